"""Model-adaptive time grids: a grid fitted to one model and one sampler from pilot solves (issue 16).

Method. Draw a few dozen pilot states ``x_T`` (never the ones that will be scored), solve the probability-flow ODE
from them accurately once (adaptive dopri5, ``rtol = atol = 1e-6``, then Tweedie's ``x0_hat`` at ``t_min``: what
``td.sample(model, x_T, "ode", rtol=1e-6, atol=1e-6)`` returns), and choose the ``n - 1`` interior times of an
``n``-interval grid that minimize the final RMS error of the sampler against that reference,

    min_z  log RMS( sampler(x_T, grid(z)) - x_ref ),

where the grid is a smooth monotone function of ``z``: the points are placed in log-SNR ``lambda`` between
``lambda(t_max)`` and ``lambda(t_min)`` at the cumulative sums of the increments ``softmax(z)`` (``n`` increments,
the last one the gap left below the last positive point, so the final noise level is free too), and ``z = B w``
with a few coordinates ``w`` (:func:`basis`: the first and last increments free, a piecewise-linear profile
between), so that the fit follows the model rather than the pilot states. Every ``z`` gives
a strictly decreasing grid that starts at ``t_max`` and ends at ``t_zero``. The search starts from the best of a
few good fixed grids (uniform log-SNR, Karras rho = 7, the library's ``optimized`` grid) and is a derivative-free
pattern search (coordinate moves of size ``delta`` on ``z``, repeated in a direction while they improve,
``delta`` halved when a sweep finds nothing). It is deterministic and needs no scipy.

This is the idea of Align Your Steps (Sabour et al. 2024: optimize the grid of a given solver and model, starting
from a standard grid, by iterative local moves of single points) and of GITS (Chen et al. 2024: grids from a
teacher trajectory), with the plain objective those papers bound or approximate -- the global error of the
actual solver against an accurate solve -- measured directly, since a pilot batch makes it cheap.

Cost. Every objective evaluation is one sampling run on the pilot batch (``run_nfe`` network calls). The budget
caps the total number of network calls, reference solve included, at ``budget x run_nfe``; the cost actually
spent is returned (``return_info=True``) and logged as ``cost = k x one sampling run in NFE``.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchdiffusion.parameterization.flow import Bound
from torchdiffusion.processes import Process
from torchdiffusion.samplers.registry import get as get_sampler

log = logging.getLogger(__name__)

GridGetter = Callable[[str, Process, int], Tensor]


@dataclass
class _Search:
    """Book-keeping of one fit: the budget in network calls and every evaluation spent."""

    max_calls: int
    calls: int = 0
    evals: int = 0
    history: list[float] = field(default_factory=list)


class _BudgetSpentError(Exception):
    """Raised inside the search when the next evaluation would exceed the budget."""


def lambda_range(process: Process) -> tuple[float, float]:
    """``(lambda(t_max), lambda(t_min))``: the log-SNR span the interior grid points may occupy."""
    lo, hi = float(process.log_snr(process.t_max)), float(process.log_snr(process.t_min))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"grids.optimize needs a finite, increasing log-SNR between t_max and t_min; {process!r} "
                         f"has lambda(t_max) = {lo:g}, lambda(t_min) = {hi:g}")
    return lo, hi


def grid_from_logits(process: Process, z: Tensor) -> Tensor:
    """The grid of logits ``z`` (length ``n``): ``[t_max, t(lambda_1), ..., t(lambda_{n-1}), t_zero]`` with
    ``lambda_i = lambda(t_max) + (lambda(t_min) - lambda(t_max)) * sum_{j < i} softmax(z)_j``."""
    lo, hi = lambda_range(process)
    c = torch.cumsum(torch.softmax(z.to(torch.float64), 0), 0)[:-1]
    ts = process.t_from_log_snr(lo + (hi - lo) * c) if len(c) else torch.zeros(0, dtype=torch.float64)
    ts = torch.cat([torch.tensor([process.t_max], dtype=torch.float64), ts.reshape(-1),
                    torch.tensor([process.t_zero], dtype=torch.float64)])
    return ts


def logits_from_grid(process: Process, ts: Tensor, floor: float = 1e-3) -> Tensor:
    """Inverse of :func:`grid_from_logits` (up to a constant) for a grid starting at ``t_max``: the log of its
    increments in normalized log-SNR, each at least ``floor`` (the gap below the last point may be 0)."""
    lo, hi = lambda_range(process)
    lam = process.log_snr(ts[1:-1]).to(torch.float64) if len(ts) > 2 else torch.zeros(0, dtype=torch.float64)
    c = torch.cat([torch.zeros(1, dtype=torch.float64), ((lam - lo) / (hi - lo)).clamp(0, 1),
                   torch.ones(1, dtype=torch.float64)])
    return torch.log(torch.diff(c).clamp_min(floor))


def basis(n: int, knots: int) -> Tensor:
    """``(n, k)`` matrix mapping search coordinates to the ``n`` logits: a free coordinate for the first increment
    (the jump from ``t_max``) and for the last (the gap below the last positive point), plus ``knots``
    piecewise-linear hat functions over the increment index (a smooth profile); the identity when ``n <= knots +
    2``. Few coordinates keep the fit from chasing the particular pilot states."""
    if n <= knots + 2:
        return torch.eye(n, dtype=torch.float64)
    pos = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    centers = torch.linspace(0, 1, knots, dtype=torch.float64)
    hats = (1 - (pos[:, None] - centers[None, :]).abs() * (knots - 1)).clamp_min(0)
    ends = torch.zeros(n, 2, dtype=torch.float64)
    ends[0, 0] = ends[-1, 1] = 1.0
    return torch.cat([ends, hats], 1)


def _check_sampler(sampler: str, options: dict) -> None:
    spec = get_sampler(sampler)
    if sampler == "ode":
        raise ValueError("grids.optimize: the adaptive 'ode' sampler chooses its own steps; give a fixed-step sampler")
    params = inspect.signature(spec.fn).parameters
    allowed = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k not in ("generator", "callback")]
    bad = sorted(set(options) - set(allowed))
    if bad:
        raise ValueError(f"sampler {sampler!r} has no option {', '.join(map(repr, bad))}; "
                         f"allowed: {', '.join(allowed) or 'none'}")


def fit(model, sampler: str, steps: int, x_T: Tensor, *, cond=None, budget: float = 100.0,
        reference: Tensor | None = None, rtol: float = 1e-6, atol: float = 1e-6,
        starts: dict[str, Tensor] | None = None, delta: float = 0.5, min_delta: float = 0.03, knots: int = 5,
        **options) -> tuple[Tensor, dict]:
    """Fit the grid (see the module docstring) on the pilot states ``x_T``; returns ``(grid, info)``.

    ``starts`` maps names to candidate starting grids (each with the number of intervals that ``steps`` buys);
    ``reference`` (optional) gives the target samples for ``x_T`` instead of the adaptive ODE solve (its cost is
    then not counted). ``info`` holds ``cost_nfe`` (network calls spent, all on the pilot batch), ``run_nfe``
    (calls of one sampling run), ``cost_runs = cost_nfe / run_nfe``, ``reference_nfe``, ``evals``, ``start`` (the
    chosen starting grid), ``start_rms`` and ``rms`` (pilot RMS before and after).
    """
    _check_sampler(sampler, options)
    spec = get_sampler(sampler)
    process = model.process
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 1):
        raise ValueError(f"budget must be a finite number >= 1 (sampling runs' worth of NFE), got {budget!r}")
    if not starts:
        raise ValueError("grids.optimize needs at least one starting grid")
    n = len(next(iter(starts.values()))) - 1
    opts = spec.prepare(steps, n, dict(options)) if spec.prepare is not None else dict(options)

    def run(ts: Tensor, seed: int = 0) -> tuple[Tensor, int]:
        bound = Bound(model, cond)
        with torch.no_grad():
            x = spec.fn(bound, x_T, ts, generator=torch.Generator(x_T.device).manual_seed(seed), **opts)
        return x, bound.nfe

    # one run fixes the unit of cost (and checks that the sampler accepts the grid)
    first_name, first = next(iter(starts.items()))
    x_first, run_nfe = run(first)
    run_nfe = max(run_nfe, 1)
    state = _Search(max_calls=int(math.floor(budget * run_nfe)), calls=run_nfe, evals=1)
    if spec.stochastic:  # e.g. ddim: deterministic with eta = 0 only; a second noise seed tells
        x_again, calls = run(first, seed=1)
        state.calls += calls
        if not torch.equal(x_first, x_again):
            raise ValueError(f"grids.optimize needs a deterministic sampler; {sampler!r} with options {options} draws "
                             "noise (use e.g. unipc, dpmpp_2m, ipndm, or ddim with eta=0)")
    ref_nfe = 0
    if reference is None:
        bound = Bound(model, cond)
        ode = get_sampler("ode").fn
        with torch.no_grad():
            reference = ode(bound, x_T, first, rtol=rtol, atol=atol)
        ref_nfe = bound.nfe
        state.calls += ref_nfe
        if state.calls + run_nfe > state.max_calls:
            raise ValueError(f"grids.optimize: the budget of {budget:g} sampling runs ({state.max_calls} calls) "
                             f"does not cover the reference solve ({ref_nfe} calls) and one more run; raise budget "
                             "or pass reference=")
    if reference.shape != x_T.shape:
        raise ValueError(f"reference must have the shape of x_T {tuple(x_T.shape)}, got {tuple(reference.shape)}")
    ref = reference.to(torch.float64)

    def rms(x: Tensor) -> float:
        v = float(((x.to(torch.float64) - ref) ** 2).mean().sqrt())
        return v if math.isfinite(v) else math.inf

    def evaluate(ts: Tensor) -> float:
        if state.calls + run_nfe > state.max_calls:
            raise _BudgetSpentError
        if not (ts[1:] < ts[:-1]).all():
            return math.inf
        try:
            x, calls = run(ts)
        except (ValueError, ZeroDivisionError, OverflowError):
            return math.inf
        state.calls += calls
        state.evals += 1
        v = rms(x)
        state.history.append(v)
        return v

    scores = {first_name: rms(x_first)}
    best_name, best_ts = first_name, first
    try:
        for name, ts in list(starts.items())[1:]:
            scores[name] = evaluate(ts)
            if scores[name] < scores[best_name]:
                best_name, best_ts = name, ts
    except _BudgetSpentError:
        pass
    start_rms = scores[best_name]
    best, best_z = start_rms, None
    if n >= 2 and best_ts[0] == process.t_max:
        B = basis(n, knots)
        w = torch.linalg.lstsq(B, logits_from_grid(process, best_ts)[:, None]).solution[:, 0]
        try:
            v = evaluate(grid_from_logits(process, B @ w))  # the start as the parameterization sees it
            best, best_z = (v, w) if v <= best else (best, w)
            d = delta
            while d >= min_delta:
                improved = False
                for j in range(len(w)):
                    for sign in (1.0, -1.0):
                        moved = False
                        while True:
                            cand = best_z.clone()
                            cand[j] += sign * d
                            v = evaluate(grid_from_logits(process, B @ cand))
                            if v < best * (1 - 1e-9):
                                best, best_z, moved, improved = v, cand, True, True
                            else:
                                break
                        if moved:
                            break
                if not improved:
                    d /= 2
        except _BudgetSpentError:
            pass
    grid = best_ts if best_z is None or best >= start_rms else grid_from_logits(process, B @ best_z)
    final_rms = min(best, start_rms)
    info = {"sampler": sampler, "steps": steps, "intervals": n, "run_nfe": run_nfe, "cost_nfe": state.calls,
            "cost_runs": state.calls / run_nfe, "budget_runs": float(budget), "reference_nfe": ref_nfe,
            "evals": state.evals, "n_pilot": int(x_T.shape[0]), "start": best_name, "start_scores": scores,
            "start_rms": start_rms, "rms": final_rms}
    log.info("grids.optimize(%s, steps=%d): pilot RMS %.3e -> %.3e (start %s); cost = %.1f x one sampling run in "
             "NFE (%d network calls on %d pilot samples, reference %d, budget %.0f runs)", sampler, steps, start_rms,
             final_rms, best_name, info["cost_runs"], state.calls, info["n_pilot"], ref_nfe, budget)
    return grid, info
