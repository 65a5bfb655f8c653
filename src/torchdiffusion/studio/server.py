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

Sampling runs on a worker thread, never on the request thread; one job at a time per model (a lock, waited
for up to :data:`WAIT_SECONDS`); a bad value is a one-line ``error`` and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import math
import queue
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import torch
from torch import Tensor

from torchdiffusion import samplers
from torchdiffusion.data.datasets import TOYS, toy_density
from torchdiffusion.evaluation.scorefield import score_field
from torchdiffusion.evaluation.viz import grid_array, save_samples, save_score_field
from torchdiffusion.parameterization import guidance as G
from torchdiffusion.runs.latent import dataset_from_config, to_images
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.samplers import grids

WAIT_SECONDS = 30.0  # how long a request waits for the model while another one runs
FRAME_SECONDS = 0.04  # at most ~25 reverse-process pictures a second are streamed (every step's counter is)
MAX_STEPS = 2000
MAX_N_IMAGES, MAX_N_POINTS = 256, 5000
FRAME_IMAGES, FRAME_POINTS, DATA_POINTS = 16, 1000, 2000
KEEP_RESULTS = 32
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class StudioError(ValueError):
    """A bad request value or a busy model: shown to the user as one line."""


class JobCancelledError(Exception):
    """The browser went away while its job was running."""


# --- settings ------------------------------------------------------------------------------------------------
def _int(value, name: str, lo: int, hi: int) -> int:
    text = str(value).strip()
    try:
        v = int(text)
    except ValueError:
        raise StudioError(f"{name} must be a whole number, got {text!r}") from None
    if not lo <= v <= hi:
        raise StudioError(f"{name} must be in {lo}..{hi}, got {v}")
    return v


def _float(value, name: str) -> float:
    text = str(value).strip()
    try:
        v = float(text)
    except ValueError:
        raise StudioError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise StudioError(f"{name} must be a finite number, got {text!r}")
    return v


@dataclass(frozen=True)
class Settings:
    """One request's sampling settings, checked (``grid`` ``None`` = the run's own; ``klass`` ``None`` =
    unconditional; ``view`` ``None`` = no anagram)."""

    sampler: str
    grid: str | None
    steps: int
    seed: int
    n: int
    klass: int | None = None
    guidance: float = 0.0
    view: str | None = None
    class2: int | None = None

    def label(self) -> str:
        """A short description (``ddim, grid logsnr, 10 steps``)."""
        return f"{self.sampler}, grid {self.grid or 'default'}, {self.steps} steps"


# --- the model and its jobs ----------------------------------------------------------------------------------
class CountingModel:
    """A model that counts its network calls (the NFE of one job: a guided call is one batched call)."""

    def __init__(self, model):
        self.model, self.process, self.net, self.calls = model, model.process, model.net, 0

    def predict(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        """The wrapped model's prediction, counted."""
        self.calls += 1
        return self.model.predict(x, t) if cond is None else self.model.predict(x, t, cond)


class Job:
    """Messages from a worker thread to the request that started it (``None`` ends the stream)."""

    def __init__(self):
        self.messages: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()

    def put(self, msg: dict) -> None:
        """Send one message to the browser (or stop the work if the browser went away)."""
        if self.cancelled.is_set():
            raise JobCancelledError()
        self.messages.put(msg)

    def __iter__(self) -> Iterator[dict]:
        while (msg := self.messages.get()) is not None:
            yield msg


def _png_data_url(arr: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Studio:
    """A loaded run and what the page can ask of it; :meth:`serve` makes the HTTP server."""

    def __init__(self, pipe: Pipeline, name: str = "run"):
        self.name, self.denoiser, self.config = name, pipe.model, pipe.config
        self.counter = CountingModel(pipe.model)
        self.pipe = Pipeline(self.counter, pipe.config)
        info = self.config["run"]
        self.info_run = info
        self.num_classes = info.get("num_classes") or None
        self.latent = bool(info.get("latent"))
        self.image_shape = tuple(info["latent"]["image_shape"] if self.latent else info["data_shape"])
        self.value_range = tuple(info["latent"].get("value_range", (-1, 1)) if self.latent
                                 else info.get("value_range", (-1, 1)))
        self.is_image = len(self.image_shape) == 3
        self.is_2d = self.image_shape == (2,)
        self.data: Tensor | None = None
        self.density = None
        if self.is_2d:
            self.data = dataset_from_config(self.config["data"]).x[:DATA_POINTS].float()
            name_ = self.config["data"].get("name")
            self.density = toy_density(name_) if name_ in TOYS else None
            self.lim = max(1.0, round(float(self.data.abs().quantile(0.995)) * 1.15, 1))
        self.lock = threading.Lock()
        self.tmp = tempfile.TemporaryDirectory(prefix="torchdiffusion-studio-")
        self.results: OrderedDict[str, dict] = OrderedDict()
        self._next_id = 0

    @classmethod
    def from_run(cls, run: str | Path, *, ema: bool = True, device: str = "cpu") -> Studio:
        """Load a run folder (refused with one line unless it is a diffusion or latent run)."""
        return cls(Pipeline.from_pretrained(run, ema=ema, device=device), name=Path(run).name)

    def close(self) -> None:
        """Remove the stored results."""
        self.tmp.cleanup()

    # --- what the page shows --------------------------------------------------------------------------------
    def defaults(self) -> Settings:
        """The run's own sampling settings (``sample`` section of its config)."""
        s = self.config.get("sample", {})
        n = int(s.get("n", 64)) if self.is_image else 1000
        return Settings(sampler=s.get("sampler", "ddim"), grid=s.get("grid"), steps=int(s.get("steps", 50)),
                        seed=0, n=min(n, MAX_N_IMAGES if self.is_image else MAX_N_POINTS),
                        klass=0 if self.num_classes else None, guidance=float(s.get("guidance", 0.0) or 0.0))

    def info(self) -> dict:
        """The page's description of the run."""
        d = self.defaults()
        views = [v for v in G.VIEWS if v != "identity"] if self.anagrams() else []
        out = {"name": self.name, "kind": "latent" if self.latent else "diffusion",
               "process": self.denoiser.process.name, "data": str(self.config["data"].get("name")),
               "data_shape": list(self.image_shape), "image": self.is_image, "two_d": self.is_2d,
               "num_classes": self.num_classes, "samplers": samplers.names(), "grids": grids.names(),
               "views": views, "max_n": MAX_N_IMAGES if self.is_image else MAX_N_POINTS, "max_steps": MAX_STEPS,
               "defaults": {"sampler": d.sampler, "grid": d.grid or "", "steps": d.steps, "seed": d.seed, "n": d.n,
                            "class": d.klass, "guidance": d.guidance}}
        if self.is_2d:
            out["data_points"] = self.data[:FRAME_POINTS].round(decimals=3).tolist()
            out["lim"] = self.lim
            out["scorefield"] = {"exact": self.density is not None and hasattr(self.density, "score"),
                                 "density": self.density is not None}
        return out

    def anagrams(self) -> bool:
        """Whether the page offers visual anagrams (class-conditional pixel-space image runs)."""
        return bool(self.num_classes) and self.is_image and not self.latent

    def parse(self, body: dict, prefix: str = "") -> Settings:
        """Settings from the page's values (strings as typed); a bad one is a one-line :class:`StudioError`."""
        def get(key: str, default=""):
            v = body.get(prefix + key, body.get(key, default))
            return "" if v is None else v

        sampler = str(get("sampler")).strip()
        if sampler not in samplers.names():
            raise StudioError(f"unknown sampler {sampler!r}; allowed: {', '.join(samplers.names())}")
        grid = str(get("grid")).strip() or None
        if grid is not None and grid not in grids.names():
            raise StudioError(f"unknown grid {grid!r}; allowed: {', '.join(grids.names())}")
        steps = _int(get("steps"), "steps", 1, MAX_STEPS)
        seed = _int(get("seed"), "seed", 0, 2**63 - 1)
        n = _int(get("n"), "n", 1, MAX_N_IMAGES if self.is_image else MAX_N_POINTS)
        klass = guidance = view = class2 = None
        if self.num_classes:
            text = str(get("class")).strip()
            klass = None if text == "" else _int(text, "class", 0, self.num_classes - 1)
            guidance = _float(get("guidance", "0") or "0", "guidance")
            if guidance and klass is None:
                raise StudioError("guidance needs a class")
            view = str(get("view")).strip() or None
            if view is not None:
                if not self.anagrams():
                    raise StudioError("anagram views need a class-conditional image run in pixel space")
                if view not in G.VIEWS or view == "identity":
                    raise StudioError(f"unknown view {view!r}; allowed: {', '.join(self.info()['views'])}")
                if klass is None:
                    raise StudioError("an anagram view needs a class (and a second class for the view)")
                class2 = _int(get("class2"), "class 2", 0, self.num_classes - 1)
        return Settings(sampler, grid, steps, seed, n, klass, guidance or 0.0, view, class2)

    # --- sampling -------------------------------------------------------------------------------------------
    def sample(self, s: Settings, callback: Callable[[dict], None] | None = None) -> tuple[Tensor, int, float]:
        """Samples (images or points in the data's range), the NFE and the seconds of one setting."""
        gen = torch.Generator().manual_seed(s.seed)
        self.counter.calls = 0
        t0 = time.perf_counter()
        if s.view is None:
            x = self.pipe(s.n, sampler=s.sampler, steps=s.steps, grid=s.grid, class_labels=s.klass,
                          guidance=s.guidance, generator=gen, callback=callback)
        else:  # a visual anagram: looks like class as it is, like class2 under the view
            model = G.CFG(self.counter, s.guidance) if s.guidance else self.counter
            model = G.MultiView(model, ["identity", s.view], conds=[s.klass, s.class2],
                                shape=tuple(self.info_run["data_shape"]))
            x = self.pipe.generate(model, s.n, sampler=s.sampler, steps=s.steps, grid=s.grid, generator=gen,
                                   callback=callback)
        return x, self.counter.calls, time.perf_counter() - t0

    def picture_title(self, s: Settings) -> str:
        """The title of a 2-D scatter (as the ``sample`` command writes it)."""
        return f"{s.sampler}, {s.steps} NFE"

    def store(self, x: Tensor, s: Settings) -> str:
        """Write the samples as .png and .npz with the viz writers; their id."""
        self._next_id += 1
        rid = f"r{self._next_id}"
        folder = Path(self.tmp.name)
        png = folder / f"{rid}.png"
        if s.view is not None:  # each sample as it is and under the view, side by side
            pairs = torch.stack([x, G.get_view(s.view).forward(x)], 1).flatten(0, 1)
            save_samples(pairs, png, nrow=2 * min(len(x), 8), value_range=self.value_range)
        else:
            save_samples(x, png, data=self.data, value_range=self.value_range, title=self.picture_title(s))
        save_samples(x, folder / f"{rid}.npz")
        self.results[rid] = {"png": png, "npz": folder / f"{rid}.npz"}
        while len(self.results) > KEEP_RESULTS:
            _, old = self.results.popitem(last=False)
            for p in old.values():
                p.unlink(missing_ok=True)
        return rid

    def result_file(self, name: str) -> Path | None:
        """The stored file ``ID.png`` or ``ID.npz`` (``None`` if unknown or dropped)."""
        rid, _, ext = name.partition(".")
        entry = self.results.get(rid)
        return entry.get(ext) if entry else None

    def frame(self, d: dict) -> dict:
        """One reverse-process step as the page draws it: image grids or 2-D points of x_t and x0."""
        out = {}
        for key in ("x", "x0"):
            v = d.get(key)
            if v is None:
                continue
            if self.is_2d:
                out[key] = v[:FRAME_POINTS].detach().float().cpu().round(decimals=3).tolist()
            elif self.is_image:
                imgs = to_images(v[:FRAME_IMAGES].detach().float().cpu(), self.info_run)[0]
                out[key] = _png_data_url(grid_array(imgs, value_range=self.value_range))
        return out

    def stepper(self, job: Job, which: str = "") -> Callable[[dict], None]:
        """A sampler callback streaming every step's counter and, at most every :data:`FRAME_SECONDS`, its
        pictures; call it with ``None`` after sampling to send the last step's pictures if they were skipped."""
        last = {"time": 0.0, "d": None, "sent": True}

        def cb(d: dict | None) -> None:
            if d is None:
                if not last["sent"] and last["d"] is not None:
                    job.put({"type": "step", "which": which, **last["d"], **self.frame(last["raw"])})
                return
            msg = {"i": int(d.get("i", 0)) + 1, "t": float(d["t"]) if "t" in d else None}
            now = time.perf_counter()
            if now - last["time"] >= FRAME_SECONDS:
                last["time"], last["sent"] = now, True
                job.put({"type": "step", "which": which, **msg, **self.frame(d)})
            else:
                last["sent"] = False
                job.put({"type": "step", "which": which, **msg})
            last["d"], last["raw"] = msg, {"x": d.get("x"), "x0": d.get("x0")}
        return cb

    def run_generate(self, s: Settings, job: Job) -> None:
        """The Generate job: stream the reverse process, store the samples, report NFE and seconds."""
        cb = self.stepper(job)
        x, nfe, seconds = self.sample(s, cb)
        cb(None)
        rid = self.store(x, s)
        job.put({"type": "done", "id": rid, "png": f"/results/{rid}.png", "npz": f"/results/{rid}.npz",
                 "nfe": nfe, "seconds": round(seconds, 3), "label": s.label(), "n": len(x)})

    def run_compare(self, a: Settings, b: Settings, job: Job) -> None:
        """The Compare job: both settings from the same noise (same seed), and the RMS difference."""
        out = {}
        for which, s in (("a", a), ("b", b)):
            cb = self.stepper(job, which)
            x, nfe, seconds = self.sample(s, cb)
            cb(None)
            rid = self.store(x, s)
            out[which] = {"x": x, "id": rid, "png": f"/results/{rid}.png", "npz": f"/results/{rid}.npz", "nfe": nfe,
                          "seconds": round(seconds, 3), "label": s.label()}
        rms = float((out["a"].pop("x") - out["b"].pop("x")).double().pow(2).mean().sqrt())
        job.put({"type": "done", "a": out["a"], "b": out["b"], "rms": rms})

    def scorefield(self, sigma: float) -> dict:
        """The learned (and exact) score field at noise level ``sigma`` as a PNG data URL, ``t`` and the
        density-weighted relative error (``None`` without an oracle)."""
        if not self.is_2d:
            raise StudioError("the score field is for 2-D runs")
        if not sigma > 0:
            raise StudioError(f"sigma must be > 0, got {sigma:g}")
        t, learned, exact, log_density, err = score_field(self.denoiser, self.density, sigma, self.lim)
        fields = {"learned": learned} if exact is None else {"learned": learned, "exact": exact}
        path = Path(self.tmp.name) / "scorefield.png"
        save_score_field(fields, path, log_density=log_density, lim=self.lim, n=21,
                         title=f"score at sigma={sigma:.3g} (t={t:.3g})")
        url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
        return {"png": url, "t": t, "sigma": sigma, "error": err}

    def start(self, work: Callable[[Job], None]) -> Job:
        """Run ``work`` on a worker thread once the model is free (one job at a time); its messages end with
        ``done`` or one ``error`` line."""
        if not self.lock.acquire(timeout=WAIT_SECONDS):
            raise StudioError("the model is busy with another request; try again when it finishes")
        job = Job()

        def main() -> None:
            final = None
            try:
                work(job)
            except JobCancelledError:
                pass
            except (ValueError, TypeError, RuntimeError, KeyError) as e:
                final = {"type": "error", "message": _one_line(e)}
            except Exception as e:  # noqa: BLE001  (shown to the user, the server keeps serving)
                final = {"type": "error", "message": f"{type(e).__name__}: {_one_line(e)}"}
            finally:
                self.lock.release()  # before the last message: the page's next request finds the model free
                if final is not None:
                    job.messages.put(final)
                job.messages.put(None)

        threading.Thread(target=main, name="studio-worker", daemon=True).start()
        return job

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> StudioServer:
        """A bound (not yet serving) HTTP server for this studio."""
        return StudioServer(self, host, port)


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
                if not studio.lock.acquire(timeout=WAIT_SECONDS):
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
    """Load ``run`` and bind a studio server on ``host:port`` (port 0: a free one); call ``serve_forever``."""
    return Studio.from_run(run, ema=ema, device=device).serve(host, port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine only (the default); anything else is reachable from outside."""
    return host in LOOPBACK or host.startswith("127.")
