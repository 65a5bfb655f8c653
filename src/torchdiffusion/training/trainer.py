"""One training loop for every model in the library.

AdamW with warm-up and cosine/constant decay, gradient clipping and accumulation, EMA with warm-up, bf16
autocast, ``torch.compile`` and the channels-last layout (on, off or ``auto``: :mod:`torchdiffusion.nets.fast`),
NaN/Inf detection, atomic checkpoints with exact resumption (model,
EMA, optimizer and RNG states in one safetensors file), CSV logs, periodic sample grids, tqdm progress,
optional TensorBoard scalars (``train.tensorboard``), and data-parallel training on torch.distributed (see
:mod:`torchdiffusion.training.distributed` for the batch-sharding scheme; only rank 0 writes files).

Data in memory (a :class:`~torchdiffusion.data.datasets.Dataset`) is indexed by a checkpointed generator; an image
folder (:class:`~torchdiffusion.data.folder.ImageFolder`) is streamed by a ``DataLoader`` with ``train.workers``
processes in an order that is a function of (``train.seed``, step) alone (:mod:`torchdiffusion.data.folder`), so
both resume bit-exactly. A bad image in a folder stops the run with one line naming it; when that happens at a
step boundary after progress, a checkpoint of the last whole step is written first.

The run folder is never lost or silently wrong (docs/design.md section 6): one trainer holds it (``.lock``); SIGINT
and SIGTERM finish the current step, save and stop; a folder that holds a model is overwritten only with
``force`` (which also starts a fresh log); temp files of killed writers are removed at start.

The ``train`` settings and the lr / EMA schedules are in ``settings.py``; signal handling in ``signals.py``.
"""

from __future__ import annotations

import contextlib
import copy
import csv
import functools
import io
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchdiffusion._files import FileError, FolderLock, atomic_write, cause, read_text, remove_stale_temps
from torchdiffusion.data.datasets import Dataset
from torchdiffusion.data.folder import BadImageError, ImageFolder, stream
from torchdiffusion.nets.fast import ChannelsLast, resolve_flag
from torchdiffusion.training import distributed as dist_mod
from torchdiffusion.training.checkpoint import (
    clear_run,
    load_tensors,
    model_files,
    optimizer_from_tensors,
    optimizer_to_tensors,
    require,
    save_json,
    save_tensors,
)
from torchdiffusion.training.settings import TrainSettings, ema_decay, ema_update, lr_at, pick_device
from torchdiffusion.training.signals import Interrupted, _deferred_signals, _signals_held

LossFn = Callable[..., Tensor]


def _worker_init(lock: tuple[int, int, int] | None, worker_id: int) -> None:
    """In a data-loading worker: leave Ctrl-C to the trainer (which finishes the step, saves and stops the workers),
    and close the forked copy of the run folder's lock (``lock``: its fd, device and inode), which must die with
    the trainer: a kill -9 of the trainer frees the folder for the resume at once. (A worker that was not forked
    has no such copy; the fd is closed only if it is that file.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lock is not None:
        fd, dev, ino = lock
        with contextlib.suppress(OSError):
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) == (dev, ino):
                os.close(fd)
Preview = Callable[[nn.Module, Path], Path]


class Trainer:
    """Train ``net`` on ``data`` with ``loss_fn`` into the run folder ``out``; ``run()`` resumes from its checkpoint.

    The trainer knows no model kind: ``loss_fn(net, x0, *, cond, generator) -> scalar`` closes over whatever the
    loss needs (process, parameterization, label dropout); ``config`` is the JSON written as ``config.json``;
    ``preview(ema_net, path)`` writes a picture every ``sample_every`` steps; with ``conditional`` the batches
    carry the dataset's labels as ``cond``; ``weights_meta`` is JSON stored in the metadata of the weights files
    (the run layer binds the config to the weights with it).

    The trainer holds ``out`` (a lock) from construction until :meth:`run` returns or :meth:`close`; a second
    trainer on the folder is refused. With ``resume`` a ``train_state.safetensors`` there is continued; otherwise
    a folder that holds a model (:data:`RUN_FILES`) is refused unless ``force``, which deletes the old run's
    files (weights, log, previews) and starts afresh.
    """

    def __init__(self, net: nn.Module, loss_fn: LossFn, data: Dataset, settings: TrainSettings, out: str | Path, *,
                 config: dict | None = None, preview: Preview | None = None, conditional: bool = False,
                 progress: bool = True, resume: bool = True, force: bool = False, weights_meta: dict | None = None,
                 validate: Callable[[nn.Module], float] | None = None, plot: Callable[[Path], object] | None = None):
        self.settings, self.out, self.progress, self.config = settings, Path(out), progress, config or {}
        # validate(ema_net) -> held-out loss, logged as val_loss with every log row; plot(out) redraws the loss
        # curve after every checkpoint (both from the run kind, runs/train.py; rank 0 only)
        self.validate, self.plot = validate, plot
        self.weights_meta = dict(weights_meta or {})
        t = settings
        self.device = pick_device(t.device)
        self.dist = dist_mod.current()
        self.lock = FolderLock(self.out, "trainer") if self.dist.is_main else None
        self._in_step = False
        if self.lock is not None:
            self.lock.acquire()
            for folder in (self.out, self.out / "samples"):
                remove_stale_temps(folder)
        try:
            self._setup(net, loss_fn, data, preview, conditional, resume, force)
        except BaseException:
            self.close()  # a trainer that failed to start does not keep the folder
            raise

    def _setup(self, net: nn.Module, loss_fn: LossFn, data: Dataset, preview: Preview | None, conditional: bool,
               resume: bool, force: bool) -> None:
        t = self.settings
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self._shard = dist_mod.shard(int(t.batch), self.dist)
        self.tb = None
        if t.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard=true needs the tensorboard package (pip install tensorboard); "
                                 "the CSV log (log.csv) is written either way") from None
        self.data, self.conditional, self.preview = data, conditional, preview
        self.streamed = isinstance(data, ImageFolder)
        self._stream = None  # the DataLoader's batches while run() trains (streamed data)
        if conditional and data.y is None:
            raise ValueError(f"data.conditional=true but dataset {data.name!r} has no labels")
        self.net = net.to(self.device)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=float(t.lr), weight_decay=float(t.weight_decay))
        self.loss_fn = loss_fn
        self.gen = torch.Generator().manual_seed(int(t.seed))
        self.data_gen = self.gen  # batches (shared by all ranks); self.gen: diffusion noise (per rank)
        if self.dist.enabled:
            self.data_gen = torch.Generator().manual_seed(int(t.seed))
            self.gen = torch.Generator().manual_seed(int(t.seed) + 7919 * (self.dist.rank + 1))
            torch.manual_seed(int(t.seed) + self.dist.rank)
        self.step = 0
        self._pending: list[float] = []  # losses since the last full log interval (checkpointed: exact log.csv)
        self.ddp = dist_mod.wrap(self.net, self.device) if self.dist.enabled else None
        self.fwd_net = self.ddp or self.net
        # what the loss calls: the network (DDP-wrapped), in the channels-last layout and compiled where the settings
        # (or their "auto" rule, from the data's shape and the step count) say so
        shape, calls = tuple(data.shape), int(t.steps)
        self.fast_path = {key: resolve_flag(getattr(t, key), f"train.{key}", key, "train", self.net, shape, calls)
                          for key in ("channels_last", "compile")}
        if self.fast_path["channels_last"]:
            self.fwd_net = ChannelsLast(self.fwd_net)
        if self.fast_path["compile"]:
            self.fwd_net = torch.compile(self.fwd_net)
        if resume and not force and (self.out / "train_state.safetensors").is_file():
            self._load()
        elif self.dist.is_main:
            self._start_fresh(force)
        if t.tensorboard and self.dist.is_main:
            self.tb = SummaryWriter(str(self.out / "tensorboard"), purge_step=self.step or None)

    # --- the run folder -------------------------------------------------------------------------------------
    def close(self) -> None:
        """Give the run folder back (another trainer may then take it)."""
        if self.lock is not None:
            self.lock.release()

    def _start_fresh(self, force: bool) -> None:
        """A new run in ``out``: refuse a folder that holds a model unless ``force``, which deletes the old run's
        files; a log without a checkpoint (a run stopped before its first save) is dropped: a fresh log."""
        held = model_files(self.out)
        if held and not force:
            why = "" if (self.out / "train_state.safetensors").exists() else " and no train_state.safetensors to resume"
            self.close()
            raise FileError(f"{self.out} already holds a trained model ({', '.join(held)}){why}; pass --force "
                            "(force=True) to overwrite it, or use another --out")
        # (without force nothing of a model is here; a config.json stays until the first checkpoint replaces it:
        # it may be the user's own file, passed as this run's config)
        clear_run(self.out, config=force)

    # --- checkpoints ------------------------------------------------------------------------------------
    def _load(self) -> None:
        path = self.out / "train_state.safetensors"
        tensors, meta = load_tensors(path)
        for key in ("step", "optimizer"):
            if key not in meta:
                raise FileError(f"corrupt checkpoint {path}: its metadata lacks {key!r}")
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        self.ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
        optimizer_from_tensors(self.opt, {k: v.to(self.device) for k, v in tensors.items()}, meta["optimizer"])
        self.data_gen.set_state(require(tensors, "rng.gen", path))
        torch.set_rng_state(require(tensors, "rng.torch", path))
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
        opt_t, opt_meta = optimizer_to_tensors(self.opt)
        tensors = {**{f"net.{k}": v for k, v in self.net.state_dict().items()},
                   **{f"ema.{k}": v for k, v in self.ema.state_dict().items()},
                   **opt_t, "rng.gen": self.data_gen.get_state(), "rng.torch": torch.get_rng_state(), **rngs}
        with _signals_held():
            self._sync_log()
            save_json(self.config, self.out / "config.json")
            # train_state first: it alone decides a resume; the weights files follow it
            save_tensors(tensors, self.out / "train_state.safetensors", {"step": self.step, "optimizer": opt_meta,
                                                                            "pending_losses": self._pending})
            meta = {**self.weights_meta, "step": self.step}
            save_tensors(self.net.state_dict(), self.out / "model.safetensors", meta)
            save_tensors(self.ema.state_dict(), self.out / "ema.safetensors", meta)

    def _sync_log(self) -> None:
        """fsync ``log.csv`` before a checkpoint, so that no logged row up to the checkpoint's step can be lost."""
        log = self.out / "log.csv"
        if log.is_file():
            try:
                fd = os.open(log, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as e:
                raise FileError(f"cannot write {log}: {cause(e)}") from None

    def _truncate_log(self) -> None:
        """Drop the log rows after the checkpoint's step (written before an interruption; they are written again),
        and a last row cut short by a kill; the rewrite is atomic. A damaged log is refused, naming the file."""
        log = self.out / "log.csv"
        if not log.is_file():
            return
        text = read_text(log, "training log")
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a row cut short by a kill during its write
        try:
            rows = list(csv.reader(io.StringIO(text)))
            head = rows[0] if rows else []
            keep = [head] + [r for r in rows[1:] if len(r) == len(head) and int(r[0]) <= self.step]
        except (ValueError, csv.Error) as e:
            raise FileError(f"cannot resume: the training log {log} is damaged ({e}); restore it, or delete it "
                            "(the checkpoint is intact; rows before the resume are then lost)") from None
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(keep)
        atomic_write(log, lambda tmp: tmp.write_text(buf.getvalue()), run_file=True)

    def _plot(self) -> None:
        """Redraw the loss curve (``plot``, rank 0) from ``log.csv``."""
        if self.plot is not None and self.dist.is_main and (self.out / "log.csv").is_file():
            self.plot(self.out)

    def _log(self, row: dict) -> None:
        """Append a row to ``log.csv`` (and TensorBoard scalars when enabled); rank 0 only."""
        if not self.dist.is_main:
            return
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"train/{k}", v, row["step"])
        log = self.out / "log.csv"
        new = not log.is_file()
        # a log begun by an older version keeps its columns (a resumed run's rows must match its header)
        try:
            fields = list(row)
            if not new:
                with log.open(newline="") as f:
                    fields = next(csv.reader([f.readline()]), None) or fields
            with log.open("a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow(row)
        except OSError as e:
            if new:  # a log this call created and could not fill (a full disk) is not left behind half-written
                with contextlib.suppress(OSError):
                    log.unlink()
            raise FileError(f"cannot write {log}: {cause(e)}") from None

    # --- one step ------------------------------------------------------------------------------------------
    def _batch(self) -> tuple[Tensor, Tensor | None]:
        """This rank's shard of the next global batch of ``train.batch`` examples (all of it for 1 process)."""
        if self.streamed:
            return self._streamed_batch()
        b, sh, g = int(self.settings.batch), self._shard, self.data_gen
        idx = torch.randint(0, len(self.data), (b,), generator=g)
        x = self.data.x[idx]
        if self.settings.flip and x.ndim == 4:
            flip = torch.rand(b, generator=g) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        y = None
        if self.conditional:
            y = self.data.y[idx][sh].to(self.device)
        return x[sh].to(self.device), y

    def _streamed_batch(self) -> tuple[Tensor, Tensor | None]:
        """The next micro-batch of the image folder's stream, started at the current step (data.folder)."""
        t = self.settings
        if self._stream is None:
            lock = None
            if self.lock is not None and self.lock.fd is not None:
                st = os.fstat(self.lock.fd)
                lock = (self.lock.fd, st.st_dev, st.st_ino)
            self._stream = stream(self.data, batch=int(t.batch), accum=int(t.accum), seed=int(t.seed),
                                  start=self.step, shard=self._shard, flip=bool(t.flip), workers=int(t.workers),
                                  worker_init=functools.partial(_worker_init, lock),
                                  pin_memory=self.device.type == "cuda")
        x, y = next(self._stream)
        return x.to(self.device), (y.to(self.device) if self.conditional else None)

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()  # stops the workers
            self._stream = None

    def train_step(self) -> tuple[float, float]:
        """One optimizer step (with accumulation); returns (loss, grad norm)."""
        first = self._batch()  # before the step starts: a bad image here leaves a whole-step state
        self._in_step = True
        t = self.settings
        lr = lr_at(self.step, t)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.zero_grad(set_to_none=True)
        total = 0.0
        accum = int(t.accum)
        for i in range(accum):
            x0, y = first if i == 0 else self._batch()
            # DDP all-reduces the gradients on the last micro-batch only
            with self.ddp.no_sync() if self.ddp is not None and i < accum - 1 else contextlib.nullcontext():
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
                    loss = self.loss_fn(self.fwd_net, x0, cond=y, generator=self.gen)
                (loss / accum).backward()
            loss = dist_mod.all_mean(loss.detach())  # every rank sees the same value (and the same NaN)
            if not torch.isfinite(loss):
                raise RuntimeError(f"loss is {loss.item()} at step {self.step}: training diverged "
                                   f"(last checkpoint kept in {self.out}); lower train.lr or check the data")
            total += loss.item() / accum
        gn = torch.nn.utils.clip_grad_norm_(self.net.parameters(), float(t.clip) if t.clip else math.inf)
        if not torch.isfinite(gn):
            raise RuntimeError(f"gradient norm is {gn.item()} at step {self.step}: training diverged")
        self.opt.step()
        ema_update(self.ema, self.net, ema_decay(self.step, float(t.ema), bool(t.ema_warmup)))
        self.step += 1
        self._in_step = False
        return total, float(gn)

    # --- the loop ------------------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> dict:
        """Train until ``train.steps`` (or ``stop_after`` more steps); checkpoint periodically and at the end.
        SIGINT (Ctrl-C) and SIGTERM finish the current step and write a checkpoint before stopping
        (:class:`Interrupted`), so the same command resumes; the folder is given back when this returns.
        ``train.threads > 0`` sets torch's intra-op threads while it trains; the caller's count is restored after."""
        if self.lock is not None:
            self.lock.acquire()
        threads = torch.get_num_threads()
        if self.settings.threads > 0:
            torch.set_num_threads(self.settings.threads)
        try:
            return self._run(stop_after)
        finally:
            self._end_stream()
            torch.set_num_threads(threads)
            self.close()

    def _run(self, stop_after: int | None) -> dict:
        t = self.settings
        total = int(t.steps)
        end = total if stop_after is None else min(total, self.step + stop_after)
        self.net.train()
        start, t0, losses = self.step, time.time(), []
        bar = tqdm(total=end, initial=self.step, disable=not (self.progress and self.dist.is_main), desc="train",
                   dynamic_ncols=True)
        signum = signal.SIGINT
        try:
            with _deferred_signals(enabled=not self.dist.enabled) as interrupted:
                self._loop(end, bar, losses, t0, interrupted)
                if interrupted():
                    signum = interrupted()
                    raise KeyboardInterrupt
        except BadImageError as e:
            bar.close()
            if self._in_step or self.step == start or self.dist.enabled:
                raise
            self._end_stream()
            self.save()  # the state after the last whole step: nothing is lost
            raise BadImageError(f"{e}; checkpoint saved at step {self.step}; fix or remove the file (or set "
                                "data.on_bad_image=skip) and run the same command to resume") from None
        except Exception:
            bar.close()  # the error message starts on a line of its own
            raise
        except KeyboardInterrupt as e:
            bar.close()
            signum = getattr(e, "signum", signum)
            name = signal.Signals(signum).name
            if self._in_step:  # stopped inside a step: its state is partial, the last checkpoint stands
                raise Interrupted(f"interrupted during step {self.step + 1} ({name}); the last checkpoint in "
                                  f"{self.out} is kept; run the same command to resume", signum) from None
            self.save(gather=False)  # other ranks may already be gone: no collective here
            raise Interrupted(f"interrupted at step {self.step} ({name}); checkpoint saved in {self.out}; "
                              "run the same command to resume", signum) from None
        bar.close()
        self.save()
        self._plot()
        if self.tb is not None:
            self.tb.close()
        return {"step": self.step, "steps_run": self.step - start, "seconds": time.time() - t0, **self.fast_path,
                "loss": sum(losses[-50:]) / max(len(losses[-50:]), 1) if losses else float("nan"),
                "out": str(self.out)}

    def _loop(self, end: int, bar, losses: list[float], t0: float, interrupted: Callable[[], int]) -> None:
        """Steps until ``end``; returns early, at a step boundary, once ``interrupted()`` (a deferred Ctrl-C)."""
        t = self.settings
        while self.step < end and not interrupted():
            loss, gn = self.train_step()
            losses.append(loss)
            self._pending.append(loss)
            bar.update(1)
            if self.step % int(t.log_every) == 0 or self.step == end:
                # the mean over the interval, including its steps before a resume
                avg = sum(self._pending) / len(self._pending)
                if self.step % int(t.log_every) == 0:
                    self._pending = []
                row = {"step": self.step, "loss": avg, "lr": lr_at(self.step - 1, t), "grad_norm": gn,
                       "seconds": round(time.time() - t0, 3)}
                if self.validate is not None and self.dist.is_main:
                    row["val_loss"] = float(self.validate(self.ema))
                bar.set_postfix(loss=f"{avg:.4f}", **({"val": f"{row['val_loss']:.4f}"} if "val_loss" in row else {}))
                self._log(row)
            if int(t.ckpt_every) and self.step % int(t.ckpt_every) == 0:
                self.save()
                self._plot()
            if self.preview and t.sample_every and self.step % t.sample_every == 0 and self.dist.is_main:
                self.preview(self.ema, self.out / "samples" / f"step_{self.step:07d}.png")
