"""Bits per dimension for K-level data (B-1). Discrete values ``k in {0..K-1}`` are dequantized to
``u = k + U[0, 1)`` in ``[0, K)`` and scaled to the model's range ``y = lo + u W / K`` (width ``W``). The bins
have volume ``(W/K)^D``, so ``-log P(k) <= E[-log p_y(y)] + D log(K/W)`` (Jensen), i.e.
``bpd = E[-log p_y] / (D ln 2) + log2(K / W)``: +7 for 8-bit data on [-1, 1], +8 on [0, 1], log2(8.5) for the
17-level digits on [-1, 1]. A uniform density on [-1, 1)^D scores exactly 8 bpd with K = 256.
The VLB needs no offset: its decoder already gives probabilities of the K discrete values.
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from torchdiffusion.parameterization.denoiser import Denoiser

from .ode import ode_log_likelihood
from .vlb import LikelihoodResult, vlb


def dequantization_offset(levels: int, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Bits per dimension to add to ``-log p_y / (D ln 2)`` for uniformly dequantized ``K``-level data on a range
    of width ``W``: ``log2(K / W)`` (module docstring; +7 for 8-bit on [-1, 1])."""
    lo, hi = (float(v) for v in value_range)
    if int(levels) < 2 or not hi > lo:
        raise ValueError(f"need levels >= 2 and value_range (low, high) with high > low, got {levels}, "
                         f"{value_range}")
    return math.log2(int(levels) / (hi - lo))


def dequantize(x: Tensor, levels: int, value_range: tuple[float, float] = (-1.0, 1.0),
               generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization: data on the ``K``-level grid ``lo + k W/(K-1)`` becomes
    ``y = lo + (k + U[0,1)) W / K``, uniform within bin ``k`` of ``[lo, hi)``."""
    lo, hi = (float(v) for v in value_range)
    K = int(levels)
    dequantization_offset(K, value_range)
    k = torch.round((x - lo) / (hi - lo) * (K - 1)).clamp(0, K - 1)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return lo + (k + u) * (hi - lo) / K


def nll_to_bpd(nll_nats: Tensor | float, dims: int, levels: int | None = None,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """``bpd = nll / (D ln 2)`` plus :func:`dequantization_offset` for the density of dequantized
    ``levels``-level data (B-1)."""
    bpd = torch.as_tensor(nll_nats, dtype=torch.float64) / (int(dims) * math.log(2))
    return bpd + (dequantization_offset(levels, value_range) if levels else 0.0)


def bits_per_dim(model: Denoiser, x: Tensor, *, method: str = "vlb", levels: int | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), generator: torch.Generator | None = None,
                 cond=None, **options) -> LikelihoodResult:
    """Negative log-likelihood of data ``x`` (on its ``levels``-level grid, or continuous with ``levels=None``)
    by the variational bound (``method="vlb"``, discretized decoder; ``options`` go to :func:`vlb`) or by the
    ODE (``method="ode"``; uniform dequantization plus ``log2(K/W)`` bits/dim; ``options`` go to
    :func:`ode_log_likelihood`). ``.bpd`` gives bits/dim per example and ``.mean_se()`` their mean and SE.
    """
    if method == "vlb":
        return vlb(model, x, levels=levels, value_range=value_range, generator=generator, cond=cond, **options)
    if method != "ode":
        raise ValueError(f"unknown likelihood method {method!r}; allowed: vlb, ode")
    t0 = time.time()
    D = x[0].numel()
    y = dequantize(x, levels, value_range, generator) if levels else x
    logp, nfe = ode_log_likelihood(model, y, generator=generator, cond=cond, **options)
    offset = D * math.log(2) * dequantization_offset(levels, value_range) if levels else 0.0
    nll = -logp.double() + offset
    return LikelihoodResult(nll, D, "ode", {"-log p_y": -logp.double(), "dequantization": torch.full_like(nll, offset)},
                            None, float(nfe), time.time() - t0)
