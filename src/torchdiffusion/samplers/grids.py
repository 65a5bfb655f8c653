"""Time grids for sampling (axis 4 of docs/design.md).

A grid is a strictly decreasing float64 tensor of ``n + 1`` process times: ``n`` points at which a sampler
may evaluate the model, followed by ``process.t_zero`` (the clean state, noise 0). Every grid is a function
``grid(process, n) -> Tensor`` registered by name; ``get(name, process, n)`` looks it up.

For DDPM the ``uniform`` (diffusers "linspace"), ``leading`` and ``trailing`` spacings produce integer
timesteps exactly as diffusers does, so samples can be compared with its schedulers.

:func:`optimize` fits a grid to one model and sampler from pilot solves (:mod:`torchdiffusion.samplers.gridfit`);
:func:`save` and :func:`load` keep such a grid in a JSON file (``torchdiffusion sample RUN --grid FILE.json``).
"""

from __future__ import annotations

import copy
import inspect
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from torchdiffusion._files import read_text, write_json
from torchdiffusion.parameterization.interop import process_from_diffusers
from torchdiffusion.processes import Process, as_time, times_from_ve_sigmas
from torchdiffusion.samplers import gridfit
from torchdiffusion.samplers.registry import get as _get_sampler

GridFn = Callable[[Process, int], Tensor]
_GRIDS: dict[str, GridFn] = {}
_DEFAULTS: dict[str, str] = {"ddpm": "logsnr", "vp": "logsnr", "subvp": "logsnr", "ve": "karras", "edm": "karras"}


def register(name: str) -> Callable[[GridFn], GridFn]:
    """Decorator: add a grid function under ``name``."""
    def deco(fn: GridFn) -> GridFn:
        _GRIDS[name] = fn
        return fn
    return deco


def names() -> list[str]:
    """Every grid name that ``td.sample`` accepts."""
    return sorted(_GRIDS)


def default_for(process: Process) -> str:
    """The grid a process uses when none is given."""
    return _DEFAULTS.get(process.name, "logsnr")


def _finish(process: Process, ts: Tensor) -> Tensor:
    ts = torch.cat([as_time(ts).reshape(-1), torch.tensor([process.t_zero], dtype=torch.float64)])
    if not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"grid is not strictly decreasing for {len(ts) - 1} steps on {process!r}; "
                         "use fewer steps or another grid")
    return ts


def get(name: str | Tensor, process: Process, n: int) -> Tensor:
    """Grid ``name`` with ``n`` evaluation points, or validate a user-given tensor of times."""
    if isinstance(name, Tensor):
        ts = as_time(name).detach().cpu().reshape(-1)
        if len(ts) < 2 or not torch.isfinite(ts).all() or not (ts[1:] < ts[:-1]).all():
            raise ValueError("a custom grid must be a strictly decreasing 1-D tensor of finite times with at "
                             f"least 2 entries (got {len(ts)})")
        process.check_time(ts)
        if float(ts[-1]) != process.t_zero:
            raise ValueError(f"a custom grid must end at the clean time t_zero = {process.t_zero:g} of "
                             f"{process!r}, got {float(ts[-1]):g}")
        return ts
    if name not in _GRIDS:
        raise ValueError(f"unknown grid {name!r}; allowed: {', '.join(names())}")
    if int(n) < 1:
        raise ValueError(f"steps must be >= 1, got {n}")
    return _GRIDS[name](process, int(n))


def _discrete_round(process: Process, ts: Tensor) -> Tensor:
    return ts.round() if process.discrete else ts


@register("uniform")
def uniform(process: Process, n: int) -> Tensor:
    """Uniform in t from ``t_max`` to ``t_min`` (diffusers ``linspace`` spacing for DDPM: rounded)."""
    ts = torch.linspace(process.t_max, process.t_min, n, dtype=torch.float64)
    return _finish(process, _discrete_round(process, ts))


@register("leading")
def leading(process: Process, n: int) -> Tensor:
    """diffusers ``leading``: ``t_min + (T / n) * [n-1, ..., 0]`` (starts below ``t_max``)."""
    if process.discrete:
        T = int(process.t_max) + 1
        ts = (torch.arange(n - 1, -1, -1, dtype=torch.float64) * (T // n)).round()
        return _finish(process, ts)
    span = process.t_max - process.t_min
    return _finish(process, process.t_min + span * torch.arange(n - 1, -1, -1, dtype=torch.float64) / n)


@register("trailing")
def trailing(process: Process, n: int) -> Tensor:
    """diffusers ``trailing``: ``t_max`` down in equal strides, never reaching ``t_min`` (Lin et al. 2024)."""
    if process.discrete:
        T = int(process.t_max) + 1
        ts = (torch.round(torch.arange(T, 0, -T / n, dtype=torch.float64)) - 1)[:n]
        return _finish(process, ts)
    span = process.t_max - process.t_min
    return _finish(process, process.t_max - span * torch.arange(n, dtype=torch.float64) / n)


@register("logsnr")
def logsnr(process: Process, n: int) -> Tensor:
    """Uniform in log-SNR between ``t_max`` and ``t_min`` (natural for exponential integrators)."""
    l0, l1 = process.log_snr(process.t_max), process.log_snr(process.t_min)
    ls = torch.linspace(float(l0), float(l1), n, dtype=torch.float64)
    ts = process.t_from_log_snr(ls)
    ts[0], ts[-1] = process.t_max, (process.t_min if n > 1 else process.t_max)
    return _finish(process, ts)


def karras_sigmas(s_max: float, s_min: float, n: int, rho: float = 7.0) -> Tensor:
    """EDM's rho-grid ``(s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho`` (B-9)."""
    if n == 1:
        return torch.tensor([s_max], dtype=torch.float64)
    r = torch.linspace(0, 1, n, dtype=torch.float64)
    return (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def _ve_range(process: Process) -> tuple[float, float]:
    tmax, tmin = as_time(process.t_max), as_time(process.t_min)
    return float(process.sigma(tmax) / process.alpha(tmax)), float(process.sigma(tmin) / process.alpha(tmin))


@register("karras")
def karras(process: Process, n: int, rho: float = 7.0) -> Tensor:
    """Karras et al. rho = 7 grid in the VE noise level ``sigma/alpha`` of the process."""
    s_max, s_min = _ve_range(process)
    ts = times_from_ve_sigmas(process, karras_sigmas(s_max, s_min, n, rho))
    ts[0], ts[-1] = process.t_max, (process.t_min if n > 1 else process.t_max)
    return _finish(process, ts)


def _rho_sigmas(hi: float, lo: float, n: int, rho: float) -> Tensor:
    if math.isinf(rho):
        return torch.logspace(math.log10(hi), math.log10(lo), n, dtype=torch.float64)
    return karras_sigmas(hi, lo, n, rho)


def _from_sigmas(process: Process, s: Tensor, lo_is_min: bool) -> Tensor:
    ts = times_from_ve_sigmas(process, s)
    ts[0] = process.t_max
    if lo_is_min and len(ts) > 1:
        ts[-1] = process.t_min
    return _finish(process, ts)


@register("edm")
def edm(process: Process, n: int) -> Tensor:
    """Karras et al.'s grid with EDM's own range ``sigma_min = 0.002``, ``sigma_max = 80`` (rho = 7, B-9),
    clipped to the process's VE range, with the first point moved to ``t_max`` (where ``x_T`` lives).
    It equals ``karras`` whenever the process's range lies inside [0.002, 80] (EDM, VE); for DDPM-linear
    (``s_max ~ 157``) every point but the first follows the EDM range."""
    s_max, s_min = _ve_range(process)
    lo = max(0.002, s_min)
    return _from_sigmas(process, karras_sigmas(min(80.0, s_max), lo, n), lo == s_min)


def capped_grid(process: Process, n: int, s_hi: float, s_lo: float, rho: float) -> Tensor:
    """``[t_max]`` followed by ``n - 1`` points of the rho-grid (:func:`karras_sigmas`; ``rho = inf`` is uniform
    in log-SNR) from ``min(s_hi, s_max)`` down to ``max(s_lo, s_min)`` in VE noise level ``sigma/alpha``: the
    first (cheap, nearly linear) interval jumps from ``s_max`` to ``s_hi``."""
    s_max, s_min = _ve_range(process)
    hi, lo = min(s_hi, s_max), max(s_lo, s_min)
    if n == 1:
        return _finish(process, torch.tensor([process.t_max], dtype=torch.float64))
    if not lo < hi:
        raise ValueError(f"empty noise range: s_hi={s_hi:g}, s_lo={s_lo:g} on {process!r}")
    if hi >= s_max:
        return _from_sigmas(process, _rho_sigmas(s_max, lo, n, rho), lo == s_min)
    s = torch.cat([torch.tensor([s_max], dtype=torch.float64), _rho_sigmas(hi, lo, n - 1, rho)])
    return _from_sigmas(process, s, lo == s_min)


@register("blend")
def blend(process: Process, n: int, w: float = 0.5) -> Tensor:
    """Mix of the ``logsnr`` grid and the ``uniform`` (in t) grid in log-SNR: ``lambda_i = (1 - w) lambda_i^logsnr
    + w lambda_i^uniform`` (``w = 0``: logsnr, ``w = 1``: uniform in t; end points kept)."""
    if not 0 <= w <= 1:
        raise ValueError(f"blend weight w must be in [0, 1], got {w}")
    if n == 1:
        return _finish(process, torch.tensor([process.t_max], dtype=torch.float64))
    l0, l1 = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
    lu = process.log_snr(torch.linspace(process.t_max, process.t_min, n, dtype=torch.float64))
    ls = (1 - w) * torch.linspace(l0, l1, n, dtype=torch.float64) + w * lu
    ts = process.t_from_log_snr(ls)
    ts[0], ts[-1] = process.t_max, process.t_min
    return _finish(process, ts)


# (s_hi, s_lo, rho) of :func:`capped_grid` per number of evaluation points: constants found once by a search
# over these three parameters for UniPC on an 8-D Gaussian mixture under the cosine schedule (a problem unlike
# the benchmark's; the option of benchmarks/samplers.py that ran it was removed when td.grids.optimize replaced it,
# see commit 5d5cd81); other n use the nearest key in log n. Assumes data scaled to about [-1, 1].
OPTIMIZED: dict[int, tuple[float, float, float]] = {
    5: (1.5, 0.08, 5.0), 10: (2.5, 0.02, math.inf), 20: (2.5, 0.01, 12.0), 50: (5.0, 0.0, 12.0)}


@register("optimized")
def optimized(process: Process, n: int) -> Tensor:
    """A grid tuned for few-step multistep solvers: a first jump from ``t_max`` to VE noise ``s_hi`` (at high
    noise the data look Gaussian and exponential integrators are nearly exact there), then a rho-grid down to
    ``s_lo`` (:func:`capped_grid`), with parameters from :data:`OPTIMIZED`."""
    key = min(OPTIMIZED, key=lambda k: abs(math.log(k) - math.log(max(n, 1))))
    return capped_grid(process, n, *OPTIMIZED[key])


# --- grids fitted to a model (issue 16) ----------------------------------------------------------------------

START_GRIDS = ("logsnr", "karras", "optimized", "trailing")  # starts of a fit, after the process's default grid


def optimize(model, sampler: str, steps: int, x_T: Tensor | None = None, shape: tuple[int, ...] | None = None,
             cond=None, budget: float | None = None, *, max_runs: int | None = None, method: str = "fast",
             robust: bool = True, z: float = 2.0, n_pilot: int = 256, generator: torch.Generator | None = None,
             reference: Tensor | None = None, rtol: float = 1e-6, atol: float = 1e-6, knots: int = 4,
             delta: float = 0.5, holdout: float = 1 / 3, choices: dict | None = None,
             starts: Sequence[str] | None = None, progress: Callable[[dict], None] | None = None,
             return_info: bool = False, **options) -> Tensor | tuple[Tensor, dict]:
    """A grid fitted to ``model`` and ``sampler`` at ``steps`` network evaluations (method:
    :mod:`torchdiffusion.samplers.gridfit`): the interior times, as softmax increments in log-SNR, minimize the
    final RMS error of ``sampler`` against the PF-ODE's end state at noise 0 (:func:`gridfit.end_state`: dopri5 at
    ``rtol``/``atol``, Tweedie's x0_hat near ``t_min`` extrapolated to noise 0) over pilot trajectories, starting
    from the best of the process's default grid, ``logsnr``, ``karras``, ``optimized`` and ``trailing``. A
    fraction ``holdout`` of the pilot states is never seen by the search. With ``robust=True`` (the default) the
    fitted grid is returned only when it beats the best fixed start grid on those states by more than ``z``
    standard errors of a paired comparison; otherwise that fixed grid is (``info["decision"]``). With
    ``robust=False`` the grid returned is the best on them along the search path (issue 16's rule).
    ``method="fast"`` (the default) orders the work coarse to fine for small budgets, ``"search"`` is issue 16's
    order (:func:`gridfit.fit`). ``starts`` names the start grids (default: the
    process's default grid and :data:`START_GRIDS`). ``choices`` lets the fit choose sampler options too (e.g.
    ``{"order": [2, 3], "final_step": ["denoise", "extrapolate"]}`` for unipc); sample with
    ``info["options"]`` then (``return_info=True``).

    Pilot states: ``x_T`` (the state at ``t_max``; draw it independently of any noise you will score), or else
    ``n_pilot`` draws of ``process.prior_sample((n_pilot, *shape))`` from ``generator`` (default seed 16). ``cond``
    is the condition of the pilot batch. Cost: ``max_runs`` caps the sampling runs of the pilot batch, the
    reference solve coming on top (default 30 when ``budget`` is not given either); ``budget`` instead caps the
    total, reference solve included, at ``budget`` sampling runs' worth of network calls (``budget x run_nfe``).
    The cost spent is logged and, with ``return_info=True``, returned with the grid as ``(grid, info)`` (see
    :func:`gridfit.fit`). The pilot's size does not change the cost in network calls (one call serves the whole
    batch), only the seconds: a larger pilot makes the selection surer at the same cost. ``progress``: called with the
    network calls spent (``calls``, ``max_calls``) as the fit goes. ``knots``: the
    number of smooth-profile coordinates searched (:func:`gridfit.basis`); ``delta``: the first step of the
    search in those coordinates. ``options`` go to the sampler.
    Returns a strictly decreasing float64 tensor of times from ``t_max`` to ``t_zero`` that
    ``td.sample(model, x, sampler, grid=...)`` accepts.
    """
    process = model.process
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    spec = _get_sampler(sampler)
    if x_T is None:
        if shape is None:
            raise ValueError("grids.optimize needs pilot states x_T or a sample shape (e.g. shape=(2,))")
        if not isinstance(n_pilot, int) or n_pilot < 1:
            raise ValueError(f"n_pilot must be an integer >= 1, got {n_pilot!r}")
        g = generator if generator is not None else torch.Generator().manual_seed(16)
        x_T = process.prior_sample((n_pilot, *tuple(shape)), generator=g)
    if not isinstance(x_T, Tensor) or not torch.isfinite(x_T).all():
        raise ValueError("x_T must be a finite tensor of pilot states")
    iopts = {k: v for k, v in options.items() if k in inspect.signature(spec.intervals).parameters and k != "steps"}
    n = spec.intervals(steps, **iopts)
    if n < 1:
        raise ValueError(f"sampler {sampler!r} needs more than {steps} evaluation(s)")
    names_ = START_GRIDS if starts is None else list(starts)
    for name in names_:
        if name not in _GRIDS:
            raise ValueError(f"unknown start grid {name!r}; allowed: {', '.join(names())}")
    start_grids: dict[str, Tensor] = {}
    for name in dict.fromkeys([default_for(process), *names_] if starts is None else names_):
        try:
            start_grids[name] = get(name, process, n)
        except ValueError:
            continue
    for combo in gridfit._combos(options, choices):
        c_opts = {k: v for k, v in combo.items() if k in inspect.signature(spec.intervals).parameters and k != "steps"}
        if spec.intervals(steps, **c_opts) != n:
            raise ValueError(f"choices must keep the number of grid intervals of {sampler!r} at {steps} steps; "
                             f"{combo} changes it")
    if budget is None and max_runs is None:
        max_runs = 30
    grid, info = gridfit.fit(model, sampler, steps, x_T, cond=cond, budget=budget, max_runs=max_runs,
                             reference=reference, rtol=rtol, atol=atol, starts=start_grids, knots=knots,
                             delta=delta, holdout=holdout,
                             choices=choices, method=method, robust=robust, z=z, progress=progress, **options)
    grid = get(grid, process, 0)  # validated like any user grid
    return (grid, info) if return_info else grid


def save(path: str | Path, grid: Tensor, **metadata) -> Path:
    """Write ``grid`` as JSON ``{"times": [...], ...metadata}`` (atomically); :func:`load` reads it back and
    ``torchdiffusion sample RUN --grid FILE.json`` samples on it."""
    ts = as_time(grid).detach().cpu().reshape(-1)
    if len(ts) < 2 or not torch.isfinite(ts).all() or not (ts[1:] < ts[:-1]).all():
        raise ValueError("a grid must be a strictly decreasing 1-D tensor of finite times with at least 2 entries")
    return write_json(path, {**metadata, "times": [float(t) for t in ts]})


def load(path: str | Path) -> Tensor:
    """The grid in JSON file ``path``: a list of times, or an object with a ``"times"`` list (other keys are
    metadata). Strictly decreasing finite numbers, at least two; one-line errors naming the file otherwise.
    Whether the grid suits a process (range, last time ``t_zero``) is checked when it is used."""
    text = read_text(path, "grid file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"grid file {path}: not valid JSON ({e})") from None
    times = obj.get("times") if isinstance(obj, dict) else obj
    if not isinstance(times, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                              for v in times):
        raise ValueError(f"grid file {path}: expected a JSON list of times or an object with a \"times\" list of "
                         "numbers")
    ts = torch.tensor([float(v) for v in times], dtype=torch.float64)
    if len(ts) < 2 or not torch.isfinite(ts).all() or not (ts[1:] < ts[:-1]).all():
        raise ValueError(f"grid file {path}: the times must be at least 2 finite numbers, strictly decreasing "
                         "(from t_max down to the clean time t_zero)")
    return ts


# --- handing a grid to diffusers (issue 33) --------------------------------------------------------------------

def grid_of(fit_or_grid) -> Tensor:
    """The times of a grid tensor, a fit record (a dict with ``"times"``, e.g. a file of ``RUN/fits/``) or a JSON
    file of either (:func:`load`)."""
    if isinstance(fit_or_grid, Tensor):
        return as_time(fit_or_grid).detach().cpu().reshape(-1)
    if isinstance(fit_or_grid, dict):
        times = fit_or_grid.get("times")
        if not isinstance(times, list):
            raise ValueError("a fit record must hold a \"times\" list")
        return torch.tensor([float(v) for v in times], dtype=torch.float64)
    if isinstance(fit_or_grid, (str, Path)):
        return load(fit_or_grid)
    raise TypeError(f"expected a grid tensor, a fit record or a JSON file, got {type(fit_or_grid).__name__}")


def _diffusers_walks(sch, ts: Tensor, sig: Tensor) -> bool:
    """Whether scheduler ``sch`` (after ``set_timesteps``) walks the grid ``ts`` (VE noise levels ``sig``): its
    ``sigmas`` (where it keeps them) are ours followed by 0, else its ``timesteps`` are ours."""
    n = len(ts) - 1
    got = getattr(sch, "sigmas", None)
    if got is not None:
        got = torch.as_tensor(got, dtype=torch.float64).reshape(-1).cpu()
        return len(got) == n + 1 and float(got[-1]) == 0.0 and torch.allclose(got[:-1], sig, rtol=1e-4, atol=0)
    steps = torch.as_tensor(sch.timesteps, dtype=torch.float64).reshape(-1).cpu()
    return len(steps) == n and torch.allclose(steps, ts[:-1], rtol=0, atol=1e-3)


def to_diffusers(fit_or_grid, scheduler, *, round_timesteps: bool = False) -> dict:
    """The keyword arguments that make a diffusers ``scheduler`` walk our grid: ``scheduler.set_timesteps(**kw)``,
    or ``pipe(..., **kw)`` for a diffusers pipeline built on that scheduler.

    ``fit_or_grid``: a grid tensor, a fit record or its JSON file (:func:`grid_of`); its times are the process's of
    the scheduler (:func:`~torchdiffusion.parameterization.interop.process_from_diffusers`: for DDPM-type schedulers
    the training timestep). The first form the scheduler's ``set_timesteps`` accepts and honours (tried on a copy
    and checked: its sigmas, or its timesteps, must be ours) is returned: ``{"sigmas": [...]}`` (VE noise levels
    ``sigma/alpha`` of the grid's points followed by 0; e.g. ``EulerDiscreteScheduler``), else ``{"timesteps":
    [...]}`` (training timesteps; fractional ones where the scheduler keeps them). Schedulers that take only
    integer timesteps (e.g. ``DPMSolverMultistepScheduler``, ``DDPMScheduler``) need ``round_timesteps=True``
    when the grid is fractional: diffusers then walks the grid rounded to integers (our samplers accept that grid
    too: ``torch.tensor(kw["timesteps"] + [process.t_zero])``). A scheduler that takes neither (e.g.
    ``DDIMScheduler``, which walks equal strides only, or ``UniPCMultistepScheduler`` outside flow matching) is a
    one-line ValueError: use :func:`set_diffusers_grid` there, or a scheduler that takes ``sigmas=``.
    """
    process = process_from_diffusers(scheduler)
    ts = get(grid_of(fit_or_grid), process, 0)
    pts = ts[:-1]
    params = inspect.signature(scheduler.set_timesteps).parameters
    ints = pts.round()
    candidates: list[tuple[dict, Tensor]] = []
    if "sigmas" in params:
        sig = (process.sigma(pts) / process.alpha(pts)).to(torch.float64)
        candidates.append(({"sigmas": [float(s) for s in sig] + [0.0]}, ts))
    if "timesteps" in params and process.discrete:
        if torch.equal(ints, pts):
            candidates.append(({"timesteps": [int(t) for t in ints]}, ts))
        else:
            candidates.append(({"timesteps": [float(t) for t in pts]}, ts))
            if round_timesteps:
                if len(torch.unique(ints)) != len(ints):
                    raise ValueError(f"rounded to integer timesteps the grid repeats a point ({ints.tolist()}); "
                                     "use a scheduler that takes sigmas= (e.g. EulerDiscreteScheduler)")
                candidates.append(({"timesteps": [int(t) for t in ints]},
                                   torch.cat([ints, ts[-1:]])))
    name = type(scheduler).__name__
    for kw, walked in candidates:
        sch = copy.deepcopy(scheduler)
        try:
            sch.set_timesteps(**kw)
        except (ValueError, TypeError, IndexError):
            continue
        sig_w = (process.sigma(walked[:-1]) / process.alpha(walked[:-1])).to(torch.float64)
        if _diffusers_walks(sch, walked, sig_w):
            return kw
    hint = (" (its set_timesteps takes integer timesteps only: pass round_timesteps=True to walk the grid rounded)"
            if "timesteps" in params and process.discrete and not round_timesteps else "")
    other = "grids.set_diffusers_grid(scheduler, grid), or " if name in SETTABLE else ""
    raise ValueError(f"{name} cannot be given this grid through set_timesteps{hint}; use {other}a scheduler that "
                     "takes sigmas= (e.g. EulerDiscreteScheduler, whose Euler step on this grid is our ddim/euler)")


SETTABLE = ("UniPCMultistepScheduler", "DPMSolverMultistepScheduler", "DEISMultistepScheduler",
            "EulerDiscreteScheduler")  # their step() reads self.sigmas / self.timesteps by index


def set_diffusers_grid(scheduler, fit_or_grid):
    """Make ``scheduler`` walk our grid exactly and return it: through :func:`to_diffusers` where its
    ``set_timesteps`` takes the grid, else (the schedulers in :data:`SETTABLE`) by ``set_timesteps(n)`` and then
    replacing its ``timesteps`` (our fractional training timesteps) and ``sigmas`` (ours, then 0), which their
    ``step`` reads by index. Others (e.g. ``DDIMScheduler``, whose step assumes equal strides) are refused."""
    try:
        scheduler.set_timesteps(**to_diffusers(fit_or_grid, scheduler))
        return scheduler
    except ValueError:
        name = type(scheduler).__name__
        if name not in SETTABLE:
            raise ValueError(f"{name} cannot walk a given grid (its step assumes its own spacing); allowed: "
                             f"{', '.join(SETTABLE)} or a scheduler whose set_timesteps takes sigmas=/timesteps="
                             ) from None
    process = process_from_diffusers(scheduler)
    ts = get(grid_of(fit_or_grid), process, 0)
    pts = ts[:-1]
    scheduler.set_timesteps(len(pts))
    sig = (process.sigma(pts) / process.alpha(pts)).to(torch.float64)
    scheduler.timesteps = pts.clone()
    scheduler.sigmas = torch.cat([sig, torch.zeros(1, dtype=torch.float64)])
    return scheduler
