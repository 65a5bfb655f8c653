"""The noise-aware classifier loss of classifier guidance (B-13)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdiffusion.processes import Process

from .score import sample_times


def classifier_loss(net: nn.Module, process: Process, x0: Tensor, y: Tensor, *,
                    generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy of ``net(x_t, t)`` against the labels ``y`` (-1 = no label), with ``t`` drawn as for the DSM
    loss and ``x_t = alpha x0 + sigma eps`` (B-13): its Bayes optimum is the noisy posterior ``p(y | x_t)``."""
    t = sample_times(process, x0.shape[0], generator, x0.device)
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = process.add_noise(x0, t, eps).to(x0.dtype)
    logits = net(x_t, t if process.discrete else t.to(x0.dtype))
    return torch.nn.functional.cross_entropy(logits, y.long(), ignore_index=-1)
