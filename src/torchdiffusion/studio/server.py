"""The studio's HTTP server (standard library only): one page and a small JSON / NDJSON API over a Pipeline.

Routes (all answers are JSON unless said otherwise):

``GET /``                      the page (``page.html``, plain HTML and JS)
``GET /api/info``              the run: samplers, grids, defaults, classes, views, 2-D data points
``POST /api/generate``         NDJSON stream: ``step`` lines (x_t and the x0 prediction) while sampling, then
                               ``done`` (result id, NFE, seconds) or ``error``
``POST /api/compare``          NDJSON stream: two settings from the same noise, then ``done`` with both results
                               and their RMS difference
``GET /api/scorefield?sigma=`` 2-D runs: the learned (and exact, where the data has an oracle) score field as a PNG
                               data URL, with ``t`` and the density-weighted relative error
``GET /results/ID.png|.npz``   a stored result, written by :func:`torchdiffusion.evaluation.viz.save_samples`

This file is the HTTP layer only; the model side (settings, jobs, results) is
:class:`~torchdiffusion.studio.app.Studio` in ``app.py``. Sampling runs on a worker thread, never on the request
thread; a bad value is a one-line ``error`` and the server keeps serving.
"""

from __future__ import annotations

import json
import socket
import threading
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from torchdiffusion.studio import app
from torchdiffusion.studio.app import Job, Studio, StudioError, _float, _one_line

LOOPBACK = ("127.0.0.1", "localhost", "::1")


# --- HTTP ----------------------------------------------------------------------------------------------------
class StudioServer(ThreadingHTTPServer):
    """A threading HTTP server for one :class:`Studio` (``url`` is where it listens)."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, studio: Studio, host: str, port: int):
        self.studio = studio
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` of the bound socket."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"

    def start_background(self) -> threading.Thread:
        """Serve on a daemon thread (for tests and notebooks); stop with :meth:`stop`."""
        th = threading.Thread(target=self.serve_forever, name="studio-server", daemon=True)
        th.start()
        return th

    def stop(self) -> None:
        """Stop serving, close the socket and remove the stored results."""
        self.shutdown()
        self.server_close()
        self.studio.close()


class Handler(BaseHTTPRequestHandler):
    """The routes of the module docstring."""

    server: StudioServer
    server_version = "torchdiffusion-studio"

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (quiet: the command line prints)
        return

    # --- answers -----------------------------------------------------------------------------------------------
    def _send(self, body: bytes, ctype: str, status: int = 200, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, obj: dict, status: int = 200) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _error(self, message: str, status: int = 400) -> None:
        self._send((json.dumps({"type": "error", "message": message}) + "\n").encode(), "application/x-ndjson",
                   status)

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for msg in job:
                self.wfile.write((json.dumps(msg) + "\n").encode())
                self.wfile.flush()
        except OSError:  # the browser went away: stop the work at its next step
            job.cancelled.set()
        self.close_connection = True

    def _body(self) -> dict:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1_000_000:
            raise StudioError("request too large")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError:
            raise StudioError("the request is not JSON") from None
        if not isinstance(body, dict):
            raise StudioError("the request must be a JSON object")
        return body

    # --- routes ------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        """The page, the run's description, the score field and stored results."""
        studio = self.server.studio
        url = urlparse(self.path)
        try:
            if url.path in ("/", "/index.html"):
                page = files("torchdiffusion.studio").joinpath("page.html").read_bytes()
                self._send(page, "text/html; charset=utf-8")
            elif url.path == "/api/info":
                self._json(studio.info())
            elif url.path == "/api/scorefield":
                sigma = _float(parse_qs(url.query).get("sigma", [""])[0], "sigma")
                if not studio.lock.acquire(timeout=app.WAIT_SECONDS):
                    raise StudioError("the model is busy with another request; try again when it finishes")
                try:
                    self._json(studio.scorefield(sigma))
                finally:
                    studio.lock.release()
            elif url.path.startswith("/results/"):
                path = studio.result_file(url.path.removeprefix("/results/"))
                if path is None or not path.exists():
                    self._error("no such result (results are kept for the last 32 runs)", HTTPStatus.NOT_FOUND)
                    return
                ctype = "image/png" if path.suffix == ".png" else "application/octet-stream"
                self._send(path.read_bytes(), ctype, extra={
                    "Content-Disposition": f'attachment; filename="{studio.name}-{path.name}"'})
            elif url.path == "/favicon.ico":
                self._send(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
            else:
                self._error(f"no page {url.path}", HTTPStatus.NOT_FOUND)
        except (ValueError, TypeError, RuntimeError, KeyError) as e:
            self._error(_one_line(e))
        except OSError:  # the browser went away
            pass
        except Exception as e:  # noqa: BLE001  (one line for the page; the server keeps serving)
            self._error(f"{type(e).__name__}: {_one_line(e)}", HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_POST(self) -> None:
        """Start a generate or compare job and stream its messages."""
        studio = self.server.studio
        path = urlparse(self.path).path
        try:
            body = self._body()
            if path == "/api/generate":
                s = studio.parse(body)
                job = studio.start(lambda job: studio.run_generate(s, job))
            elif path == "/api/compare":
                a = studio.parse(body)
                b = replace(a, **{k: v for k, v in vars(studio.parse(body, prefix="b_")).items()
                                  if k in ("sampler", "grid", "steps")})
                job = studio.start(lambda job: studio.run_compare(a, b, job))
            else:
                self._error(f"no route {path}", HTTPStatus.NOT_FOUND)
                return
        except (ValueError, TypeError, KeyError) as e:
            self._error(_one_line(e))
            return
        self._stream(job)


def make_server(run: str | Path, host: str = "127.0.0.1", port: int = 0, *, ema: bool = True,
                device: str = "cpu") -> StudioServer:
    return StudioServer(Studio.from_run(run, ema=ema, device=device), host, port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (the default); anything else is reachable from outside."""
    return host in LOOPBACK or host.startswith("127.")

