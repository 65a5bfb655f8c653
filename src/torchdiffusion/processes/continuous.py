"""Continuous-time processes of Song et al. (2021) and Karras et al. (2022): VP, SubVP, VE, EDM (T-SDE-4..6)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import Process, as_time


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
        if not (beta_min >= 0 and beta_max >= 0 and beta_min + beta_max > 0):  # beta(t) >= 0: noise only grows
            raise ValueError(f"need beta_min >= 0 and beta_max >= 0, not both 0, got {beta_min}, {beta_max}")
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

