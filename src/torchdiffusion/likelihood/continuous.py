"""The continuous-time variational bound of any process (Variational Diffusion Models, Kingma et al. 2021; THEORY
B-8), with uniform or variational dequantization (B-1).

For data ``x`` (per example, nats), with ``z_t = alpha_t x + sigma_t eps`` on ``[t_min, t_max]``:

    -log p(x) <= L_prior + L_recon + L_diffusion                                             (VDM eq. 11)
    L_prior     = KL(q(z_{t_max} | x) || N(0, prior_std^2 I))
    L_diffusion = -1/2 int_{t_min}^{t_max} lambda'(t) E_eps ||eps - eps_hat(z_t, t)||^2 dt   (VDM eq. 17, T -> inf)
    L_recon     = -E log p(x | z_{t_min}),  p(x | z) = N(z / alpha, sigma^2 / alpha^2)      (continuous x)
                  or its discretized version on the K levels (DDPM eq. 13 decoder; K-level x without dequantization)

``lambda = log(alpha^2 / sigma^2)``. ``L_diffusion`` is estimated from ``u ~ U[0, 1)`` drawn by a low-variance
sampler (:func:`unit_times`: antithetic or stratified), mapped to ``t`` uniformly or importance sampled by log-SNR
(:func:`diffusion_term`). It is the limit of the discrete bound's KL terms as the grid
is refined (each ``L_i = 1/2 (SNR_s - SNR_t) ||x - x0_hat||^2`` with the posterior variance).

K-level data are either scored directly (``dequantize="none"``: discretized decoder) or dequantized first:
``-log P(k) <= E_q[-log p(y) + log q(u | k)] + D log(K / W)`` with ``y = lo + (k + u) W / K`` and ``u`` uniform
(``"uniform"``, ``log q = 0``; the same bins as the ODE likelihood) or drawn from a learned ``q``
(``"variational"``: the model's ``VariationalDequantizer``).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

from torchdiffusion.parameterization.denoiser import Denoiser, unwrap

from .dequantization import dequantization_offset, dequantize
from .gaussian import discretized_gaussian_log_likelihood, gaussian_kl
from .vlb import LikelihoodResult

TIME_SAMPLERS = ("uniform", "antithetic", "stratified")
DEQUANTIZATIONS = ("none", "uniform", "variational")


def unit_times(n: int, kind: str = "antithetic", generator: torch.Generator | None = None) -> Tensor:
    """``n`` float64 times in ``[0, 1)``, each marginally uniform: ``uniform`` (independent), ``antithetic``
    (pairs ``u, 1 - u``) or ``stratified`` (VDM's low-discrepancy draw ``(u_0 + i / n) mod 1``, one ``u_0``)."""
    if kind not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {kind!r}; allowed: {', '.join(TIME_SAMPLERS)}")
    if kind == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if kind == "antithetic":
        u = torch.rand((n + 1) // 2, generator=generator, dtype=torch.float64)
        return torch.cat([u, 1 - u])[:n]
    u0 = torch.rand(1, generator=generator, dtype=torch.float64)
    return torch.remainder(u0 + torch.arange(n, dtype=torch.float64) / n, 1.0)


def dequantizer_of(model: Denoiser):
    """The model's learned dequantizer (``model.net.dequantizer``, through DDP / compile wrappers) or None."""
    return getattr(unwrap(model.net), "dequantizer", None)


def dequantize_for(model: Denoiser, x: Tensor, levels: int, value_range: tuple[float, float], kind: str,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(y, log q(u | k) + D log(K / W))`` per example: uniform or variational dequantization (module doc)."""
    D = x[0].numel()
    offset = D * math.log(2) * dequantization_offset(levels, value_range)
    if kind == "uniform":
        y = dequantize(x, levels, value_range, generator)
        return y, torch.full((x.shape[0],), offset, dtype=torch.float64, device=x.device)
    if kind != "variational":
        raise ValueError(f"unknown dequantization {kind!r}; allowed: {', '.join(DEQUANTIZATIONS)}")
    deq = dequantizer_of(model)
    if deq is None:
        raise ValueError("dequantize='variational' needs a model with a variational dequantizer "
                         "(model.dequantizer=true); use 'uniform'")
    y, log_q = deq(x, levels, value_range, generator)
    return y, log_q.double() + offset


def _per_example(v: Tensor) -> Tensor:
    return v.flatten(1).sum(1)


def diffusion_term(model: Denoiser, x: Tensor, u: Tensor, *, importance: bool = False, cond=None,
                   generator: torch.Generator | None = None) -> Tensor:
    """One-draw estimate of ``L_diffusion`` per example from per-example ``u ~ U[0, 1)``.

    ``importance=False``: ``t = t_min + u (t_max - t_min)`` and ``-1/2 (t_max - t_min) lambda'(t) ||eps -
    eps_hat||^2``. ``importance=True``: times drawn with density proportional to the weight ``-lambda'(t)``, i.e.
    ``lambda`` uniform between ``lambda(t_max)`` and ``lambda(t_min)`` (``t = t_from_log_snr``), and the estimate
    ``1/2 (lambda(t_min) - lambda(t_max)) ||eps - eps_hat||^2`` (the same integral, by change of variables; without
    the ``1/t``-like weights that make uniform ``t`` useless for VP / VE near ``t_min``)."""
    proc = model.process
    if importance:
        with torch.no_grad():
            ends = proc.log_snr(torch.tensor([proc.t_min, proc.t_max], dtype=torch.float64))
            lam = ends[0] - u * (ends[0] - ends[1])
            t = proc.t_from_log_snr(lam).clamp(proc.t_min, proc.t_max).to(x.device)
        w = 0.5 * (ends[0] - ends[1]).expand(x.shape[0])
    else:
        t = (proc.t_min + (proc.t_max - proc.t_min) * u).to(x.device)
        w = -0.5 * (proc.t_max - proc.t_min) * proc.log_snr_derivative(t)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    z = proc.add_noise(x, t, eps)
    _, eps_hat = model.predict(z, t, cond)
    return w.to(x.device) * _per_example((eps - eps_hat) ** 2).double()


def recon_term(model: Denoiser, x: Tensor, *, levels: int | None, value_range: tuple[float, float],
               generator: torch.Generator | None = None) -> Tensor:
    """``L_recon = -E log p(x | z_{t_min})`` per example: the discretized decoder on ``levels`` levels (one draw of
    ``z``), or, for continuous ``x`` (``levels=None``), its exact expectation ``D/2 (log(2 pi s^2) + 1)``,
    ``s = sigma / alpha`` at ``t_min``."""
    proc = model.process
    t0 = torch.tensor(proc.t_min, dtype=torch.float64)
    a, s = proc.alpha(t0), proc.sigma(t0)
    log_s = torch.log(s) - torch.log(a)
    D = x[0].numel()
    if levels is None:
        return (0.5 * D * (math.log(2 * math.pi) + 2 * log_s + 1)).expand(x.shape[0]).to(x.device)
    eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    mean = x + (s / a).to(x) * eps
    lp = discretized_gaussian_log_likelihood(x.double(), mean.double(), log_std=log_s.expand_as(mean).to(mean.device),
                                             levels=levels, value_range=value_range)
    return -_per_example(lp).double()


def prior_term(model: Denoiser, x: Tensor) -> Tensor:
    """``L_prior = KL(q(z_{t_max} | x) || N(0, prior_std^2 I))`` per example (differentiable in a learned
    schedule's endpoint)."""
    proc = model.process
    tT = torch.tensor(proc.t_max, dtype=torch.float64)
    a, s = proc.alpha(tT).to(x.device), proc.sigma(tT).to(x.device)
    return _per_example(gaussian_kl(a * x.double(), s**2, torch.zeros((), dtype=torch.float64, device=x.device),
                                    torch.tensor(proc.prior_std() ** 2, dtype=torch.float64, device=x.device)))


def continuous_bound(model: Denoiser, x: Tensor, *, levels: int | None = None,
                     value_range: tuple[float, float] = (-1.0, 1.0), dequantize: str = "uniform", n_t: int = 1,
                     time_sampler: str = "antithetic", importance: bool | None = None, cond=None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The continuous-time bound per example in nats (module doc) and its terms ``L_prior``, ``L_recon``,
    ``L_diffusion``, ``dequantization`` (``log q + D log(K/W)``; 0 without dequantization). ``L_diffusion``
    averages ``n_t`` times per example (drawn together by ``time_sampler`` over the whole batch), importance
    sampled by log-SNR (:func:`diffusion_term`) unless ``importance=False``; default: importance sampling except
    for a learned schedule (whose gradient flows through ``t``, and whose shape is itself trained to make uniform
    ``t`` a low-variance choice, VDM app. I.2). Differentiable: the training loss
    (``losses.continuous_vlb_loss``) and the evaluation (:func:`continuous_vlb`) share it."""
    if int(n_t) < 1:
        raise ValueError(f"n_t must be >= 1, got {n_t}")
    if dequantize not in DEQUANTIZATIONS:
        raise ValueError(f"unknown dequantization {dequantize!r}; allowed: {', '.join(DEQUANTIZATIONS)}")
    proc = model.process
    B = x.shape[0]
    extra = torch.zeros(B, dtype=torch.float64, device=x.device)
    dec_levels = levels
    if levels is not None and dequantize != "none":
        x, extra = dequantize_for(model, x, levels, value_range, dequantize, generator)
        dec_levels = None
    if importance is None:
        importance = not hasattr(proc, "variance_gradient")
    u = unit_times(B * int(n_t), time_sampler, generator).reshape(int(n_t), B)
    diff = torch.zeros(B, dtype=torch.float64, device=x.device)
    for j in range(int(n_t)):
        diff = diff + diffusion_term(model, x, u[j], importance=importance, cond=cond,
                                     generator=generator) / int(n_t)
    terms = {"L_prior": prior_term(model, x), "L_recon": recon_term(model, x, levels=dec_levels,
                                                                      value_range=value_range, generator=generator),
             "L_diffusion": diff, "dequantization": extra}
    return sum(terms.values()), terms


def continuous_vlb(model: Denoiser, x: Tensor, *, levels: int | None = None,
                   value_range: tuple[float, float] = (-1.0, 1.0), dequantize: str = "uniform", n_t: int = 16,
                   time_sampler: str = "stratified", importance: bool | None = None, cond=None,
                   generator: torch.Generator | None = None):
    """:func:`continuous_bound` without gradients, as a ``LikelihoodResult`` (``.bpd`` per example; ``nfe`` = ``n_t``
    network calls per example). An unbiased estimate of the bound; its Monte Carlo noise is part of the standard
    error over examples."""
    t0 = time.time()
    with torch.no_grad():
        nll, terms = continuous_bound(model, x, levels=levels, value_range=value_range, dequantize=dequantize,
                                      n_t=n_t, time_sampler=time_sampler, importance=importance, cond=cond,
                                      generator=generator)
    return LikelihoodResult(nll.detach(), x[0].numel(), "vlb-continuous", {k: v.detach() for k, v in terms.items()},
                            None, float(n_t), time.time() - t0)
