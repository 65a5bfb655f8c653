"""Langevin dynamics: the sampler of score-based and energy-based models (THEORY T-EBM-2..5, T-NCSN-2).

Step-size convention. The library writes one Langevin step as (002 eq. 1, T-EBM-2)

    ``x_{k+1} = x_k + c * grad log p(x_k) + sqrt(2 c) * xi_k``,   ``xi_k ~ N(0, I)``,

the Euler-Maruyama step of length ``c`` of ``dX = grad log p dt + sqrt(2) dW``. Note 003 (and Song & Ermon
2019) write ``x + (eps/2) grad log p + sqrt(eps) z``: that is the same step with ``c = eps / 2``.
:func:`langevin` takes ``step_size = c``; the ``annealed_langevin`` sampler (:mod:`torchdiffusion.samplers.langevin`)
takes Song & Ermon's ``eps`` (their ``epsilon = 2e-5`` means 2 x 10^-5) and uses ``c_i = alpha_i / 2``.

Without a Metropolis correction the chain (the unadjusted Langevin algorithm, ULA) is biased: for
``N(0, v)`` it is stationary at variance ``v / (1 - c / (2 v))`` (T-EBM-3). ``metropolis=True`` (MALA)
removes the bias at the cost of one ``log_prob`` evaluation per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

ScoreFn = Callable[[Tensor], Tensor]


def _noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)


def _sum_dims(v: Tensor) -> Tensor:
    return v.reshape(v.shape[0], -1).sum(1) if v.ndim > 1 else v


def langevin_step(x: Tensor, score: Tensor, c: float | Tensor, z: Tensor) -> Tensor:
    """One unadjusted Langevin step ``x + c * score + sqrt(2 c) * z`` (T-EBM-2; ``c = eps/2`` in 003's form)."""
    c = torch.as_tensor(c, dtype=x.dtype, device=x.device)
    return x + c * score + torch.sqrt(2 * c) * z


def _check_step(step_size: float) -> float:
    c = float(step_size)
    if not c > 0 or not math.isfinite(c):
        raise ValueError(f"step_size must be a positive number, got {step_size!r}")
    return c


def langevin(score_fn: ScoreFn, x: Tensor, *, step_size: float, n_steps: int,
             generator: torch.Generator | None = None, metropolis: bool = False,
             log_prob: Callable[[Tensor], Tensor] | None = None,
             callback: Callable[[dict], None] | None = None) -> Tensor:
    """Run ``n_steps`` Langevin steps ``x <- x + c score(x) + sqrt(2c) xi`` with ``c = step_size`` (T-EBM-2).

    ``score_fn(x)`` returns ``grad log p(x)`` for a batch ``x`` of shape ``(B, ...)``; each example is an
    independent chain. With ``metropolis=True`` each proposal ``x'`` is accepted with probability
    ``min(1, p(x') q(x | x') / (p(x) q(x' | x)))`` where ``q(x'|x) = N(x + c s(x), 2c I)`` (MALA; needs
    ``log_prob``, an unnormalised log-density is enough). ``callback`` receives ``{"i", "x"}`` (and
    ``"accept"``, the batch acceptance rate, under MALA) after each step. Randomness only from ``generator``.
    """
    c = _check_step(step_size)
    if int(n_steps) < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if metropolis and log_prob is None:
        raise ValueError("metropolis=True (MALA) needs log_prob, the (unnormalised) log-density")
    s = score_fn(x)
    lp = log_prob(x) if metropolis else None
    for i in range(int(n_steps)):
        z = _noise(x, generator)
        prop = langevin_step(x, s, c, z)
        if not metropolis:
            x = prop
            s = score_fn(x) if i < int(n_steps) - 1 else s
            if callback is not None:
                callback({"i": i, "x": x})
            continue
        s_prop, lp_prop = score_fn(prop), log_prob(prop)
        # log q(x | x') - log q(x' | x), with q(b | a) = N(b; a + c s(a), 2c I)
        fwd = _sum_dims(z**2) / 2
        bwd = _sum_dims((x - prop - c * s_prop) ** 2) / (4 * c)
        log_acc = lp_prop - lp + fwd - bwd
        u = torch.rand(log_acc.shape, generator=generator, dtype=log_acc.dtype).to(x.device)
        keep = torch.log(u) < log_acc
        mask = keep.reshape(-1, *([1] * (x.ndim - 1)))
        x, s, lp = torch.where(mask, prop, x), torch.where(mask, s_prop, s), torch.where(keep, lp_prop, lp)
        if callback is not None:
            callback({"i": i, "x": x, "accept": float(keep.to(torch.float64).mean())})
    return x


def annealed_step_sizes(sigmas: Sequence[float] | Tensor, eps: float) -> Tensor:
    """Song & Ermon (2019) Alg. 1 step sizes ``alpha_i = eps * sigma_i^2 / sigma_L^2`` (T-NCSN-2), float64."""
    s = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    return float(eps) * s**2 / s[-1] ** 2


def simulate_sde(drift: Callable[[Tensor, float], Tensor], diffusion: Callable[[float], float | Tensor], x: Tensor,
                 t0: float, t1: float, n_steps: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Euler-Maruyama for ``dX = drift(X, t) dt + diffusion(t) dW`` from ``t0`` to ``t1`` in ``n_steps`` equal
    steps (002 eqs. 6-8, T-SDE-1): ``X <- X + drift(X, t) h + diffusion(t) sqrt(|h|) xi``. Langevin dynamics is
    the case ``drift = grad log p``, ``diffusion = sqrt(2)`` (:func:`langevin_step` with ``c = h``).
    ``diffusion(t)`` may return a scalar or a tensor broadcastable to ``x``."""
    if int(n_steps) < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    h = (float(t1) - float(t0)) / int(n_steps)
    for k in range(int(n_steps)):
        t = float(t0) + k * h
        x = x + drift(x, t) * h + diffusion(t) * math.sqrt(abs(h)) * _noise(x, generator)
    return x
