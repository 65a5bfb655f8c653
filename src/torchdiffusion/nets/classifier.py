"""Noise-conditional classifier ``p_phi(y | x_t, t)`` for classifier guidance (THEORY T-CG-1, B-13).

The encoder half of the DDPM U-Net: residual blocks with the sinusoidal time embedding added in each block,
GroupNorm, stride-2 downsampling between resolutions, then GroupNorm-SiLU, global average pooling and a linear
layer to the class logits. It is trained with cross-entropy on noised data ``x_t = alpha x0 + sigma eps``
(``train.py`` loss ``classifier``), so its Bayes optimum is ``p(y | x_t)`` at every noise level.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from torchdiffusion.nets.embeddings import TimeEmbedding
from torchdiffusion.nets.unet import Downsample, ResBlock, group_count


class NoisyClassifier(nn.Module):
    """``NoisyClassifier(in_channels, num_classes, channels, channel_mult, num_res_blocks, ...)``:
    ``forward(x, t) -> logits`` of shape ``(B, num_classes)``; ``t`` is the process time (DDPM: the integer
    timestep), multiplied by ``time_scale`` before the sinusoidal embedding (as in the U-Net)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 32, channel_mult: Sequence[int] = (1, 2),
                 num_res_blocks: int = 1, dropout: float = 0.0, time_scale: float = 1.0, groups: int = 32):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {num_classes}")
        emb = 4 * channels
        self.num_classes = int(num_classes)
        self.time_embed = TimeEmbedding(channels, emb, time_scale=time_scale)
        self.stem = nn.Conv2d(in_channels, channels, 3, padding=1)
        blocks: list[nn.Module] = []
        ch = channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(ch, channels * mult, emb, dropout, groups))
                ch = channels * mult
            if level < len(channel_mult) - 1:
                blocks.append(Downsample(ch))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.GroupNorm(group_count(ch, groups), ch)
        self.head = nn.Linear(ch, num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embed(t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t)
        h = self.stem(x)
        for b in self.blocks:
            h = b(h, emb) if isinstance(b, ResBlock) else b(h)
        return self.head(F.silu(self.norm(h)).mean((2, 3)))
