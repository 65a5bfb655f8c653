"""The one check of class labels, shared by in-memory datasets and streamed image folders."""

from __future__ import annotations

import torch
from torch import Tensor


def check_labels(y: Tensor, num_classes: int | None, where: str) -> int:
    """The class count of labels ``y`` (checked on every dataset): whole numbers (an integer tensor) in
    ``[0, num_classes)``; without a declared ``num_classes`` the count is the largest label + 1, which may not
    exceed the number of examples (a stray label such as 10^6 would otherwise build a million-class embedding:
    relabel, or declare ``data.classes``). -1 is refused: it is the null class of guidance, never a data label."""
    if y.dtype.is_floating_point or y.dtype == torch.bool or y.dtype.is_complex or y.ndim != 1:
        raise ValueError(f"{where}: labels must be a 1-D array of whole numbers, got dtype {y.dtype} and shape "
                         f"{tuple(y.shape)}")
    lo, hi = int(y.min()), int(y.max())
    if num_classes is None:
        if hi + 1 > len(y):
            raise ValueError(f"{where}: labels up to {hi} imply {hi + 1} classes for {len(y)} examples; relabel "
                             "them 0..K-1, or declare the class count (data.classes)")
        num_classes = hi + 1
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"{where}: the class count must be a whole number >= 1, got {num_classes!r}")
    if lo < 0 or hi >= num_classes:
        raise ValueError(f"{where}: labels must lie in 0..{num_classes - 1} ({num_classes} classes), got values in "
                         f"[{lo}, {hi}] (-1 is the null class of guidance, not a label)")
    return num_classes
