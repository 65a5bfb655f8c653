"""Losses from the variational bound and the likelihood weighting: the DDPM bound as a training loss, IDDPM's
hybrid loss with learned variances (B-12), and importance-sampled likelihood-weighted DSM."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from torchdiffusion.likelihood.continuous import continuous_bound
from torchdiffusion.likelihood.vlb import (
    reverse_kernel,
    vlb_term,
    vlb_times,
)
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.processes import Process

from .score import dsm_loss, eps_weight


def _sample_steps(n: int, N: int, generator, device) -> Tensor:
    return torch.randint(0, N, (n,), generator=generator).to(device)


def vlb_loss(model: Denoiser, x0: Tensor, *, variance: str | Tensor = "small", cond=None,
             generator: torch.Generator | None = None, detach_mean: bool = False,
             reduction: str = "mean") -> Tensor:
    """``L_vlb = sum_i L_i`` per data dimension, estimated as ``N L_i`` with ``i`` uniform (nats/dim; ``L_T`` has
    no parameters and is left out; ``L_0`` is the Gaussian decoder density)."""
    times = vlb_times(model.process)
    N = len(times) - 1
    i = _sample_steps(x0.shape[0], N, generator, x0.device)
    per = N * vlb_term(model, x0, i, times=times, variance=variance, cond=cond, generator=generator,
                       detach_mean=detach_mean) / x0[0].numel()
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
    return per.mean()


def continuous_vlb_loss(model: Denoiser, x0: Tensor, *, levels: int | None = None,
                        value_range: tuple[float, float] = (-1.0, 1.0), dequantize: str = "uniform",
                        time_sampler: str = "antithetic", importance: bool | None = None, cond=None,
                        generator: torch.Generator | None = None, reduction: str = "mean") -> Tensor:
    """VDM's continuous-time bound ``L_prior + L_recon + L_diffusion`` (+ dequantization) as a loss, in nats per
    dimension (``likelihood.continuous_bound``, one time per example from ``time_sampler``, importance sampled by
    log-SNR for fixed schedules; B-8). Its value is a
    bound on ``-log P(x)`` of the training batch: divided by ``ln 2``, bits/dim.

    With a learned schedule (a process with ``variance_gradient``, e.g. ``LearnedVP``) the endpoints
    ``gamma_0, gamma_1`` follow the gradient of the bound and the schedule's shape that of the bound's squared
    per-example estimate (VDM app. I.2: the shape leaves the bound unchanged, so it is trained to lower the variance
    of the estimate); the network is trained on the bound itself.
    """
    D = x0[0].numel()
    holder = getattr(model.process, "variance_gradient", None)
    holder = holder() if holder is not None else None
    nll, terms = continuous_bound(model, x0, levels=levels, value_range=value_range, dequantize=dequantize,
                                  n_t=1, time_sampler=time_sampler, importance=importance, cond=cond,
                                  generator=generator)
    per = nll / D
    if holder is not None:
        holder.scale = 2 * (terms["L_diffusion"] / D).detach()
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
    return per.mean().to(x0.dtype)


def hybrid_loss(model: Denoiser, x0: Tensor, *, lambda_vlb: float = 0.001, cond=None,
                generator: torch.Generator | None = None) -> Tensor:
    """IDDPM's ``L_hybrid = L_simple + lambda L_vlb`` (B-12) for a network with learned variance (twice the
    data channels: native prediction, then ``v``). ``L_vlb`` sees the mean through a stop-gradient, so it
    trains only the variance head; ``L_simple`` is the eps MSE (averaged over dimensions) of the same call.
    """
    proc = model.process
    times = vlb_times(proc)
    N, n = len(times) - 1, x0.shape[0]
    i = _sample_steps(n, N, generator, x0.device)
    e = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = proc.add_noise(x0, times[i + 1], e)
    _, _, eps_hat = reverse_kernel(model, x_t, i, times, "learned", cond)
    simple = ((eps_hat - e) ** 2).flatten(1).mean(1)
    vb = N * vlb_term(model, x0, i, times=times, variance="learned", x_t=x_t, cond=cond,
                      detach_mean=True) / x0[0].numel()
    return (simple + lambda_vlb * vb).mean()


def importance_times(process: Process, n: int, weighting: str = "g2", *, generator: torch.Generator | None = None,
                     grid: int = 2048) -> tuple[Tensor, Tensor]:
    """Times drawn with density ``p(t)`` roughly proportional to the eps-weight ``w(t)`` of ``weighting``
    (``losses.eps_weight``), and the importance factor ``r(t) = w(t) / (range p(t))``, so that
    ``E_{t~p}[r(t) e(t)] = E_{t~U}[w(t) e(t)]`` exactly for any ``e``.

    DDPM: ``p(k) = w(k) / sum w`` over the T timesteps. Continuous processes: ``p`` is piecewise constant in
    ``log t`` on a ``grid``-cell log-spaced grid over ``[t_min, t_max]`` with cell masses from ``w`` (exact
    density, so the factor is exact; it is nearly constant where the grid resolves ``w``). With ``g2`` on VP
    (``w = beta / sigma^2 ~ 1/t`` near 0) this removes the heavy weights of uniform sampling.
    """
    if process.discrete:
        T = int(process.t_max) + 1
        w = eps_weight(process, torch.arange(T, dtype=torch.float64), weighting)
        p = w / w.sum()
        k = torch.multinomial(p, n, replacement=True, generator=generator)
        return k.double(), w[k] / (T * p[k])
    if process.t_min <= 0:
        raise ValueError("importance sampling needs t_min > 0")
    lo, hi = math.log(process.t_min), math.log(process.t_max)
    u = torch.linspace(lo, hi, grid + 1, dtype=torch.float64)
    mid = torch.exp(0.5 * (u[1:] + u[:-1]))
    mass = eps_weight(process, mid, weighting) * mid * (u[1] - u[0])  # int w dt over each cell (midpoint)
    p_cell = mass / mass.sum()
    j = torch.multinomial(p_cell, n, replacement=True, generator=generator)
    uu = u[j] + (u[1] - u[0]) * torch.rand(n, generator=generator, dtype=torch.float64)
    t = torch.exp(uu)
    density = p_cell[j] / ((u[1] - u[0]) * t)  # p(t) = p(cell) / (cell width in log t) / t
    return t, eps_weight(process, t, weighting) / ((process.t_max - process.t_min) * density)


def importance_dsm_loss(model: Denoiser, x0: Tensor, *, weighting: str = "g2", cond=None,
                        generator: torch.Generator | None = None) -> Tensor:
    """``losses.dsm_loss(weighting=...)`` with importance-sampled times (:func:`importance_times`): the same
    expectation, lower variance. With ``g2`` on VP this is likelihood weighting ``lambda = g^2`` (B-8; Song,
    Durkan, Murray & Ermon 2021), whose uniform-``t`` estimate is dominated by rare small-``t`` draws."""
    t, r = importance_times(model.process, x0.shape[0], weighting, generator=generator)
    per = dsm_loss(model, x0, weighting="eps", t=t.to(x0.device), cond=cond, generator=generator, reduction="none")
    return (r.to(per) * per).mean()


# ------------------------------------------------------------------------------------------------------------
# Probability-flow ODE likelihood (B-2)
# ------------------------------------------------------------------------------------------------------------
