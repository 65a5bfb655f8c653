"""Reverse discretizations (axis 4 of docs/design.md).

Every sampler is a stateless function ``sampler(model, x, ts, *, generator=None, callback=None, **options)``
walking the decreasing grid ``ts`` (whose last entry is the clean time) and returning the sample. ``model``
is anything with ``.process`` and ``.predict(x, t) -> (x0, eps)``. ``td.sample`` chooses the grid so that
the sampler makes at most ``steps`` network evaluations.

Samplers register themselves with :func:`register`; :func:`names` lists them.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from torchdiffusion._tensor import check_finite, check_number
from torchdiffusion.parameterization.flow import Bound
from torchdiffusion.samplers import ddpm, langevin, ode, sde, solvers  # noqa: F401  (register the families)
from torchdiffusion.samplers import grids as _grids
from torchdiffusion.samplers.registry import SamplerSpec, get, names, register  # noqa: F401

DEFAULT_STEPS = 50


def check_options(sampler: str, fn: Callable, options: dict) -> None:
    """The options of ``sampler``: known names, and values of the kind of their defaults (a finite number where
    the default is a number, true/false where it is a flag); one-line errors saying what is allowed."""
    params = inspect.signature(fn).parameters
    allowed = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k not in ("generator", "callback")]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"sampler {sampler!r} has no option {', '.join(map(repr, bad))}; "
                         f"allowed: {', '.join(allowed) or 'none'}")
    for k, v in options.items():
        default = params[k].default
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"sampler option {k} must be true or false, got {v!r}")
        elif isinstance(default, (int, float)) or (default is None and isinstance(v, float)):
            check_number(v, f"sampler option {k}", allow_inf=True)  # (heun's max_ratio=inf is meaningful)


def _interval_options(spec: SamplerSpec, options: dict) -> dict:
    """The sampler options that its ``intervals`` function reads (e.g. ``n_corrector``, ``levels``)."""
    params = inspect.signature(spec.intervals).parameters
    return {k: v for k, v in options.items() if k in params and k != "steps"}


class StopSampling(Exception):  # noqa: N818  (a signal, not an error)
    """Raised by a ``callback`` to end sampling early: :func:`sample` returns the state reached at that step
    (the ``x`` of the last report), as diffusers returns the latents when a pipeline is interrupted."""


def progress_bar(total: int | None, progress: bool | None = None, **config):
    """A tqdm bar over ``total`` sampler steps. ``progress=None`` shows it where someone can see it (a terminal or
    a notebook) and not in logs, pipes or tests; ``True`` always; ``False`` never. ``config`` goes to tqdm
    (``desc``, ``leave``, ``disable``, ...), as diffusers' ``set_progress_bar_config`` does."""
    config = dict(config)
    disable = config.pop("disable", None)
    if disable is None:
        disable = (not (sys.stderr.isatty() or "ipykernel" in sys.modules)) if progress is None else not progress
    return tqdm(total=total, disable=bool(disable), **{"unit": "step", "dynamic_ncols": True, **config})


@dataclass(frozen=True)
class Plan:
    """What :func:`sample` will walk: the grid ``ts``, the completed sampler ``options`` and ``emits``, the number
    of reports the sampler makes to its callback (the progress bar's total)."""

    ts: Tensor
    options: dict
    emits: int


def plan(process, sampler: str = "ddim", steps: int | None = None, grid: str | Tensor | None = None,
         **options) -> Plan:
    """The grid, options and report count of ``sample(model, x_T, sampler, steps, grid=grid, **options)`` for a
    model over ``process`` (the checks of :func:`sample`, before any network call)."""
    spec = get(sampler)
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 1):
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    check_options(sampler, spec.fn, options)
    iopts = _interval_options(spec, options)
    if isinstance(grid, Tensor):
        ts = _grids.get(grid, process, 0)
        if steps is not None and spec.intervals(steps, **iopts) != len(ts) - 1:
            raise ValueError(f"the grid has {len(ts) - 1} intervals but sampler {sampler!r} walks "
                             f"{spec.intervals(steps, **iopts)} with steps={steps}; give matching steps or leave "
                             "steps out")
    else:
        steps = DEFAULT_STEPS if steps is None else steps
        n = spec.intervals(steps, **iopts)
        if n < 1:
            raise ValueError(f"sampler {sampler!r} needs more than {steps} evaluation(s)")
        ts = _grids.get(grid if grid is not None else _grids.default_for(process), process, n)
    if spec.prepare is not None:
        options = spec.prepare(steps, len(ts) - 1, options)
    emits = spec.emits(len(ts) - 1, options) if spec.emits is not None else len(ts) - 1
    return Plan(ts, options, int(emits))


def reporter(callback: Callable[[dict], dict | None] | None, bar=None) -> tuple[Callable[[dict], None], dict]:
    """The callback :func:`sample` gives a sampler, and the dict that holds the last state reported (``"x"``):
    it advances ``bar``, calls the user's ``callback``, and where that returns a dict with ``"x"`` replaces the
    sampler's state with it (in place, so that the pure sampler function walks on from the new state)."""
    last: dict = {}

    def report(d: dict) -> None:
        last["x"] = d["x"]
        if bar is not None:
            bar.update(1)
        out = callback(d) if callback is not None else None
        if isinstance(out, dict) and out.get("x") is not None:
            new = torch.as_tensor(out["x"])
            if new.shape != d["x"].shape:
                raise ValueError(f"the callback returned a state of shape {tuple(new.shape)}; the sampler's state "
                                 f"is {tuple(d['x'].shape)}")
            d["x"].copy_(new)
    return report, last


def sample(model, x_T: Tensor, sampler: str = "ddim", steps: int | None = None, *,
           grid: str | Tensor | None = None, generator: torch.Generator | None = None,
           callback: Callable[[dict], dict | None] | None = None, cond=None, progress: bool | None = None,
           **options) -> Tensor:
    """Generate: walk from ``x_T`` (the state at ``process.t_max``) to a clean sample.

    ``steps`` is the number of network evaluations (NFE) the sampler may spend (default 50); ``grid`` names a
    grid of :mod:`torchdiffusion.samplers.grids` (default: the process's own) or is a strictly decreasing tensor of
    times ending at ``process.t_zero``. A tensor grid fixes the number of intervals: ``steps`` may then be left
    out, and if given it must buy exactly that many intervals for this sampler. Randomness comes only from
    ``generator``.

    ``callback`` receives a dict with ``i``, ``t``, ``x`` (the new state) and ``x0`` (the current prediction)
    after every step. It may change the state: return a dict whose ``"x"`` is the state to walk on from (the
    counterpart of diffusers' ``callback_on_step_end`` returning ``latents``); and it may stop early by raising
    :class:`StopSampling`, which returns the state reached. ``progress``: a tqdm bar over the steps (None: shown
    on a terminal or in a notebook only; True / False: always / never).
    """
    if not isinstance(x_T, Tensor):
        raise TypeError("x_T must be a tensor")
    if not x_T.is_floating_point():
        raise TypeError(f"x_T must be a floating-point tensor (noise at t_max), got dtype {x_T.dtype}")
    if not torch.isfinite(x_T).all():
        raise ValueError("x_T contains NaN or Inf")
    p = plan(model.process, sampler, steps, grid, **options)
    bar = progress_bar(p.emits, progress, desc=sampler) if progress is not False else None
    report, last = reporter(callback, bar) if (callback is not None or bar is not None) else (None, {})
    bound = Bound(model, cond)
    try:
        with torch.no_grad():
            x = get(sampler).fn(bound, x_T, p.ts, generator=generator, callback=report, **p.options)
    except StopSampling:
        x = last.get("x", x_T)
    finally:
        if bar is not None:
            bar.close()
    return check_finite(x, f"the {sampler} sample")
