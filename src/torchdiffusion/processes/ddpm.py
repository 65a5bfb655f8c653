"""The discrete DDPM process and its named beta schedules (Ho et al. 2020; THEORY T-FWD-1..4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Process, TimeLike, as_time, expand_like


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
