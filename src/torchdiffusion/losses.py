"""Losses (axis 3 of DESIGN.md): plain functions ``loss(model, x0, ...) -> scalar tensor``.

Weighted denoising score matching covers L_simple (DDPM Algorithm 1), the score-SDE weightings
``lambda(t) = sigma^2`` and ``g^2`` (likelihood weighting), SNR / min-SNR weightings and EDM's weighting.
Every weighting is written once, as a weight ``w(t)`` on the eps-error ``||eps - eps_hat||^2``:

``||score - score*||^2 = ||eps - eps_hat||^2 / sigma^2``,  ``||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR``,
``||v - v_hat||^2 = ((alpha^2 + sigma^2)/alpha)^2 ||eps - eps_hat||^2`` (THEORY T-ALG-3, T-SDE-8, B-8).

The error itself is measured in the network's native space (what it predicts), and rescaled, so that no
ill-conditioned conversion enters the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .denoiser import Denoiser
from .processes import Process, as_time, expand_like

WEIGHTINGS = ("native", "eps", "x0", "v", "g2", "min_snr", "edm")


def sample_times(process: Process, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Training times: ``k ~ U{0..T-1}`` for DDPM (Algorithm 1), ``t ~ U(t_min, t_max)`` otherwise."""
    if process.discrete:
        return torch.randint(0, int(process.t_max) + 1, (n,), generator=generator).to(device, torch.float64)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (process.t_min + (process.t_max - process.t_min) * u).to(device)


def _native_factor(prediction: str, a: Tensor, s: Tensor) -> Tensor:
    """``F`` with ``||native error||^2 = F ||eps error||^2``."""
    if prediction == "eps":
        return torch.ones_like(a)
    if prediction == "x0":
        return (s / a) ** 2
    if prediction == "v":
        return ((a**2 + s**2) / a) ** 2
    return 1 / s**2  # score


def eps_weight(process: Process, t: Tensor, weighting: str, *, prediction: str = "eps",
               min_snr_gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """Weight ``w(t)`` on ``||eps - eps_hat||^2`` of each weighting (float64, shape of t).

    ``native``: plain MSE in the network's own prediction space; ``eps``: L_simple; ``x0``: ``1/SNR``;
    ``v``: ``((alpha^2+sigma^2)/alpha)^2``; ``g2``: ``g(t)^2 / sigma^2`` (likelihood weighting,
    ``lambda = g^2`` on the score); ``min_snr``: ``min(SNR, gamma)/SNR`` (Hang et al. 2023, B-14);
    ``edm``: ``(s^2 + sd^2)/sd^2`` with ``s = sigma/alpha`` (``1/c_out^2`` on the x0 error, B-9).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    a, s = process.alpha(t), process.sigma(t)
    if weighting == "native":
        return _native_factor(prediction, a, s)
    if weighting == "eps":
        return torch.ones_like(a)
    if weighting == "x0":
        return (s / a) ** 2
    if weighting == "v":
        return ((a**2 + s**2) / a) ** 2
    if weighting == "g2":
        return process.sde_coefficients(t)[1] ** 2 / s**2
    if weighting == "min_snr":
        snr = (a / s) ** 2
        return snr.clamp(max=min_snr_gamma) / snr
    return ((s / a) ** 2 + sigma_data**2) / sigma_data**2


def dsm_loss(model: Denoiser, x0: Tensor, *, weighting: str = "native", t: Tensor | None = None,
             eps: Tensor | None = None, cond=None, generator: torch.Generator | None = None,
             min_snr_gamma: float = 5.0, reduction: str = "mean") -> Tensor:
    """Weighted denoising score matching ``E_t w(t) ||eps - eps_theta(alpha x0 + sigma eps, t)||^2``.

    With DDPM, ``weighting="eps"`` (or ``"native"`` for an eps-net) is L_simple of Algorithm 1. The squared
    error is averaged over data dimensions. ``reduction="none"`` returns one value per example.
    """
    proc = model.process
    n = x0.shape[0]
    if t is None:
        t = sample_times(proc, n, generator, x0.device)
    t = as_time(t).to(x0.device)
    if t.ndim == 0:
        t = t.expand(n)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = proc.add_noise(x0, t, eps)
    native = "x0" if model.precond == "edm" else model.prediction
    pred = model.native(x_t, t, cond)
    target = model.as_prediction(x_t, t, x0, eps, native)
    a, s = proc.alpha(t), proc.sigma(t)
    w = eps_weight(proc, t, weighting, prediction=native, min_snr_gamma=min_snr_gamma,
                   sigma_data=model.sigma_data) / _native_factor(native, a, s)
    err = ((pred - target) ** 2).flatten(1).mean(1)
    per = w.to(err.dtype) * err
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
    return per.mean()


def simple_loss(model: Denoiser, x0: Tensor, **kw) -> Tensor:
    """L_simple of DDPM (Algorithm 1): ``E ||eps - eps_theta(x_t, t)||^2`` with uniform ``t``."""
    return dsm_loss(model, x0, weighting="eps", **kw)


def _unused(x: Tensor) -> Tensor:  # pragma: no cover - keeps expand_like import for subclasses
    return expand_like(x, x)
