"""One training loop for every model in the library.

AdamW with warm-up and cosine/constant decay, gradient clipping and accumulation, EMA with warm-up, bf16
autocast, optional ``torch.compile``, NaN/Inf detection, atomic checkpoints with exact resumption (model,
EMA, optimizer and RNG states in one safetensors file), CSV logs, periodic sample grids, tqdm progress,
optional TensorBoard scalars (``train.tensorboard``), and data-parallel training on torch.distributed (see
:mod:`torchdiffusion.distributed` for the batch-sharding scheme; only rank 0 writes files).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data as data_mod
from . import distributed as dist_mod
from .checkpoint import (
    load_json,
    load_tensors,
    optimizer_from_tensors,
    optimizer_to_tensors,
    save_json,
    save_tensors,
)
from .denoiser import Denoiser
from .losses import dsm_loss
from .runs import build_model

# ---------------------------------------------------------------------------------------------------------
# loss registry: name -> f(model, x0, *, cond, generator, cfg) -> scalar
# ---------------------------------------------------------------------------------------------------------
LossFn = Callable[..., Tensor]


def _dsm(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    return dsm_loss(model, x0, weighting=cfg.get("weighting", "native"), cond=cond, generator=generator,
                    min_snr_gamma=float(cfg.get("min_snr_gamma", 5.0)))


def _vlb(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    from .likelihood import vlb_loss  # DDPM variational bound, fixed variance (nats/dim)

    return vlb_loss(model, x0, cond=cond, generator=generator)


def _hybrid(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    from .likelihood import hybrid_loss  # IDDPM L_simple + lambda L_vlb; needs a 2x-channel (learned-variance) net

    return hybrid_loss(model, x0, cond=cond, generator=generator, lambda_vlb=float(cfg.get("lambda_vlb", 0.001)))


def _dsm_is(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    from .likelihood import importance_dsm_loss  # dsm with t ~ w(t) (e.g. likelihood weighting g2), lower variance

    return importance_dsm_loss(model, x0, weighting=cfg.get("weighting", "g2"), cond=cond, generator=generator)


LOSSES: dict[str, LossFn] = {"dsm": _dsm, "vlb": _vlb, "hybrid": _hybrid, "dsm_is": _dsm_is}


# score-matching family (NCSN, exact and sliced score matching on the noised marginals; losses.py)
def _ncsn(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    from .losses import ncsn_loss, process_ncsn_sigmas

    sigmas = process_ncsn_sigmas(model.process, int(cfg.get("ncsn_levels", 10)))
    return ncsn_loss(model, x0, sigmas, cond=cond, generator=generator)


def _score_matching(method: str) -> LossFn:
    def loss(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
        from .losses import noisy_score_matching_loss

        return noisy_score_matching_loss(model, x0, method=method, weighting=cfg.get("weighting", "native"),
                                         cond=cond, generator=generator,
                                         n_projections=int(cfg.get("ssm_projections", 1)),
                                         dist=cfg.get("ssm_dist", "gaussian"),
                                         variance_reduced=bool(cfg.get("ssm_variance_reduced", True)))
    return loss


LOSSES.update({"ncsn": _ncsn, "esm": _score_matching("esm"), "ssm": _score_matching("ssm")})


def _classifier(model: Denoiser, x0: Tensor, *, cond, generator, cfg: dict) -> Tensor:
    """Noise-aware classifier (B-13): cross-entropy of ``model.net(x_t, t)`` against the labels, with ``t``
    drawn as for the DSM loss and ``x_t = alpha x0 + sigma eps``; its Bayes optimum is ``p(y | x_t)``."""
    from .losses import sample_times

    if cond is None:
        raise ValueError("loss 'classifier' needs labels: set data.conditional=true")
    proc = model.process
    t = sample_times(proc, x0.shape[0], generator, x0.device)
    x_t = proc.add_noise(x0, t, torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)).to(x0.dtype)
    logits = model.net(x_t, t if proc.discrete else t.to(x0.dtype))
    return torch.nn.functional.cross_entropy(logits, cond.long(), ignore_index=-1)


LOSSES["classifier"] = _classifier

# autoencoders (issue 9): ae, dae, vae on model.net (an Autoencoder; ae_losses.py)
from .ae_losses import TRAIN_LOSSES as _AE_LOSSES  # noqa: E402

LOSSES.update(_AE_LOSSES)


def get_loss(name: str) -> LossFn:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; allowed: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# ---------------------------------------------------------------------------------------------------------
def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None


def lr_at(step: int, tcfg: dict) -> float:
    """Learning rate at ``step``: linear warm-up, then cosine (to ``min_lr_ratio``) or constant."""
    base, warm, total = float(tcfg["lr"]), int(tcfg["warmup"]), int(tcfg["steps"])
    f = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    sched = tcfg.get("schedule", "cosine")
    if sched == "cosine":
        r = float(tcfg.get("min_lr_ratio", 0.1))
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


def split_dataset(ds: data_mod.Dataset, holdout: float,
                  seed: int = 0) -> tuple[data_mod.Dataset, data_mod.Dataset | None]:
    """Deterministic (train, test) split: the last ``round(holdout * N)`` examples of a fixed permutation
    (``seed`` 0) are held out; with none held out the test part is ``None``."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"data.holdout must be in [0, 1), got {holdout}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    n_test = round(holdout * len(ds))
    if n_test == 0:
        return ds, None

    def part(idx: Tensor) -> data_mod.Dataset:
        return dataclasses.replace(ds, x=ds.x[idx], y=None if ds.y is None else ds.y[idx])
    return part(perm[: len(ds) - n_test]), part(perm[len(ds) - n_test:])


def _model_sections(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("data", "process", "model", "loss")}


@contextlib.contextmanager
def _deferred_sigint(enabled: bool = True) -> Iterator[Callable[[], bool]]:
    """Defer Ctrl-C (SIGINT) to the next step boundary, so that the checkpoint written on interrupt is the state
    after a whole step and resuming stays bit-exact; a second Ctrl-C interrupts at once. Yields ``interrupted()``.
    Only in the main thread of a single process (elsewhere Ctrl-C acts immediately, as usual)."""
    hit = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def handler(signum, frame):
        if hit:
            raise KeyboardInterrupt
        hit.append(signum)

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(hit)
    finally:
        signal.signal(signal.SIGINT, previous)


class Trainer:
    """Train ``cfg`` into the run folder ``out``; ``run()`` resumes from its checkpoint if there is one."""

    def __init__(self, cfg: dict, out: str | Path, *, dataset: data_mod.Dataset | None = None,
                 progress: bool = True, resume: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        t, d = cfg["train"], cfg["data"]
        for key in ("steps", "batch", "accum"):
            if int(t[key]) < 1:
                raise ValueError(f"train.{key} must be >= 1, got {t[key]}")
        self.device = pick_device(t["device"])
        self.dist = dist_mod.current()
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self._shard = dist_mod.shard(int(t["batch"]), self.dist)
        if int(t.get("threads") or 0) > 0:
            torch.set_num_threads(int(t["threads"]))
        self.tb = None
        if t.get("tensorboard"):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard=true needs the tensorboard package (pip install tensorboard); "
                                 "the CSV log (log.csv) is written either way") from None
        if t["precision"] not in ("fp32", "bf16"):
            raise ValueError(f"unknown precision {t['precision']!r}; allowed: fp32, bf16")
        self.data = dataset or split_dataset(data_mod.load(d["name"], **{k: v for k, v in d.items() if k != "name"}),
                                             float(d.get("holdout", 0.0)))[0]  # data.holdout stays unseen
        self.conditional = bool(d.get("conditional"))
        if self.conditional and self.data.y is None:
            raise ValueError(f"data.conditional=true but dataset {self.data.name!r} has no labels")
        ncls = self.data.num_classes if self.conditional else None
        torch.manual_seed(int(t["seed"]))  # the initial weights follow train.seed
        self.model = build_model(cfg, self.data.shape, ncls).to(self.device)
        self.net = self.model.net
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=float(t["lr"]), weight_decay=float(t["weight_decay"]))
        self.loss_fn = get_loss(cfg["loss"]["name"])
        self.gen = torch.Generator().manual_seed(int(t["seed"]))
        self.data_gen = self.gen  # batches (shared by all ranks); self.gen: diffusion noise (per rank)
        if self.dist.enabled:
            self.data_gen = torch.Generator().manual_seed(int(t["seed"]))
            self.gen = torch.Generator().manual_seed(int(t["seed"]) + 7919 * (self.dist.rank + 1))
            torch.manual_seed(int(t["seed"]) + self.dist.rank)
        self.step = 0
        self._pending: list[float] = []  # losses since the last full log interval (checkpointed: exact log.csv)
        self.run_info = {"data_shape": list(self.data.shape), "num_classes": ncls, "levels": self.data.levels,
                         "value_range": list(self.data.value_range), "data_name": self.data.name,
                         **({"latent": self.data.meta["latent"]} if "latent" in self.data.meta else {})}
        self._fwd_model = self.model
        self.ddp = dist_mod.wrap(self.net, self.device) if self.dist.enabled else None
        if self.ddp is not None:
            self._fwd_model = Denoiser(self.ddp, self.model.process, self.model.prediction, self.model.precond,
                                       self.model.sigma_data)
        if t.get("compile"):
            self._fwd_model = Denoiser(torch.compile(self.ddp or self.net), self.model.process, self.model.prediction,
                                       self.model.precond, self.model.sigma_data)
        if resume and (self.out / "train_state.safetensors").is_file():
            self._load()
        if t.get("tensorboard") and self.dist.is_main:
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)

    # --- checkpoints ------------------------------------------------------------------------------------
    def _load(self) -> None:
        saved = load_json(self.out / "config.json")
        if _model_sections(saved) != _model_sections(self.cfg):
            raise ValueError(f"{self.out} holds a run with a different data/process/model/loss config; "
                             "use another --out or --no-resume")
        tensors, meta = load_tensors(self.out / "train_state.safetensors")
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer_from_tensors(self.opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["optimizer"])
        self.data_gen.set_state(tensors["rng.gen"])
        torch.set_rng_state(tensors["rng.torch"])
        r = self.dist.rank
        if self.dist.enabled and f"rng.noise.{r}" in tensors:  # saved by a run with at least r + 1 processes
            self.gen.set_state(tensors[f"rng.noise.{r}"])
            torch.set_rng_state(tensors[f"rng.torch.{r}"])
        self.step = int(meta["step"])
        self._pending = [float(v) for v in meta.get("pending_losses", [])]
        if self.dist.is_main:
            self._truncate_log()

    def save(self, gather: bool = True) -> None:
        """Write model, EMA and the full training state atomically (rank 0; with several processes every rank
        must call this, as their generator states are gathered, unless ``gather=False``)."""
        rngs = {}
        if self.dist.enabled:
            states = dist_mod.gather_objects((self.gen.get_state(), torch.get_rng_state())) if gather else []
            for r, (noise, trng) in enumerate(states):
                rngs[f"rng.noise.{r}"], rngs[f"rng.torch.{r}"] = noise, trng
        if not self.dist.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        opt_t, opt_meta = optimizer_to_tensors(self.opt)
        tensors = {**{f"net.{k}": v for k, v in self.net.state_dict().items()},
                   **{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                   **opt_t, "rng.gen": self.data_gen.get_state(), "rng.torch": torch.get_rng_state(), **rngs}
        save_json({**self.cfg, "run": self.run_info}, self.out / "config.json")
        save_tensors(tensors, self.out / "train_state.safetensors", {"step": self.step, "optimizer": opt_meta,
                                                                        "pending_losses": self._pending})
        save_tensors(self.net.state_dict(), self.out / "model.safetensors", {"step": self.step})
        save_tensors(self.ema.state_dict(), self.out / "ema.safetensors", {"step": self.step})

    def _truncate_log(self) -> None:
        log = self.out / "log.csv"
        if log.is_file():
            rows = list(csv.reader(log.open()))
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= self.step]
            with log.open("w", newline="") as f:
                csv.writer(f).writerows(keep)

    def _log(self, row: dict) -> None:
        """Append a row to ``log.csv`` (and TensorBoard scalars when enabled); rank 0 only."""
        if not self.dist.is_main:
            return
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        self.out.mkdir(parents=True, exist_ok=True)
        log = self.out / "log.csv"
        new = not log.is_file()
        with log.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    # --- one step ------------------------------------------------------------------------------------------
    def _batch(self) -> tuple[Tensor, Tensor | None]:
        """This rank's shard of the next global batch of ``train.batch`` examples (all of it for 1 process)."""
        b, sh, g = int(self.cfg["train"]["batch"]), self._shard, self.data_gen
        idx = torch.randint(0, len(self.data), (b,), generator=g)
        x = self.data.x[idx]
        if self.cfg["data"].get("flip") and x.ndim == 4:
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = None
        if self.conditional:
            y = self.data.y[idx].clone()
            drop = torch.rand(b, generator=g) < float(self.cfg["loss"].get("p_uncond", 0.0))
            y[drop] = -1
            y = y[sh].to(self.device)
        return x[sh].to(self.device), y

    def train_step(self) -> tuple[float, float]:
        """One optimizer step (with accumulation); returns (loss, grad norm)."""
        t = self.cfg["train"]
        lr = lr_at(self.step, t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        accum = int(t["accum"])
        for i in range(accum):
            x0, y = self._batch()
            # DDP all-reduces the gradients on the last micro-batch only
            with self.ddp.no_sync() if self.ddp is not None and i < accum - 1 else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t["precision"] == "bf16"):
                    loss = self.loss_fn(self._fwd_model, x0, cond=y, generator=self.gen, cfg=self.cfg["loss"])
                (loss / accum).backward()
            loss = dist_mod.all_mean(loss.detach())  # every rank sees the same value (and the same NaN)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {self.step}: training diverged "
                                   f"(last checkpoint kept in {self.out}); lower train.lr or check the data")
            total += loss.item() / accum
        gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), float(t["clip"]) if t["clip"] else math.inf)
        if not torch.isfinite(gn):
            raise RuntimeError(f"gradient norm is {gn.item()} at step {self.step}: training diverged")
        self.opt.step()
        ema_update(self.ema, self.net, ema_decay(self.step, float(t["ema"]), bool(t["ema_warmup"])))
        self.step += 1
        return total, float(gn)

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``stop_after`` more steps); checkpoint periodically and at the end.
        Ctrl-C writes a checkpoint before stopping, so the same command resumes."""
        t = self.cfg["train"]
        total = int(t["steps"])
        end = total if stop_after is None else min(total, self.step + stop_after)
        self.net.train()
        start, t0, losses = self.step, time.time(), []
        bar = tqdm(total=end, initial=self.step, disable=not (self.progress and self.dist.is_main), desc="train",
                   dynamic_ncols=True)
        try:
            with _deferred_sigint(enabled=not self.dist.enabled) as interrupted:
                self._loop(end, bar, losses, t0, interrupted)
                if interrupted():
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            self.save(gather=False)  # other ranks may already be gone: no collective here
            bar.close()
            raise KeyboardInterrupt(f"interrupted at step {self.step}; checkpoint saved in {self.out}; "
                                    "run the same command to resume") from None
        bar.close()
        self.save()
        if self.tb is not None:
            self.tb.close()
        return {"step": self.step, "steps_run": self.step - start, "seconds": time.time() - t0,
                "loss": sum(losses[-50:]) / max(len(losses[-50:]), 1) if losses else float("nan"),
                "out": str(self.out)}

    def _loop(self, end: int, bar, losses: list[float], t0: float, interrupted: Callable[[], bool]) -> None:
        """Steps until ``end``; returns early, at a step boundary, once ``interrupted()`` (a deferred Ctrl-C)."""
        t = self.cfg["train"]
        while self.step < end and not interrupted():
            loss, gn = self.train_step()
            losses.append(loss)
            self._pending.append(loss)
            bar.update(1)
            if self.step % int(t["log_every"]) == 0 or self.step == end:
                # the mean over the interval, including its steps before a resume
                avg = sum(self._pending) / len(self._pending)
                if self.step % int(t["log_every"]) == 0:
                    self._pending = []
                bar.set_postfix(loss=f"{avg:.4f}")
                self._log({"step": self.step, "loss": avg, "lr": lr_at(self.step - 1, t), "grad_norm": gn,
                           "seconds": round(time.time() - t0, 3)})
            if int(t["ckpt_every"]) and self.step % int(t["ckpt_every"]) == 0:
                self.save()
            if int(t["sample_every"]) and self.step % int(t["sample_every"]) == 0 and self.dist.is_main:
                self.sample_grid()

    def ema_model(self) -> Denoiser:
        return Denoiser(self.ema, self.model.process, self.model.prediction, self.model.precond,
                        self.model.sigma_data).eval()

    def sample_grid(self) -> Path:
        """Samples from the EMA model into ``samples/step_XXXXXX.png``."""
        from .generate import generate_to_file
        from .latent import is_autoencoder_config, write_autoencoder_samples

        if is_autoencoder_config(self.cfg):  # prior samples / reconstructions of the EMA net (issue 9)
            net = copy.deepcopy(self.ema).eval()
            return write_autoencoder_samples(net, {**self.cfg, "run": self.run_info}, self.out,
                                             out=self.out / "samples" / f"step_{self.step:07d}.png")[0]
        return generate_to_file(self.ema_model(), self.cfg, self.run_info,
                                self.out / "samples" / f"step_{self.step:07d}.png", data=self.data)


def train(cfg: dict, out: str | Path, *, dataset: data_mod.Dataset | None = None, progress: bool = True,
          resume: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) a run; returns a summary dict."""
    return Trainer(cfg, out, dataset=dataset, progress=progress, resume=resume).run(stop_after)
