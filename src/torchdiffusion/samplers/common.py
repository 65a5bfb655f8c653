"""Helpers shared by every sampler (one implementation of each step formula)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from torchdiffusion._tensor import SampleGenerators
from torchdiffusion.processes import Process


def coeffs(process: Process, t: Tensor) -> tuple[float, float]:
    """``(alpha(t), sigma(t))`` as Python floats (grids are scalar per step)."""
    return float(process.alpha(t)), float(process.sigma(t))


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn only from ``generator``."""
    if isinstance(generator, SampleGenerators):
        return generator.randn(tuple(x.shape), dtype=x.dtype, device=x.device)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def emit(callback: Callable[[dict], None] | None, i: int, t: Tensor, x: Tensor, x0: Tensor, **extra) -> None:
    """Report one step to the user's callback."""
    if callback is not None:
        callback({"i": i, "t": float(t), "x": x, "x0": x0, **extra})


def ddim_step(x0: Tensor, eps: Tensor, a_s: float, s_s: float, noise_std: float = 0.0,
              z: Tensor | None = None) -> Tensor:
    """Generalized DDIM update ``x_s = a_s x0 + sqrt(s_s^2 - c^2) eps + c z`` (Song et al. 2021a eq. 12,
    B-3), written for any affine process."""
    out = a_s * x0 + max(s_s**2 - noise_std**2, 0.0) ** 0.5 * eps
    if noise_std > 0:
        out = out + noise_std * z
    return out


def posterior_var(process: Process, t: Tensor, s: Tensor) -> float:
    """Variance of ``q(x_s | x_t, x0)`` (beta-tilde for adjacent DDPM steps)."""
    return float(process.posterior_coefficients(t, s)[2])


# --- exponential integrators and multistep helpers (samplers/solvers.py) -------------------------------------

def half_log_snr(a: float, s: float) -> float:
    """``lambda = log(alpha / sigma)`` (DPM-Solver's time variable); ``+inf`` at noise 0."""
    return math.inf if s == 0 else math.log(a) - math.log(s)


def phi(h: float, m: int) -> float:
    """``phi_m(h) = int_0^h e^{-(h - u)} u^m / m! du`` (the exponential-integrator weights of Lu et al. 2022):
    ``phi_0 = 1 - e^{-h}``, ``phi_1 = h - 1 + e^{-h}``, ``phi_m = h^m / m! - phi_{m-1}``. A power series for
    ``h < 1`` avoids the cancellation of the closed form."""
    if h < 1.0:
        total, term, j = 0.0, h ** (m + 1) / math.factorial(m + 1), 0
        while abs(term) > 1e-18 * max(abs(total), 1e-300) and j < 60:
            total += term
            j += 1
            term *= -h / (m + 1 + j)
        return total
    out = -math.expm1(-h)
    for k in range(1, m + 1):
        out = h**k / math.factorial(k) - out
    return out


def poly_weights(nodes: Sequence[float], moments: Sequence[float]) -> list[float]:
    """Weights ``w`` with ``sum_j w_j f(nodes_j) = L[p]`` for the interpolating polynomial ``p`` of ``f`` at
    ``nodes``, where ``moments[m] = L[u^m]`` describes the linear functional ``L`` (an integral, a derivative,
    a value). One helper for every multistep rule: Adams-Bashforth weights, Taylor terms of DPM-Solver and
    Richardson extrapolation. Solves ``sum_j w_j nodes_j^m = moments[m]`` (float64)."""
    k = len(nodes)
    if k == 1:
        return [float(moments[0])]
    V = torch.tensor([[float(u) ** m for u in nodes] for m in range(k)], dtype=torch.float64)
    return torch.linalg.solve(V, torch.tensor([float(v) for v in moments[:k]], dtype=torch.float64)).tolist()


def combine(weights: Sequence[float], values: Sequence[Tensor]) -> Tensor:
    """``sum_j w_j values_j``."""
    out = weights[0] * values[0]
    for w, v in zip(weights[1:], values[1:]):
        out = out + w * v
    return out


def exp_integrator_moments(h: float, k: int, eta: float = 0.0, midpoint: bool = False) -> list[float]:
    """Moments ``int_0^h rho(u) u^m du`` (m = 0..k-1, the m = 0 part excluded: it is the DDIM step) of the
    data-prediction exponential integrator with weight ``rho(u) = (1+eta) e^{-(1+eta)(h-u)}`` (B-5; eta > 0 is
    the SDE variant of DPM-Solver++). ``midpoint`` replaces the first moment by ``(1 - e^{-h'}) h / 2`` (the
    DPM-Solver++(2M) paper's rule, as in diffusers' ``solver_type="midpoint"``)."""
    c = 1.0 + eta
    mom = [0.0] + [math.factorial(m) * phi(c * h, m) / c**m for m in range(1, k)]
    if midpoint and k > 1:
        mom[1] = -math.expm1(-c * h) * h / 2
    return mom


def exp_integrator_step(x0: Tensor, eps: Tensor, a_s: float, s_s: float, h: float,
                        history: Sequence[tuple[float, Tensor]] = (), eta: float = 0.0, z: Tensor | None = None,
                        midpoint: bool = False) -> Tensor:
    """DPM-Solver++ step in ``lambda = log(alpha/sigma)`` (Lu et al. 2022b; THEORY B-5), data prediction:
    ``x_s = alpha_s x0 + sigma_s e^{-eta h} eps + sigma_s sqrt(1 - e^{-2 eta h}) z + alpha_s L[D]``, where the
    first part is :func:`ddim_step` (DPM-Solver-1 == DDIM) and ``L[D]`` integrates the interpolating polynomial
    of the x0 predictions ``history = [(lambda_j - lambda_t, x0_j), ...]`` (newest first, the current one at 0)
    against ``rho``. ``eta = 0`` is the ODE; ``eta = 1`` is DPM-Solver++ SDE."""
    noise_std = s_s * math.sqrt(-math.expm1(-2 * eta * h)) if eta > 0 else 0.0
    out = ddim_step(x0, eps, a_s, s_s, noise_std, z)
    if len(history) > 1:
        w = poly_weights([d for d, _ in history], exp_integrator_moments(h, len(history), eta, midpoint))
        out = out + a_s * combine(w, [v for _, v in history])
    return out


def dynamic_threshold(x0: Tensor, percentile: float, max_value: float | None = None) -> Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022): per sample ``c = quantile(|x0|, percentile)``
    clamped to ``[1, max_value]``; ``x0 -> clamp(x0, -c, c) / c``."""
    flat = x0.flatten(1).abs().float()
    c = torch.quantile(flat, percentile, dim=1).clamp(min=1.0, max=max_value if max_value else math.inf)
    c = c.to(x0.dtype).reshape(-1, *([1] * (x0.ndim - 1)))
    return torch.maximum(torch.minimum(x0, c), -c) / c


def predict_limited(model, x: Tensor, t: Tensor, clip_x0: float | None = None,
                    thresholding: float | None = None) -> tuple[Tensor, Tensor]:
    """``model.predict`` with the x0 prediction clipped to ``[-clip_x0, clip_x0]`` or dynamically thresholded
    (``thresholding`` = percentile, ``clip_x0`` then bounds the threshold), eps recomputed to match."""
    x0, eps = model.predict(x, t)
    if clip_x0 is None and thresholding is None:
        return x0, eps
    x0 = dynamic_threshold(x0, thresholding, clip_x0) if thresholding is not None else x0.clamp(-clip_x0, clip_x0)
    a, s = coeffs(model.process, t)
    return x0, (x - a * x0) / s if s > 0 else eps


def predict_interval(model, x: Tensor, t: Tensor, s: Tensor, clip_x0: float | None = None,
                     thresholding: float | None = None) -> tuple[Tensor, Tensor, tuple, tuple]:
    """The start of one step of a sampler over ``[t, s]``: the (limited) x0 and eps predictions at ``t``
    (:func:`predict_limited`, one network evaluation) and the coefficients ``(alpha, sigma)`` of both ends."""
    x0, eps = predict_limited(model, x, t, clip_x0, thresholding)
    return x0, eps, coeffs(model.process, t), coeffs(model.process, s)
