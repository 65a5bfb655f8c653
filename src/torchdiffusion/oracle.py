"""Exact Gaussian-mixture oracle (THEORY section 0, F-G / F-GMM / F-PT).

For data ``x0 ~ sum_k w_k N(m_k, S_k)`` and any affine process, the noised marginal is the mixture
``p_t = sum_k w_k N(alpha m_k, C_k)`` with ``C_k = alpha^2 S_k + sigma^2 I``. Everything a diffusion model
learns has a closed form here: density, score, ``E[eps | x_t]``, ``E[x0 | x_t]`` (Tweedie), posterior
covariance, class-conditional versions, and exact samples. Each component is stored in its eigenbasis
``S_k = U_k diag(lam_k) U_k^T`` so that every quantity is diagonal there.

``GaussianMixture.dataset(x)`` is the ideal denoiser of a finite dataset (zero-covariance components): what a
network that memorises its training set converges to.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from torchdiffusion.parameterization.denoiser import PREDICTIONS, prediction_from
from torchdiffusion.processes import Process, as_time, expand_like


class GaussianMixture:
    """A labelled Gaussian mixture ``sum_k w_k N(m_k, S_k)``.

    ``covs`` may be full ``(K, d, d)``, diagonal ``(K, d)``, isotropic ``(K,)`` or a scalar. ``labels``
    assigns each component to a class (default: component k is class k); class-conditional quantities
    restrict the mixture to the components of that class.
    """

    def __init__(self, weights: Tensor, means: Tensor, covs: Tensor | float, labels: Tensor | None = None,
                 dtype: torch.dtype = torch.float64):
        means = torch.as_tensor(means, dtype=dtype)
        if means.ndim == 1:
            means = means[:, None]
        K, d = means.shape
        w = torch.as_tensor(weights, dtype=dtype).flatten()
        if w.shape != (K,) or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum")
        covs = torch.as_tensor(covs, dtype=dtype)
        if covs.ndim == 0:
            covs = covs.expand(K)
        if covs.ndim == 1:
            lam, U = covs[:, None].expand(K, d).clone(), None
        elif covs.ndim == 2:
            lam, U = covs.clone(), None
        elif covs.shape == (K, d, d):
            if not torch.allclose(covs, covs.transpose(1, 2)):
                raise ValueError("full covariances must be symmetric")
            lam, U = torch.linalg.eigh(covs)
            lam = lam.clamp_min(0.0)
        else:
            raise ValueError(f"covs must have shape (K,), (K, d) or (K, d, d) with K={K}, d={d}")
        if lam.shape != (K, d) or (lam < 0).any():
            raise ValueError("covariances must be positive semi-definite with matching shape")
        self.weights = w / w.sum()
        self.means, self.lam, self.U = means, lam, U
        self.labels = torch.arange(K) if labels is None else torch.as_tensor(labels, dtype=torch.long)
        if self.labels.shape != (K,):
            raise ValueError(f"labels must have shape ({K},)")
        self.num_classes = int(self.labels.max()) + 1
        self.K, self.dim = K, d

    # --- constructors -----------------------------------------------------------------------------------
    @classmethod
    def dataset(cls, x: Tensor, labels: Tensor | None = None) -> GaussianMixture:
        """The empirical distribution of a finite dataset (the ideal memorising denoiser)."""
        x = torch.as_tensor(x, dtype=torch.float64).flatten(1)
        return cls(torch.ones(len(x)), x, torch.zeros(len(x)), labels=labels)

    @classmethod
    def gaussian(cls, mean: Tensor | float, var: Tensor | float, dim: int = 1) -> GaussianMixture:
        """One Gaussian ``N(m, diag(v))`` (F-G)."""
        m = torch.as_tensor(mean, dtype=torch.float64).flatten().expand(dim).clone()
        v = torch.as_tensor(var, dtype=torch.float64).flatten().expand(dim).clone()
        return cls(torch.ones(1), m[None], v[None])

    # --- coordinates ---------------------------------------------------------------------------------------
    def _rot(self, v: Tensor) -> Tensor:
        """Component coordinates: ``(B, K, d) -> U_k^T v`` (identity for diagonal components)."""
        if self.U is None:
            return v
        return torch.einsum("kdj,bkd->bkj", self.U.to(v.dtype), v)

    def _unrot(self, v: Tensor) -> Tensor:
        if self.U is None:
            return v
        return torch.einsum("kdj,bkj->bkd", self.U.to(v.dtype), v)

    def _parts(self, x: Tensor, a: Tensor, s: Tensor):
        """Per-component centred coordinates z, variances c = a^2 lam + s^2, log N(x; a m_k, C_k)."""
        x = x.flatten(1)
        if x.shape[1] != self.dim:
            raise ValueError(f"oracle expects data of dimension {self.dim}, got {x.shape[1]}")
        dt = x.dtype
        a = a.to(dt).reshape(-1, 1, 1)
        s = s.to(dt).reshape(-1, 1, 1)
        z = self._rot(x[:, None, :] - a * self.means.to(dt)[None])
        c = a**2 * self.lam.to(dt)[None] + s**2
        logn = -0.5 * (z**2 / c).sum(-1) - 0.5 * torch.log(2 * math.pi * c).sum(-1)
        return z, c, logn

    def _log_resp(self, logn: Tensor, y: Tensor | None) -> Tensor:
        logw = torch.log(self.weights.to(logn.dtype))[None] + logn
        if y is not None:
            y = torch.as_tensor(y, device=logn.device).long().reshape(-1, 1)
            keep = (y == self.labels.to(logn.device)[None]) | (y < 0)  # y < 0: unconditional
            logw = logw.masked_fill(~keep, -math.inf)
        return logw

    def _coeffs(self, process: Process | None, t, n: int):
        if process is None:
            a, s = torch.ones(()), torch.zeros(())
        else:
            tt = process.check_time(t)
            a, s = process.alpha(tt), process.sigma(tt)
        return a.expand(n) if a.ndim == 0 else a, s.expand(n) if s.ndim == 0 else s

    # --- densities ----------------------------------------------------------------------------------------
    def log_prob(self, x: Tensor, process: Process | None = None, t=None, y: Tensor | None = None) -> Tensor:
        """``log p_t(x)`` (``log p_t(x | y)`` with labels ``y``); ``process=None`` is the clean data."""
        a, s = self._coeffs(process, t, len(x))
        _, _, logn = self._parts(x, a, s)
        logw = self._log_resp(logn, y)
        if y is not None:  # renormalise the class prior
            lw = torch.log(self.weights.to(logn.dtype))[None].expand_as(logn)
            logw = logw - torch.logsumexp(lw.masked_fill(torch.isinf(logw) & (logw < 0), -math.inf), 1,
                                          keepdim=True)
        return torch.logsumexp(logw, 1)

    def responsibilities(self, x: Tensor, process: Process | None = None, t=None,
                         y: Tensor | None = None) -> Tensor:
        """``p(component k | x_t)``, shape (B, K)."""
        a, s = self._coeffs(process, t, len(x))
        _, _, logn = self._parts(x, a, s)
        return torch.softmax(self._log_resp(logn, y), 1)

    def class_log_prob(self, x: Tensor, process: Process | None = None, t=None) -> Tensor:
        """Bayes classifier ``log p(y | x_t)``, shape (B, num_classes) (log-space, T-BAY-2)."""
        a, s = self._coeffs(process, t, len(x))
        _, _, logn = self._parts(x, a, s)
        lw = self._log_resp(logn, None)
        out = torch.full((len(x), self.num_classes), -math.inf, dtype=lw.dtype)
        for c in range(self.num_classes):
            m = self.labels == c
            if m.any():
                out[:, c] = torch.logsumexp(lw[:, m], 1)
        return out - torch.logsumexp(lw, 1, keepdim=True)

    # --- denoising quantities -------------------------------------------------------------------------------
    def eps_x0(self, x: Tensor, process: Process, t, y: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Exact ``E[eps | x_t]`` and ``E[x0 | x_t]`` (Tweedie, T-BAY-3 / T-PAR-4), reshaped like x."""
        a, s = self._coeffs(process, t, len(x))
        z, c, logn = self._parts(x, a, s)
        r = torch.softmax(self._log_resp(logn, y), 1)[..., None]
        dt = x.dtype
        a3, s3 = a.to(dt).reshape(-1, 1, 1), s.to(dt).reshape(-1, 1, 1)
        eps_k = self._unrot(s3 * z / c)
        x0_k = self.means.to(dt)[None] + self._unrot(a3 * self.lam.to(dt)[None] * z / c)
        return (r * eps_k).sum(1).reshape(x.shape), (r * x0_k).sum(1).reshape(x.shape)

    def eps(self, x: Tensor, process: Process, t, y: Tensor | None = None) -> Tensor:
        """``E[eps | x_t] = -sigma grad log p_t``."""
        return self.eps_x0(x, process, t, y)[0]

    def x0(self, x: Tensor, process: Process, t, y: Tensor | None = None) -> Tensor:
        """Posterior mean ``E[x0 | x_t]``."""
        return self.eps_x0(x, process, t, y)[1]

    def score(self, x: Tensor, process: Process | None = None, t=None, y: Tensor | None = None) -> Tensor:
        """``grad_x log p_t(x) = -sum_k r_k C_k^{-1} (x - alpha m_k)``."""
        a, s = self._coeffs(process, t, len(x))
        z, c, logn = self._parts(x, a, s)
        r = torch.softmax(self._log_resp(logn, y), 1)[..., None]
        return -(r * self._unrot(z / c)).sum(1).reshape(x.shape)

    def posterior_cov(self, x: Tensor, process: Process, t, y: Tensor | None = None) -> Tensor:
        """``Cov[x0 | x_t]`` by the law of total covariance, shape (B, d, d) (B-11)."""
        a, s = self._coeffs(process, t, len(x))
        z, c, logn = self._parts(x, a, s)
        r = torch.softmax(self._log_resp(logn, y), 1)
        dt = x.dtype
        a3, s3 = a.to(dt).reshape(-1, 1, 1), s.to(dt).reshape(-1, 1, 1)
        lam = self.lam.to(dt)[None]
        mu_k = self.means.to(dt)[None] + self._unrot(a3 * lam * z / c)  # (B, K, d)
        var_k = lam * s3**2 / c  # eigen-coordinates
        if self.U is None:
            cov_k = torch.diag_embed(var_k)
        else:
            U = self.U.to(dt)
            cov_k = torch.einsum("kij,bkj,klj->bkil", U, var_k, U)
        mu = (r[..., None] * mu_k).sum(1)
        second = (r[..., None, None] * (cov_k + mu_k[..., :, None] * mu_k[..., None, :])).sum(1)
        return second - mu[:, :, None] * mu[:, None, :]

    # --- sampling -------------------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, y: Tensor | int | None = None,
               dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
        """Exact samples ``(x0, labels)``; with ``y`` given, draw from that class only."""
        w = self.weights.clone()
        if y is not None:
            w = w * (self.labels == int(y))
            if w.sum() == 0:
                raise ValueError(f"no component has class {int(y)}")
        k = torch.multinomial(w, n, replacement=True, generator=generator)
        e = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        v = e * self.lam[k].sqrt()
        if self.U is not None:
            v = torch.einsum("bdj,bj->bd", self.U[k], v)
        return (self.means[k] + v).to(dtype), self.labels[k]

    def sample_t(self, n: int, process: Process, t, generator: torch.Generator | None = None,
                 dtype: torch.dtype = torch.float64) -> Tensor:
        """Exact samples of the noised marginal ``p_t`` (from (x0, eps))."""
        x0, _ = self.sample(n, generator, dtype=dtype)
        e = torch.randn(x0.shape, generator=generator, dtype=dtype)
        return process.add_noise(x0, t, e)

    # --- as a network ----------------------------------------------------------------------------------------
    def net(self, process: Process, prediction: str = "eps", shape: tuple[int, ...] | None = None) -> Callable:
        """A callable ``net(x, t, cond=None)`` predicting ``eps``, ``x0``, ``v`` or ``score`` exactly, for use
        inside :class:`torchdiffusion.Denoiser` (``t`` is the process time). ``cond`` is a class label
        (``-1``: unconditional)."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")

        def f(x: Tensor, t, cond: Tensor | None = None) -> Tensor:
            tt = as_time(t).to(x.device)
            if tt.ndim == 0:
                tt = tt.expand(len(x))
            eps, x0 = self.eps_x0(x, process, tt, cond)
            return prediction_from(x0, eps, expand_like(process.alpha(tt), x), expand_like(process.sigma(tt), x),
                                   prediction)

        f.oracle = self  # type: ignore[attr-defined]
        return f


def two_point(m: float = 1.0, s: float = 0.0) -> GaussianMixture:
    """``1/2 N(-m, s^2) + 1/2 N(m, s^2)`` in 1-D."""
    return GaussianMixture(torch.ones(2), torch.tensor([[-m], [m]]), torch.tensor([s**2, s**2]))
