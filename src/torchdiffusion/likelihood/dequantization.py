"""Uniform dequantization of K-level data and its bits/dim offset (THEORY B-1; see :mod:`.bpd`)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def dequantization_offset(levels: int, value_range: tuple[float, float] = (-1.0, 1.0)) -> float:
    """Bits per dimension to add to ``-log p_y / (D ln 2)`` for uniformly dequantized ``K``-level data on a range
    of width ``W``: ``log2(K / W)`` (module docstring; +7 for 8-bit on [-1, 1])."""
    lo, hi = (float(v) for v in value_range)
    if int(levels) < 2 or not hi > lo:
        raise ValueError(f"need levels >= 2 and value_range (low, high) with high > low, got {levels}, "
                         f"{value_range}")
    return math.log2(int(levels) / (hi - lo))


def dequantize(x: Tensor, levels: int, value_range: tuple[float, float] = (-1.0, 1.0),
               generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantization: data on the ``K``-level grid ``lo + k W/(K-1)`` becomes
    ``y = lo + (k + U[0,1)) W / K``, uniform within bin ``k`` of ``[lo, hi)``."""
    lo, hi = (float(v) for v in value_range)
    K = int(levels)
    dequantization_offset(K, value_range)
    k = torch.round((x - lo) / (hi - lo) * (K - 1)).clamp(0, K - 1)
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    return lo + (k + u) * (hi - lo) / K
