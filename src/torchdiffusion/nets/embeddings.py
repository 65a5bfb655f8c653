"""Time embeddings shared by every network."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer-style sinusoidal embedding of DDPM (001 "Network Architecture", THEORY T-NET-2).

    ``PE(t) = [sin(t w_0), ..., sin(t w_{h-1}), cos(t w_0), ..., cos(t w_{h-1})]`` with ``h = dim // 2`` and
    ``w_i = max_period ** (-i / (h - 1))`` (the DDPM code convention: sines first, the first frequency 1,
    the last ``1 / max_period``). ``t`` has shape ``(B,)``; the result has shape ``(B, dim)``.
    """
    if dim % 2 or dim < 4:
        raise ValueError(f"embedding dim must be even and >= 4, got {dim}")
    half = dim // 2
    i = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * i / (half - 1))
    args = t.float().reshape(-1, 1) * freqs.reshape(1, -1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TimeEmbedding(nn.Module):
    """Sinusoidal features of ``time_scale * t`` followed by a two-layer MLP (DDPM's time MLP)."""

    def __init__(self, dim: int, out_dim: int, time_scale: float = 1.0):
        super().__init__()
        self.dim = dim
        self.time_scale = float(time_scale)
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(sinusoidal_embedding(t * self.time_scale, self.dim))
