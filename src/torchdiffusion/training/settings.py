"""The ``train`` section as a checked dataclass, and the schedules the loop follows: learning rate and EMA."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from torchdiffusion._tensor import check_count, resolve_device
from torchdiffusion.nets.fast import check_flag


def pick_device(name: str) -> torch.device:
    """``train.device``: ``auto`` (CUDA when available) or a device this torch build has (one-line error else)."""
    return resolve_device(name)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """What the loop needs to know (the ``train`` section of a run's config, plus the flip augmentation)."""

    steps: int
    batch: int
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    ema: float = 0.999
    ema_warmup: bool = True
    clip: float | None = 1.0
    accum: int = 1
    seed: int = 0
    ckpt_every: int = 0
    log_every: int = 50
    sample_every: int = 0
    device: str = "auto"
    precision: str = "fp32"
    compile: bool | str = "auto"  # true, false or "auto" (nets.fast.auto_picks: only where measured to win)
    channels_last: bool | str = "auto"
    threads: int = 0
    tensorboard: bool = False
    workers: int = 0  # DataLoader processes decoding a streamed image folder (data.folder); in-memory data: unused
    flip: bool = False

    def __post_init__(self) -> None:
        for key in ("steps", "batch", "accum", "log_every"):
            check_count(getattr(self, key), f"train.{key}", 1)
        for key in ("ckpt_every", "sample_every", "warmup", "threads", "seed", "workers"):
            check_count(getattr(self, key), f"train.{key}", 0)
        for key in ("compile", "channels_last"):
            check_flag(getattr(self, key), f"train.{key}")
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {self.precision!r}; allowed: fp32, bf16")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown lr schedule {self.schedule!r}; allowed: cosine, constant")
        for key in ("lr", "ema", "min_lr_ratio", "weight_decay"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"train.{key} must be a finite number >= 0, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict) -> TrainSettings:
        """From a ``train`` section (unknown keys are an error naming them)."""
        names = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(d) - names)
        if bad:
            raise ValueError(f"unknown train setting(s) {', '.join(bad)}; allowed: {', '.join(sorted(names))}")
        return cls(**d)


def lr_at(step: int, s: TrainSettings) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine (to ``min_lr_ratio``) or constant."""
    base, warm, total = float(s.lr), int(s.warmup), int(s.steps)
    f = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    sched = s.schedule
    if sched == "cosine":
        r = float(s.min_lr_ratio)
        f *= r + (1 - r) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))
    elif sched != "constant":
        raise ValueError(f"unknown lr schedule {sched!r}; allowed: cosine, constant")
    return base * f


def ema_decay(step: int, decay: float, warmup: bool) -> float:
    """EMA decay at ``step``; with warm-up ``min(decay, (1 + step) / (10 + step))``."""
    return min(decay, (1 + step) / (10 + step)) if warmup else decay


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``ema <- decay * ema + (1 - decay) * net`` for parameters; buffers are copied."""
    for pe, p in zip(ema.parameters(), net.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)
