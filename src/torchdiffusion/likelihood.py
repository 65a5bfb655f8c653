"""Likelihoods: the DDPM variational bound (discrete time) and the probability-flow ODE likelihood.

Variational bound (THEORY T-VLB-1..7, B-1, B-6, B-12). The bound is taken on a time grid
``times = [t_zero, t_1, ..., t_N]`` (DDPM: every timestep, ``[-1, 0, ..., T-1]``, so that term ``i`` is the
code step ``k = i``, paper step ``t = k + 1``; continuous processes: ``N`` points from ``t_min`` to ``t_max``):

    -log p(x0) <= L_T + sum_{i=1}^{N-1} L_i + L_0                                              (T-VLB-3)
    L_T = KL(q(x_{t_N} | x0) || N(0, prior_std^2 I))                                          (T-FWD-3)
    L_i = E_{q(x_{t_{i+1}} | x0)} KL(q(x_{t_i} | x_{t_{i+1}}, x0) || p(x_{t_i} | x_{t_{i+1}}))  (T-VLB-4/5)
    L_0 = -E_{q(x_{t_1} | x0)} log p(x0 | x_{t_1})                                             (B-1 decoder)

with ``p(x_s | x_t) = N(mu_theta, var)``, ``mu_theta = c_x x_t + c_0 x0_hat`` (``Denoiser.mean``, T-PAR-2/3).
Every KL is in closed form; the outer expectation over ``x_t`` uses one draw per example (or given states).

Reverse variances (DDPM conventions, T-FWD-4): ``small`` is the posterior variance beta-tilde_t, ``large`` the
forward step variance beta_t; since beta-tilde_1 = 0, the decoder step uses beta-tilde_2 in both (as the
DDPM code does), and ``learned`` is IDDPM's ``exp(u log beta_t + (1-u) log beta-tilde_t)`` with the same
clipped beta-tilde (B-12). A tensor of ``N`` variances may be given instead (e.g. the exact reverse variances
of Gaussian data, :func:`gaussian_reverse_variances`, B-6).

ODE likelihood (B-2): ``log p_{t_eps}(x) = log p_T(x(T)) + int_{t_eps}^T div f~(x(t), t) dt`` along the
probability-flow ODE ``dx/dt = f~ = f x - 1/2 g^2 score``, with the divergence exact (autograd) or by
Hutchinson's estimator (one probe per solve).

Bits per dimension for K-level data (B-1). Discrete values ``k in {0..K-1}`` are dequantized to
``u = k + U[0, 1)`` in ``[0, K)`` and scaled to the model's range ``y = lo + u W / K`` (width ``W``). The bins
have volume ``(W/K)^D``, so ``-log P(k) <= E[-log p_y(y)] + D log(K/W)`` (Jensen), i.e.
``bpd = E[-log p_y] / (D ln 2) + log2(K / W)``: +7 for 8-bit data on [-1, 1], +8 on [0, 1], log2(8.5) for the
17-level digits on [-1, 1]. A uniform density on [-1, 1)^D scores exactly 8 bpd with K = 256.
The VLB needs no offset: its decoder already gives probabilities of the K discrete values.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import Tensor

from .denoiser import Denoiser
from .losses import dsm_loss, eps_weight, sample_projections
from .processes import Process, TimeLike, as_time, expand_like
from .samplers import Bound
from .samplers.common import pf_ode_drift

VARIANCES = ("small", "large", "learned")
DIVERGENCES = ("exact", "hutchinson")

# ------------------------------------------------------------------------------------------------------------
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


def vlb_times(process: Process, steps: int | None = None) -> Tensor:
    """Increasing float64 grid ``[t_zero, t_1, ..., t_N]`` for the bound. DDPM: every timestep (``steps``
    given: that many integer timesteps, evenly spread, always including 0 and T-1); continuous processes:
    ``steps`` (default 1000) points uniform in ``t`` from ``t_min`` to ``t_max``."""
    if process.discrete:
        T = int(process.t_max) + 1
        n = T if steps is None else int(steps)
        if not 1 <= n <= T:
            raise ValueError(f"steps must be in 1..{T} for this DDPM process, got {steps}")
        ts = torch.arange(T, dtype=torch.float64) if n == T else \
            torch.unique(torch.round(torch.linspace(0, T - 1, n, dtype=torch.float64)))
    else:
        n = 1000 if steps is None else int(steps)
        if n < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        ts = torch.linspace(process.t_min, process.t_max, n, dtype=torch.float64)
    return torch.cat([torch.tensor([process.t_zero], dtype=torch.float64), ts])


def truncate_times(process: Process, times: Tensor, min_sigma: float) -> Tensor:
    """The grid without the steps whose noise ``sigma(t)`` is below ``min_sigma``: the chain then decodes from the
    first step at that noise level. A bound for the same network with a shorter chain, which avoids the
    tiny-noise steps where discrete data (few levels) makes the ideal eps a sawtooth that small nets miss."""
    times = _check_times(process, times)
    keep = times[1:][process.sigma(times[1:]) >= min_sigma]
    if len(keep) == 0:
        raise ValueError(f"no grid time has sigma >= {min_sigma:g}")
    return torch.cat([times[:1], keep])


def time_at_sigma(process: Process, sigma: float) -> float:
    """The time in ``[t_min, t_max]`` at which the noise std ``sigma(t)`` (increasing in t) equals ``sigma``,
    by bisection; clamped to the ends of the range."""
    lo, hi = float(process.t_min), float(process.t_max)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if float(process.sigma(torch.tensor(mid, dtype=torch.float64))) < sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _check_times(process: Process, times: Tensor) -> Tensor:
    times = as_time(times).reshape(-1)
    if len(times) < 2 or not (times[1:] > times[:-1]).all():
        raise ValueError("times must be an increasing 1-D grid [t_zero, t_1, ..., t_N] with N >= 1")
    if abs(float(times[0]) - process.t_zero) > 1e-12 or float(process.sigma(times[:1])) != 0:
        raise ValueError(f"times must start at the clean time t_zero = {process.t_zero:g}")
    process.check_time(times)
    return times


def reverse_log_variance_bounds(process: Process, times: Tensor) -> tuple[Tensor, Tensor]:
    """``(log beta-tilde_clipped, log beta)`` for each of the ``N`` steps of the grid (float64).

    beta-tilde is the posterior variance of ``q(x_{t_i} | x_{t_{i+1}}, x0)``, which is 0 at the decoder step
    (``beta-tilde_1 = 0``, T-FWD-4); it is replaced there by the next step's value (IDDPM's clipping). beta is
    the forward transition variance ``q(x_{t_{i+1}} | x_{t_i})``.
    """
    t, s = times[1:], times[:-1]
    post = process.posterior_coefficients(t, s)[2].clone()
    large = process.transition(t, s)[1]
    post[0] = post[1] if len(post) > 1 else large[0]
    return torch.log(post), torch.log(large)


def reverse_variances(process: Process, times: Tensor, variance: str | Tensor = "small") -> Tensor:
    """Fixed reverse variances ``sigma_i^2`` of the ``N`` steps (float64): ``small`` (beta-tilde),
    ``large`` (beta, with beta-tilde_2 at the decoder step as in DDPM), or a given tensor of ``N`` values."""
    if isinstance(variance, Tensor):
        v = as_time(variance).reshape(-1)
        if len(v) != len(times) - 1 or not (v > 0).all():
            raise ValueError(f"a variance tensor must hold {len(times) - 1} positive values (one per step)")
        return v
    if variance not in ("small", "large"):
        raise ValueError(f"unknown fixed variance {variance!r}; allowed: small, large, or a tensor")
    log_small, log_large = reverse_log_variance_bounds(process, times)
    if variance == "small":
        return log_small.exp()
    v = log_large.exp()
    v[0] = log_small[0].exp()
    return v


def gaussian_reverse_variances(process: Process, times: Tensor, data_var: float) -> Tensor:
    """Exact reverse variances ``Var[x_s | x_t] = beta-tilde + c_0^2 Var[x0 | x_t]`` for Gaussian data of
    variance ``v`` (``Var[x0 | x_t] = v sigma_t^2 / (alpha_t^2 v + sigma_t^2)``); for DDPM this is
    ``(1/v_{t-1} + alpha_t/beta_t)^{-1}`` (B-6: beta_t when v = 1, beta-tilde_t when v -> 0)."""
    times = as_time(times)
    t, s = times[1:], times[:-1]
    _, c_0, post = process.posterior_coefficients(t, s)
    a, sg = process.alpha(t), process.sigma(t)
    return post + c_0**2 * data_var * sg**2 / (a**2 * data_var + sg**2)


def mean_matching_weights(process: Process, t: Tensor, s: Tensor, var: Tensor | float | None = None) -> dict:
    """Weights ``w`` with ``||mu~ - mu_theta||^2 / (2 var) = w ||e - e_hat||^2`` for ``e`` = ``x0``, ``eps``,
    ``score`` (T-PAR-3, T-PAR-7, T-PAR-6); ``var`` defaults to beta-tilde (then the x0 weight is
    ``1/2 (SNR_s - SNR_t)``). From ``mu~ - mu_theta = c_0 (x0 - x0_hat)`` and
    ``x0 = (x_t - sigma eps)/alpha = (x_t + sigma^2 score)/alpha``."""
    t, s = as_time(t), as_time(s)
    _, c_0, post = process.posterior_coefficients(t, s)
    var = post if var is None else torch.as_tensor(var, dtype=torch.float64)
    a, sg = process.alpha(t), process.sigma(t)
    w0 = c_0**2 / (2 * var)
    return {"x0": w0, "eps": w0 * sg**2 / a**2, "score": w0 * sg**4 / a**2}


def continuous_vlb_weight(process: Process, t: TimeLike) -> Tensor:
    """Weight on ``||eps - eps_hat||^2`` of the continuous-time bound, ``-1/2 SNR'(t) sigma^2/alpha^2 =
    -1/2 d log-SNR/dt`` (Kingma et al. 2021; B-8). For VP it equals ``1/2 g^2 / sigma^2``: likelihood weighting
    ``lambda = g^2`` (``losses.dsm_loss(weighting="g2")`` is twice this per dimension)."""
    t = as_time(t).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (d,) = torch.autograd.grad(process.log_snr(t).sum(), t)
    return -0.5 * d


# ------------------------------------------------------------------------------------------------------------
# The reverse kernel and the terms of the bound
# ------------------------------------------------------------------------------------------------------------


def _net_time(process: Process, t: Tensor, x: Tensor) -> Tensor:
    return t if process.discrete else t.to(x.dtype)


def _steps(i: Tensor | int, n: int, times: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(per-example indices (n,), t, s, key)``: with one index for the whole batch, ``t``, ``s`` and ``key``
    (for indexing per-step tables) are scalars, so that coefficients are computed once, not per example."""
    i = torch.as_tensor(i).long()
    key = i.reshape(()) if i.numel() == 1 else i.reshape(-1)
    if key.ndim == 1 and key.shape[0] != n:
        raise ValueError(f"need one step index or {n}, got {key.shape[0]}")
    if ((key < 0) | (key >= len(times) - 1)).any():
        raise ValueError(f"step index must be in 0..{len(times) - 2}")
    return key.expand(n), times[key + 1], times[key], key


def reverse_kernel(model: Denoiser, x_t: Tensor, i: Tensor, times: Tensor, variance: str | Tensor = "small",
                   cond=None, detach_mean: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """``p(x_{t_i} | x_{t_{i+1}}) = N(mean, exp(log_var))`` for per-example step indices ``i`` (T-VLB-1).

    Returns ``(mean, log_var, eps_hat)``. ``mean = c_x x_t + c_0 x0_hat`` (``Denoiser.mean``). With
    ``variance="learned"`` the network outputs twice the data channels (dim 1): the native prediction and
    ``v`` in [-1, 1], mapped to ``u = (v + 1)/2`` in :func:`learned_log_variance` (IDDPM); ``detach_mean`` stops
    the gradient through the mean (IDDPM's hybrid loss, B-12).
    """
    proc = model.process
    _, t, s, i = _steps(i, x_t.shape[0], times)
    c_x, c_0, _ = proc.posterior_coefficients(t, s)
    if variance == "learned":
        if model.precond != "none":
            raise ValueError("variance='learned' needs precond='none'")
        tn = _net_time(proc, t.expand(x_t.shape[0]), x_t)
        out = model.net(x_t, tn) if cond is None else model.net(x_t, tn, cond)
        if out.ndim < 2 or out.shape[1] != 2 * x_t.shape[1] or out.shape[2:] != x_t.shape[2:]:
            raise ValueError(f"variance='learned' needs a network with twice the data channels (prediction and "
                             f"variance); got output {tuple(out.shape)} for input {tuple(x_t.shape)}")
        pred, v = out.chunk(2, dim=1)
        a, sg = expand_like(proc.alpha(t), x_t), expand_like(proc.sigma(t), x_t)
        x0, eps = Denoiser.convert(x_t, a, sg, pred, model.prediction)
        log_small, log_large = reverse_log_variance_bounds(proc, times)
        u = (v + 1) / 2
        log_var = learned_log_variance(u, expand_like(log_small[i], x_t), expand_like(log_large[i], x_t))
    else:
        x0, eps = model.predict(x_t, t, cond)
        log_var = expand_like(torch.log(reverse_variances(proc, times, variance))[i], x_t)
    if detach_mean:
        x0 = x0.detach()
    mean = expand_like(c_x, x_t) * x_t + expand_like(c_0, x_t) * x0
    return mean, log_var, eps


def _decoder_nll(x0: Tensor, mean: Tensor, log_var: Tensor, levels: int | None,
                 value_range: tuple[float, float]) -> Tensor:
    """Per-example ``-log p(x0 | x_{t_1})``: discretized Gaussian with ``levels`` (B-1), else a density."""
    if levels is None:
        lp = -0.5 * (math.log(2 * math.pi) + log_var + (x0 - mean) ** 2 * torch.exp(-log_var))
    else:
        lp = discretized_gaussian_log_likelihood(x0, mean, log_std=0.5 * log_var, levels=levels,
                                                 value_range=value_range)
    return -lp.flatten(1).sum(1)


def prior_kl(process: Process, x0: Tensor) -> Tensor:
    """``L_T = KL(q(x_T | x0) || N(0, prior_std^2 I))`` per example, in nats (T-FWD-3)."""
    tT = as_time(process.t_max)
    a, s = float(process.alpha(tT)), float(process.sigma(tT))
    return gaussian_kl(a * x0, s**2, 0.0, process.prior_std() ** 2).flatten(1).sum(1)


def vlb_term(model: Denoiser, x0: Tensor, i: Tensor | int, *, times: Tensor | None = None,
             variance: str | Tensor = "small", levels: int | None = None,
             value_range: tuple[float, float] = (-1.0, 1.0), x_t: Tensor | None = None, cond=None,
             generator: torch.Generator | None = None, detach_mean: bool = False) -> Tensor:
    """One term of the bound per example, in nats: ``L_i`` for per-example step indices ``i`` (0 = decoder).

    ``L_0 = -log p(x0 | x_{t_1})`` (discretized with ``levels``, else a Gaussian density) and, for ``i >= 1``,
    ``KL(q(x_{t_i} | x_{t_{i+1}}, x0) || p(x_{t_i} | x_{t_{i+1}}))`` in closed form (T-VLB-3..5). ``x_t`` is the
    state at ``t_{i+1}``; by default one draw of ``q(x_{t_{i+1}} | x0)`` from ``generator``.
    """
    proc = model.process
    times = vlb_times(proc) if times is None else _check_times(proc, times)
    i, t, s, key = _steps(i, x0.shape[0], times)
    if x_t is None:
        e = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        x_t = proc.add_noise(x0, t, e)
    mean, log_var, _ = reverse_kernel(model, x_t, key, times, variance, cond, detach_mean)
    log_var = log_var.expand_as(x_t)
    dec = i == 0
    if dec.all():
        return _decoder_nll(x0, mean, log_var, levels, value_range)
    c_x, c_0, post = proc.posterior_coefficients(t, s)
    mu_q = expand_like(c_x, x_t) * x_t + expand_like(c_0, x_t) * x0
    post = expand_like(torch.where(key == 0, 1.0, post), x_t)  # the decoder rows are replaced below
    kl = gaussian_kl(mu_q, post, mean, torch.exp(log_var)).flatten(1).sum(1)
    if dec.any():
        nll = _decoder_nll(x0[dec], mean[dec], log_var[dec], levels, value_range)
        kl = kl.clone()
        kl[dec] = nll.to(kl.dtype)
    return kl


# ------------------------------------------------------------------------------------------------------------
# Results
# ------------------------------------------------------------------------------------------------------------


@dataclass
class LikelihoodResult:
    """Per-example negative log-likelihoods (or bounds) in nats, with their decomposition.

    ``nll`` (B,) nats; ``terms`` maps names (``L_T``, ``L_0``, ``L_1:N``, ``prior``, ``delta`` ...) to (B,)
    tensors; ``per_step`` (B, N) holds ``L_0 .. L_{N-1}`` (VLB; an unbiased estimate when sampled);
    ``nfe`` is the mean number of network evaluations per example.
    """

    nll: Tensor
    dims: int
    method: str
    terms: dict[str, Tensor] = field(default_factory=dict)
    per_step: Tensor | None = None
    nfe: float = 0.0
    seconds: float = 0.0

    @property
    def bpd(self) -> Tensor:
        """Per-example bits per dimension."""
        return self.nll / (self.dims * math.log(2))

    def mean_se(self, values: Tensor | None = None) -> tuple[float, float]:
        """Mean and its standard error over examples (bits/dim by default)."""
        v = (self.bpd if values is None else values).double()
        se = float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")
        return float(v.mean()), se

    @staticmethod
    def cat(results: list[LikelihoodResult]) -> LikelihoodResult:
        """Concatenate batches."""
        r0 = results[0]
        n = [len(r.nll) for r in results]
        steps = [r.per_step for r in results]
        return LikelihoodResult(
            torch.cat([r.nll for r in results]), r0.dims, r0.method,
            {k: torch.cat([r.terms[k] for r in results]) for k in r0.terms},
            torch.cat(steps) if all(s is not None for s in steps) else None,
            sum(r.nfe * m for r, m in zip(results, n)) / sum(n), sum(r.seconds for r in results))


@torch.no_grad()
def vlb(model: Denoiser, x0: Tensor, *, n_t: int | None = None, times: Tensor | None = None,
        steps: int | None = None, variance: str | Tensor = "small", levels: int | None = None,
        value_range: tuple[float, float] = (-1.0, 1.0), cond=None, generator: torch.Generator | None = None,
        progress: bool = False) -> LikelihoodResult:
    """The variational bound ``L_T + sum_i L_i`` per example (T-VLB-3), in nats (``.bpd`` for bits/dim).

    ``n_t=None``: every term (one network call per step, ``N`` in all). ``n_t=k``: an unbiased estimate with
    ``L_T`` and the decoder term ``L_0`` exact and ``k`` KL steps drawn uniformly from ``1..N-1`` per example,
    ``L_T + L_0 + (N-1) mean_j L_{i_j}`` (``k + 1`` network calls; the per-step table then holds the unbiased
    estimate ``(N-1)/k sum_j L_{i_j} 1[i = i_j]``). Both carry the noise of the ``x_t`` draws, which the
    standard error over examples (``mean_se``) includes. ``levels`` selects the discretized decoder (256 for
    8-bit data, 17 for the digits); without it ``L_0`` is a Gaussian density and the bound is on ``-log p``.
    """
    proc = model.process
    times = vlb_times(proc, steps) if times is None else _check_times(proc, times)
    N, B = len(times) - 1, x0.shape[0]
    if not (isinstance(variance, str) and variance == "learned"):
        variance = reverse_variances(proc, times, variance)  # tabulated once, not per term
    t0 = time.time()
    per_step = torch.zeros(B, N, dtype=torch.float64, device=x0.device)
    if n_t is None:
        idx = range(N)
        if progress:
            from tqdm.auto import tqdm

            idx = tqdm(idx, desc="vlb terms", leave=False, dynamic_ncols=True)
        for i in idx:
            per_step[:, i] = vlb_term(model, x0, i, times=times, variance=variance, levels=levels,
                                      value_range=value_range, cond=cond, generator=generator).double()
        nfe = N
    else:
        if int(n_t) < 1:
            raise ValueError(f"n_t must be >= 1 (or None for every term), got {n_t}")
        kw = {"times": times, "variance": variance, "levels": levels, "value_range": value_range, "cond": cond,
              "generator": generator}
        per_step[:, 0] = vlb_term(model, x0, 0, **kw).double()
        rows = torch.arange(B, device=x0.device)
        for _ in range(int(n_t) if N > 1 else 0):
            i = torch.randint(1, N, (B,), generator=generator).to(x0.device)
            per_step[rows, i] += (N - 1) * vlb_term(model, x0, i, **kw).double() / int(n_t)
        nfe = 1 + int(n_t)
    prior = prior_kl(proc, x0).double()
    terms = {"L_T": prior, "L_0": per_step[:, 0], "L_1:N": per_step[:, 1:].sum(1)}
    return LikelihoodResult(prior + per_step.sum(1), x0[0].numel(), "vlb" if n_t is None else "vlb-sampled",
                            terms, per_step, float(nfe), time.time() - t0)


# ------------------------------------------------------------------------------------------------------------
# Trajectories (T-VLB-1, T-VLB-2): importance weights p(x_{0:N}) / q(x_{1:N} | x0)
# ------------------------------------------------------------------------------------------------------------


def forward_trajectory(process: Process, x0: Tensor, times: Tensor,
                       generator: torch.Generator | None = None) -> list[Tensor]:
    """``[x_{t_0} = x0, x_{t_1}, ..., x_{t_N}]`` drawn from the Markov chain ``q(x_{t_{i+1}} | x_{t_i})``."""
    xs = [x0]
    for i in range(len(times) - 1):
        a, v = process.transition(times[i + 1], times[i])
        z = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        xs.append(float(a) * xs[-1] + math.sqrt(float(v)) * z)
    return xs


def forward_log_prob(process: Process, xs: list[Tensor], times: Tensor) -> Tensor:
    """``log q(x_{t_1:t_N} | x0) = sum_i log N(x_{t_{i+1}}; alpha_{i+1|i} x_{t_i}, var)`` per example."""
    out = torch.zeros(xs[0].shape[0], dtype=torch.float64, device=xs[0].device)
    for i in range(len(times) - 1):
        a, v = process.transition(times[i + 1], times[i])
        out += gaussian_log_density(xs[i + 1], float(a) * xs[i], float(v)).flatten(1).sum(1).double()
    return out


def reverse_log_prob(model: Denoiser, xs: list[Tensor], times: Tensor, *, variance: str | Tensor = "small",
                     levels: int | None = None, value_range: tuple[float, float] = (-1.0, 1.0), cond=None,
                     prior_logp=None) -> Tensor:
    """``log p(x_{0:N}) = log p(x_{t_N}) + sum_i log p(x_{t_i} | x_{t_{i+1}})`` per example (T-VLB-1), with the
    decoder (discretized with ``levels``) at ``i = 0``. ``prior_logp(x)`` replaces the process prior."""
    proc = model.process
    times = _check_times(proc, times)
    out = (proc.prior_logp(xs[-1]) if prior_logp is None else prior_logp(xs[-1])).double()
    if not (isinstance(variance, str) and variance == "learned"):
        variance = reverse_variances(proc, times, variance)
    for i in range(len(times) - 1):
        mean, log_var, _ = reverse_kernel(model, xs[i + 1], torch.tensor(i), times, variance, cond)
        if i == 0:
            out -= _decoder_nll(xs[0], mean, log_var, levels, value_range).double()
        else:
            out += gaussian_log_density(xs[i], mean, log_var.exp()).flatten(1).sum(1).double()
    return out


# ------------------------------------------------------------------------------------------------------------
# Training losses with the bound (IDDPM, B-12)
# ------------------------------------------------------------------------------------------------------------


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


class ODELikelihood(NamedTuple):
    """``logp`` (B,) in nats at ``t_eps`` and the number of drift evaluations ``nfe``."""

    logp: Tensor
    nfe: int


def jacobian_trace(fx: Tensor, x: Tensor, v: Tensor | None = None) -> Tensor:
    """Per-example ``div f = tr(df/dx)`` of ``fx = f(x)`` (graph to ``x``): exact with one backward pass per
    dimension, or Hutchinson's unbiased ``v^T (df/dx) v`` with the probe ``v`` (one backward pass). Assumes the
    examples of the batch do not interact."""
    if v is not None:
        (g,) = torch.autograd.grad((fx * v).sum(), x)
        return (g * v).flatten(1).sum(1)
    ff = fx.flatten(1)
    D = ff.shape[1]
    out = torch.zeros(x.shape[0], dtype=fx.dtype, device=fx.device)
    for j in range(D):
        (g,) = torch.autograd.grad(ff[:, j].sum(), x, retain_graph=j < D - 1)
        out = out + g.flatten(1)[:, j]
    return out


ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")
DIVERGED_TAIL = 1e-12


def prior_norm_bound(tail: float = DIVERGED_TAIL) -> float:
    """The ratio ``r > 1`` with ``exp(-(r - 1 - ln r) / 2) = tail``: by the Chernoff bound
    ``P(chi2_D >= r D) <= exp(-D (r - 1 - ln r) / 2)``, a prior draw has ``|x_T|^2 / (D prior_std^2) >= r`` with
    probability below ``tail`` per dimension (``tail^D`` in all). ``tail = 1e-12``: ``r = 60.4``, where the prior
    term alone costs over 40 bits/dim."""
    target = -2.0 * math.log(tail)
    lo, hi = 1.0, 2.0 * target + 10.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mid - 1.0 - math.log(mid) < target else (lo, mid)
    return 0.5 * (lo + hi)


def _examples(idx: list[int], values: Tensor | None = None, limit: int = 20) -> str:
    shown = ", ".join(str(i) if values is None else f"{i} ({float(values[i]):.3g})" for i in idx[:limit])
    return f"[{shown}{', ...' if len(idx) > limit else ''}]"


class _X0InRange:
    """The model with ``x0_hat`` clamped to the data's range ``[lo, hi]`` and ``eps`` recomputed to match
    (``eps = (x - alpha x0) / sigma``): the posterior mean of data in ``[lo, hi]^D`` always lies there."""

    def __init__(self, model, lo: float, hi: float):
        self.model, self.process, self.lo, self.hi = model, model.process, lo, hi

    def predict(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        x0, _ = self.model.predict(x, t)
        x0 = x0.clamp(self.lo, self.hi)
        tt = as_time(t).to(x.device)
        a, s = expand_like(self.process.alpha(tt), x).to(x), expand_like(self.process.sigma(tt), x).to(x)
        return x0, (x - a * x0) / s


def ode_log_likelihood(model: Denoiser, x: Tensor, *, divergence: str = "hutchinson", noise: str = "gaussian",
                       rtol: float = 1e-5, atol: float = 1e-5, method: str = "dopri5",
                       generator: torch.Generator | None = None, t_eps: float | None = None, cond=None,
                       options: dict | None = None, prior_logp: Callable[[Tensor], Tensor] | None = None,
                       x0_range: tuple[float, float] | None = None, max_steps: int = 10_000) -> ODELikelihood:
    """``log p_{t_eps}(x)`` of the probability-flow ODE model, per example (B-2; Song et al. 2021 app. D.2).

    Integrates ``d[x, delta]/dt = [f~(x, t), div f~(x, t)]`` with torchdiffeq from ``t_eps`` (default
    ``process.t_min``) to ``t_max`` and returns ``process.prior_logp(x(t_max)) + delta``. The drift is
    ``samplers.common.pf_ode_drift``. ``divergence="exact"`` costs one backward pass per dimension (low
    dimensions); ``"hutchinson"`` draws one probe per example from ``generator`` (Gaussian or Rademacher),
    fixed for the whole solve, giving an unbiased estimate of ``log p`` up to the solver error.
    ``prior_logp(x_T)`` replaces ``process.prior_logp`` (e.g. the exact ``p_T`` of an oracle in tests).

    ``x0_range=(lo, hi)`` (data known to lie in ``[lo, hi]^D``, e.g. the ``value_range`` of images) clamps
    ``x0_hat`` there, as the exact posterior mean always is, and scores the flow of that field. An eps-net
    extrapolates ``x0_hat`` linearly far outside the data's range once a trajectory leaves the region it was
    trained on, and the flow then grows exponentially (``dx/dt ~ beta/2 (k - 1) x`` at high noise for
    ``eps_hat ~ k x``, ``k > 1``). With ``x0_hat`` in the range the drift is
    ``alpha g^2 / (2 sigma^2) (alpha x - x0_hat)`` (VP), so ``d(x/sigma)/dt`` is bounded and each coordinate of
    ``x / sigma`` moves by at most ``max(|lo|, |hi|) alpha / sigma`` (at ``t_eps``; VP): no exponential runaway.

    Raises ``ValueError`` naming the examples when the solve diverges: a non-finite ``x(t_max)`` or ``delta``,
    or ``|x(t_max)|^2 / (D prior_std^2)`` beyond :func:`prior_norm_bound` (a prior tail below 1e-12 per
    dimension); or when an adaptive solve takes more than ``max_steps`` steps or its step size underflows.
    """
    from torchdiffeq import odeint

    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; allowed: {', '.join(DIVERGENCES)}")
    bound = Bound(model, cond)
    field = bound
    if x0_range is not None:
        lo, hi = (float(v) for v in x0_range)
        if not hi > lo:
            raise ValueError(f"x0_range must be (low, high) with high > low, got {x0_range}")
        field = _X0InRange(bound, lo, hi)
    proc = model.process
    t0 = float(proc.t_min if t_eps is None else t_eps)
    proc.check_time(t0)
    if not t0 < proc.t_max or float(proc.sigma(as_time(t0))) <= 0:
        raise ValueError(f"t_eps must satisfy sigma(t_eps) > 0 and t_eps < t_max = {proc.t_max:g}, got {t0:g}")
    v = sample_projections(x, noise, generator) if divergence == "hutchinson" else None
    last: dict = {}

    def f(t: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        last["t"], last["x"] = float(t), state[0]
        with torch.enable_grad():
            xt = state[0].detach().requires_grad_(True)
            drift = pf_ode_drift(field, xt, as_time(t))[0]
            div = jacobian_trace(drift, xt, v)
        return drift.detach(), div.detach()

    span = torch.tensor([t0, proc.t_max], dtype=x.dtype, device=x.device)
    zero = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
    B, D = x.shape[0], x[0].numel()
    options = dict(options or {})
    if method in ADAPTIVE_METHODS:
        options.setdefault("step_t", span[1:])  # land on t_max instead of stepping past it
        # torchdiffeq's initial-step guess probes the drift at t0 + h0 with an unbounded h0; 1 % of the span
        # keeps every evaluation inside it (the solver adapts the step from there)
        options.setdefault("first_step", 0.01 * (proc.t_max - t0))
        options.setdefault("max_num_steps", int(max_steps))
    try:
        xs, deltas = odeint(f, (x.detach(), zero), span, rtol=rtol, atol=atol, method=method, options=options)
    except AssertionError as e:  # torchdiffeq's step limit, dt underflow and non-finite state are assertions
        reason = str(e).split(":")[0]
        if not any(k in reason for k in ("max_num_steps", "underflow", "non-finite")):
            raise
        xl = last["x"].detach().flatten(1).double()
        q = (xl**2).mean(1)
        bad = (~torch.isfinite(xl).all(1)).nonzero().flatten().tolist()
        if not bad:
            bad = q.argsort(descending=True)[:5].tolist()
        raise ValueError(f"ODE likelihood solve failed ({reason}; max_num_steps = {options.get('max_num_steps')}) "
                         f"at t = {last['t']:.4g} in a batch of {B}; examples with the largest |x_t|^2/D then: "
                         f"{_examples(bad, q)}") from e
    xT, dT = xs[-1], deltas[-1]
    q = (xT.detach().flatten(1).double() ** 2).mean(1) / proc.prior_std() ** 2
    r = prior_norm_bound()
    bad_mask = ~torch.isfinite(xT.flatten(1)).all(1) | ~torch.isfinite(dT) | ~(q <= r)
    if bad_mask.any():
        bad = bad_mask.nonzero().flatten().tolist()
        hint = "" if x0_range is not None else \
            "; if the data lie in a known range, pass x0_range=(low, high) (cli: --x0-in-range)"
        raise ValueError(f"ODE likelihood diverged for examples {_examples(bad, q)} of {B} "
                         f"(|x_T|^2/(D prior_std^2) at t_max in parentheses; a prior draw exceeds {r:.3g} with "
                         f"probability below {DIVERGED_TAIL:g}^D, D = {D}){hint}")
    prior = proc.prior_logp if prior_logp is None else prior_logp
    return ODELikelihood(prior(xT) + dT, bound.nfe)


# ------------------------------------------------------------------------------------------------------------
# Bits per dimension
# ------------------------------------------------------------------------------------------------------------


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
