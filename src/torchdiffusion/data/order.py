"""The order of training examples from a streamed folder: a pure function of (seed, step) (docs/design.md
section 8; the rule is stated in :mod:`torchdiffusion.data.folder`'s docstring)."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterator

import torch
from torch import Tensor


def _seed(seed: int, *tag) -> int:
    h = hashlib.sha256(repr((int(seed), *tag)).encode()).digest()
    return int.from_bytes(h[:8], "little") & (2**63 - 1)


@functools.lru_cache(maxsize=4)  # an epoch's permutation serves all its steps (never modified: callers slice it)
def _perm(n: int, seed: int, *tag) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, "perm", *tag)))


def step_indices(n: int, per_step: int, seed: int, step: int) -> Tensor:
    """The ``per_step`` example indices (of ``n``) of training step ``step`` (module doc): distinct when
    ``per_step <= n``; a pure function of its arguments."""
    if per_step <= n:
        per_epoch = n // per_step
        epoch, k = divmod(int(step), per_epoch)
        return _perm(n, seed, "epoch", epoch)[k * per_step:(k + 1) * per_step]
    reps = math.ceil(per_step / n)
    return torch.cat([_perm(n, seed, "step", int(step), r) for r in range(reps)])[:per_step]


def step_flips(per_step: int, seed: int, step: int) -> Tensor:
    """Which of the ``per_step`` examples of step ``step`` are flipped horizontally (probability 1/2)."""
    g = torch.Generator().manual_seed(_seed(seed, "flip", int(step)))
    return torch.rand(per_step, generator=g) < 0.5


class StepBatches(torch.utils.data.Sampler):
    """The micro-batches of steps ``start, start + 1, ...`` (``accum`` per step) as lists of ``(index, flip)``:
    this rank's ``shard`` of each global micro-batch of ``batch`` examples. Endless; a pure function of its
    arguments (the batch sampler of :func:`stream`)."""

    def __init__(self, n: int, batch: int, accum: int, seed: int, start: int, shard: slice = slice(None),
                 flip: bool = False):
        super().__init__()
        self.n, self.batch, self.accum, self.seed = int(n), int(batch), int(accum), int(seed)
        self.start, self.shard, self.flip = int(start), shard, bool(flip)

    def micro_batch(self, step: int, i: int) -> list[tuple[int, bool]]:
        """Micro-batch ``i`` of step ``step``, this rank's shard."""
        per = self.batch * self.accum
        idx = step_indices(self.n, per, self.seed, step)[i * self.batch:(i + 1) * self.batch]
        flips = (step_flips(per, self.seed, step)[i * self.batch:(i + 1) * self.batch] if self.flip
                 else torch.zeros(self.batch, dtype=torch.bool))
        return list(zip(idx[self.shard].tolist(), flips[self.shard].tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, bool]]]:
        step = self.start
        while True:
            for i in range(self.accum):
                yield self.micro_batch(step, i)
            step += 1
