"""The studio's model side: settings parsed from the page, sampling on a worker thread, stored results.

:class:`Studio` holds a loaded :class:`torchdiffusion.Pipeline`; the HTTP layer in ``server.py`` turns requests
into calls of its methods. One job at a time per model (a lock, waited for up to :data:`WAIT_SECONDS`); a bad
value is a one-line error (:class:`StudioError`).
"""


from __future__ import annotations

import base64
import inspect
import io
import itertools
import math
import queue
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

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
MAX_WAITING = 16  # requests queued for the model at once; more are refused at once (StudioBusyError)


class StudioError(ValueError):
    """A bad request value or a busy model: shown to the user as one line."""


class StudioBusyError(StudioError):
    """The model is taken and the queue for it is full or did not move in time (HTTP 503)."""


class JobCancelledError(Exception):
    """The job was stopped (the Stop button) or the browser went away while it was running."""


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


def _flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false", "1", "0"):
        raise StudioError(f"{name} must be true or false, got {text!r}")
    return text in ("true", "1")


MAX_PROMPT = 1000  # characters of a prompt (the tokenizer keeps its max_length tokens of it)


def _prompt(value, name: str) -> str:
    """A prompt as typed: text of at most :data:`MAX_PROMPT` characters (surrounding spaces removed)."""
    if not isinstance(value, str):
        raise StudioError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT:
        raise StudioError(f"{name} has {len(value)} characters; at most {MAX_PROMPT}")
    return value.strip()


def _float(value, name: str) -> float:
    text = str(value).strip()
    try:
        v = float(text)
    except ValueError:
        raise StudioError(f"{name} must be a number, got {text!r}") from None
    if not math.isfinite(v):
        raise StudioError(f"{name} must be a finite number, got {text!r}")
    return v


def sampler_options() -> dict[str, list[dict]]:
    """The options the page offers for each registered sampler: its keyword-only arguments (as
    :func:`torchdiffusion.samplers.check_options` reads them) whose defaults are numbers or flags, with their
    defaults and kinds (``float``, ``int``, ``bool``)."""
    out = {}
    for name in samplers.names():
        params = inspect.signature(samplers.get(name).fn).parameters
        opts = []
        for key, p in params.items():
            if p.kind != p.KEYWORD_ONLY or key in ("generator", "callback"):
                continue
            d = p.default
            kind = "bool" if isinstance(d, bool) else "int" if isinstance(d, int) else \
                "float" if isinstance(d, float) else None
            if kind is not None:
                opts.append({"name": key, "default": d, "type": kind})
        out[name] = opts
    return out


@dataclass(frozen=True)
class Settings:
    """One request's sampling settings, checked (``grid`` ``None`` = the run's own; ``klass`` ``None`` =
    unconditional; ``view`` ``None`` = no anagram; ``options`` the sampler's options that differ from its defaults;
    ``all_classes``: ``n`` samples of every class, one row per class)."""

    sampler: str
    grid: str | None
    steps: int
    seed: int
    n: int
    klass: int | None = None
    guidance: float = 0.0
    view: str | None = None
    class2: int | None = None
    options: tuple[tuple[str, object], ...] = ()
    all_classes: bool = False
    prompt: str | None = None  # text runs: "" = unconditional
    negative_prompt: str | None = None

    def label(self, default_grid: str = "") -> str:
        """A short description (``ddim eta=1, grid default (logsnr), 10 steps``); ``default_grid`` names what
        "default" was."""
        opts = "".join(f" {k}={'true' if v is True else 'false' if v is False else f'{v:g}'}"
                       for k, v in self.options)
        grid = self.grid or (f"default ({default_grid})" if default_grid else "default")
        return f"{self.sampler}{opts}, grid {grid}, {self.steps} steps"


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
    """Messages from a worker thread to the request that started it (``None`` ends the stream). ``cancelled``
    stops the work at its next step: set by :meth:`Studio.stop` (``stopped``) or when the browser went away."""

    _ids = itertools.count(1)

    def __init__(self):
        self.id = f"j{next(Job._ids)}"
        self.messages: queue.Queue = queue.Queue()
        self.cancelled = threading.Event()
        self.stopped = False
        self.step = 0  # the last step reached

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
        # the run's Pipeline settings carried over: sampling threads (sample.threads, shared with the CLI), the
        # folder of stored fits, a text run's tokenizer, the compile / channels-last switches (nets/fast.py)
        self.pipe = Pipeline(self.counter, pipe.config, threads=pipe.threads, path=pipe.path,
                             tokenizer=pipe.tokenizer, **pipe.switches)
        self.text = pipe.tokenizer is not None  # a text-conditioned run: a prompt box instead of the class
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
        self.default_grid = self.config.get("sample", {}).get("grid") or grids.default_for(self.denoiser.process)
        # classifier-free guidance training (label dropout) is what makes the unconditional model exist
        self.unconditional = bool(self.num_classes) and float(self.config.get("loss", {}).get("p_uncond", 0) or 0) > 0
        self.lock = threading.Lock()
        self._queue = threading.Lock()
        self.waiting = 0  # requests waiting for ``lock``
        self.current: Job | None = None  # the job holding the model
        self.tmp = tempfile.TemporaryDirectory(prefix="torchdiffusion-studio-")
        self.results: OrderedDict[str, dict] = OrderedDict()
        self._next_id = 0

    @classmethod
    def from_run(cls, run: str | Path, *, ema: bool = True, device: str = "cpu",
                 threads: int | None = None) -> Studio:
        """Load a run folder (refused with one line unless it is a diffusion or latent run)."""
        return cls(Pipeline.from_pretrained(run, ema=ema, device=device, threads=threads), name=Path(run).name)

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
                        klass=0 if self.num_classes and not self.unconditional else None,
                        guidance=float(s.get("guidance", 0.0) or 0.0))

    def info(self) -> dict:
        """The page's description of the run."""
        d = self.defaults()
        views = [v for v in G.VIEWS if v != "identity"] if self.anagrams() else []
        out = {"name": self.name, "kind": "latent" if self.latent else "diffusion",
               "process": self.denoiser.process.name, "data": str(self.config["data"].get("name")),
               "data_shape": list(self.image_shape), "image": self.is_image, "two_d": self.is_2d,
               "num_classes": self.num_classes, "unconditional": self.unconditional, "text": self.text,
               "samplers": samplers.names(), "sampler_options": sampler_options(), "grids": grids.names(),
               "default_grid": self.default_grid, "fits": self.fits(), "views": views, "keep_results": KEEP_RESULTS,
               "max_n": MAX_N_IMAGES if self.is_image else MAX_N_POINTS, "max_steps": MAX_STEPS,
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
        options = self.parse_options(sampler, {k.removeprefix(prefix + "opt_"): v for k, v in body.items()
                                               if k.startswith(prefix + "opt_")})
        grid = str(get("grid")).strip() or None
        if grid is not None and grid not in grids.names():
            raise StudioError(f"unknown grid {grid!r}; allowed: {', '.join(grids.names())}")
        steps = _int(get("steps"), "steps", 1, MAX_STEPS)
        seed = _int(get("seed"), "seed", 0, 2**63 - 1)
        max_n = MAX_N_IMAGES if self.is_image else MAX_N_POINTS
        all_classes = _flag(body.get("all_classes", False), "all_classes")
        if all_classes:
            if not self.num_classes:
                raise StudioError("an all-classes grid needs a class-conditional run")
            max_n = max(1, max_n // self.num_classes)
        n = _int(get("n"), "samples per class" if all_classes else "n", 1, max_n)
        klass = guidance = view = class2 = None
        if self.num_classes:
            text = str(get("class")).strip()
            klass = None if text == "" else _int(text, "class", 0, self.num_classes - 1)
            guidance = _float(get("guidance", "0") or "0", "guidance")
            if klass is None and not all_classes and not self.unconditional:
                raise StudioError("this run has no unconditional model (trained with loss.p_uncond = 0): "
                                  f"choose a class in 0..{self.num_classes - 1}")
            if guidance and not self.unconditional:
                raise StudioError("guidance needs the unconditional model, and this run was trained without one "
                                  "(loss.p_uncond = 0)")
            if guidance and klass is None and not all_classes:
                raise StudioError("guidance needs a class")
            view = str(get("view")).strip() or None
            if view is not None:
                if not self.anagrams():
                    raise StudioError("anagram views need a class-conditional image run in pixel space")
                if view not in G.VIEWS or view == "identity":
                    raise StudioError(f"unknown view {view!r}; allowed: {', '.join(self.info()['views'])}")
                if all_classes:
                    raise StudioError("an all-classes grid and an anagram view do not mix: choose view none")
                if klass is None:
                    raise StudioError("an anagram view needs a class (and a second class for the view)")
                class2 = _int(get("class2"), "class 2", 0, self.num_classes - 1)
        if all_classes:
            klass = None
        prompt = negative = None
        if self.text:  # text prompts (issue 30): "" = the unconditional model; a negative prompt needs guidance
            prompt, negative = _prompt(get("prompt"), "prompt"), _prompt(get("negative_prompt"), "negative prompt")
            guidance = _float(get("guidance", "0") or "0", "guidance")
            if negative and not guidance:
                raise StudioError("a negative prompt needs guidance > 0 (it replaces the unconditional half of "
                                  "classifier-free guidance)")
        return Settings(sampler, grid, steps, seed, n, klass, guidance or 0.0, view, class2, options, all_classes,
                        prompt, negative or None)

    def parse_options(self, sampler: str, values: dict) -> tuple[tuple[str, object], ...]:
        """The sampler options of a request (``opt_NAME`` keys, strings as typed; empty = the default), checked
        against :func:`sampler_options`; those equal to their defaults are left out."""
        offered = {o["name"]: o for o in sampler_options()[sampler]}
        bad = sorted(set(values) - set(offered))
        if bad:
            raise StudioError(f"sampler {sampler!r} has no option {bad[0]!r}; allowed: "
                              f"{', '.join(offered) or 'none'}")
        out = []
        for name, o in offered.items():
            v = values.get(name)
            if v is None or str(v).strip() == "":
                continue
            v = (_flag(v, name) if o["type"] == "bool" else _int(v, name, 0, 1000) if o["type"] == "int"
                 else _float(v, name))
            if v != o["default"]:
                out.append((name, v))
        return tuple(out)

    # --- sampling -------------------------------------------------------------------------------------------
    def sample(self, s: Settings, callback: Callable[[dict], None] | None = None) -> tuple[Tensor, int, float]:
        """Samples (images or points in the data's range), the NFE and the seconds of one setting."""
        gen = torch.Generator().manual_seed(s.seed)
        self.counter.calls = 0
        t0 = time.perf_counter()
        opts = dict(s.options)
        if s.all_classes:  # one row of s.n samples per class
            labels = torch.arange(self.num_classes).repeat_interleave(s.n)
            x = self.pipe(len(labels), sampler=s.sampler, steps=s.steps, grid=s.grid, class_labels=labels,
                          guidance=s.guidance, generator=gen, callback=callback, progress=False, **opts)
        elif s.view is None:
            x = self.pipe(s.n, sampler=s.sampler, steps=s.steps, grid=s.grid, class_labels=s.klass,
                          guidance=s.guidance, generator=gen, callback=callback, prompt=s.prompt,
                          negative_prompt=s.negative_prompt, progress=False, **opts)
        else:  # a visual anagram: looks like class as it is, like class2 under the view
            model = G.CFG(self.counter, s.guidance) if s.guidance else self.counter
            model = G.MultiView(model, ["identity", s.view], conds=[s.klass, s.class2],
                                shape=tuple(self.info_run["data_shape"]))
            x = self.pipe.generate(model, s.n, sampler=s.sampler, steps=s.steps, grid=s.grid, generator=gen,
                                   callback=callback, progress=False, **opts)
        return x, self.counter.calls, time.perf_counter() - t0

    def grid_used(self, s: Settings) -> str:
        """What the default grid was for the last sampling call of ``s``: a stored fit of the run folder
        (``RUN/fits/SAMPLER-STEPS.json``, used by the Pipeline when one matches) or the run's own grid."""
        note = self.pipe.note or ""
        if s.grid is None and note.startswith("using"):
            return f"fitted: fits/{s.sampler}-{s.steps}.json"
        return self.default_grid

    def fits(self) -> list[str]:
        """The stored fits of the run folder, as ``SAMPLER-STEPS`` (the Pipeline uses one when the sampler and
        steps match and no grid is named)."""
        folder = None if self.pipe.path is None else self.pipe.path / "fits"
        return sorted(p.stem for p in folder.glob("*.json")) if folder is not None and folder.is_dir() else []

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
        elif s.all_classes and self.is_image:
            save_samples(x, png, nrow=s.n, value_range=self.value_range)
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
            job.step = msg["i"]
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
        grid, note = self.grid_used(s), self.pipe.note
        rid = self.store(x, s)
        job.put({"type": "done", "id": rid, "png": f"/results/{rid}.png", "npz": f"/results/{rid}.npz",
                 "nfe": nfe, "seconds": round(seconds, 3), "label": s.label(grid), "n": len(x),
                 "rows": self.num_classes if s.all_classes else None, "note": note})

    def run_compare(self, a: Settings, b: Settings, job: Job) -> None:
        """The Compare job: both settings from the same noise (same seed), and the RMS difference."""
        out = {}
        for which, s in (("a", a), ("b", b)):
            cb = self.stepper(job, which)
            x, nfe, seconds = self.sample(s, cb)
            cb(None)
            grid, note = self.grid_used(s), self.pipe.note
            rid = self.store(x, s)
            out[which] = {"x": x, "id": rid, "png": f"/results/{rid}.png", "npz": f"/results/{rid}.npz", "nfe": nfe,
                          "seconds": round(seconds, 3), "label": s.label(grid), "note": note}
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

    def acquire(self) -> None:
        """Take the model, waiting up to :data:`WAIT_SECONDS` in a queue of at most :data:`MAX_WAITING`
        requests; a one-line :class:`StudioBusyError` otherwise (a burst of clients is answered, never hung)."""
        with self._queue:
            if self.waiting >= MAX_WAITING:
                raise StudioBusyError(f"the model is busy and {self.waiting} requests are already waiting; "
                                      "try again when they finish")
            self.waiting += 1
        try:
            if not self.lock.acquire(timeout=WAIT_SECONDS):
                raise StudioBusyError("the model is busy with another request; try again when it finishes")
        finally:
            with self._queue:
                self.waiting -= 1

    def stop(self, job_id: str | None = None) -> str | None:
        """Stop the running job (``job_id``: only if it is that one) at its next step; its id, or ``None`` when
        there was nothing to stop."""
        job = self.current
        if job is None or (job_id is not None and job.id != job_id):
            return None
        job.stopped = True
        job.cancelled.set()
        return job.id

    def start(self, work: Callable[[Job], None]) -> Job:
        """Run ``work`` on a worker thread once the model is free (one job at a time); its messages end with
        ``done`` or one ``error`` line."""
        self.acquire()
        job = Job()
        self.current = job
        job.messages.put({"type": "started", "job": job.id})

        def main() -> None:
            final = None
            try:
                work(job)
            except JobCancelledError:
                if job.stopped:
                    final = {"type": "stopped", "message": f"stopped after step {job.step}", "step": job.step}
            except (ValueError, TypeError, RuntimeError, KeyError) as e:
                final = {"type": "error", "message": _one_line(e)}
            except Exception as e:  # noqa: BLE001  (shown to the user, the server keeps serving)
                final = {"type": "error", "message": f"{type(e).__name__}: {_one_line(e)}"}
            finally:
                self.current = None
                self.lock.release()  # before the last message: the page's next request finds the model free
                if final is not None:
                    job.messages.put(final)
                job.messages.put(None)

        threading.Thread(target=main, name="studio-worker", daemon=True).start()
        return job


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
