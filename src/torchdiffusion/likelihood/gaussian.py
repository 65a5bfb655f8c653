"""Gaussian building blocks of the bounds: KL divergences, log densities, discretized Gaussian decoder
(B-1), learned variances (B-12)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

# Gaussian building blocks
# ------------------------------------------------------------------------------------------------------------


def gaussian_kl(mu1: Tensor | float, var1: Tensor | float, mu2: Tensor | float, var2: Tensor | float) -> Tensor:
    """Per-element ``KL(N(mu1, var1) || N(mu2, var2)) = 1/2 [log(var2/var1) + var1/var2 + (mu1-mu2)^2/var2 - 1]``
    (T-VLB-5 for diagonal covariances; sum over elements for the full KL)."""
    dt = next((v.dtype for v in (mu1, var1, mu2, var2) if isinstance(v, Tensor)), torch.float64)
    mu1, var1, mu2, var2 = (v if isinstance(v, Tensor) else torch.tensor(float(v), dtype=dt)
                            for v in (mu1, var1, mu2, var2))
    return 0.5 * (torch.log(var2) - torch.log(var1) + var1 / var2 + (mu1 - mu2) ** 2 / var2 - 1.0)


def gaussian_kl_full(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> Tensor:
    """``KL(N(mu1, S1) || N(mu2, S2)) = 1/2 [log(|S2|/|S1|) + tr(S2^-1 S1) + d^T S2^-1 d - n]`` with full
    covariances (T-VLB-5, first argument's covariance is S1 -- the notes' ``N(x; mu_x, Sigma_y)`` is a typo);
    batched over leading dimensions."""
    n = mu1.shape[-1]
    L2 = torch.linalg.cholesky(cov2)
    L1 = torch.linalg.cholesky(cov1)
    logdet = 2 * (torch.log(torch.diagonal(L2, dim1=-2, dim2=-1)).sum(-1)
                  - torch.log(torch.diagonal(L1, dim1=-2, dim2=-1)).sum(-1))
    tr = torch.cholesky_solve(cov1, L2).diagonal(dim1=-2, dim2=-1).sum(-1)
    d = (mu2 - mu1).unsqueeze(-1)
    maha = (d * torch.cholesky_solve(d, L2)).sum((-2, -1))
    return 0.5 * (logdet + tr + maha - n)


def gaussian_log_density(x: Tensor, mean: Tensor, var: Tensor | float) -> Tensor:
    """Per-element ``log N(x; mean, var)``."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var)


def _log1mexp(d: Tensor) -> Tensor:
    """``log(1 - exp(d))`` for ``d <= 0``, accurate at both ends (Maechler 2012)."""
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def log_normal_mass(a: Tensor, b: Tensor) -> Tensor:
    """``log(Phi(b) - Phi(a))`` for ``a < b`` in log space (T-BAY-2): by symmetry both edges are moved to the
    lower tail, where ``log_ndtr`` keeps full relative accuracy, and the difference is a log1mexp."""
    flip = (a + b) > 0  # NaN for (-inf, inf): no flip, which is right
    lo, hi = torch.where(flip, -b, a), torch.where(flip, -a, b)
    lhi = torch.special.log_ndtr(hi)
    return lhi + _log1mexp(torch.special.log_ndtr(lo) - lhi)


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, std: Tensor | float | None = None, *,
                                        log_std: Tensor | None = None, levels: int = 256,
                                        value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Per-element ``log P(x)`` of DDPM's discretized Gaussian decoder (DDPM eq. 13, B-1):
    ``P(x) = int_{x - D/2}^{x + D/2} N(u; mean, std^2) du`` with bin width ``D = W/(K-1)`` for ``K`` levels
    ``lo, lo + D, ..., hi`` (8-bit on [-1, 1]: ``x +- 1/255``); the outer bins extend to ``-inf`` and ``+inf``, so
    the ``K`` probabilities sum to 1. ``x`` is snapped to the nearest level. Computed in float64 from log-CDF
    differences: finite even 40 standard deviations into the tails (T-BAY-2). Give ``std`` or ``log_std``.
    """
    if (std is None) == (log_std is None):
        raise ValueError("give exactly one of std and log_std")
    if int(levels) < 2:
        raise ValueError(f"levels must be an integer >= 2, got {levels}")
    lo, hi = (float(v) for v in value_range)
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    dt = torch.float64
    x64, m64 = x.to(dt), torch.as_tensor(mean).to(dt)
    log_s = torch.log(torch.as_tensor(std).to(dt)) if log_std is None else torch.as_tensor(log_std).to(dt)
    delta = (hi - lo) / (int(levels) - 1)
    k = torch.round((x64 - lo) / delta).clamp(0, int(levels) - 1)
    centre = lo + k * delta
    inv_s = torch.exp(-log_s)
    a = torch.where(k == 0, -math.inf, (centre - 0.5 * delta - m64) * inv_s)
    b = torch.where(k == int(levels) - 1, math.inf, (centre + 0.5 * delta - m64) * inv_s)
    return log_normal_mass(a, b).to(x.dtype)


def learned_log_variance(u: Tensor, log_small: Tensor, log_large: Tensor) -> Tensor:
    """IDDPM's interpolated reverse variance ``log Sigma = u log beta_t + (1 - u) log beta-tilde_t`` (B-12);
    ``u = 0`` gives beta-tilde (``log_small``), ``u = 1`` gives beta (``log_large``)."""
    return u * log_large + (1 - u) * log_small


# ------------------------------------------------------------------------------------------------------------
# Grids and reverse variances
# ------------------------------------------------------------------------------------------------------------
