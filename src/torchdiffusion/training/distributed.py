"""Multi-process data-parallel training on torch.distributed.

``torchrun --nproc_per_node N -m torchdiffusion train CONFIG --out RUN`` starts N processes; each joins the
process group from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) with the ``gloo`` backend on CPU or ``nccl`` on GPU (one GPU per process, ``cuda:LOCAL_RANK``),
and the :class:`~torchdiffusion.training.trainer.Trainer` wraps its network in ``DistributedDataParallel``.

Batches (the scheme ``Trainer`` follows): ``train.batch`` is the *global* batch. At every step every rank
draws the same global batch of example indices (and flips, label drops) from a data generator seeded
identically on all ranks, so no communication is needed, and keeps the contiguous shard
``[r B/W, (r+1) B/W)`` of it (:func:`shard`): the shards are disjoint and together form the global batch,
which is exactly the batch a single process with the same seed draws. The diffusion noise (``t``, ``eps``)
comes from a per-rank generator. DDP averages the gradients, so one step equals a single-process step on the
combined batch (up to the noise draws). A streamed image folder follows the same scheme without a generator: the
global batch of step ``s`` (indices and flips) is a function of (``train.seed``, ``s``)
(:func:`torchdiffusion.data.folder.step_indices`, distinct examples within a step) and each rank's ``DataLoader``
decodes only its shard. Only rank 0 writes checkpoints, logs, samples and progress bars;
every rank loads the checkpoint on resume (so the run folder must be visible to every rank: one machine or a
shared file system), and the per-rank generator states are gathered into it, so a resumed run with the same
number of processes continues exactly.
"""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the process group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def current() -> DistInfo:
    """The process group this process belongs to, or a single-process ``DistInfo``."""
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def init_from_env(device: str = "auto") -> DistInfo:
    """Join the process group described by the torchrun environment (no-op for ``WORLD_SIZE`` 1 or when
    already initialised). ``nccl`` when the training device is a GPU, ``gloo`` otherwise."""
    if dist.is_available() and dist.is_initialized():
        return current()
    if env_world_size() <= 1:
        return DistInfo()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE > 1 but {', '.join(missing)} not set: launch with torchrun --nproc_per_node N")
    use_cuda = torch.cuda.is_available() and device in ("auto", "cuda") or device.startswith("cuda")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if use_cuda else "gloo"
    if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun started every rank together (and hosts the store)
        dist.init_process_group(backend)
    else:  # a hand-made environment, or one left over from another job: wait for the others, but not forever
        rank, world = int(os.environ["RANK"]), env_world_size()
        dist.init_process_group(backend, store=rendezvous(rank, world), rank=rank, world_size=world)
    return current()


def rendezvous_timeout() -> float:
    """Seconds a rank not started by torchrun waits for the others: ``TORCHDIFFUSION_RENDEZVOUS_S`` (default 60)."""
    text = os.environ.get("TORCHDIFFUSION_RENDEZVOUS_S", "60")
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ValueError(f"TORCHDIFFUSION_RENDEZVOUS_S must be a number of seconds > 0, got {text!r}")
    return value


def rendezvous(rank: int, world: int) -> dist.Store:
    """The store of a process group whose ranks were started by hand (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``,
    ``MASTER_PORT`` set, no torchrun): every rank checks in, and a rank that does not see all ``world`` within
    :func:`rendezvous_timeout` seconds stops with one line, instead of waiting forever for a rank that never comes
    (a ``WORLD_SIZE=2`` left over in the environment of a single process)."""
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in 0..WORLD_SIZE-1 = {world - 1}")
    timeout = rendezvous_timeout()
    where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    hint = ("a WORLD_SIZE left over in the environment? unset WORLD_SIZE, RANK, MASTER_ADDR and MASTER_PORT for one "
            "process, or launch with torchrun --nproc_per_node N")
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, rank == 0,
                              timeout=datetime.timedelta(seconds=timeout), wait_for_workers=False)
    except (RuntimeError, ValueError) as e:  # (DistStoreError / DistNetworkError are RuntimeErrors)
        raise ValueError(f"WORLD_SIZE={world}, RANK={rank}: cannot reach the rendezvous at {where} "
                         f"({str(e).splitlines()[0][:100]}); {hint}") from None
    store.add("torchdiffusion/arrived", 1)
    deadline = time.monotonic() + timeout
    while (arrived := store.add("torchdiffusion/arrived", 0)) < world:
        if time.monotonic() > deadline:
            raise ValueError(f"WORLD_SIZE={world} but only {arrived} of {world} processes joined at {where} within "
                             f"{timeout:g} s; {hint}")
        time.sleep(0.05)
    return store


def shard(global_batch: int, info: DistInfo) -> slice:
    """This rank's contiguous part of a global batch of ``global_batch`` positions."""
    if global_batch % info.world_size:
        raise ValueError(f"train.batch={global_batch} (the global batch) must be divisible by the number of "
                         f"processes {info.world_size}")
    per = global_batch // info.world_size
    return slice(info.rank * per, (info.rank + 1) * per)


def wrap(net: nn.Module, device: torch.device) -> nn.Module:
    """``DistributedDataParallel(net)`` (parameters broadcast from rank 0)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)


def all_mean(x: Tensor) -> Tensor:
    """Mean of a tensor over all ranks (the tensor itself when not distributed)."""
    if not current().enabled:
        return x
    y = x.detach().clone()
    dist.all_reduce(y)
    return y / dist.get_world_size()


def gather_objects(obj) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` when not distributed)."""
    if not current().enabled:
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().enabled:
        dist.barrier()


