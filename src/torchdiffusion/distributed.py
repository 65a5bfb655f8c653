"""Multi-process training on torch.distributed (``torchrun --nproc_per_node N -m torchdiffusion train ...``)."""

from __future__ import annotations

import os
from pathlib import Path


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def maybe_distributed_train(cfg: dict, out: str | Path, *, progress: bool = True, resume: bool = True):
    """Train in this process; under torchrun, join the process group first (see ``Trainer``)."""
    from .train import train

    return train(cfg, out, progress=progress, resume=resume)
