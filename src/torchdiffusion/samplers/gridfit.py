"""Model-adaptive time grids: a grid fitted to one model and one sampler from pilot solves (issue 16).

Method. Draw a few dozen pilot states ``x_T`` (never the ones that will be scored), solve the probability-flow ODE
from them accurately once to its end state at noise 0 (:func:`end_state`: adaptive dopri5, ``rtol = atol = 1e-6``,
down to ``t_min`` through two slightly higher noise levels, Tweedie's ``x0_hat`` at the three extrapolated to
noise 0 -- not Tweedie's ``x0_hat`` at ``t_min`` alone, whose bias the fit could not see), and choose the ``n - 1``
interior times of an ``n``-interval grid that minimize the final RMS error of the sampler against that reference,

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

Against overfitting the pilot: a third of the pilot states (``holdout``) is never seen by the search; every
accepted iterate is scored on them too (free: the sampler runs on the whole pilot batch, and cost is counted in
network calls), and the grid returned is the best on this validation part along the search path, the start
included -- so it is never worse there than its start (early stopping). The profile has few coordinates
(``knots = 4``). Sampler options may be chosen too (``choices``: e.g. unipc's ``order`` and ``final_step``): every
start grid is tried with every combination, the search runs with the best on the fit part, the other
combinations are tried on the grid it ends with, and validation decides among all of these.

This is the idea of Align Your Steps (Sabour et al. 2024: optimize the grid of a given solver and model, starting
from a standard grid, by iterative local moves of single points) and of GITS (Chen et al. 2024: grids from a
teacher trajectory), with the plain objective those papers bound or approximate -- the global error of the
actual solver against an accurate solve -- measured directly, since a pilot batch makes it cheap.

Cost. Every objective evaluation is one sampling run on the pilot batch (``run_nfe`` network calls). The budget
caps the total number of network calls, reference solve included, at ``budget x run_nfe`` (or, with
``max_runs``, the sampling runs alone, the reference solve on top); the cost actually spent is returned
(``return_info=True``) and logged as ``cost = k x one sampling run in NFE``. The pilot's size does not enter the
cost: one network call serves the whole batch.

Selection that carries over (issue 33). A grid chosen as the best of many candidates on a few validation states
is optimistic there. With ``robust=True`` validation is used once: the fit part chooses the fitted candidate and
the best fixed start grid, and a paired comparison of the two on the validation states (mean and standard error
of the per-state difference in squared error, :func:`paired_gain`) keeps the fitted grid only when it is better by
``z`` standard errors; otherwise the fixed grid is returned. ``benchmarks/fit_cost.py`` measures both rules on
fresh states, on problems the fit was not designed on.
"""

from __future__ import annotations

import contextlib
import inspect
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchdiffusion.parameterization.flow import Bound
from torchdiffusion.processes import Process
from torchdiffusion.samplers.registry import get as get_sampler
from torchdiffusion.samplers.solvers import extrapolate_x0

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


def end_state(model, x_T: Tensor, cond=None, *, rtol: float = 1e-6, atol: float = 1e-6, levels: int = 3,
              ratio: float = 1.2) -> tuple[Tensor, int]:
    """The end state of the probability-flow ODE from ``x_T`` at noise 0, and the network calls spent.

    The model is not defined below ``t_min``, so the solve (adaptive dopri5, ``rtol``/``atol``) visits ``levels``
    VE noise levels ``s_k = s(t_min) ratio^k`` (largest first, the last at ``t_min``), takes Tweedie's ``x0_hat``
    at each, and extrapolates them to ``s = 0`` as a polynomial in ``s^2`` (along the ODE ``x0_hat(s) = x(0) + c
    s^2 + O(s^4)``; :func:`~torchdiffusion.samplers.solvers.extrapolate_x0`). Tweedie's ``x0_hat`` at ``t_min``
    alone (what ``td.sample(..., "ode")`` returns) stops short of noise 0 by a bias of order ``s(t_min)^2``, which
    a fit against it cannot see.
    """
    process = model.process
    s_min = float(process.sigma(process.t_min) / process.alpha(process.t_min))
    if not (isinstance(levels, int) and levels >= 1 and ratio > 1 and s_min > 0):
        raise ValueError(f"end_state needs levels >= 1, ratio > 1 and sigma(t_min) > 0; got {levels}, {ratio}, "
                         f"{s_min:g}")
    ss = [s_min * ratio**k for k in range(levels)][::-1]
    ts = [float(process.t_from_log_snr(torch.tensor(-2 * math.log(s), dtype=torch.float64))) for s in ss[:-1]]
    ts = [t for t in ts if process.t_min < t < process.t_max] + [process.t_min]
    ss = ss[len(ss) - len(ts):]
    ode = get_sampler("ode").fn
    bound = Bound(model, cond)
    x, t_prev, x0s = x_T, process.t_max, []
    for t in ts:
        box: dict = {}
        with torch.no_grad():
            x0 = ode(bound, x, torch.tensor([t_prev, process.t_zero], dtype=torch.float64), rtol=rtol, atol=atol,
                     t_end=t, callback=lambda d, box=box: box.setdefault("x", d["x"]))
        x, t_prev = box.get("x", x), t
        x0s.append(x0)
    return extrapolate_x0(ss, x0s, len(x0s)), bound.nfe


def _split(n: int, holdout: float) -> tuple[Tensor, Tensor]:
    """Deterministic split of ``n`` pilot states into fit and validation indices (a seeded permutation)."""
    if not (isinstance(holdout, (int, float)) and 0 <= holdout < 1):
        raise ValueError(f"holdout must be a fraction in [0, 1), got {holdout!r}")
    n_val = int(round(holdout * n))
    if holdout > 0 and not 1 <= n_val < n:
        raise ValueError(f"holdout {holdout:g} of {n} pilot states leaves no fit or no validation states")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    val, fit_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
    return fit_idx, val


def _combos(options: dict, choices: dict | None) -> list[dict]:
    """Every sampler-option combination of ``choices`` on top of ``options`` (the given options first)."""
    if not choices:
        return [dict(options)]
    keys = list(choices)
    for k in keys:
        if not isinstance(choices[k], (list, tuple)) or not choices[k]:
            raise ValueError(f"choices[{k!r}] must be a non-empty list of values")
    out = [{**options, **dict(zip(keys, vals))} for vals in itertools.product(*(choices[k] for k in keys))]
    return sorted(out, key=lambda o: o != {**o, **options})  # a combo that keeps the given options goes first


def paired_gain(err_a: Tensor, err_b: Tensor) -> tuple[float, float]:
    """Mean and standard error of the per-state difference ``err_a - err_b`` of squared errors (a paired
    comparison of two samplers on the same states: negative means ``a`` is better)."""
    d = (err_a - err_b).to(torch.float64)
    if len(d) < 2:
        return float(d.mean()) if len(d) else math.nan, math.inf
    return float(d.mean()), float(d.std(unbiased=True) / math.sqrt(len(d)))


METHODS = ("fast", "search")


def fit(model, sampler: str, steps: int, x_T: Tensor, *, cond=None, budget: float | None = 100.0,
        max_runs: int | None = None, reference: Tensor | None = None, rtol: float = 1e-6, atol: float = 1e-6,
        starts: dict[str, Tensor] | None = None, delta: float = 0.5, min_delta: float = 0.03, knots: int = 4,
        holdout: float = 1 / 3, choices: dict | None = None, method: str = "search", robust: bool = False,
        z: float = 2.0, progress: Callable[[dict], None] | None = None, **options) -> tuple[Tensor, dict]:
    """Fit the grid (see the module docstring) on the pilot states ``x_T``; returns ``(grid, info)``.

    ``starts`` maps names to candidate starting grids (each with the number of intervals that ``steps`` buys);
    ``reference`` (optional) gives the target samples for ``x_T`` instead of :func:`end_state` (its cost is then
    not counted). ``holdout``: the fraction of the pilot states kept for validation (never seen by the search).
    ``choices`` (e.g. ``{"order": [2, 3], "final_step": ["denoise", "extrapolate"]}``): sampler options chosen
    too, on the same pilot data.

    Cost: ``budget`` caps every network call, the reference solve included, at ``budget`` sampling runs' worth;
    ``max_runs`` (instead) caps the sampling runs of the pilot batch, the reference solve coming on top.

    ``method``: ``"search"`` tries every start grid with every option combination first, then searches, then
    tries the combinations on the grid it ends with (issue 16); ``"fast"`` orders the work coarse to fine for small
    budgets (issue 33): the start grids with the given options, the other combinations on the best start only,
    the search with half the runs left, the combinations again on the grid reached (the best sampler options
    depend on the grid), and the rest of the search, with half the step, for the best combination.

    Selection: with ``robust=False`` the grid returned is the best on validation along the search path (never worse
    there than the start). With ``robust=True`` the fit part alone chooses both the fitted candidate (the search's
    best, options included) and the best fixed start grid (options included); validation then decides between
    the two by a paired comparison of their per-state squared errors: the fitted grid is kept only when its mean
    gain exceeds ``z`` standard errors, otherwise the best fixed grid is returned (``info["decision"]``).

    ``progress`` (optional) is called after the reference solve and after every sampling run with ``calls`` (spent
    so far) and ``max_calls`` (the cap).

    ``info`` holds ``cost_nfe`` (network calls spent, all on the pilot batch), ``run_nfe`` (calls of one sampling
    run), ``cost_runs = cost_nfe / run_nfe``, ``reference_nfe``, ``search_runs`` (sampling runs, reference
    excluded), ``evals``, ``start`` (the chosen starting grid), ``options`` (the sampler options to sample with),
    ``start_rms`` / ``rms`` (fit-part RMS of the start and of the grid returned), ``start_val`` / ``val``
    (validation RMS of the same two), ``n_fit`` / ``n_val``, and with ``robust``: ``decision`` (``"fitted"`` or
    ``"fixed"``), ``fixed`` (the best fixed grid's name), ``fitted_val`` and ``gain`` / ``gain_se`` (mean and
    standard error of the paired difference in squared error, fitted minus fixed, on validation).
    """
    _check_sampler(sampler, options)
    for k in choices or {}:
        _check_sampler(sampler, {k: None})
    if method not in METHODS:
        raise ValueError(f"unknown fit method {method!r}; allowed: {', '.join(METHODS)}")
    spec = get_sampler(sampler)
    process = model.process
    if max_runs is not None:
        if not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs < 2:
            raise ValueError(f"max_runs must be an integer >= 2 (sampling runs of the pilot batch), got {max_runs!r}")
    elif not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget >= 1):
        raise ValueError(f"budget must be a finite number >= 1 (sampling runs' worth of NFE), got {budget!r}")
    if not (isinstance(z, (int, float)) and math.isfinite(z) and z >= 0):
        raise ValueError(f"z must be a finite number >= 0 (standard errors), got {z!r}")
    if not starts:
        raise ValueError("grids.optimize needs at least one starting grid")
    fit_idx, val_idx = _split(int(x_T.shape[0]), holdout)
    n = len(next(iter(starts.values()))) - 1
    combos = _combos(options, choices)
    prepared = [spec.prepare(steps, n, dict(o)) if spec.prepare is not None else dict(o) for o in combos]

    def run(ts: Tensor, c: int, seed: int = 0) -> tuple[Tensor, int]:
        bound = Bound(model, cond)
        with torch.no_grad():
            x = spec.fn(bound, x_T, ts, generator=torch.Generator(x_T.device).manual_seed(seed), **prepared[c])
        return x, bound.nfe

    # one run fixes the unit of cost (and checks that the sampler accepts the grid)
    first_name, first = next(iter(starts.items()))
    x_first, run_nfe = run(first, 0)
    run_nfe = max(run_nfe, 1)
    state = _Search(max_calls=int(math.floor(budget * run_nfe)) if max_runs is None else 0, calls=run_nfe, evals=1)
    if spec.stochastic:  # e.g. ddim: deterministic with eta = 0 only; a second noise seed tells
        x_again, calls = run(first, 0, seed=1)
        state.calls += calls
        if not torch.equal(x_first, x_again):
            raise ValueError(f"grids.optimize needs a deterministic sampler; {sampler!r} with options {options} draws "
                             "noise (use e.g. unipc, dpmpp_2m, ipndm, or ddim with eta=0)")
    ref_nfe = 0
    if reference is None:
        reference, ref_nfe = end_state(model, x_T, cond, rtol=rtol, atol=atol)
        state.calls += ref_nfe
        if max_runs is None and state.calls + run_nfe > state.max_calls:
            raise ValueError(f"grids.optimize: the budget of {budget:g} sampling runs ({state.max_calls} calls) "
                             f"does not cover the reference solve ({ref_nfe} calls) and one more run; raise budget "
                             "or pass reference=")
    if max_runs is not None:
        state.max_calls = ref_nfe + max_runs * run_nfe

    def report() -> None:
        if progress is not None:
            progress({"calls": state.calls, "max_calls": state.max_calls})
    report()
    if reference.shape != x_T.shape:
        raise ValueError(f"reference must have the shape of x_T {tuple(x_T.shape)}, got {tuple(reference.shape)}")
    ref = reference.to(torch.float64)
    reserve = [0]  # calls kept back for the last stage of the fast method

    def errors(x: Tensor) -> Tensor:
        err = ((x.to(torch.float64) - ref) ** 2).reshape(len(x), -1).mean(1)
        return torch.where(torch.isfinite(err), err, torch.full_like(err, math.inf))

    def rms(err: Tensor) -> tuple[float, float]:
        return tuple(float(err[idx].mean().sqrt()) if len(idx) else math.nan for idx in (fit_idx, val_idx))

    def evaluate(ts: Tensor, c: int) -> tuple[tuple[float, float], Tensor | None]:
        if state.calls + run_nfe > state.max_calls - reserve[0]:
            raise _BudgetSpentError
        if not (ts[1:] < ts[:-1]).all():
            return (math.inf, math.inf), None
        try:
            x, calls = run(ts, c)
        except (ValueError, ZeroDivisionError, OverflowError):
            return (math.inf, math.inf), None
        state.calls += calls
        state.evals += 1
        report()
        err = errors(x)
        v = rms(err)
        state.history.append(v[0])
        return v, err

    def val_key(v: tuple[float, float]) -> float:
        return v[1] if len(val_idx) else v[0]

    # the fixed grids: every start grid with every option combination ("search"), or coarse to fine ("fast")
    err_first = errors(x_first)
    scores = {(first_name, 0): (rms(err_first), err_first)}
    try:
        if method == "search":
            for name, ts in starts.items():
                for c in range(len(combos)):
                    if (name, c) not in scores:
                        scores[(name, c)] = evaluate(ts, c)
        else:
            reserve[0] = (len(combos) - 1) * run_nfe
            for name, ts in starts.items():
                if (name, 0) not in scores:
                    scores[(name, 0)] = evaluate(ts, 0)
            top = min((k for k in scores), key=lambda k: scores[k][0][0])[0]
            reserve[0] = 0
            for c in range(1, len(combos)):
                scores[(top, c)] = evaluate(starts[top], c)
    except _BudgetSpentError:
        pass
    best_name, combo = min(scores, key=lambda k: (scores[k][0][0], k[1]))
    best_ts = starts[best_name]
    start_score, start_err = scores[(best_name, combo)]
    # accepted iterates: (scores, grid, option combination, per-state squared errors)
    path: list[tuple[tuple[float, float], Tensor, int, Tensor | None]] = [(start_score, best_ts, combo, start_err)]
    def pattern(d: float) -> None:
        """The pattern search from ``best_z`` (coordinate moves of size ``d``, repeated in a direction while they
        improve, ``d`` halved when a sweep finds nothing) until ``d < min_delta`` or the budget is spent."""
        nonlocal best, best_z
        while d >= min_delta:
            improved = False
            for j in range(len(best_z)):
                for sign in (1.0, -1.0):
                    moved = False
                    while True:
                        cand = best_z.clone()
                        cand[j] += sign * d
                        ts = grid_from_logits(process, B @ cand)
                        v, err = evaluate(ts, combo)
                        if v[0] < best[0] * (1 - 1e-9):
                            best, best_z, moved, improved = v, cand, True, True
                            path.append((v, ts, combo, err))
                        else:
                            break
                    if moved:
                        break
            if not improved:
                d /= 2

    start_combo = combo
    if n >= 2 and best_ts[0] == process.t_max:
        B = basis(n, knots)
        w = torch.linalg.lstsq(B, logits_from_grid(process, best_ts)[:, None]).solution[:, 0]
        try:
            ts = grid_from_logits(process, B @ w)  # the start as the parameterization sees it
            v, err = evaluate(ts, combo)
            best, best_z = v, w
            path.append((v, ts, combo, err))
            if method == "fast":
                # coarse to fine: half the runs left, then the other option combinations on the grid reached (the
                # best sampler options depend on the grid), then the rest with the best combination
                runs_left = (state.max_calls - state.calls) // run_nfe
                reserve[0] = max(0, runs_left - max(runs_left // 2, 2 * len(w))) * run_nfe
                with contextlib.suppress(_BudgetSpentError):
                    pattern(delta)
                reserve[0] = 0
                here = grid_from_logits(process, B @ best_z)
                scored = {combo: best}
                for c in range(len(combos)):
                    if c != combo:
                        v, err = evaluate(here, c)
                        path.append((v, here, c, err))
                        scored[c] = v
                c_new = min(scored, key=lambda c: scored[c][0])
                combo, best = c_new, scored[c_new]
                pattern(delta / 2)
            else:
                pattern(delta)
        except _BudgetSpentError:
            pass
        reserve[0] = 0
        # the other option combinations on the grid the search ended with
        last = path[-1][1]
        for c in range(len(combos)):
            if method == "search" and c != combo and len(path) > 1 and state.calls + run_nfe <= state.max_calls:
                v, err = evaluate(last, c)
                path.append((v, last, c, err))
    info_sel: dict = {}
    if robust and len(val_idx):
        # the fit part chooses the candidate and the fixed grid; validation only tests the one difference
        cand = min(range(len(path)), key=lambda i: (path[i][0][0], -i))
        (c_fit, c_val), c_grid, c_combo, c_err = path[cand]
        gain, se = paired_gain(c_err[val_idx], start_err[val_idx]) if c_err is not None else (math.inf, math.inf)
        keep = cand > 0 and math.isfinite(gain) and gain + z * se < 0
        pick = cand if keep else 0
        info_sel = {"decision": "fitted" if keep else "fixed", "fixed": best_name, "fixed_options": combos[start_combo],
                    "fitted_rms": c_fit, "fitted_val": c_val, "fixed_val": start_score[1], "gain": gain,
                    "gain_se": se, "z": float(z)}
    else:
        # the best on validation (early stopping); the start is a candidate, so never worse than it there
        pick = min(range(len(path)), key=lambda i: (val_key(path[i][0]), i))
    (fit_rms, val_rms), grid, c_best, _ = path[pick]
    chosen = dict(combos[c_best])
    info = {"sampler": sampler, "steps": steps, "intervals": n, "run_nfe": run_nfe, "cost_nfe": state.calls,
            "cost_runs": state.calls / run_nfe, "search_runs": (state.calls - ref_nfe) / run_nfe,
            "budget_runs": None if budget is None else float(budget), "max_runs": max_runs,
            "reference_nfe": ref_nfe, "method": method, "robust": bool(robust),
            "evals": state.evals, "n_pilot": int(x_T.shape[0]), "n_fit": len(fit_idx), "n_val": len(val_idx),
            "start": best_name, "start_options": combos[start_combo],
            "start_scores": {f"{k[0]}{combos[k[1]] if len(combos) > 1 else ''}": v[0][0] for k, v in scores.items()},
            "start_rms": start_score[0], "start_val": start_score[1], "rms": fit_rms, "val": val_rms,
            "options": chosen, "path": len(path), "picked": pick, **info_sel}
    log.info("grids.optimize(%s, steps=%d, %s): pilot RMS %.3e -> %.3e, validation %.3e -> %.3e (start %s, options "
             "%s%s); cost = %.1f x one sampling run in NFE (%d network calls on %d pilot samples, reference %d)",
             sampler, steps, method, start_score[0], fit_rms, start_score[1], val_rms, best_name, chosen,
             f", {info_sel['decision']}" if info_sel else "", info["cost_runs"], state.calls, info["n_pilot"],
             ref_nfe)
    return grid, info
