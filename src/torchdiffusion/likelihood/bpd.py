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

from .continuous import continuous_vlb, dequantize_for, dequantizer_of
from .dequantization import dequantization_offset
from .ode import ode_log_likelihood
from .vlb import LikelihoodResult, vlb


def nll_to_bpd(nll_nats: Tensor | float, dims: int, levels: int | None = None,
               value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """``bpd = nll / (D ln 2)`` plus :func:`dequantization_offset` for the density of dequantized
    ``levels``-level data (B-1)."""
    bpd = torch.as_tensor(nll_nats, dtype=torch.float64) / (int(dims) * math.log(2))
    return bpd + (dequantization_offset(levels, value_range) if levels else 0.0)


def bits_per_dim(model: Denoiser, x: Tensor, *, method: str = "vlb", levels: int | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0), generator: torch.Generator | None = None,
                 cond=None, dequantize: str | None = None, **options) -> LikelihoodResult:
    """Negative log-likelihood of data ``x`` (on its ``levels``-level grid, or continuous with ``levels=None``)
    by the variational bound (``method="vlb"``) or by the probability-flow ODE (``method="ode"``).
    ``.bpd`` gives bits/dim per example and ``.mean_se()`` their mean and SE.

    ``vlb``: DDPM, or ``times=`` / ``steps=`` given: the bound on a time grid with the discretized decoder
    (``options`` go to :func:`vlb`); other (continuous) processes: the continuous-time bound
    (:func:`continuous_vlb`; ``options``: ``n_t``, ``time_sampler``). ``ode``: ``options`` go to
    :func:`ode_log_likelihood`. ``dequantize`` (K-level data): ``uniform`` (bins ``lo + (k + [0, 1)) W/K``,
    offset ``log2(K/W)`` bits/dim), ``variational`` (the model's learned ``q(u | k)``; ``+ E log q``) or, for the
    continuous bound only, ``none`` (discretized decoder on the levels); default: ``variational`` when the model
    has a dequantizer, else ``uniform``.
    """
    if dequantize is None:
        dequantize = "variational" if dequantizer_of(model) is not None else "uniform"
    if method == "vlb":
        if model.process.discrete or "times" in options or "steps" in options:
            return vlb(model, x, levels=levels, value_range=value_range, generator=generator, cond=cond, **options)
        return continuous_vlb(model, x, levels=levels, value_range=value_range, dequantize=dequantize,
                              generator=generator, cond=cond, **options)
    if method != "ode":
        raise ValueError(f"unknown likelihood method {method!r}; allowed: vlb, ode")
    t0 = time.time()
    D = x[0].numel()
    if levels and dequantize == "none":
        raise ValueError("the ODE likelihood scores a density: K-level data must be dequantized "
                         "(dequantize='uniform' or 'variational')")
    with torch.no_grad():
        if levels:
            y, extra = dequantize_for(model, x, levels, value_range, dequantize, generator)
        else:
            y, extra = x, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    logp, nfe = ode_log_likelihood(model, y, generator=generator, cond=cond, **options)
    nll = -logp.double() + extra
    return LikelihoodResult(nll, D, "ode", {"-log p_y": -logp.double(), "dequantization": extra},
                            None, float(nfe), time.time() - t0)
