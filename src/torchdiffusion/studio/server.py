"""The studio's HTTP server (standard library only): one page and a small JSON / NDJSON API over a Pipeline.

Routes (all answers are JSON unless said otherwise):

``GET /``                      the page (``page.html``, plain HTML and JS)
``GET /api/info``              the run: samplers, grids, defaults, classes, views, 2-D data points
``POST /api/generate``         NDJSON stream: ``started`` (the job id), ``step`` lines (x_t and the x0
                               prediction) while sampling, then ``done`` (result id, NFE, seconds), ``stopped`` or
                               ``error``; ``all_classes: true`` samples ``n`` of every class, one row per class
``POST /api/compare``          NDJSON stream: two settings from the same noise, then ``done`` with both results
                               and their RMS difference
``POST /api/stop``             stop the running job (``{"job": ID}``: only that one) at its next step
``GET /api/scorefield?sigma=`` 2-D runs: the learned (and exact, where the data has an oracle) score field as a PNG
                               data URL, with ``t`` and the density-weighted relative error
``GET /results/ID.png|.npz``   a stored result, written by :func:`torchdiffusion.evaluation.viz.save_samples`

Who may ask (docs/design.md section 7): every request must name this server in ``Host`` (:func:`host_allowed`;
a DNS-rebinding page sends its own name); the API and the results refuse requests from other origins (an
``Origin`` that is not ``http://`` + ``Host``, a ``Sec-Fetch-Site`` other than ``same-origin`` / ``none``); POST
bodies must be ``application/json`` (what another site cannot send without a CORS preflight, which is refused) of
at most :data:`MAX_BODY` bytes, arriving within :data:`READ_SECONDS` (one deadline for the whole request). Every
refusal and failure is one JSON line; clients that go away cost nothing.

This file is the HTTP layer only; the model side (settings, jobs, results) is
:class:`~torchdiffusion.studio.app.Studio` in ``app.py``. Sampling runs on a worker thread, never on the request
thread; a bad value is a one-line ``error`` and the server keeps serving.
"""

from __future__ import annotations

import io
import ipaddress
import json
import socket
import sys
import threading
import time
import unicodedata
from dataclasses import replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, quote, urlparse

from torchdiffusion.studio.app import Job, Studio, StudioBusyError, _float, _one_line

LOOPBACK = ("127.0.0.1", "localhost", "::1")
WILDCARD = ("", "0.0.0.0", "::")
MAX_BODY = 64 * 1024  # bytes of a POST body (the page sends a few hundred)
READ_SECONDS = 10.0  # the whole request (line, headers, body) must arrive within this
WRITE_SECONDS = 30.0  # a client that reads nothing of an answer for this long is dropped
PAGE_PATHS = ("/", "/index.html", "/favicon.ico")


class RefusedError(Exception):
    """A request refused before any work: its HTTP status and one line for the client."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _split_host(value: str) -> tuple[str, int | None]:
    """``host[:port]`` of a ``Host`` header or an origin's authority (``[v6]:port`` too), host lowercased; the
    port is ``None`` where absent and ``-1`` where it is not a number."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and not rest.startswith(":"):
            return value, -1
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep:
            host, port_text = value, None
    if port_text is None:
        return host, None
    return host, int(port_text) if port_text.isdigit() and len(port_text) <= 5 else -1


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def host_allowed(value: str, bind_host: str, port: int) -> bool:
    """Whether a ``Host`` header ``value`` names a server bound to ``bind_host``:``port``: the right port (80 when
    absent) and the bound name, or on a loopback bind any loopback name (``127.0.0.1``, ``localhost``, ``::1``), or
    on a wildcard bind (``0.0.0.0``, ``::``) any IP literal (an address cannot be rebound by DNS) and the machine's
    own names. Any other name is what a DNS-rebinding page would send."""
    host, got = _split_host(value)
    if (80 if got is None else got) != port:
        return False
    bind_host = bind_host.strip("[]").lower()
    if bind_host in WILDCARD:
        return _is_ip(host) or host in {"localhost", socket.gethostname().lower(), socket.getfqdn().lower()}
    if is_loopback(bind_host):
        return host in {bind_host, *LOOPBACK}
    return host == bind_host


def _ascii_name(name: str) -> str:
    """An ASCII stand-in for a file name (the ``filename=`` fallback of RFC 6266)."""
    text = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    text = "".join(c if c.isalnum() or c in "._-" else "_" for c in text).strip("._")
    return text or "result"


def content_disposition(name: str) -> str:
    """``attachment`` with a plain ASCII ``filename`` and, for any other name, RFC 5987's ``filename*=UTF-8''...``
    beside an ASCII fallback (a header is Latin-1 bytes: a run folder may be named in any script)."""
    if name.isascii() and name.isprintable() and not any(c in name for c in '"\\;'):
        return f'attachment; filename="{name}"'
    return f"attachment; filename=\"{_ascii_name(name)}\"; filename*=UTF-8''{quote(name, safe='')}"


class _DeadlineReader(io.RawIOBase):
    """The connection's socket for reading, with one deadline for the whole request (request line, headers and
    body): a slow or silent client times out (``TimeoutError``) instead of holding a thread forever."""

    def __init__(self, sock: socket.socket, seconds: float):
        self.sock, self.deadline = sock, time.monotonic() + seconds

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the request did not arrive in time")
        self.sock.settimeout(left)
        try:
            return self.sock.recv_into(buf)
        finally:
            self.sock.settimeout(WRITE_SECONDS)


# --- HTTP ----------------------------------------------------------------------------------------------------
class StudioServer(ThreadingHTTPServer):
    """A threading HTTP server for one :class:`Studio` (``url`` is where it listens).

    It answers only requests addressed to itself (:meth:`host_allowed`: its own address, plus ``localhost``
    names on a loopback bind) and, on the API, only from its own page (docs/design.md section 7)."""

    daemon_threads = True
    block_on_close = False
    request_queue_size = 1024  # listen backlog: bursts of clients queue instead of being reset

    def __init__(self, studio: Studio, host: str, port: int):
        self.studio = studio
        if ":" in host:
            self.address_family = socket.AF_INET6
        super().__init__((host, port), Handler)
        self.bind_host = host.strip("[]").lower()
        self.port = int(self.server_address[1])

    @property
    def url(self) -> str:
        """``http://HOST:PORT/`` of the bound socket."""
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}/" if ":" in str(host) else f"http://{host}:{port}/"

    def host_allowed(self, value: str) -> bool:
        """Whether a ``Host`` header names this server (:func:`host_allowed`)."""
        return host_allowed(value, self.bind_host, self.port)

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

    def handle_error(self, request, client_address) -> None:
        """A client that went away or timed out is no news; anything else is one line on stderr."""
        err = sys.exc_info()[1]
        if isinstance(err, OSError):
            return
        print(f"torchdiffusion studio: {type(err).__name__}: {_one_line(err)}", file=sys.stderr, flush=True)


class Handler(BaseHTTPRequestHandler):
    """The routes of the module docstring. One request per connection (HTTP/1.0 answers, ``Connection: close``);
    every refusal or failure is one JSON line ``{"type": "error", "message": ...}``."""

    server: StudioServer
    server_version = "torchdiffusion-studio"
    timeout = WRITE_SECONDS  # the socket's default; reads run under the request's deadline instead
    read_seconds = READ_SECONDS

    def setup(self) -> None:
        super().setup()
        self.rfile.close()
        self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.read_seconds))
        self.unread = False  # a refused body still in the socket: drained before closing (no reset)

    def finish(self) -> None:
        try:
            super().finish()
            if self.unread:  # let the client read the answer: stop sending, drain its body briefly, then close
                self.connection.shutdown(socket.SHUT_WR)
                self.connection.settimeout(0.5)
                end = time.monotonic() + 1.0
                while time.monotonic() < end and self.connection.recv(65536):
                    pass
        except OSError:
            pass

    def log_message(self, format: str, *args) -> None:  # noqa: A002  (quiet: the command line prints)
        return

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own refusals (bad request line, unknown method, huge headers) as JSON."""
        self.close_connection = True
        phrase = self.responses.get(code, ("error",))[0]
        self._error(message if message and message.isascii() else phrase, code)

    # --- answers -----------------------------------------------------------------------------------------------
    def _send(self, body: bytes, ctype: str, status: int = 200, extra: dict | None = None) -> None:
        headers = {"Content-Type": ctype, "Content-Length": str(len(body)), "Cache-Control": "no-store",
                   "X-Content-Type-Options": "nosniff", "Connection": "close", **(extra or {})}
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj: dict, status: int = 200) -> None:
        self._send(json.dumps(obj).encode(), "application/json", status)

    def _error(self, message: str, status: int = 400) -> None:
        extra = {"Retry-After": "5"} if status == HTTPStatus.SERVICE_UNAVAILABLE else None
        self._send((json.dumps({"type": "error", "message": message}) + "\n").encode(), "application/x-ndjson",
                   status, extra)

    def _stream(self, job: Job) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Connection", "close")
        self.end_headers()
        try:
            for msg in job:
                self.wfile.write((json.dumps(msg) + "\n").encode())
                self.wfile.flush()
        except OSError:  # the browser went away (or stopped reading): stop the work at its next step
            job.cancelled.set()
        self.close_connection = True

    # --- what a request must be --------------------------------------------------------------------------------
    def _check(self, path: str) -> None:
        """Refuse a request not addressed to this server (DNS rebinding) or, on the API and results, one that a
        page of another origin sent (cross-site requests)."""
        host = self.headers.get("Host")
        if not host or not self.server.host_allowed(host):
            raise RefusedError(HTTPStatus.FORBIDDEN, f"this server answers only its own address ({self.server.url}),"
                                                f" not Host {host!r}")
        origin = self.headers.get("Origin")
        if origin is not None and origin.strip().lower() != "http://" + host.strip().lower():
            raise RefusedError(HTTPStatus.FORBIDDEN, f"cross-origin request from {origin!r} refused")
        site = (self.headers.get("Sec-Fetch-Site") or "").strip().lower()
        navigation = self.command == "GET" and path in PAGE_PATHS
        if site and site not in ("same-origin", "none") and not navigation:
            raise RefusedError(HTTPStatus.FORBIDDEN, f"a request from another site ({site}) is refused")

    def _body(self) -> dict:
        """The POST body: a JSON object of settings (``application/json``, at most :data:`MAX_BODY` bytes,
        arrived within the request's deadline)."""
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if ctype != "application/json":
            self.unread = True
            raise RefusedError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                          f"the body must be application/json, got {ctype or 'no Content-Type'!r}")
        if self.headers.get("Transfer-Encoding"):
            self.unread = True
            raise RefusedError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted: send Content-Length")
        text = (self.headers.get("Content-Length") or "").strip()
        if not text.isdigit():
            self.unread = True
            raise RefusedError(HTTPStatus.LENGTH_REQUIRED if not text else HTTPStatus.BAD_REQUEST,
                          f"Content-Length must be a whole number of bytes, got {text!r}")
        length = int(text)
        if length > MAX_BODY:
            self.unread = True
            raise RefusedError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                          f"the request body is {length} bytes; at most {MAX_BODY} are accepted")
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise RefusedError(HTTPStatus.REQUEST_TIMEOUT,
                          f"the request body did not arrive within {self.read_seconds:g} s") from None
        if len(data) < length:
            raise RefusedError(HTTPStatus.BAD_REQUEST, f"the request body ended after {len(data)} of {length} bytes")
        try:
            body = json.loads(data or b"{}")
        except RecursionError:
            raise RefusedError(HTTPStatus.BAD_REQUEST, "the request JSON is nested too deeply") from None
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            raise RefusedError(HTTPStatus.BAD_REQUEST, "the request is not JSON") from None
        if not isinstance(body, dict):
            raise RefusedError(HTTPStatus.BAD_REQUEST, "the request must be a JSON object")
        bad = [k for k, v in body.items() if v is not None and not isinstance(v, (str, int, float, bool))]
        if bad:
            raise RefusedError(HTTPStatus.BAD_REQUEST, f"setting {bad[0]!r} must be a string or a number")
        return body

    # --- routes ------------------------------------------------------------------------------------------------
    def do_GET(self) -> None:
        """The page, the run's description, the score field and stored results."""
        studio = self.server.studio
        url = urlparse(self.path)
        try:
            self._check(url.path)
            if url.path in ("/", "/index.html"):
                page = files("torchdiffusion.studio").joinpath("page.html").read_bytes()
                self._send(page, "text/html; charset=utf-8", extra={  # never inside another site's frame
                    "Content-Security-Policy": "frame-ancestors 'none'", "X-Frame-Options": "DENY"})
            elif url.path == "/api/info":
                self._json(studio.info())
            elif url.path == "/api/scorefield":
                sigma = _float(parse_qs(url.query).get("sigma", [""])[0], "sigma")
                studio.acquire()
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
                self._send(path.read_bytes(), ctype,
                           extra={"Content-Disposition": content_disposition(f"{studio.name}-{path.name}")})
            elif url.path == "/favicon.ico":
                self._send(b"", "image/x-icon", HTTPStatus.NO_CONTENT)
            else:
                self._error(f"no page {url.path}", HTTPStatus.NOT_FOUND)
        except OSError:  # the browser went away
            self.close_connection = True
        except Exception as e:  # noqa: BLE001  (one line for the page; the server keeps serving)
            self._fail(e)

    def do_POST(self) -> None:
        """Start a generate or compare job and stream its messages."""
        studio = self.server.studio
        path = urlparse(self.path).path
        try:
            self._check(path)
            if path not in ("/api/generate", "/api/compare", "/api/stop"):
                self.unread = True
                raise RefusedError(HTTPStatus.NOT_FOUND, f"no route {path}")
            body = self._body()
            if path == "/api/stop":
                job_id = body.get("job")
                stopped = studio.stop(None if job_id in (None, "") else str(job_id))
                self._json({"type": "stopping" if stopped else "idle", "job": stopped})
                return
            if path == "/api/generate":
                s = studio.parse(body)
                job = studio.start(lambda job: studio.run_generate(s, job))
            else:
                a = studio.parse(body)
                b = replace(a, **{k: v for k, v in vars(studio.parse(body, prefix="b_")).items()
                                  if k in ("sampler", "grid", "steps", "options")})
                job = studio.start(lambda job: studio.run_compare(a, b, job))
        except OSError:  # the client went away mid-request
            self.close_connection = True
            return
        except Exception as e:  # noqa: BLE001  (one line for the page; the server keeps serving)
            self._fail(e)
            return
        self._stream(job)

    def _fail(self, e: BaseException) -> None:
        """One JSON line for a refusal, a bad value, a busy model or an unexpected failure."""
        self.close_connection = True
        try:
            if isinstance(e, RefusedError):
                self._error(str(e), e.status)
            elif isinstance(e, StudioBusyError):
                self._error(_one_line(e), HTTPStatus.SERVICE_UNAVAILABLE)
            elif isinstance(e, (ValueError, TypeError, RuntimeError, KeyError)):
                self._error(_one_line(e))
            else:
                self._error(f"{type(e).__name__}: {_one_line(e)}", HTTPStatus.INTERNAL_SERVER_ERROR)
        except OSError:
            pass


def make_server(run: str | Path, host: str = "127.0.0.1", port: int = 0, *, ema: bool = True,
                device: str = "cpu", threads: int | None = None) -> StudioServer:
    """A :class:`StudioServer` for the run folder ``run`` (``threads``: torch's threads while sampling, as
    :class:`~torchdiffusion.Pipeline`'s; None: the run's ``sample.threads``)."""
    return StudioServer(Studio.from_run(run, ema=ema, device=device, threads=threads), host, port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (the default); anything else is reachable from outside."""
    return host in LOOPBACK or host.startswith("127.")

