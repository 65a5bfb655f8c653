"""Train a run from its config, in this process or as one rank under torchrun.

:func:`build_trainer` turns a config into the plain objects the trainer takes: the network, a loss closure
(process, parameterization and label dropout inside), the training split, :class:`TrainSettings`, the JSON to
write as ``config.json`` and a preview writer; the trainer itself knows no model kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from torchdiffusion.data.augment import augment
from torchdiffusion.data.datasets import Dataset, examples, split_dataset
from torchdiffusion.evaluation.viz import save_loss_curve
from torchdiffusion.runs.build import RunModel, augment_probability, build_model, net_of, run_kind, with_net
from torchdiffusion.runs.config import config_binding, with_defaults
from torchdiffusion.runs.generate import generate_to_file
from torchdiffusion.runs.latent import dataset_from_config, write_autoencoder_samples
from torchdiffusion.runs.losses import get_loss
from torchdiffusion.runs.text import is_text_run, load_tokenizer, text_info, tokenize_data
from torchdiffusion.training.checkpoint import load_json
from torchdiffusion.training.distributed import barrier, init_from_env
from torchdiffusion.training.trainer import Preview, Trainer, TrainSettings

MODEL_SECTIONS = ("data", "process", "model", "loss")
RESUMABLE_DATA_KEYS = ("on_bad_image",)  # may change between a run and its resume (the data drawn stay the same)
RESUMABLE_MODEL_KEYS = ("checkpointing",)  # memory, not weights: may change between a run and its resume


def train_dataset(cfg: dict) -> Dataset:
    """The training split of a run's data (``data.holdout`` stays unseen)."""
    return training_data(cfg)[0]


def training_data(cfg: dict, dataset: Dataset | None = None, tokenizer=None) -> tuple[Dataset, object]:
    """The training split of a run's data (``dataset`` given: all of it is for training) and, for a text run, the
    tokenizer (``tokenizer``, or one trained on the training captions) whose token ids are the data's ``y``
    (:mod:`torchdiffusion.runs.text`); None otherwise."""
    train_part, _, tokenizer = data_splits(cfg, dataset, tokenizer)
    return train_part, tokenizer


def data_splits(cfg: dict, dataset: Dataset | None = None, tokenizer=None) -> tuple[Dataset, Dataset | None, object]:
    """``(training split, held-out split or None, tokenizer)`` of a run's data (:func:`training_data`)."""
    holdout = 0.0 if dataset is not None else float(cfg["data"].get("holdout", 0.0))
    full = dataset if dataset is not None else dataset_from_config(cfg["data"])
    if is_text_run(cfg):
        full, tokenizer = tokenize_data({**cfg, "data": {**cfg["data"], "holdout": holdout}}, full, tokenizer)
    else:
        tokenizer = None
    return (*split_dataset(full, holdout), tokenizer)


PREVIEW_MAX = 64  # samples in a preview grid (train.sample_every)
VAL_EXAMPLES = 512  # held-out examples the validation loss averages over (the first of the held-out split)


def validator(model: RunModel, cfg: dict, heldout: Dataset | None, conditional: bool,
              batch: int) -> Callable[[nn.Module], float] | None:
    """``validate(net) -> float`` for the trainer: the run's loss (without label dropout or augmentation) of
    ``net`` in eval mode on the first :data:`VAL_EXAMPLES` held-out examples, with noise and times from a
    generator seeded afresh each call, so that it is a function of the weights alone (a curve that moves only
    when the model does). None when nothing is held out (``data.holdout=0``)."""
    if heldout is None or len(heldout) == 0:
        return None
    val = examples(heldout, VAL_EXAMPLES)
    fn, lcfg = get_loss(cfg["loss"]["name"], run_kind(cfg)), dict(cfg["loss"])
    lcfg.update({"_levels": val.levels, "_value_range": list(val.value_range)})

    def validate(net: nn.Module) -> float:
        was = net.training
        net.eval()
        device = next(net.parameters()).device
        g, total = torch.Generator().manual_seed(0), 0.0
        try:
            for i in range(0, len(val), batch):
                x = val.x[i: i + batch].to(device)
                y = val.y[i: i + batch].to(device) if conditional and val.y is not None else None
                total += float(fn(with_net(model, net), x, cond=y, generator=g, cfg=lcfg).detach()) * len(x)
        finally:
            net.train(was)
        return total / len(val)
    return validate


def plot_losses(out: Path) -> Path:
    """``RUN/loss.png`` from ``RUN/log.csv`` (training and held-out loss against the step)."""
    return save_loss_curve(out / "log.csv", out / "loss.png")


def loss_closure(model: RunModel, cfg: dict, data: Dataset | None = None):
    """``loss(net, x0, *, cond, generator)`` for the trainer: the configured loss of ``model`` with ``net`` in
    place of its network (DDP / compiled wrappers), after dropping each label with probability
    ``loss.p_uncond`` (classifier-free guidance training: ``-1`` is the null class). The data's quantization
    levels and value range go along (for ``loss.dequantize`` and the discretized decoder). With ``data.augment``
    each batch is augmented first and the network sees the labels of what each image underwent
    (:mod:`torchdiffusion.data.augment`)."""
    fn, lcfg = get_loss(cfg["loss"]["name"], run_kind(cfg)), dict(cfg["loss"])
    if data is not None:
        lcfg.update({"_levels": data.levels, "_value_range": list(data.value_range)})
    p_uncond = float(lcfg.get("p_uncond", 0.0))
    p_augment = augment_probability(cfg)

    def loss(net: nn.Module, x0: Tensor, *, cond: Tensor | None, generator: torch.Generator) -> Tensor:
        cond = drop_labels(cond, p_uncond, generator)
        if p_augment > 0:
            x0, labels = augment(x0, p_augment, generator)
            net = AugmentLabelled(net, labels)
        return fn(with_net(model, net), x0, cond=cond, generator=generator, cfg=lcfg)
    return loss


class AugmentLabelled(nn.Module):
    """``module`` called with the augmentation ``labels`` of the batch it is training on (``augment=labels``):
    the wrapper the loss sees in place of the network while ``data.augment`` is on. The learned schedule and
    dequantizer stay reachable through ``.module`` (``parameterization.denoiser.unwrap``)."""

    def __init__(self, module: nn.Module, labels: Tensor):
        super().__init__()
        self.module, self.labels = module, labels

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if x.shape[0] != self.labels.shape[0]:
            raise ValueError(f"the loss called the network on a batch of {x.shape[0]}, but the augmentation "
                             f"labels are for {self.labels.shape[0]} images")
        return self.module(x, t, augment=self.labels) if cond is None else self.module(x, t, cond,
                                                                                     augment=self.labels)


def drop_labels(y: Tensor | None, p: float, generator: torch.Generator | None = None) -> Tensor | None:
    """Each label replaced by the null class ``-1`` with probability ``p`` (T-CFG-2); a condition sequence
    ``(B, L)`` (the token ids of a caption) is replaced whole by ``-1`` s, which the text encoder reads as the empty
    prompt (:mod:`torchdiffusion.nets.text`)."""
    if y is None or p <= 0:
        return y
    drop = torch.rand(y.shape[0], generator=generator).to(y.device) < p
    return y.masked_fill(drop.reshape(-1, *[1] * (y.ndim - 1)), -1)


def run_info(cfg: dict, data: Dataset) -> dict:
    """The ``run`` section of ``config.json``: what loading and sampling need to know about the data."""
    ncls = data.num_classes if cfg["data"].get("conditional") else None
    return {"data_shape": list(data.shape), "num_classes": ncls, "levels": data.levels,
            "value_range": list(data.value_range), "data_name": data.name,
            **({"latent": data.meta["latent"]} if "latent" in data.meta else {})}


def previewer(cfg: dict, model: RunModel, data: Dataset) -> Preview | None:
    """``preview(ema_net, path)`` for the trainer: a sample grid (diffusion and latent runs), prior samples and
    reconstructions (autoencoders), or None (a classifier has nothing to draw)."""
    kind = run_kind(cfg)
    if kind == "classifier":
        return None

    def preview(ema_net: nn.Module, path: Path) -> Path:
        if kind == "autoencoder":
            return write_autoencoder_samples(ema_net.eval(), cfg, path.parent.parent, out=path)[0]
        n = min(int(cfg["sample"].get("n", 64)), PREVIEW_MAX)
        return generate_to_file(with_net(model, ema_net).eval(), cfg, cfg["run"], path, data=data, n=n)
    return preview


def build_trainer(cfg: dict, out: str | Path, *, dataset: Dataset | None = None, progress: bool = True,
                  resume: bool = True, force: bool = False) -> Trainer:
    """The trainer of run ``cfg`` in folder ``out``: resuming its checkpoint when ``resume``; a folder that holds
    another run (or a model without a training state) is refused unless ``force``, which starts afresh."""
    out = Path(out)
    settings = TrainSettings.from_dict({**cfg["train"], "flip": bool(cfg["data"].get("flip", False))})
    resuming = resume and not force and (out / "train_state.safetensors").is_file()
    if resuming:
        saved = with_defaults(load_json(out / "config.json"))
        def same(k: str) -> bool:
            a, b = dict(saved.get(k) or {}), dict(cfg.get(k) or {})
            for key in {"data": RESUMABLE_DATA_KEYS, "model": RESUMABLE_MODEL_KEYS}.get(k, ()):
                a.pop(key, None), b.pop(key, None)
            return a == b
        diff = [k for k in MODEL_SECTIONS if not same(k)]
        if diff:
            raise ValueError(f"{out} holds a run with a different {'/'.join(diff)} config; use another --out, or "
                             "--force to overwrite that run")
    # a resumed text run keeps the token ids its weights were trained with (its tokenizer.json)
    data, heldout, tokenizer = data_splits(cfg, dataset, load_tokenizer(out, saved) if resuming else None)
    conditional = bool(cfg["data"].get("conditional")) or tokenizer is not None  # captions: cond = token ids
    if conditional and data.y is None:
        raise ValueError(f"data.conditional=true but dataset {data.name!r} has no labels")
    torch.manual_seed(int(settings.seed))  # the initial weights follow train.seed
    model = build_model(cfg, data.shape, data.num_classes if conditional else None)
    config = {**cfg, "run": {**run_info(cfg, data), **text_info(tokenizer)}}
    tr = Trainer(net_of(model), loss_closure(model, cfg, data), data, settings, out, config=config,
                 preview=previewer(config, model, data), conditional=conditional, progress=progress, resume=resume,
                 force=force, weights_meta=config_binding(config),
                 validate=validator(model, cfg, heldout, conditional, int(settings.batch)), plot=plot_losses)
    if tokenizer is not None:  # written once the trainer holds the folder (and has cleared it with force)
        tokenizer.save(out / "tokenizer.json")
    tr.model = model  # the parameterization around the trained net (for callers; the trainer never reads it)
    return tr


def ema_model(tr: Trainer) -> RunModel:
    """The EMA network of a trainer built by :func:`build_trainer`, in the run's model object."""
    return with_net(tr.model, tr.ema).eval()


def train(cfg: dict, out: str | Path, *, dataset: Dataset | None = None, progress: bool = True, resume: bool = True,
          stop_after: int | None = None, force: bool = False) -> dict:
    """Train (or resume) the run ``cfg`` into ``out``; returns a summary dict (``force``: see
    :func:`build_trainer`)."""
    return build_trainer(cfg, out, dataset=dataset, progress=progress, resume=resume, force=force).run(stop_after)


def maybe_distributed_train(cfg: dict, out: str | Path, *, progress: bool = True, resume: bool = True,
                            force: bool = False):
    """Train in this process; under torchrun (``WORLD_SIZE`` > 1) join the process group first, show progress
    on rank 0 only, and leave the group at the end. Returns the summary on rank 0 and ``None`` elsewhere."""
    started = not (dist.is_available() and dist.is_initialized())
    info = init_from_env(cfg["train"].get("device", "auto"))
    try:
        res = train(cfg, out, progress=progress and info.is_main, resume=resume, force=force)
        barrier()
    finally:
        if info.enabled and started:
            dist.destroy_process_group()
    return res if info.is_main else None
