"""The variational bound of any affine process on a time grid (discrete time; DDPM conventions).

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
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.processes import Process, TimeLike, as_time, expand_like

from .gaussian import discretized_gaussian_log_likelihood, gaussian_kl, gaussian_log_density, learned_log_variance

VARIANCES = ("small", "large", "learned")


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
    return -0.5 * process.log_snr_derivative(as_time(t)).detach()


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
