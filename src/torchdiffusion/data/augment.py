"""Non-leaking geometric augmentation for small image datasets (Karras et al. 2022, "Elucidating the design space",
section 5 and appendix F.2, after Karras et al. 2020's ADA): each training image is transformed with probability
``p`` per operation, and the network is told which transform it saw through a label vector (added to its time
embedding). At sampling and likelihood time the label is zero, the identity: the model of un-augmented data is
still the one trained and scored, while the transformed copies regularize the shared weights on a dataset that a
network would otherwise memorize.

The label of a transform is ``[xflip, yflip, cos(k pi/2) - 1, sin(k pi/2), dx / W, dy / H]``: a horizontal and a
vertical flip (0/1), a rotation by ``k`` quarter turns (square images only) and an integer translation ``(dx, dy)``
with the border pixels repeated, applied in that order. The identity has the zero label.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

AUGMENT_DIM = 6


def _draw(n: int, p: float, generator: torch.Generator | None) -> Tensor:
    return torch.rand(n, generator=generator) < p


def translate(x: Tensor, dx: Tensor, dy: Tensor) -> Tensor:
    """Each image ``x[b]`` (B, C, H, W) moved right by ``dx[b]`` and down by ``dy[b]`` whole pixels, the border
    pixels repeated into the space it leaves."""
    B, _, H, W = x.shape
    rows = (torch.arange(H, device=x.device)[None, :] - dy.to(x.device)[:, None]).clamp(0, H - 1)
    cols = (torch.arange(W, device=x.device)[None, :] - dx.to(x.device)[:, None]).clamp(0, W - 1)
    b = torch.arange(B, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[b, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def augment(x: Tensor, p: float, generator: torch.Generator | None = None,
            max_shift: int | None = None) -> tuple[Tensor, Tensor]:
    """``(x_aug, labels)``: the images ``x`` (B, C, H, W) with each operation (x-flip, y-flip, a quarter-turn
    rotation by 1-3 turns on square images, a translation by up to ``max_shift`` pixels each way, default
    ``max(1, round(min(H, W) / 8))``) applied with probability ``p`` independently, and the ``(B, AUGMENT_DIM)``
    labels that name what each image underwent (module doc; zero = untouched), float32 unless ``x`` is of another
    floating type. ``generator`` is a CPU generator (the draws are made on the CPU, then moved to ``x.device``)."""
    if x.ndim != 4:
        raise ValueError(f"augmentation needs images (B, C, H, W), got shape {tuple(x.shape)}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"the augmentation probability must lie in [0, 1], got {p}")
    B, _, H, W = x.shape
    m = max(1, round(min(H, W) / 8)) if max_shift is None else int(max_shift)
    labels = torch.zeros(B, AUGMENT_DIM)
    xflip, yflip = _draw(B, p, generator), _draw(B, p, generator)
    turns = torch.where(_draw(B, p, generator) & (H == W), torch.randint(1, 4, (B,), generator=generator), 0)
    shift = _draw(B, p, generator)
    dx = torch.where(shift, torch.randint(-m, m + 1, (B,), generator=generator), 0)
    dy = torch.where(shift, torch.randint(-m, m + 1, (B,), generator=generator), 0)
    dev = x.device
    x = torch.where(xflip.to(dev)[:, None, None, None], x.flip(-1), x)
    x = torch.where(yflip.to(dev)[:, None, None, None], x.flip(-2), x)
    for k in (1, 2, 3):
        if bool((turns == k).any()):
            x = torch.where((turns == k).to(dev)[:, None, None, None], torch.rot90(x, k, (-2, -1)), x)
    if bool(shift.any()):
        x = translate(x, dx, dy)
    angle = turns.double() * (math.pi / 2)
    labels[:, 0], labels[:, 1] = xflip.float(), yflip.float()
    labels[:, 2], labels[:, 3] = (torch.cos(angle) - 1).round().float(), torch.sin(angle).round().float()
    labels[:, 4], labels[:, 5] = dx.float() / W, dy.float() / H
    return x, labels.to(device=dev, dtype=x.dtype if x.is_floating_point() else torch.float32)
