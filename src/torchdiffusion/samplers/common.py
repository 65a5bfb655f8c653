"""Helpers shared by every sampler (one implementation of each step formula)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..processes import Process


def coeffs(process: Process, t: Tensor) -> tuple[float, float]:
    """``(alpha(t), sigma(t))`` as Python floats (grids are scalar per step)."""
    return float(process.alpha(t)), float(process.sigma(t))


def noise_like(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Standard normal noise shaped like ``x``, drawn only from ``generator``."""
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


def pf_ode_drift(model, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Probability-flow ODE ``dx/dt = f(t) x - 1/2 g(t)^2 score`` (Song et al. 2021, THEORY T-SDE-10), with
    ``score = -eps / sigma``. Returns ``(dx/dt, x0_hat, eps_hat)`` from one network call."""
    proc = model.process
    x0, eps = model.predict(x, t)
    f, g = proc.sde_coefficients(t)
    _, sig = coeffs(proc, t)
    return float(f) * x + 0.5 * float(g) ** 2 / sig * eps, x0, eps
