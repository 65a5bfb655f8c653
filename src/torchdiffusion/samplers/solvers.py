"""Few-step solvers of the probability-flow ODE (and DPM-Solver++ SDE): Euler, Heun, DPM-Solver++ (2M, 3M, 2S,
2M-SDE), UniPC and iPNDM.

All of them only use ``model.predict(x, t) -> (x0_hat, eps_hat)`` and the process's ``alpha``, ``sigma`` and
``log_snr``, so they work for every process and prediction type. Two coordinate systems:

- VE coordinates ``y = x / alpha``, ``s = sigma / alpha``: the PF-ODE is ``dy/ds = eps(y, s)`` (Karras et al.
  2022; THEORY T-DDIM-1). Euler there is DDIM; Heun is EDM's Algorithm 1; iPNDM is Adams-Bashforth on eps.
- ``lambda = log(alpha / sigma) = -log s``: exponential integrators in data prediction (DPM-Solver++,
  UniPC; THEORY B-5). Their first-order step is :func:`~torchdiffusion.samplers.common.ddim_step`.

Common options:

- ``final_step``: how the last interval reaches noise 0. ``"denoise"`` returns Tweedie's ``x0_hat`` at the last
  positive time (the first-order step of every solver: noise 0 is ``lambda = inf``, where multistep
  polynomials in lambda cannot be used). ``"extrapolate"`` instead extrapolates the last x0 predictions to
  ``s = 0`` as a polynomial in ``s^2`` (along the ODE ``d x0_hat / ds = O(s)``, so ``x0_hat(s) = x0(0) + c s^2 +
  O(s^4)``). ``"solver"`` is the solver's own step (iPNDM: Adams-Bashforth in ``s`` down to 0; the others:
  the same as ``"denoise"``).
- ``lower_order_final`` (multistep): a step never uses a higher order than the number of steps left, which keeps
  few-step sampling stable (as diffusers does).
- ``clip_x0`` / ``thresholding``: clip x0_hat to ``[-clip_x0, clip_x0]``, or Imagen's dynamic thresholding at the
  given percentile (e.g. 0.995), bounded by ``clip_x0`` when both are given; eps is recomputed to match.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchdiffusion.samplers.common import (
    coeffs,
    combine,
    ddim_step,
    emit,
    exp_integrator_step,
    half_log_snr,
    noise_like,
    phi,
    poly_weights,
    predict_interval,
    predict_limited,
)
from torchdiffusion.samplers.registry import register

FINAL_STEPS = ("denoise", "extrapolate", "solver")
SOLVER_TYPES = ("midpoint", "taylor")
UNIPC_VARIANTS = ("bh1", "bh2")


def heun_intervals(steps: int, **_) -> int:
    """Two evaluations per interval except the last one (to noise 0): ``n`` intervals cost ``2n - 1`` NFE."""
    return (steps + 1) // 2


def _check(final_step: str, clip_x0: float | None, thresholding: float | None, order: int | None = None,
           max_order: int = 3) -> None:
    if final_step not in FINAL_STEPS:
        raise ValueError(f"unknown final_step {final_step!r}; allowed: {', '.join(FINAL_STEPS)}")
    if clip_x0 is not None and not clip_x0 > 0:
        raise ValueError(f"clip_x0 must be > 0, got {clip_x0}")
    if thresholding is not None and not 0 < thresholding <= 1:
        raise ValueError(f"thresholding is a percentile in (0, 1], got {thresholding}")
    if order is not None and (not isinstance(order, int) or not 1 <= order <= max_order):
        raise ValueError(f"order must be an integer in 1..{max_order}, got {order!r}")


def _step_order(order: int, i: int, n: int, available: int, lower_order_final: bool) -> int:
    k = min(order, available)
    return min(k, n - i) if lower_order_final else k


def extrapolate_x0(s_hist: list[float], x0_hist: list[Tensor], k: int = 2) -> Tensor:
    """Richardson extrapolation of the last ``k`` x0 predictions to ``s = 0`` as a polynomial in ``s^2``."""
    k = min(k, len(x0_hist))
    nodes = [v**2 for v in s_hist[-k:]]
    return combine(poly_weights(nodes, [1.0] + [0.0] * (k - 1)), x0_hist[-k:])


def _finish(final_step: str, x0: Tensor, s_hist: list[float], x0_hist: list[Tensor]) -> Tensor:
    if final_step == "extrapolate":
        return extrapolate_x0(s_hist, x0_hist)
    return x0


# --- VE coordinates: Euler, Heun, iPNDM -------------------------------------------------------------------------

@register("euler")
def euler(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, final_step: str = "denoise",
          clip_x0: float | None = None, thresholding: float | None = None) -> Tensor:
    """Euler on ``dy/ds = eps`` in VE coordinates (Karras et al. 2022, THEORY T-DDIM-1): algebraically the same
    as deterministic DDIM, ``x_s = alpha_s x0_hat + sigma_s eps_hat``."""
    _check(final_step, clip_x0, thresholding)
    s_hist, x0_hist = [], []
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps, (a_t, sig_t), (a_s, sig_s) = predict_interval(model, x, t, s, clip_x0, thresholding)
        s_hist.append(sig_t / a_t)
        x0_hist.append(x0)
        x = _finish(final_step, x0, s_hist, x0_hist) if sig_s == 0 else ddim_step(x0, eps, a_s, sig_s)
        emit(callback, i, t, x, x0)
    return x


@register("heun", intervals=heun_intervals)
def heun(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, final_step: str = "denoise",
         clip_x0: float | None = None, thresholding: float | None = None, max_ratio: float = 10.0) -> Tensor:
    """Heun's method on ``dy/ds = eps`` (EDM Algorithm 1, deterministic; THEORY B-9): an Euler step, then the
    trapezoidal correction ``y_s = y_t + (s_s - s_t)(eps_t + eps_s') / 2``; the last step, to noise 0, is Euler.
    ``steps`` NFE buy ``(steps + 1) // 2`` intervals.

    An interval over which the noise level falls by more than ``max_ratio`` (``s_t / s_s``, default 10) takes
    the Euler step alone (saving its second evaluation): there the correction multiplies ``eps_s' - eps_t`` by
    ``(s_t - s_s) / 2``, which is unstable from a start like the cosine schedule's ``s = 2e4`` (t = 999; with a
    trained digits model the textbook scheme gives FD 230 at 5-20 NFE, this one 7.4 / 5.1 / 4.7). Grids of
    many steps never trigger it; ``max_ratio = inf`` is the textbook scheme."""
    _check(final_step, clip_x0, thresholding)
    if not max_ratio > 1:
        raise ValueError(f"max_ratio must be > 1, got {max_ratio}")
    s_hist, x0_hist = [], []
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps, (a_t, sig_t), (a_s, sig_s) = predict_interval(model, x, t, s, clip_x0, thresholding)
        s_hist.append(sig_t / a_t)
        x0_hist.append(x0)
        if sig_s == 0:
            x = _finish(final_step, x0, s_hist, x0_hist)
        else:
            x = ddim_step(x0, eps, a_s, sig_s)
            if (sig_t / a_t) <= max_ratio * (sig_s / a_s):
                _, eps_e = predict_limited(model, x, s, clip_x0, thresholding)
                x = x + (a_s * (sig_s / a_s - sig_t / a_t) / 2) * (eps_e - eps)
        emit(callback, i, t, x, x0)
    return x


_AB = {1: [1.0], 2: [3 / 2, -1 / 2], 3: [23 / 12, -16 / 12, 5 / 12], 4: [55 / 24, -59 / 24, 37 / 24, -9 / 24]}


@register("ipndm")
def ipndm(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, order: int = 4,
          variable_step: bool = True, final_step: str = "solver", clip_x0: float | None = None,
          thresholding: float | None = None) -> Tensor:
    """Improved PNDM (Zhang & Chen 2023): linear multistep Adams-Bashforth of order <= 4 on ``dy/ds = eps``,
    ``y_s = y_t + (s_s - s_t) eps_bar``, warming up with lower orders (no extra NFE).

    ``variable_step=True`` integrates the polynomial through the past ``(s_j, eps_j)`` exactly over
    ``[s_t, s_s]`` (Adams-Bashforth for uneven steps; the same as DEIS's rho-AB); ``False`` uses the classic
    fixed coefficients ``(55, -59, 37, -9) / 24`` (exact only for equal steps in s). ``final_step="solver"``
    takes the multistep step down to ``s = 0``."""
    _check(final_step, clip_x0, thresholding, order, max_order=4)
    s_hist, x0_hist, eps_hist = [], [], []
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps, (a_t, sig_t), (a_s, sig_s) = predict_interval(model, x, t, s, clip_x0, thresholding)
        st, ss = sig_t / a_t, sig_s / a_s
        s_hist.append(st)
        x0_hist.append(x0)
        eps_hist.append(eps)
        if sig_s == 0 and final_step != "solver":
            x = _finish(final_step, x0, s_hist, x0_hist)
        else:
            k = min(order, len(eps_hist))
            h = ss - st
            if variable_step:
                nodes = [v - st for v in reversed(s_hist[-k:])]
                w = poly_weights(nodes, [h**m / (m + 1) for m in range(k)])
            else:
                w = _AB[k]
            eps_bar = combine(w, eps_hist[::-1][:k])
            x = ddim_step(x0, eps, a_s, sig_s) + (a_s * h) * (eps_bar - eps)
        emit(callback, i, t, x, x0)
    return x


# --- lambda = log(alpha/sigma): DPM-Solver++ ------------------------------------------------------------------

def _dpmpp_multistep(model, x: Tensor, ts: Tensor, order: int, eta: float, generator, callback, solver_type: str,
                     lower_order_final: bool, final_step: str, clip_x0, thresholding) -> Tensor:
    """DPM-Solver++(kM) / SDE: multistep data-prediction exponential integrator of order ``order``."""
    _check(final_step, clip_x0, thresholding)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    n = len(ts) - 1
    lam_hist, s_hist, x0_hist = [], [], []
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        x0, eps, (a_t, sig_t), (a_s, sig_s) = predict_interval(model, x, t, s, clip_x0, thresholding)
        lam_t = half_log_snr(a_t, sig_t)
        lam_hist.append(lam_t)
        s_hist.append(sig_t / a_t)
        x0_hist.append(x0)
        if sig_s == 0:
            x = _finish(final_step, x0, s_hist, x0_hist)
        else:
            k = _step_order(order, i, n, len(x0_hist), lower_order_final)
            hist = [(lam_hist[-j] - lam_t, x0_hist[-j]) for j in range(1, k + 1)]
            z = noise_like(x, generator) if eta > 0 else None
            x = exp_integrator_step(x0, eps, a_s, sig_s, half_log_snr(a_s, sig_s) - lam_t, hist, eta, z,
                                    midpoint=solver_type == "midpoint" and k == 2)
        emit(callback, i, t, x, x0)
    return x


@register("dpmpp_2m")
def dpmpp_2m(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, solver_type: str = "midpoint",
             lower_order_final: bool = True, final_step: str = "denoise", clip_x0: float | None = None,
             thresholding: float | None = None) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022b, Algorithm 2; THEORY B-5): second-order multistep in lambda with data
    prediction. ``solver_type="midpoint"`` is the paper's rule ``D = (1 + 1/(2r)) x0_t - 1/(2r) x0_prev``;
    ``"taylor"`` integrates the linear interpolant exactly (``phi_1`` weight)."""
    return _dpmpp_multistep(model, x, ts, 2, 0.0, generator, callback, solver_type, lower_order_final,
                            final_step, clip_x0, thresholding)


@register("dpmpp_3m")
def dpmpp_3m(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, solver_type: str = "taylor",
             lower_order_final: bool = True, final_step: str = "denoise", clip_x0: float | None = None,
             thresholding: float | None = None) -> Tensor:
    """DPM-Solver++(3M): third-order multistep in lambda, the quadratic interpolant of the last three x0
    predictions integrated exactly against ``e^{-(h-u)}`` (``phi_1``, ``phi_2`` weights; B-5)."""
    return _dpmpp_multistep(model, x, ts, 3, 0.0, generator, callback, solver_type, lower_order_final,
                            final_step, clip_x0, thresholding)


@register("dpmpp_2m_sde", stochastic=True)
def dpmpp_2m_sde(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, eta: float = 1.0,
                 solver_type: str = "midpoint", lower_order_final: bool = True, final_step: str = "denoise",
                 clip_x0: float | None = None, thresholding: float | None = None) -> Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022b; as in k-diffusion): the exponential integrator with
    ``h' = (1 + eta) h``, ``x_s = alpha_s x0 + sigma_s e^{-eta h} eps + sigma_s sqrt(1 - e^{-2 eta h}) z +
    second-order term``. ``eta = 0`` is DPM-Solver++(2M); ``eta = 1`` the paper's SDE solver."""
    return _dpmpp_multistep(model, x, ts, 2, float(eta), generator, callback, solver_type, lower_order_final,
                            final_step, clip_x0, thresholding)


@register("dpmpp_2s", intervals=heun_intervals)
def dpmpp_2s(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, r: float = 0.5,
             solver_type: str = "midpoint", final_step: str = "denoise", clip_x0: float | None = None,
             thresholding: float | None = None) -> Tensor:
    """DPM-Solver++(2S) (Lu et al. 2022b, Algorithm 1): singlestep second order; per interval a first-order step
    to ``lambda_u = lambda_t + r h``, then ``x_s`` from ``D = (1 - 1/(2r)) x0_t + 1/(2r) x0_u``. Two NFE per
    interval, one for the last (to noise 0): ``steps`` buy ``(steps + 1) // 2`` intervals."""
    _check(final_step, clip_x0, thresholding)
    if not 0 < r < 1:
        raise ValueError(f"r must be in (0, 1), got {r}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"unknown solver_type {solver_type!r}; allowed: {', '.join(SOLVER_TYPES)}")
    proc = model.process
    s_hist, x0_hist = [], []
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps, (a_t, sig_t), (a_s, sig_s) = predict_interval(model, x, t, s, clip_x0, thresholding)
        s_hist.append(sig_t / a_t)
        x0_hist.append(x0)
        if sig_s == 0:
            x = _finish(final_step, x0, s_hist, x0_hist)
        else:
            lam_t = half_log_snr(a_t, sig_t)
            h = half_log_snr(a_s, sig_s) - lam_t
            t_u = proc.t_from_log_snr(torch.tensor(2 * (lam_t + r * h), dtype=torch.float64))
            a_u, sig_u = coeffs(proc, t_u)
            x_u = ddim_step(x0, eps, a_u, sig_u)
            x0_u, _ = predict_limited(model, x_u, t_u, clip_x0, thresholding)
            hist = [(0.0, x0), (half_log_snr(a_u, sig_u) - lam_t, x0_u)]
            x = exp_integrator_step(x0, eps, a_s, sig_s, h, hist, midpoint=solver_type == "midpoint")
        emit(callback, i, t, x, x0)
    return x


# --- UniPC ------------------------------------------------------------------------------------------------------

def unipc_coefficients(rks: list[float], h: float, variant: str) -> tuple[float, list[float], list[list[float]]]:
    """UniPC's ``B(h)``, right-hand side ``b_i = -phi_i(h) i! / (h^i B(h))`` and matrix ``R[i][k] = r_k^i``
    (Zhao et al. 2023, eqs. 8-9, data prediction): ``B(h) = -h`` ("bh1") or ``e^{-h} - 1`` ("bh2")."""
    B_h = -h if variant == "bh1" else math.expm1(-h)
    p = len(rks)
    b = [-phi(h, i) * math.factorial(i) / (h**i * B_h) for i in range(1, p + 1)]
    return B_h, b, [[r**i for r in rks] for i in range(p)]


def _solve(R: list[list[float]], b: list[float]) -> list[float]:
    return torch.linalg.solve(torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)).tolist()


def unipc_update(x: Tensor, x0: Tensor, a_t: float, sig_t: float, a_s: float, sig_s: float, h: float,
                 prev: list[tuple[float, Tensor]], variant: str, x0_new: Tensor | None = None) -> Tensor:
    """One UniP (``x0_new is None``) or UniC step from ``(x, t)`` to ``s``. ``x0`` is the prediction at ``t``,
    ``prev = [(lambda_j - lambda_t, x0_j), ...]`` older predictions (newest first); UniC also uses the
    prediction ``x0_new`` at the predicted point ``s`` (r = 1). The first-order part is the DDIM step."""
    out = ddim_step(x0, (x - a_t * x0) / sig_t, a_s, sig_s)
    rks = [d / h for d, _ in prev]
    diffs = [(v - x0) / r for r, (_, v) in zip(rks, prev)]
    if x0_new is not None:
        rks, diffs = rks + [1.0], diffs + [x0_new - x0]
    if not diffs:
        return out
    B_h, b, R = unipc_coefficients(rks if x0_new is not None else rks + [1.0], h, variant)
    if x0_new is None:  # predictor: order p uses the p - 1 older points
        rhos = [0.5] if len(diffs) == 1 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    else:
        rhos = [0.5] if len(diffs) == 1 else _solve(R, b)
    return out - (a_s * B_h) * combine(rhos, diffs)


@register("unipc")
def unipc(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, order: int = 3, variant: str = "bh2",
          corrector: bool = True, lower_order_final: bool = True, final_step: str = "denoise",
          clip_x0: float | None = None, thresholding: float | None = None) -> Tensor:
    """UniPC (Zhao et al. 2023): UniP-p predictor (multistep in lambda, data prediction, ``B(h)`` variant
    ``"bh1"`` or ``"bh2"``, order 1-3) and the UniC corrector, which reuses the model evaluation at the
    predicted point (no extra NFE) to raise the order by one. The prediction at the *uncorrected* point is kept
    in the history, as in the paper."""
    _check(final_step, clip_x0, thresholding, order)
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; allowed: {', '.join(UNIPC_VARIANTS)}")
    proc = model.process
    n = len(ts) - 1
    lam_hist, s_hist, x0_hist = [], [], []
    last = None  # (x, a, sigma, lambda, order) of the previous step's start, for the corrector
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        x0, _ = predict_limited(model, x, t, clip_x0, thresholding)
        a_t, sig_t = coeffs(proc, t)
        a_s, sig_s = coeffs(proc, s)
        lam_t = half_log_snr(a_t, sig_t)
        if corrector and last is not None:
            x_p, a_p, sig_p, lam_p, k_p = last
            prev = [(lam_hist[-j] - lam_p, x0_hist[-j]) for j in range(2, k_p + 1)]
            x = unipc_update(x_p, x0_hist[-1], a_p, sig_p, a_t, sig_t, lam_t - lam_p, prev, variant, x0)
        lam_hist.append(lam_t)
        s_hist.append(sig_t / a_t)
        x0_hist.append(x0)
        if sig_s == 0:
            x = _finish(final_step, x0, s_hist, x0_hist)
        else:
            k = _step_order(order, i, n, len(x0_hist), lower_order_final)
            prev = [(lam_hist[-j] - lam_t, x0_hist[-j]) for j in range(2, k + 1)]
            last = (x, a_t, sig_t, lam_t, k)
            x = unipc_update(x, x0, a_t, sig_t, a_s, sig_s, half_log_snr(a_s, sig_s) - lam_t, prev, variant)
        emit(callback, i, t, x, x0)
    return x
