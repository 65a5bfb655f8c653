"""Learned noise schedule (Variational Diffusion Models, Kingma et al. 2021; THEORY B-8)."""

from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

from .base import Process, TimeLike, as_time


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``holder.scale`` (per example) when one is set."""

    @staticmethod
    def forward(ctx, x: Tensor, holder: _GradScale) -> Tensor:
        ctx.holder = holder
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: Tensor):
        scale = ctx.holder.scale
        if scale is None or scale.shape != g.shape:
            return g, None  # scalar times (t_min, t_max): the shape's gradient there is exactly 0 anyway
        return g * scale.to(g), None


class _GradScale:
    """The per-example factor that :class:`_ScaleGrad` applies (filled in after the loss is known)."""

    scale: Tensor | None = None


_FLOOR = 1e-3  # keeps gamma_1 - gamma_0 and the slope of h away from 0 whatever the parameters


class MonotoneSchedule(torch.nn.Module):
    """VDM's learned noise schedule ``gamma(t) = -lambda(t)`` on ``t`` in ``[0, 1]`` (Kingma et al. 2021, eq. 25 and
    app. H.1; THEORY B-8):

        gamma(t) = gamma_0 + (gamma_1 - gamma_0) (h(t) - h(0)) / (h(1) - h(0)),
        h(t) = a t + sum_k c_k sigmoid(w_k t + b_k),  a, c_k, w_k > 0 (softplus),

    so ``gamma`` increases strictly from the learned endpoint ``gamma_0`` to ``gamma_1 = gamma_0 +
    softplus(delta) + 0.001``, with ``a >= 0.001``: the log-SNR is strictly monotone for any parameter values.
    ``h`` starts linear (``c_k`` small), i.e. ``gamma`` linear in ``t``. Computed in float64.
    """

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 6.0, hidden: int = 32):
        super().__init__()
        if not gamma_max > gamma_min + 0.01:
            raise ValueError(f"need gamma_max > gamma_min + 0.01, got {gamma_min}, {gamma_max}")
        if int(hidden) < 1:
            raise ValueError(f"schedule_hidden must be >= 1, got {hidden}")
        self.gamma_0 = torch.nn.Parameter(torch.tensor(float(gamma_min)))
        d = float(gamma_max) - float(gamma_min) - _FLOOR
        self.delta = torch.nn.Parameter(torch.tensor(d + math.log(-math.expm1(-d))))  # softplus^-1(d)
        k = int(hidden)
        self.a = torch.nn.Parameter(torch.tensor(math.log(math.expm1(1.0 - _FLOOR))))  # softplus^-1(1 - floor)
        self.w = torch.nn.Parameter(torch.full((k,), math.log(math.expm1(8.0))))
        centres = (torch.arange(k, dtype=torch.float32) + 0.5) / k
        self.b = torch.nn.Parameter(-8.0 * centres)
        self.c = torch.nn.Parameter(torch.full((k,), -6.0))
        self.grad_scale = _GradScale()

    def _coefficients(self) -> tuple[Tensor, ...]:
        """``(gamma_0, gamma_1, a, w, b, c, h(0), h(1) - h(0))`` in float64; cached while no gradient can flow to
        the parameters (sampling, likelihoods), keyed by the parameters' storage and version counters (an in-place
        update, a loaded state dict or a copy of the module all miss the cache)."""
        params = list(self.parameters())
        cacheable = not (torch.is_grad_enabled() and any(p.requires_grad for p in params))
        key = tuple((p.data_ptr(), p._version) for p in params) + (params[0].device,)  # a copy never matches
        if cacheable and getattr(self, "_cache_key", None) == key:
            return self._cache
        with torch.no_grad() if cacheable else contextlib.nullcontext():
            sp = torch.nn.functional.softplus
            g0 = self.gamma_0.double()
            g1 = g0 + sp(self.delta.double()) + _FLOOR
            a, w, c = sp(self.a.double()) + _FLOOR, sp(self.w.double()), sp(self.c.double()) / len(self.w)
            b = self.b.double()
            h0 = (c * torch.sigmoid(b)).sum()
            h1 = a + (c * torch.sigmoid(w + b)).sum()
            out = (g0, g1, a, w, b, c, h0, h1 - h0)
        if cacheable:
            self._cache_key, self._cache = key, out
        return out

    def endpoints(self) -> tuple[Tensor, Tensor]:
        """``(gamma_0, gamma_1)`` in float64 (differentiable)."""
        return self._coefficients()[:2]

    def shape(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """The normalized shape ``s(t) = (h(t) - h(0)) / (h(1) - h(0))`` in [0, 1] and ``s'(t)``."""
        _, _, a, w, b, c, h0, z = self._coefficients()
        sg = torch.sigmoid(t[..., None] * w + b)
        s = (a * t + (c * sg).sum(-1) - h0) / z
        ds = (a + (c * w * sg * (1 - sg)).sum(-1)) / z
        if s.requires_grad:
            s, ds = _ScaleGrad.apply(s, self.grad_scale), _ScaleGrad.apply(ds, self.grad_scale)
        return s, ds

    def forward(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """``(gamma(t), gamma'(t))`` for float64 ``t`` in [0, 1]."""
        g0, g1 = self._coefficients()[:2]
        s, ds = self.shape(t)
        return g0 + (g1 - g0) * s, (g1 - g0) * ds


class LearnedVP(Process):
    """Variance-preserving process with a learned log-SNR (VDM): ``alpha^2 = sigmoid(-gamma(t))``,
    ``sigma^2 = sigmoid(gamma(t))``, ``lambda = -gamma`` for ``t`` in ``[0, 1]`` (Kingma et al. 2021, eq. 3-4).

    ``gamma`` is a :class:`MonotoneSchedule` (``schedule``), an ``nn.Module`` that is trained with the network:
    a run keeps it inside the trained module (``nets.LikelihoodNet``) and the process reads it from there
    (:meth:`with_schedule`). ``sigma(0) > 0``, so, as for DDPM, the clean state has its own time
    ``t_zero = -1`` and times in ``(-1, 0)`` are undefined. Forward SDE: ``f = -1/2 sigma^2 gamma'``,
    ``g^2 = sigma^2 gamma'`` (THEORY T-SDE-1/2 with ``d sigma^2/dt = sigma^2 alpha^2 gamma'``).
    """

    name = "learned"
    t_zero = -1.0

    def __init__(self, gamma_min: float = -10.0, gamma_max: float = 6.0, schedule_hidden: int = 32,
                 schedule: MonotoneSchedule | None = None):
        self.gamma_min, self.gamma_max, self.schedule_hidden = float(gamma_min), float(gamma_max), int(schedule_hidden)
        self.schedule = MonotoneSchedule(gamma_min, gamma_max, schedule_hidden) if schedule is None else schedule
        self.t_min, self.t_max = 0.0, 1.0

    def with_schedule(self, schedule: MonotoneSchedule) -> LearnedVP:
        """The same process reading ``schedule`` (e.g. the EMA copy inside an EMA network)."""
        return LearnedVP(self.gamma_min, self.gamma_max, self.schedule_hidden, schedule=schedule)

    def _gamma(self, t: TimeLike) -> tuple[Tensor, Tensor, Tensor]:
        """``(gamma, gamma', clean)`` at ``t``; at ``t_zero`` gamma is -inf (clean), elsewhere t must be in [0, 1]."""
        t = self.check_time(t)
        clean = t < 0
        if (clean & (t != self.t_zero)).any():
            raise ValueError("learned: t in (-1, 0) is undefined; use -1 (clean) or a time in [0, 1]")
        p = next(self.schedule.parameters())
        g, dg = self.schedule(t.clamp(min=0.0).to(p.device))
        return torch.where(clean.to(g.device), -math.inf, g), dg, clean.to(g.device)

    def log_snr(self, t):
        return -self._gamma(t)[0]

    def t_from_log_snr(self, l):
        """Inverse of the (strictly decreasing) log-SNR on [0, 1] by 60 bisection steps (float64 resolution)."""
        l = as_time(l)
        lo, hi = torch.zeros_like(l), torch.ones_like(l)
        with torch.no_grad():
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                above = self.log_snr(mid) > l
                lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def log_snr_derivative(self, t):
        """``-gamma'(t)`` in closed form (differentiable in the schedule's parameters)."""
        return -self._gamma(t)[1]

    def alpha(self, t):
        return torch.sqrt(torch.sigmoid(-self._gamma(t)[0]))

    def sigma(self, t):
        return torch.sqrt(torch.sigmoid(self._gamma(t)[0]))

    def sde_coefficients(self, t):
        g, dg, _ = self._gamma(t)
        s2 = torch.sigmoid(g)
        return -0.5 * s2 * dg, torch.sqrt(s2 * dg)

    def prior_std(self) -> float:
        return 1.0

    def variance_gradient(self) -> _GradScale:
        """The holder whose ``scale`` (per example) multiplies the gradient reaching the schedule's *shape*
        (VDM app. I.2: with the endpoints fixed the bound does not depend on the shape, so the shape is trained
        to minimize the variance of the loss: the gradient of ``L^2`` is ``2 L dL``, i.e. ``scale = 2 L``)."""
        return self.schedule.grad_scale

    def config(self):
        return {"name": self.name, "gamma_min": self.gamma_min, "gamma_max": self.gamma_max,
                "schedule_hidden": self.schedule_hidden}
