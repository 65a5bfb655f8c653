"""Conditioning through cross-attention (latent diffusion, Rombach et al. 2022; THEORY T-LDM-1/2).

``ClassTokenEncoder`` is the conditioning encoder ``tau(y)``: a class label (``-1`` = the learned null class,
for classifier-free guidance) becomes ``tokens`` context vectors of width ``dim`` (embedding, then a
per-token MLP and LayerNorm). ``CrossAttentionUNet`` feeds them to the U-Net's cross-attention layers
(``softmax(Q K^T / sqrt(d)) V`` with ``Q = W_Q phi(z_t)``, ``K = W_K tau(y)``, ``V = W_V tau(y)``) instead
of adding a class embedding to the time embedding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdiffusion.nets.unet import UNet


class ClassTokenEncoder(nn.Module):
    """``tau(y)``: labels ``(B,)`` in ``[0, num_classes)`` (``-1`` or ``num_classes`` = null) -> ``(B, tokens,
    dim)``."""

    def __init__(self, num_classes: int, dim: int, tokens: int = 4):
        super().__init__()
        if int(num_classes) < 1 or int(tokens) < 1:
            raise ValueError(f"num_classes and tokens must be >= 1, got {num_classes}, {tokens}")
        self.num_classes, self.dim, self.tokens = int(num_classes), int(dim), int(tokens)
        self.embed = nn.Embedding(self.num_classes + 1, self.tokens * self.dim)
        self.mlp = nn.Sequential(nn.Linear(self.dim, self.dim), nn.SiLU(), nn.Linear(self.dim, self.dim))
        self.norm = nn.LayerNorm(self.dim)

    def forward(self, y: Tensor | None, batch: int, device=None) -> Tensor:
        if y is None:
            y = torch.full((batch,), -1, dtype=torch.long, device=device)
        y = torch.as_tensor(y, device=device)
        if y.is_floating_point():
            raise ValueError(f"class labels must be integers, got dtype {y.dtype}")
        y = y.long().reshape(-1).expand(batch) if y.numel() == 1 else y.long().reshape(-1)
        if y.shape != (batch,):
            raise ValueError(f"cond must be a scalar or have shape ({batch},), got {tuple(y.shape)}")
        if bool(((y < -1) | (y > self.num_classes)).any()):
            raise ValueError(f"class labels must lie in [0, {self.num_classes - 1}] (or -1 for the null class), "
                             f"got values in [{int(y.min())}, {int(y.max())}]")
        y = torch.where(y == -1, torch.full_like(y, self.num_classes), y)
        h = self.embed(y).reshape(batch, self.tokens, self.dim)
        return self.norm(h + self.mlp(h))


class CrossAttentionUNet(nn.Module):
    """A :class:`UNet` (built with ``context_dim``) conditioned on class labels through ``tau(y)`` and
    cross-attention only: ``net(x, t, cond)``. The keyword arguments are the UNet's (without
    ``num_classes``/``context_dim``); ``context_dim`` defaults to ``4 * channels``."""

    def __init__(self, num_classes: int, tokens: int = 4, context_dim: int | None = None, **unet_kw):
        super().__init__()
        dim = int(context_dim or 4 * int(unet_kw.get("channels", 64)))
        self.num_classes = int(num_classes)
        self.tau = ClassTokenEncoder(num_classes, dim, tokens)
        self.unet = UNet(num_classes=None, context_dim=dim, **unet_kw)

    def forward(self, x: Tensor, t, cond: Tensor | None = None) -> Tensor:
        return self.unet(x, t, context=self.tau(cond, x.shape[0], x.device))
