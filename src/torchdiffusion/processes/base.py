"""The ``Process`` interface and the small helpers every process shares (axis 1 of docs/design.md).

``x_t = alpha(t) * x0 + sigma(t) * eps``; the concrete processes live beside this file: ``ddpm.py`` (discrete),
``continuous.py`` (VP, SubVP, VE, EDM) and ``learned.py`` (VDM's learned schedule).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

TimeLike = Tensor | float | int


def as_time(t: TimeLike) -> Tensor:
    """Times as a float64 tensor (process coefficients are always computed in float64)."""
    if isinstance(t, Tensor):
        return t.to(torch.float64)
    return torch.tensor(float(t), dtype=torch.float64)


def expand_like(c: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-sample coefficient ``(B,)`` or scalar to the shape of ``x`` (B, ...), in x's dtype."""
    c = c.to(dtype=x.dtype, device=x.device)
    if c.ndim == 0:
        return c
    if c.ndim != 1 or c.shape[0] not in (1, x.shape[0]):
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got shape {tuple(c.shape)}")
    return c.reshape(-1, *([1] * (x.ndim - 1)))


class Process(ABC):
    """An affine Gaussian forward process ``q(x_t | x_0) = N(alpha(t) x_0, sigma(t)^2 I)``."""

    name: str = "process"
    t_min: float
    t_max: float
    t_zero: float = 0.0
    discrete: bool = False

    # --- marginal coefficients -------------------------------------------------------------------------
    @abstractmethod
    def alpha(self, t: TimeLike) -> Tensor:
        """Signal coefficient alpha(t) (float64)."""

    @abstractmethod
    def sigma(self, t: TimeLike) -> Tensor:
        """Noise standard deviation sigma(t) (float64)."""

    def log_snr(self, t: TimeLike) -> Tensor:
        """``lambda(t) = log(alpha^2 / sigma^2)``; +inf at ``t_zero``."""
        return 2.0 * (torch.log(self.alpha(t)) - torch.log(self.sigma(t)))

    def t_from_log_snr(self, l: TimeLike) -> Tensor:
        """Inverse of ``log_snr`` on ``[t_min, t_max]`` (generic bisection; subclasses give closed forms)."""
        l = as_time(l)
        lo = torch.full_like(l, self.t_min)
        hi = torch.full_like(l, self.t_max)
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            above = self.log_snr(mid) > l  # log-SNR decreases in t: the root is later
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    def log_snr_derivative(self, t: TimeLike) -> Tensor:
        """``d lambda / dt`` (float64; negative: log-SNR falls with t), by autograd of :meth:`log_snr`. The weight
        of the continuous-time bound is ``-1/2`` of it (Kingma et al. 2021, eq. 17; THEORY B-8)."""
        t = as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            (d,) = torch.autograd.grad(self.log_snr(t).sum(), t)
        return d

    def check_time(self, t: TimeLike) -> Tensor:
        """Validate that ``t`` lies in ``[t_zero, t_max]``; return it as float64."""
        tt = as_time(t)
        if torch.isnan(tt).any():
            raise ValueError(f"{self.name}: t contains NaN")
        lo, hi = min(self.t_zero, self.t_min), self.t_max
        tol = 1e-6 * max(1.0, abs(lo), abs(hi))  # float32 round-off of a time computed elsewhere (clamped away)
        if (tt < lo - tol).any() or (tt > hi + tol).any():
            raise ValueError(
                f"{self.name}: t outside the process range [{lo:.10g}, {hi:.10g}] "
                f"(got min {tt.min().item():.10g}, max {tt.max().item():.10g})"
            )
        return tt.clamp(lo, hi)

    # --- sampling the forward process ------------------------------------------------------------------
    def add_noise(self, x0: Tensor, t: TimeLike, eps: Tensor) -> Tensor:
        """``x_t = alpha(t) x0 + sigma(t) eps`` (DDPM: ``sqrt(abar_t) x0 + sqrt(1-abar_t) eps``, T-FWD-2)."""
        t = self.check_time(t)
        return expand_like(self.alpha(t), x0) * x0 + expand_like(self.sigma(t), x0) * eps

    def transition(self, t: TimeLike, s: TimeLike) -> tuple[Tensor, Tensor]:
        """``q(x_t | x_s) = N(alpha_{t|s} x_s, sigma_{t|s}^2 I)`` for ``s < t``: returns (alpha_{t|s}, var)."""
        a_t, s_t, a_s, s_s = self.alpha(t), self.sigma(t), self.alpha(s), self.sigma(s)
        a_ts = a_t / a_s
        return a_ts, (s_t**2 - a_ts**2 * s_s**2).clamp_min(0.0)

    def posterior_coefficients(self, t: TimeLike, s: TimeLike) -> tuple[Tensor, Tensor, Tensor]:
        """``q(x_s | x_t, x0) = N(c_x x_t + c_0 x0, var)`` for ``s < t`` (T-VLB-4 for any affine process).

        ``c_x = alpha_{t|s} sigma_s^2 / sigma_t^2``, ``c_0 = alpha_s sigma_{t|s}^2 / sigma_t^2``,
        ``var = sigma_{t|s}^2 sigma_s^2 / sigma_t^2``. For DDPM with s = t - 1 these are
        ``sqrt(alpha_t)(1-abar_{t-1})/(1-abar_t)``, ``sqrt(abar_{t-1}) beta_t/(1-abar_t)`` and beta-tilde_t.
        """
        a_ts, v_ts = self.transition(t, s)
        s_t2, s_s2 = self.sigma(t) ** 2, self.sigma(s) ** 2
        return a_ts * s_s2 / s_t2, self.alpha(s) * v_ts / s_t2, v_ts * s_s2 / s_t2

    # --- SDE view ----------------------------------------------------------------------------------------
    def sde_coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Scalar ``(f(t), g(t))`` of the linear SDE ``dx = f(t) x dt + g(t) dW`` with these marginals.

        Generic form (any affine process): ``f = d log alpha / dt`` and ``g^2 = d sigma^2/dt - 2 f sigma^2``
        (THEORY T-SDE-1/2), by autograd; continuous processes override it with closed forms.
        """
        t = as_time(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            la = torch.log(self.alpha(t)) + 0 * t  # "+ 0 t" keeps a graph when alpha is constant
            s2 = self.sigma(t) ** 2 + 0 * t
            f, ds2 = (torch.autograd.grad(v.sum(), t, retain_graph=True)[0] for v in (la, s2))
        g2 = (ds2 - 2 * f * s2.detach()).clamp_min(0.0)
        return f.detach(), g2.sqrt()

    def sde(self, x: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Drift ``f(t) x`` and diffusion ``g(t)`` (broadcast to x) of the forward SDE."""
        f, g = self.sde_coefficients(self.check_time(t))
        return expand_like(f, x) * x, expand_like(g, x)

    # --- prior ---------------------------------------------------------------------------------------------
    def prior_std(self) -> float:
        """Std of the prior at ``t_max``: ``sqrt(alpha^2 + sigma^2)`` (the marginal of unit-variance data;
        1 for VP/DDPM, ``~sigma_max`` for VE/EDM)."""
        t = as_time(self.t_max)
        return float(torch.sqrt(self.alpha(t) ** 2 + self.sigma(t) ** 2))

    def prior_sample(self, shape: tuple[int, ...], generator: torch.Generator | None = None,
                     device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
        """Draw ``x_T ~ N(0, prior_std^2 I)``."""
        z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
        return z * self.prior_std()

    def prior_logp(self, x: Tensor) -> Tensor:
        """Log-density of the prior, summed over all but the batch dimension."""
        s = self.prior_std()
        d = x[0].numel()
        return -0.5 * (x**2).flatten(1).sum(1) / s**2 - 0.5 * d * math.log(2 * math.pi * s**2)

    def config(self) -> dict:
        """JSON-serialisable constructor arguments (``process_from_config`` inverts it)."""
        return {"name": self.name}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def times_from_ve_sigmas(process: Process, s: Tensor) -> Tensor:
    """Process times at VE noise levels ``s = sigma/alpha`` (``log_snr = -2 log s``)."""
    return process.t_from_log_snr(-2 * torch.log(s))
