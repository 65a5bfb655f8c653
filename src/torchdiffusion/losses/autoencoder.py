"""Autoencoder, denoising-autoencoder and VAE objectives (THEORY T-AE-1..5, T-BAY-4), as pure functions.

The Gaussian pieces are those of :mod:`torchdiffusion.likelihood` (one implementation per formula):
``gaussian_kl`` for the closed-form KL, ``gaussian_log_density`` for the Gaussian decoder and
``discretized_gaussian_log_likelihood`` for a decoder on ``K``-level data.

Each loss takes the :class:`~torchdiffusion.nets.autoencoder.Autoencoder` itself; the run's loss table
(:mod:`torchdiffusion.runs.losses`) maps the config names ``ae``, ``dae``, ``vae`` to them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from torchdiffusion.likelihood import discretized_gaussian_log_likelihood, gaussian_kl, gaussian_log_density
from torchdiffusion.nets.autoencoder import Autoencoder

LIKELIHOODS = ("gaussian", "discretized")
KL_ESTIMATES = ("analytic", "mc")
Decoder = Callable[[Tensor], tuple[Tensor, Tensor | float]]


def _sum_per_example(v: Tensor, batch_dims: int = 1) -> Tensor:
    return v.flatten(batch_dims).sum(-1)


def reparameterize(mean: Tensor, logvar: Tensor, *, n_samples: int = 1,
                   generator: torch.Generator | None = None) -> Tensor:
    """``z = mean + exp(logvar/2) * e`` with ``e ~ N(0, I)`` (T-AE-2): ``n_samples`` draws, shape
    ``(n_samples, *mean.shape)``; differentiable in ``mean`` and ``logvar``."""
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    e = torch.randn((int(n_samples), *mean.shape), generator=generator, dtype=mean.dtype).to(mean.device)
    return mean + torch.exp(0.5 * logvar) * e


def kl_standard_normal(mean: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mean, diag(exp(logvar))) || N(0, I))`` per example (summed over the latent), T-AE-2:
    ``1/2 (|mean|^2 + sum exp(logvar) - r - sum logvar)``, the diagonal case of T-VLB-5 (``gaussian_kl``)."""
    return _sum_per_example(gaussian_kl(mean, torch.exp(logvar), 0.0, 1.0).to(mean.dtype))


def decoder_log_likelihood(x: Tensor, mean: Tensor, logvar: Tensor | float, *, likelihood: str = "gaussian",
                           levels: int | None = None, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """``log p(x|z)`` per example for the decoder ``N(mean, diag(exp(logvar)))`` (T-AE-3:
    ``-(n/2) log 2pi - sum log D_sigma - 1/2 |(x - D_mu)/D_sigma|^2``), or for ``likelihood="discretized"``
    the probability of ``x``'s bin among ``levels`` values (DDPM's discretized decoder, B-1)."""
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"unknown decoder likelihood {likelihood!r}; allowed: {', '.join(LIKELIHOODS)}")
    lv = torch.as_tensor(logvar, dtype=mean.dtype, device=mean.device).expand_as(mean)
    if likelihood == "gaussian":
        return _sum_per_example(gaussian_log_density(x.expand_as(mean), mean, torch.exp(lv)))
    if levels is None:
        raise ValueError("the discretized decoder needs the number of data levels (loss.levels, e.g. 17 for 8x8 "
                         "digits, 256 for 8-bit images)")
    ll = discretized_gaussian_log_likelihood(x.expand_as(mean), mean, log_std=0.5 * lv, levels=int(levels),
                                             value_range=value_range)
    return _sum_per_example(ll)


def elbo_samples(x: Tensor, mean: Tensor, logvar: Tensor, decode: Decoder, *, n_samples: int = 1,
                 beta: float = 1.0, kl: str = "analytic", likelihood: str = "gaussian", levels: int | None = None,
                 value_range: tuple[float, float] = (-1.0, 1.0),
                 generator: torch.Generator | None = None) -> Tensor:
    """Per-draw ELBO estimates, shape ``(n_samples, B)`` (T-AE-4, T-BAY-4):
    ``log p(x|z_i) - beta KL(q(z|x) || N(0, I))`` with ``z_i = mean + exp(logvar/2) e_i``.

    ``kl="analytic"`` uses the closed-form KL (lower variance in general); ``kl="mc"`` uses
    ``log q(z_i|x) - log p(z_i)``, so each draw is ``log p(x, z_i) - log q(z_i|x)`` (for ``beta = 1``), which
    equals ``log p(x)`` exactly for every draw when ``q`` is the true posterior. ``decode(z)`` returns the
    decoder's ``(mean, logvar)`` for a batch of latents.
    """
    if kl not in KL_ESTIMATES:
        raise ValueError(f"unknown KL estimate {kl!r}; allowed: {', '.join(KL_ESTIMATES)}")
    L, B = int(n_samples), x.shape[0]
    z = reparameterize(mean, logvar, n_samples=L, generator=generator)  # (L, B, ...)
    d_mean, d_logvar = decode(z.reshape(L * B, *mean.shape[1:]))
    xs = x.unsqueeze(0).expand(L, *x.shape).reshape(L * B, *x.shape[1:])
    rec = decoder_log_likelihood(xs, d_mean, d_logvar, likelihood=likelihood, levels=levels,
                                 value_range=value_range).reshape(L, B)
    if kl == "analytic":
        kl_term = kl_standard_normal(mean, logvar).unsqueeze(0)
    else:
        log_q = _sum_per_example(gaussian_log_density(z, mean, torch.exp(logvar)), 2)
        log_p = _sum_per_example(gaussian_log_density(z, torch.zeros_like(z), 1.0), 2)
        kl_term = log_q - log_p
    return rec - float(beta) * kl_term


def elbo(x: Tensor, mean: Tensor, logvar: Tensor, decode: Decoder, **kw) -> Tensor:
    """The ELBO per example, ``(B,)``: the mean of :func:`elbo_samples` over its draws (same options)."""
    return elbo_samples(x, mean, logvar, decode, **kw).mean(0)


# --- losses on an Autoencoder net ---------------------------------------------------------------------------
def _dims(x: Tensor) -> int:
    return math.prod(x.shape[1:])


def ae_loss(net: Autoencoder, x: Tensor) -> Tensor:
    """``E |x - D(E(x))|^2`` per dimension (T-AE-1); a VAE's encoder mean is used as its code."""
    return ((net.decode(net.encode(x)[0])[0] - x) ** 2).mean()


def dae_loss(net: Autoencoder, x: Tensor, sigma: float, *, generator: torch.Generator | None = None) -> Tensor:
    """Denoising autoencoder (T-AE-5): ``E |x - D(E(x + sigma e))|^2`` per dimension, ``e ~ N(0, I)`` (the
    reconstruction is an x0-prediction from ``y = x + sigma e``; ``sigma = 0`` is the plain autoencoder)."""
    if not float(sigma) >= 0:
        raise ValueError(f"the denoising autoencoder's noise level must be >= 0, got {sigma}")
    y = x + float(sigma) * torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return ((net.decode(net.encode(y)[0])[0] - x) ** 2).mean()


def vae_loss(net: Autoencoder, x: Tensor, *, beta: float = 1.0, likelihood: str = "gaussian",
             levels: int | None = None, n_samples: int = 1, generator: torch.Generator | None = None) -> Tensor:
    """``-(E_q log p(x|z) - beta KL(q || N(0, I)))`` averaged over the batch, in nats per data dimension
    (T-AE-4; ``beta = 1`` is the negative ELBO, other ``beta`` weight the KL as in the beta-VAE)."""
    if net.kind != "vae":
        raise ValueError("loss 'vae' needs a Gaussian encoder: use model.net=vae (model.net=autoencoder has a "
                         "deterministic one; train it with loss ae or dae)")
    mean, logvar = net.encode(x)

    def decode(z: Tensor) -> tuple[Tensor, Tensor]:
        m, lv = net.decode(z)
        return m, net.decoder_logvar(m, lv)

    e = elbo(x, mean, logvar, decode, n_samples=n_samples, beta=beta, likelihood=likelihood, levels=levels,
             generator=generator)
    return -e.mean() / _dims(x)
