"""Forward noising processes: ``x_t = alpha(t) * x0 + sigma(t) * eps`` (axis 1 of DESIGN.md).

Every process gives ``alpha(t)``, ``sigma(t)``, ``log_snr(t)`` and its inverse, the training range
``[t_min, t_max]``, the time ``t_zero`` at which the state is clean (``sigma == 0``), ``add_noise``,
the SDE ``(drift, diffusion)``, and the prior at ``t_max``.

Time conventions (DESIGN.md section 2):
- ``DDPM``: the training timestep ``k = 0 .. T-1`` (paper step ``t = k + 1``, THEORY T-FWD-4); ``k = -1`` is
  the clean state (``alpha_bar = 1``). Fractional ``k`` interpolates log-SNR linearly.
- ``VP``, ``SubVP``, ``VE``: ``t`` in ``[0, 1]``; ``t = 0`` is clean. Rates follow Song et al. (2021):
  ``beta(t)`` is a *rate* and ``B(t) = int_0^t beta`` its integral (THEORY T-FWD-5).
- ``EDM``: ``t = sigma``.
"""

from __future__ import annotations

import contextlib
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
        if (tt < lo - 1e-9).any() or (tt > hi + 1e-9).any():
            raise ValueError(
                f"{self.name}: t outside the process range [{lo:g}, {hi:g}] "
                f"(got min {tt.min().item():g}, max {tt.max().item():g})"
            )
        return tt

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


# ------------------------------------------------------------------------------------------------------------
# Discrete DDPM
# ------------------------------------------------------------------------------------------------------------

def make_betas(kind: str, T: int, beta_start: float | None = None, beta_end: float | None = None) -> Tensor:
    """Named beta schedules (float64): ``linear`` 1e-4..0.02 (DDPM, T-FWD-1), ``scaled_linear`` (LDM:
    ``linspace(sqrt(b0), sqrt(b1))**2`` with 0.00085..0.012), ``cosine`` (Nichol & Dhariwal, s = 0.008,
    betas clipped at 0.999; B-7)."""
    if kind == "linear":
        b0, b1 = beta_start or 1e-4, beta_end or 0.02
        return torch.linspace(b0, b1, T, dtype=torch.float64)
    if kind == "scaled_linear":
        b0, b1 = beta_start or 0.00085, beta_end or 0.012
        return torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=torch.float64) ** 2
    if kind in ("cosine", "squaredcos_cap_v2"):
        s = 0.008
        steps = torch.arange(T + 1, dtype=torch.float64) / T
        f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
        abar = f / f[0]
        return (1 - abar[1:] / abar[:-1]).clamp(max=0.999)
    raise ValueError(f"unknown beta schedule {kind!r}; allowed: linear, scaled_linear, cosine")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Lin et al. (2024): shift and scale sqrt(abar) so that sqrt(abar_T) = 0 and sqrt(abar_1) is kept."""
    sab = torch.cumprod(1 - betas, 0).sqrt()
    s0, sT = sab[0].clone(), sab[-1].clone()
    sab = (sab - sT) * s0 / (s0 - sT)
    abar = sab**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class DDPM(Process):
    """Discrete DDPM process (Ho et al. 2020). Time is the code index ``k = 0..T-1`` (paper ``t = k + 1``).

    ``DDPM(betas="linear", T=1000)``, ``DDPM(betas=tensor)``, or ``DDPM(alphas_cumprod=tensor)``.
    """

    name = "ddpm"
    discrete = True
    t_zero = -1.0

    def __init__(self, betas: str | Tensor = "linear", T: int = 1000, *, alphas_cumprod: Tensor | None = None,
                 beta_start: float | None = None, beta_end: float | None = None,
                 rescale_zero_snr: bool = False):
        self._kind = betas if isinstance(betas, str) else "given"
        self._beta_start, self._beta_end = beta_start, beta_end
        if alphas_cumprod is not None:
            ac = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
            if len(ac) < 1 or (ac < 0).any() or (ac > 1).any():
                raise ValueError("alphas_cumprod must be a 1-D tensor with values in (0, 1]")
            if (ac[1:] > ac[:-1]).any():
                raise ValueError("alphas_cumprod must be non-increasing")
            betas_t = 1 - torch.cat([ac[:1], ac[1:] / ac[:-1]])
            self._kind = "given"
        elif isinstance(betas, str):
            if int(T) < 1:
                raise ValueError(f"T must be >= 1, got {T}")
            betas_t = make_betas(betas, int(T), beta_start, beta_end)
        else:
            betas_t = torch.as_tensor(betas, dtype=torch.float64).flatten()
        if betas_t.ndim != 1 or len(betas_t) < 1 or not ((betas_t >= 0) & (betas_t <= 1)).all():
            raise ValueError("betas must be a non-empty 1-D tensor with 0 <= beta <= 1")
        if rescale_zero_snr:
            betas_t = rescale_zero_terminal_snr(betas_t)
        self.rescale_zero_snr = rescale_zero_snr
        self.betas = betas_t
        self.alphas = 1 - betas_t
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        self.T = len(betas_t)
        self.t_min, self.t_max = 0.0, float(self.T - 1)
        # log-SNR at k = -1 .. T-1 (k = -1 is clean: +inf)
        ac = self.alphas_cumprod
        self._lsnr = torch.cat([torch.tensor([math.inf], dtype=torch.float64), torch.log(ac) - torch.log1p(-ac)])

    # q(x_t | x_0) ------------------------------------------------------------------------------------------
    def log_snr(self, t: TimeLike) -> Tensor:
        """Log-SNR at (possibly fractional) timestep k, linear between integer steps; +inf at k = -1."""
        t = self.check_time(t)
        if ((t > -1) & (t < 0)).any():
            raise ValueError("ddpm: t in (-1, 0) is undefined; use -1 (clean) or a timestep in [0, T-1]")
        pos = t + 1
        lo = pos.floor().clamp(0, self.T).long()
        hi = (lo + 1).clamp(max=self.T)
        w = pos - lo
        a, b = self._lsnr[lo], self._lsnr[hi]
        return torch.where(w == 0, a, (1 - w) * a + w * b)

    def _abar(self, t: TimeLike) -> Tensor:
        """``abar_k``: the table at integer k (exactly), sigmoid of the interpolated log-SNR in between."""
        t = self.check_time(t)
        k = t.round()
        table = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod])[(k + 1).long()]
        return torch.where(k == t, table, torch.sigmoid(self.log_snr(t)))

    def alpha(self, t: TimeLike) -> Tensor:
        """``sqrt(abar_k)``."""
        return self._abar(t).sqrt()

    def sigma(self, t: TimeLike) -> Tensor:
        """``sqrt(1 - abar_k)``."""
        return (1 - self._abar(t)).sqrt()

    def sde_coefficients(self, t: TimeLike) -> tuple[Tensor, Tensor]:
        """``f = 1/2 sigma^2 l'`` and ``g^2 = -sigma^2 l'`` of the SDE whose marginals are this process with its
        log-SNR ``l`` linear between integer steps (``l'`` of the segment starting at ``t``; the last one at
        ``T-1``). Defined for ``t`` in ``[0, T-1]``."""
        t = self.check_time(t).clamp(min=0.0)
        k = t.floor().clamp(max=self.T - 2).long()
        slope = self._lsnr[k + 2] - self._lsnr[k + 1]
        s2 = torch.sigmoid(-self.log_snr(t))
        return 0.5 * s2 * slope, torch.sqrt((-s2 * slope).clamp_min(0.0))

    def t_from_log_snr(self, l: TimeLike) -> Tensor:
        """Fractional timestep with the given log-SNR (inverse of the linear interpolation), in [0, T-1]."""
        l = as_time(l)
        ls = self._lsnr[1:]
        # ls is decreasing; searchsorted on the negated array
        idx = torch.searchsorted(-ls, -l.reshape(-1)).clamp(1, self.T - 1)
        a, b = ls[idx - 1], ls[idx]
        w = ((a - l.reshape(-1)) / (a - b)).clamp(0, 1)
        return ((idx - 1) + w).reshape(l.shape).clamp(0, self.T - 1)

    def q_mean_var(self, x0: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I)`` (T-FWD-2)."""
        t = self.check_time(t)
        return expand_like(self.alpha(t), x0) * x0, expand_like(self.sigma(t) ** 2, x0)

    def step_betas(self, t: TimeLike) -> Tensor:
        """``beta_t`` of step k (the 'large' reverse variance)."""
        return self.betas[as_time(t).long()]

    def posterior(self, x_t: Tensor, x0: Tensor, t: TimeLike) -> tuple[Tensor, Tensor]:
        """``q(x_{k-1} | x_k, x_0) = N(mu_tilde, beta_tilde I)`` (DDPM eq. 7, T-VLB-4)."""
        t = self.check_time(t)
        c_x, c_0, var = self.posterior_coefficients(t, t - 1)
        return expand_like(c_x, x_t) * x_t + expand_like(c_0, x0) * x0, expand_like(var, x_t)

    @property
    def posterior_variance(self) -> Tensor:
        """beta-tilde_k for every k (0 at k = 0, T-FWD-4)."""
        return self.betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)

    def config(self) -> dict:
        if self._kind == "given":
            return {"name": self.name, "betas": self.betas.tolist()}
        cfg = {"name": self.name, "betas": self._kind, "T": self.T}
        if self._beta_start is not None:
            cfg["beta_start"] = self._beta_start
        if self._beta_end is not None:
            cfg["beta_end"] = self._beta_end
        if self.rescale_zero_snr:
            cfg["rescale_zero_snr"] = True
        return cfg


# ------------------------------------------------------------------------------------------------------------
# Continuous processes
# ------------------------------------------------------------------------------------------------------------

class _LinearBeta:
    """Song's linear rate ``beta(t) = b0 + t (b1 - b0)`` and its integral ``B(t)``."""

    beta_min: float
    beta_max: float

    def beta(self, t: Tensor) -> Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def B(self, t: Tensor) -> Tensor:
        return self.beta_min * t + 0.5 * t**2 * (self.beta_max - self.beta_min)

    def t_from_B(self, B: Tensor) -> Tensor:
        d = self.beta_max - self.beta_min
        if d == 0:
            return B / self.beta_min
        return (-self.beta_min + torch.sqrt(self.beta_min**2 + 2 * d * B)) / d


class VP(_LinearBeta, Process):
    """Variance-preserving SDE ``dx = -1/2 beta(t) x dt + sqrt(beta(t)) dW`` (T-SDE-4, T-FWD-5).

    ``alpha = exp(-B/2)``, ``sigma = sqrt(1 - exp(-B))``.
    """

    name = "vp"

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-3, t_max: float = 1.0):
        if not 0 <= t_min < t_max:
            raise ValueError(f"need 0 <= t_min < t_max, got {t_min}, {t_max}")
        self.beta_min, self.beta_max, self.t_min, self.t_max = float(beta_min), float(beta_max), t_min, t_max

    def alpha(self, t):
        return torch.exp(-0.5 * self.B(as_time(t)))

    def sigma(self, t):
        return torch.sqrt(-torch.expm1(-self.B(as_time(t))))

    def log_snr(self, t):
        B = self.B(as_time(t))
        return -B - torch.log(-torch.expm1(-B))

    def t_from_log_snr(self, l):
        return self.t_from_B(torch.nn.functional.softplus(-as_time(l)))

    def sde_coefficients(self, t):
        b = self.beta(as_time(t))
        return -0.5 * b, torch.sqrt(b)

    def config(self):
        return {"name": self.name, "beta_min": self.beta_min, "beta_max": self.beta_max,
                "t_min": self.t_min, "t_max": self.t_max}


class SubVP(VP):
    """Sub-VP SDE ``dx = -1/2 beta x dt + sqrt(beta (1 - exp(-2B))) dW`` (T-SDE-6).

    ``alpha = exp(-B/2)``, ``sigma = 1 - exp(-B)``.
    """

    name = "subvp"

    def sigma(self, t):
        return -torch.expm1(-self.B(as_time(t)))

    def log_snr(self, t):
        B = self.B(as_time(t))
        return -B - 2 * torch.log(-torch.expm1(-B))

    def t_from_log_snr(self, l):
        # u = exp(-B) solves e^l (1-u)^2 = u; take the root in (0, 1)
        el = torch.exp(as_time(l))
        u = 2 * el / ((2 * el + 1) + torch.sqrt(4 * el + 1))
        return self.t_from_B(-torch.log(u))

    def sde_coefficients(self, t):
        t = as_time(t)
        b = self.beta(t)
        return -0.5 * b, torch.sqrt(b * -torch.expm1(-2 * self.B(t)))


class VE(Process):
    """Variance-exploding SDE of Song et al. (2021): ``dx = g(t) dW`` with ``g^2 = d[s(t)^2]/dt`` and
    ``s(t) = sigma_min (sigma_max / sigma_min)^t`` (T-SDE-5).

    The marginal std is the exact one of that SDE started at the data (``V = s(t)^2 - s(0)^2``), so
    ``sigma(0) = 0`` and the process is exactly consistent with its SDE.
    """

    name = "ve"

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0, t_min: float = 1e-5, t_max: float = 1.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max, self.t_min, self.t_max = float(sigma_min), float(sigma_max), t_min, t_max
        self._logr = math.log(self.sigma_max / self.sigma_min)

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return self.sigma_min * torch.sqrt(torch.expm1(2 * self._logr * as_time(t)))

    def log_snr(self, t):
        return -2 * torch.log(self.sigma(t))

    def t_from_log_snr(self, l):
        return torch.log1p(torch.exp(-as_time(l)) / self.sigma_min**2) / (2 * self._logr)

    def sde_coefficients(self, t):
        t = as_time(t)
        g = self.sigma_min * torch.exp(self._logr * t) * math.sqrt(2 * self._logr)
        return torch.zeros_like(t), g

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max,
                "t_min": self.t_min, "t_max": self.t_max}


class EDM(Process):
    """Karras et al. (2022): ``x = x0 + t eps`` with ``t = sigma`` in ``[sigma_min, sigma_max]``; SDE
    ``dx = sqrt(2t) dW``."""

    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.t_min, self.t_max = self.sigma_min, self.sigma_max

    def alpha(self, t):
        return torch.ones_like(as_time(t))

    def sigma(self, t):
        return as_time(t).clone()

    def log_snr(self, t):
        return -2 * torch.log(as_time(t))

    def t_from_log_snr(self, l):
        return torch.exp(-0.5 * as_time(l))

    def sde_coefficients(self, t):
        t = as_time(t)
        return torch.zeros_like(t), torch.sqrt(2 * t)

    def config(self):
        return {"name": self.name, "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


# ------------------------------------------------------------------------------------------------------------
# Learned noise schedule (Variational Diffusion Models, Kingma et al. 2021)
# ------------------------------------------------------------------------------------------------------------

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


PROCESSES: dict[str, type[Process]] = {"ddpm": DDPM, "vp": VP, "subvp": SubVP, "ve": VE, "edm": EDM,
                                       "learned": LearnedVP}


def process_from_config(cfg: dict | str) -> Process:
    """Build a process from ``{"name": ..., **kwargs}`` (or just a name)."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    cfg = dict(cfg)
    name = str(cfg.pop("name", "")).lower()
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; allowed: {', '.join(PROCESSES)}")
    try:
        return PROCESSES[name](**cfg)
    except TypeError as e:
        raise ValueError(f"bad arguments for process {name!r}: {e}") from None


def times_from_ve_sigmas(process: Process, s: Tensor) -> Tensor:
    """Process times at VE noise levels ``s = sigma/alpha`` (``log_snr = -2 log s``)."""
    return process.t_from_log_snr(-2 * torch.log(s))
