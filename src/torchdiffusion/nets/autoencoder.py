"""Convolutional autoencoders (THEORY T-AE-1..5): a plain / denoising autoencoder and a VAE.

One network class covers all three; what differs is the loss (``ae_losses``): the denoising autoencoder is the
plain one trained on corrupted inputs, and the VAE's encoder outputs a Gaussian ``q(z|x) = N(mean,
diag(exp(logvar)))`` instead of a point.

Encoder: ``conv3x3 -> [num_res_blocks x ResBlock -> stride-2 conv]`` per level of ``channel_mult`` (no
downsampling after the last level) ``-> GN-SiLU-conv3x3`` to ``latent_channels`` (twice that for a VAE: mean and
log-variance). The latent is ``(latent_channels, H/f, W/f)`` with ``f = 2**(len(channel_mult)-1)``, or, with
``latent_dim``, a vector (flatten + linear), e.g. 2-D for a latent-space plot. The decoder mirrors it and
outputs the mean image (and, with ``decoder_var="learned"``, a per-pixel log-variance).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from torchdiffusion.nets.unet import _norm

KINDS = ("ae", "vae")
DECODER_VARS = ("fixed", "learned")
LOGVAR_RANGE = (-12.0, 6.0)  # log-variances are clamped here: a learned variance must not collapse to 0


class _Res(nn.Module):
    """``x + conv(SiLU(GN(conv(SiLU(GN(x))))))`` with a 1x1 skip when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(_norm(cin, groups), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                  _norm(cout, groups), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.skip(x) + self.body(x)


class Autoencoder(nn.Module):
    """``Autoencoder(in_channels, image_size, ...)``: ``encode(x) -> (mean, logvar or None)``, ``decode(z) ->
    (mean, logvar or None)``, ``forward(x)`` = the deterministic reconstruction ``D(E_mu(x))``.

    ``kind="vae"`` makes the encoder Gaussian (T-AE-2); ``decoder_var="learned"`` adds a per-pixel decoder
    log-variance (T-AE-3), otherwise the decoder variance is ``decoder_std**2`` (a constant used by the loss).
    """

    def __init__(self, in_channels: int = 1, image_size: int = 16, channels: int = 32,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 1, latent_channels: int = 4,
                 latent_dim: int | None = None, kind: str = "vae", decoder_var: str = "fixed",
                 decoder_std: float = 0.1, groups: int = 32):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown autoencoder kind {kind!r}; allowed: {', '.join(KINDS)}")
        if decoder_var not in DECODER_VARS:
            raise ValueError(f"unknown decoder_var {decoder_var!r}; allowed: {', '.join(DECODER_VARS)}")
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {channel_mult}")
        f = 2 ** (len(channel_mult) - 1)
        if image_size % f:
            raise ValueError(f"image_size={image_size} must be divisible by 2**(len(channel_mult)-1)={f}")
        if int(latent_channels) < 1 or (latent_dim is not None and int(latent_dim) < 1):
            raise ValueError(f"latent_channels and latent_dim must be >= 1, got {latent_channels}, {latent_dim}")
        if not decoder_std > 0:
            raise ValueError(f"decoder_std must be > 0, got {decoder_std}")
        self.in_channels, self.image_size, self.kind = in_channels, image_size, kind
        self.decoder_var, self.decoder_std = decoder_var, float(decoder_std)
        self.latent_channels, self.latent_dim = int(latent_channels), None if latent_dim is None else int(latent_dim)
        self.downsample_factor = f
        r = image_size // f
        zc = self.latent_channels * (2 if kind == "vae" else 1)

        enc: list[nn.Module] = [nn.Conv2d(in_channels, channels, 3, padding=1)]
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                enc.append(_Res(ch, channels * mult, groups))
                ch = channels * mult
            if level != len(channel_mult) - 1:
                enc.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        enc += [_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, zc, 3, padding=1)]
        self.encoder = nn.Sequential(*enc)
        self.to_vec = None if latent_dim is None else nn.Linear(zc * r * r, self.latent_dim * (zc // latent_channels))
        self.from_vec = None if latent_dim is None else nn.Linear(self.latent_dim, self.latent_channels * r * r)

        out_c = in_channels * (2 if decoder_var == "learned" else 1)
        dec: list[nn.Module] = [nn.Conv2d(self.latent_channels, ch, 3, padding=1)]
        for level, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks):
                dec.append(_Res(ch, channels * mult, groups))
                ch = channels * mult
            if level != 0:
                dec += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        dec += [_norm(ch, groups), nn.SiLU(), nn.Conv2d(ch, out_c, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)
        self._r = r

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """Shape of one latent: ``(latent_dim,)`` or ``(latent_channels, H/f, W/f)``."""
        return (self.latent_dim,) if self.latent_dim is not None else (self.latent_channels, self._r, self._r)

    def _check(self, x: Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-1] != self.image_size \
                or x.shape[-2] != self.image_size:
            raise ValueError(f"expected images of shape (B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}), got {tuple(x.shape)}")

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mean, logvar)`` of ``q(z|x)`` for a VAE, ``(z, None)`` for a plain autoencoder."""
        self._check(x)
        h = self.encoder(x)
        if self.to_vec is not None:
            h = self.to_vec(h.flatten(1))
        if self.kind == "ae":
            return h, None
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(*LOGVAR_RANGE)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor | None]:
        """``(mean, logvar)`` of ``p(x|z)``; ``logvar`` is ``None`` for a fixed decoder variance."""
        if tuple(z.shape[1:]) != self.latent_shape:
            raise ValueError(f"expected latents of shape (B, {', '.join(map(str, self.latent_shape))}), "
                             f"got {tuple(z.shape)}")
        if self.from_vec is not None:
            z = self.from_vec(z).reshape(len(z), self.latent_channels, self._r, self._r)
        h = self.decoder(z)
        if self.decoder_var == "learned":
            mean, logvar = h.chunk(2, dim=1)
            return mean, logvar.clamp(*LOGVAR_RANGE)
        return h, None

    def decoder_logvar(self, mean: Tensor, logvar: Tensor | None) -> Tensor:
        """The decoder log-variance as a tensor: the learned one, or ``2 log decoder_std`` everywhere."""
        return logvar if logvar is not None else torch.full_like(mean, 2 * math.log(self.decoder_std))

    def forward(self, x: Tensor, t=None, cond=None) -> Tensor:
        """Deterministic reconstruction ``D_mu(E_mu(x))`` (``t`` and ``cond`` are ignored)."""
        return self.decode(self.encode(x)[0])[0]


def reconstruct(net: Autoencoder, x: Tensor) -> Tensor:
    """``D_mu(E_mu(x))`` without gradients, in batches."""
    with torch.no_grad():
        return torch.cat([net(c) for c in x.split(512)])


__all__ = ["DECODER_VARS", "KINDS", "Autoencoder", "reconstruct"]
