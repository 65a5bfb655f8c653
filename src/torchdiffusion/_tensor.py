"""L0: small helpers shared across layers (random draws, argument checks)."""

from __future__ import annotations

import torch
from torch import Tensor

PROJECTIONS = ("gaussian", "rademacher")


def check_count(value, name: str, minimum: int = 1) -> int:
    """``value`` if it is a whole number (not a bool or a float) ``>= minimum``, else a one-line ``ValueError``
    naming ``name``: the one check for counts (steps, batch sizes, levels, config counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def sample_projections(like: Tensor, dist: str = "gaussian", generator: torch.Generator | None = None) -> Tensor:
    """Random projection vectors shaped like ``like`` with ``E[v v^T] = I``: standard normal or Rademacher
    (+-1) entries (T-SM-4). Drawn only from ``generator``."""
    if dist not in PROJECTIONS:
        raise ValueError(f"unknown projection distribution {dist!r}; allowed: {', '.join(PROJECTIONS)}")
    if dist == "gaussian":
        v = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    else:
        v = torch.randint(0, 2, like.shape, generator=generator).to(like.dtype) * 2 - 1
    return v.to(like.device)


class SampleGenerators:
    """One ``torch.Generator`` per sample of a batch: noise for row ``i`` comes from generator ``i`` only, so a
    sample's randomness does not depend on which batch it is drawn in (the Pipeline's batch-size invariance).
    Samplers accept it wherever they accept a generator (:func:`torchdiffusion.samplers.common.noise_like`)."""

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
        """Standard normal noise of ``shape`` (first dimension = number of samples), row ``i`` from generator ``i``."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples requested from {len(self.generators)} generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device) if rows else torch.zeros(shape, dtype=dtype, device=device)
