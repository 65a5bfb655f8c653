"""ODE likelihood (B-2): ``log p_{t_eps}(x) = log p_T(x(T)) + int_{t_eps}^T div f~(x(t), t) dt`` along the
probability-flow ODE ``dx/dt = f~ = f x - 1/2 g^2 score``, with the divergence exact (autograd) or by
Hutchinson's estimator (one probe per solve)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from torchdiffusion._tensor import sample_projections
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.flow import ADAPTIVE_METHODS, Bound, adaptive_options, pf_ode_drift
from torchdiffusion.processes import as_time, expand_like

DIVERGENCES = ("exact", "hutchinson")


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
    ``parameterization.flow.pf_ode_drift``. ``divergence="exact"`` costs one backward pass per dimension (low
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
        options = {**adaptive_options(t0, proc.t_max, method), "max_num_steps": int(max_steps), **options}
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
