"""DDPM ancestral sampling (Algorithm 2), DDIM with eta, and the Permenter-Yuan generalized sampler."""

from __future__ import annotations

import math

from torch import Tensor

from torchdiffusion.samplers.common import (
    coeffs,
    ddim_step,
    emit,
    noise_like,
    posterior_var,
    predict_interval,
    predict_limited,
)
from torchdiffusion.samplers.registry import register


@register("ddpm", stochastic=True)
def ddpm(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, variance: str = "small",
         clip_x0: float | None = None, thresholding: float | None = None) -> Tensor:
    """Ancestral sampling (DDPM Algorithm 2): ``x_s = mu_tilde(x_t, x0_hat) + sigma z``, no noise at the end.

    ``variance="small"`` uses the posterior variance (beta-tilde_t), ``"large"`` the forward step variance
    (beta_t); on a sub-grid both use the variances between the grid points (T-ALG-2, B-3).
    """
    if variance not in ("small", "large"):
        raise ValueError(f"unknown variance {variance!r}; allowed: small, large")
    proc = model.process
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, _ = predict_limited(model, x, t, clip_x0, thresholding)
        c_x, c_0, var = (float(c) for c in proc.posterior_coefficients(t, s))
        if variance == "large":
            var = float(proc.transition(t, s)[1])
        x = c_x * x + c_0 * x0
        if i < len(ts) - 2 and var > 0:
            x = x + math.sqrt(var) * noise_like(x, generator)
        emit(callback, i, t, x, x0)
    return x


@register("ddim", stochastic=True)
def ddim(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, eta: float = 0.0,
         clip_x0: float | None = None, thresholding: float | None = None) -> Tensor:
    """DDIM (Song et al. 2021a): ``x_s = alpha_s x0 + sqrt(sigma_s^2 - c^2) eps + c z`` with
    ``c = eta * sqrt(posterior variance)``; ``eta = 0`` is deterministic, ``eta = 1`` is ancestral (B-3)."""
    if eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    proc = model.process
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps = predict_limited(model, x, t, clip_x0, thresholding)
        a_s, s_s = coeffs(proc, s)
        c = eta * math.sqrt(posterior_var(proc, t, s)) if eta > 0 else 0.0
        x = ddim_step(x0, eps, a_s, s_s, c, noise_like(x, generator) if c > 0 else None)
        emit(callback, i, t, x, x0)
    return x


def py24_levels(s_t: float, s_s: float, mu: float) -> tuple[float, float]:
    """Permenter-Yuan noise levels (THEORY T-DDIM-2): ``s' = (s_s / s_t^mu)^(1/(1-mu))`` and the added noise
    std ``eta = sqrt(s_s^2 - s'^2)``, in VE coordinates ``s = sigma/alpha``."""
    s_prime = (s_s / s_t**mu) ** (1 / (1 - mu)) if s_s > 0 else 0.0
    return s_prime, math.sqrt(max(s_s**2 - s_prime**2, 0.0))


@register("py24", stochastic=True)
def py24(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, mu: float = 0.0,
         gamma: float = 1.0, clip_x0: float | None = None, thresholding: float | None = None) -> Tensor:
    """Permenter & Yuan (2024) generalized sampler in VE coordinates ``y = x/alpha``:
    ``y_s = y_t + (s' - s_t) eps_bar + eta w`` with ``eps_bar = gamma eps_t + (1 - gamma) eps_prev``.

    ``mu = 0`` is DDIM, ``mu = 1/2`` is DDPM with beta-tilde; ``gamma = 1`` is no acceleration, ``gamma = 2``
    the suggested momentum (T-DDIM-2, T-DDIM-3). One network call per step.

    All three samplers take ``clip_x0`` (clamp the x0 prediction to [-clip_x0, clip_x0], eps recomputed to
    match, as diffusers' ``clip_sample``) and ``thresholding`` (Imagen's dynamic thresholding percentile).
    """
    if not 0 <= mu < 1:
        raise ValueError(f"mu must be in [0, 1), got {mu}")
    eps_prev = None
    for i in range(len(ts) - 1):
        t, s = ts[i], ts[i + 1]
        x0, eps, (a_t, sig_t), (a_s, sig_s) = predict_interval(model, x, t, s, clip_x0, thresholding)
        st, ss = sig_t / a_t, sig_s / a_s
        eps_bar = eps if eps_prev is None else gamma * eps + (1 - gamma) * eps_prev
        eps_prev = eps
        s_prime, eta = py24_levels(st, ss, mu)
        y = x / a_t + (s_prime - st) * eps_bar
        if eta > 0:
            y = y + eta * noise_like(x, generator)
        x = a_s * y
        emit(callback, i, t, x, x0)
    return x
