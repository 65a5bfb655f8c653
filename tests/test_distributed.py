"""Data-parallel training on torch.distributed (gloo, 2 CPU processes): one DDP step equals a single-process
step on the combined batch, only rank 0 writes, resumption is exact, ranks stay identical."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from torchdiffusion.losses.score import dsm_loss
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs import train as runs_train
from torchdiffusion.runs.losses import LOSSES
from torchdiffusion.runs.train import build_trainer, train
from torchdiffusion.training import distributed
from torchdiffusion.training.checkpoint import load_tensors

_SEEN: list[torch.Tensor] = []  # the batches the loss saw in this process


def _fixed_noise_loss(model, x0, *, cond, generator, cfg):
    """DSM with noise that is a fixed function of each example, so that the gradient of a batch does not depend
    on which process drew its noise: the update must then equal the single-process update exactly."""
    if model.net.training:  # not the held-out validation loss (the trainer calls it in eval mode)
        _SEEN.append(x0.detach().clone())
    t = torch.remainder(torch.floor(x0[:, 0].abs() * 997), 1000).double()
    return dsm_loss(model, x0, t=t, eps=torch.sin(13 * x0 + 1), cond=cond)


LOSSES["fixed_noise_test"] = _fixed_noise_loss


def _cfg(loss: str, steps: int, **train) -> dict:
    return config_mod.resolve("ring", [f"loss.name={loss}", f"train.steps={steps}", "train.batch=64",
                                       "model.hidden=32", "model.depth=2", "data.n=512", "train.warmup=2",
                                       "train.log_every=2", "train.ckpt_every=0", "train.device=cpu",
                                       "train.ema=0.9", *[f"train.{k}={v}" for k, v in train.items()]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, root: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.init_from_env("cpu")
    assert info.world_size == world and info.rank == rank
    root_p = Path(root)
    # (1) fixed-noise loss, with gradient accumulation: compared with one process in the test
    res = runs_train.maybe_distributed_train(_cfg("fixed_noise_test", 5, accum=2), root_p / "fixed",
                                              progress=False)
    assert (res is None) == (rank != 0)
    torch.save(_SEEN, root_p / f"seen{rank}.pt")
    # (2) the real loss: 6 steps straight vs 3 + resume 3, both on 2 processes
    cfg = _cfg("dsm", 6)
    train(cfg, root_p / "straight", progress=False)
    train(cfg, root_p / "resumed", progress=False, stop_after=3)
    tr = build_trainer(cfg, root_p / "resumed", progress=False)
    assert tr.step == 3
    tr.run()
    torch.save({k: v.clone() for k, v in tr.net.state_dict().items()}, root_p / f"rank{rank}.pt")
    distributed.barrier()
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(2, _free_port(), str(root)), nprocs=2, join=True)
    return root


def _weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_tensors(run / name)[0]


def test_ddp_update_equals_single_process_on_combined_batch(ddp_runs: Path, tmp_path: Path) -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    _SEEN.clear()
    try:
        train(_cfg("fixed_noise_test", 5, accum=2), tmp_path / "single", progress=False)
    finally:
        torch.set_num_threads(threads)
    # each rank saw its own half of every global batch (5 steps x 2 micro-batches of 64)
    seen = [torch.load(ddp_runs / f"seen{r}.pt") for r in range(2)]
    assert len(_SEEN) == len(seen[0]) == len(seen[1]) == 10
    for full, a, b in zip(_SEEN, *seen):
        assert full.shape == (64, 2) and a.shape == b.shape == (32, 2)
        assert torch.equal(torch.cat([a, b]), full)
    ddp, single = _weights(ddp_runs / "fixed"), _weights(tmp_path / "single")
    init = build_trainer(_cfg("fixed_noise_test", 5, accum=2), tmp_path / "init", progress=False).net.state_dict()
    moved = 0.0
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=0)
        moved = max(moved, float((single[k] - init[k]).abs().max()))
    assert moved > 1e-3  # the weights did change, so the comparison means something
    for k, v in _weights(ddp_runs / "fixed", "ema.safetensors").items():
        torch.testing.assert_close(v, _weights(tmp_path / "single", "ema.safetensors")[k], atol=1e-5, rtol=0)
    # the logged (all-reduced) losses agree too
    rows_ddp = (ddp_runs / "fixed" / "log.csv").read_text().splitlines()
    rows_one = (tmp_path / "single" / "log.csv").read_text().splitlines()
    assert len(rows_ddp) == len(rows_one) == 4
    for a, b in zip(rows_ddp[1:], rows_one[1:]):
        assert float(a.split(",")[1]) == pytest.approx(float(b.split(",")[1]), abs=1e-5)


def test_ddp_resume_is_exact_and_ranks_agree(ddp_runs: Path) -> None:
    straight, resumed = _weights(ddp_runs / "straight"), _weights(ddp_runs / "resumed")
    for k in straight:
        assert torch.equal(straight[k], resumed[k]), k
    r0, r1 = torch.load(ddp_runs / "rank0.pt"), torch.load(ddp_runs / "rank1.pt")
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
        assert torch.equal(r0[k], resumed[k]), k
    state, _ = load_tensors(ddp_runs / "resumed" / "train_state.safetensors")
    assert {"rng.noise.0", "rng.noise.1", "rng.torch.0", "rng.torch.1"} <= set(state)
    assert not torch.equal(state["rng.noise.0"], state["rng.noise.1"])  # the ranks draw different noise


def test_shard_is_a_disjoint_cover_and_checks_divisibility() -> None:
    parts = [distributed.shard(12, distributed.DistInfo(r, 3)) for r in range(3)]
    covered = sorted(i for s in parts for i in range(12)[s])
    assert covered == list(range(12))
    with pytest.raises(ValueError, match="divisible"):
        distributed.shard(10, distributed.DistInfo(0, 3))
    assert distributed.shard(7, distributed.DistInfo()) == slice(0, 7)


def test_not_distributed_without_env(monkeypatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env() == distributed.DistInfo()
    assert not distributed.current().enabled
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="torchrun"):
        distributed.init_from_env("cpu")


@pytest.mark.slow
def test_torchrun_cli(tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m torchdiffusion train``: one summary line, rank-0 files only."""
    torchrun = Path(sys.executable).with_name("torchrun")
    out = tmp_path / "run"
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()), "-m",
                           "torchdiffusion", "train", "ring", "--out", str(out), "--quiet", "--set", "train.steps=6",
                           "--set", "train.batch=32", "--set", "train.device=cpu"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("trained 6 steps") == 1
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", "train_state.safetensors"}
