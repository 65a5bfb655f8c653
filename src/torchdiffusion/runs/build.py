"""Build processes, networks and models from a config, and load trained runs."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from torchdiffusion._tensor import resolve_device
from torchdiffusion.data.augment import AUGMENT_DIM
from torchdiffusion.nets import NETS
from torchdiffusion.nets.autoencoder import Autoencoder
from torchdiffusion.nets.fast import enable_checkpointing
from torchdiffusion.nets.likelihood import LikelihoodNet, VariationalDequantizer
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.guidance import Classifier
from torchdiffusion.processes import Process, process_from_config
from torchdiffusion.runs.config import check_binding, check_values, with_defaults
from torchdiffusion.training.checkpoint import load_json, load_tensors

_PROCESS_KEYS = {
    "ddpm": ("betas", "T", "beta_start", "beta_end", "rescale_zero_snr"),
    "vp": ("beta_min", "beta_max", "t_min"),
    "subvp": ("beta_min", "beta_max", "t_min"),
    "ve": ("sigma_min", "sigma_max", "t_min"),
    "edm": ("sigma_min", "sigma_max"),
    "learned": ("gamma_min", "gamma_max", "schedule_hidden"),
}


def build_process(pcfg: dict) -> Process:
    """A process from the ``process`` section (keys that do not apply to it are ignored; ``None`` = default)."""
    name = str(pcfg.get("name", "ddpm")).lower()
    if name not in _PROCESS_KEYS:
        raise ValueError(f"unknown process {name!r}; allowed: {', '.join(_PROCESS_KEYS)}")
    kw = {k: pcfg[k] for k in _PROCESS_KEYS[name] if pcfg.get(k) is not None}
    return process_from_config({"name": name, **kw})


def default_time_scale(process: Process, precond: str) -> float:
    """What the net's sinusoidal embedding multiplies its time input by: DDPM timesteps as they are,
    ``t`` in [0, 1] and EDM's ``c_noise = ln(s)/4`` times 1000."""
    return 1.0 if process.discrete and precond == "none" else 1000.0


def build_net(mcfg: dict, data_shape: tuple[int, ...], process: Process, num_classes: int | None,
              augment_dim: int = 0) -> nn.Module:
    """The network of the ``model`` section for data of ``data_shape`` (``augment_dim``: the length of the
    augmentation labels it takes, 0 for none; U-Net only)."""
    name = mcfg.get("net", "mlp")
    if name not in NETS:
        raise ValueError(f"unknown net {name!r}; allowed: {', '.join(NETS)}")
    if augment_dim and name not in ("unet", "unet_text"):
        raise ValueError(f"data.augment needs model.net=unet (its labels enter the U-Net's embedding), got {name!r}")
    ts = mcfg.get("time_scale") or default_time_scale(process, mcfg.get("precond", "none"))
    if name == "mlp":
        if len(data_shape) != 1:
            raise ValueError(f"net 'mlp' needs vector data, got examples of shape {data_shape}; use net=unet")
        return NETS["mlp"](dim=data_shape[0], hidden=int(mcfg["hidden"]), depth=int(mcfg["depth"]),
                           emb_dim=int(mcfg["emb_dim"]), time_scale=ts, num_classes=num_classes)
    if name == "unet":
        if len(data_shape) != 3:
            raise ValueError(f"net 'unet' needs image data (C, H, W), got examples of shape {data_shape}")
        C, H, _ = data_shape
        ch = int(mcfg["channels"])
        return NETS["unet"](in_channels=C, image_size=H, channels=ch, channel_mult=tuple(mcfg["channel_mult"]),
                            num_res_blocks=int(mcfg["num_res_blocks"]),
                            attn_resolutions=tuple(mcfg["attn_resolutions"]), dropout=float(mcfg["dropout"]),
                            num_classes=num_classes, time_scale=ts, groups=min(32, ch),
                            num_heads=int(mcfg.get("num_heads", 1)),
                            fourier_features=tuple(mcfg.get("fourier_features") or ()), augment_dim=augment_dim)
    if name in ("autoencoder", "vae"):  # (denoising) autoencoder / VAE (nets/autoencoder.py, issue 9)
        if len(data_shape) != 3:
            raise ValueError(f"net {name!r} needs image data (C, H, W), got examples of shape {data_shape}")
        ch = int(mcfg["channels"])
        return NETS[name](in_channels=data_shape[0], image_size=data_shape[1], channels=ch,
                          channel_mult=tuple(mcfg["channel_mult"]), num_res_blocks=int(mcfg["num_res_blocks"]),
                          latent_channels=int(mcfg["latent_channels"]), latent_dim=mcfg.get("latent_dim"),
                          kind="vae" if name == "vae" else "ae", decoder_var=mcfg["decoder_var"],
                          decoder_std=float(mcfg["decoder_std"]), groups=min(32, ch))
    if name == "unet_xattn":  # class conditioning through tau(y) and cross-attention (latent diffusion)
        if len(data_shape) != 3 or not num_classes:
            raise ValueError("net 'unet_xattn' needs labelled image (or latent) data: data.conditional=true and "
                             f"(C, H, W) examples, got shape {data_shape} with num_classes={num_classes} "
                             "(for unconditional data use model.net=unet)")
        C, H, _ = data_shape
        ch = int(mcfg["channels"])
        return NETS[name](num_classes, tokens=int(mcfg["cond_tokens"]), in_channels=C, image_size=H, channels=ch,
                          channel_mult=tuple(mcfg["channel_mult"]), num_res_blocks=int(mcfg["num_res_blocks"]),
                          attn_resolutions=tuple(mcfg["attn_resolutions"]), dropout=float(mcfg["dropout"]),
                          time_scale=ts, groups=min(32, ch), num_heads=int(mcfg.get("num_heads", 1)))
    if name == "unet_text":  # text prompts: a transformer text encoder + cross-attention (nets/text.py, issue 30)
        if len(data_shape) != 3:
            raise ValueError(f"net 'unet_text' needs image (or latent) data (C, H, W), got examples of shape "
                             f"{data_shape}")
        if num_classes:
            raise ValueError("net 'unet_text' is conditioned on captions, not class labels: set "
                             "data.conditional=false")
        C, H, _ = data_shape
        ch = int(mcfg["channels"])
        return NETS[name](int(mcfg["text_vocab"]), int(mcfg["text_length"]), text_dim=int(mcfg["text_dim"]),
                          text_layers=int(mcfg["text_layers"]), text_heads=int(mcfg["text_heads"]), in_channels=C,
                          image_size=H, channels=ch, channel_mult=tuple(mcfg["channel_mult"]),
                          num_res_blocks=int(mcfg["num_res_blocks"]), attn_resolutions=tuple(mcfg["attn_resolutions"]),
                          dropout=float(mcfg["dropout"]), time_scale=ts, groups=min(32, ch),
                          num_heads=int(mcfg.get("num_heads", 1)), augment_dim=augment_dim)
    if name == "classifier":  # p_phi(y | x_t, t) for classifier guidance (nets/classifier.py)
        if len(data_shape) != 3 or not num_classes:
            raise ValueError("net 'classifier' needs labelled image data: data.conditional=true and (C, H, W) "
                             f"examples, got shape {data_shape} with num_classes={num_classes}")
        ch = int(mcfg["channels"])
        return NETS["classifier"](in_channels=data_shape[0], num_classes=num_classes, channels=ch,
                                  channel_mult=tuple(mcfg["channel_mult"]), num_res_blocks=int(mcfg["num_res_blocks"]),
                                  dropout=float(mcfg["dropout"]), time_scale=ts, groups=min(32, ch))
    if name == "energy":
        if len(data_shape) != 1:
            raise ValueError(f"net 'energy' needs vector data, got examples of shape {data_shape}")
        return NETS["energy"](dim=data_shape[0], hidden=int(mcfg["hidden"]), depth=int(mcfg["depth"]),
                              emb_dim=int(mcfg["emb_dim"]), time_scale=ts, num_classes=num_classes,
                              prediction=mcfg.get("prediction", "score"))
    raise ValueError(f"net {name!r} has no builder for data of shape {data_shape}")  # pragma: no cover


AUTOENCODER_NETS = ("autoencoder", "vae")
RUN_KINDS = ("diffusion", "latent", "autoencoder", "classifier")
RunModel = Denoiser | Classifier | Autoencoder


def run_kind(cfg: dict) -> str:
    """The kind of a run (docs/design.md section 5): ``autoencoder`` (model.net autoencoder / vae), ``classifier``
    (a noise-conditional classifier for guidance), ``latent`` (diffusion on an autoencoder's codes) or
    ``diffusion``."""
    net = cfg.get("model", {}).get("net")
    if net in AUTOENCODER_NETS:
        return "autoencoder"
    if net == "classifier":
        return "classifier"
    data = cfg.get("data", {})
    latent = (cfg.get("run") or {}).get("latent") or data.get("autoencoder") or data.get("name") == "latent"
    return "latent" if latent else "diffusion"


def wrap_net(cfg: dict, net: nn.Module, process: Process) -> RunModel:
    """The model object of the run's kind around ``net``: a :class:`Denoiser` (diffusion, latent), a
    :class:`Classifier` (classifier) or the :class:`Autoencoder` itself."""
    kind, m = run_kind(cfg), cfg["model"]
    if kind == "autoencoder":
        return net
    if kind == "classifier":
        return Classifier(net, process)
    return Denoiser(net, process, prediction=m["prediction"], precond=m["precond"], sigma_data=m["sigma_data"])


def net_of(model: RunModel) -> nn.Module:
    """The trainable network inside a run's model object."""
    return model if isinstance(model, Autoencoder) else model.net


def with_net(model: RunModel, net: nn.Module) -> RunModel:
    """The model object with ``net`` in place of its network (an EMA copy, a DDP or compiled wrapper)."""
    return net if isinstance(model, Autoencoder) else model.with_net(net)


def augment_probability(cfg: dict) -> float:
    """``data.augment``: the probability of each augmentation operation (0 = off; data.augment module doc)."""
    p = cfg["data"].get("augment") or 0.0
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"data.augment must be a probability in [0, 1] (0 = no augmentation), got {p!r}")
    return float(p)


def augment_dim(cfg: dict) -> int:
    """The length of the augmentation labels the network takes: ``AUGMENT_DIM`` with ``data.augment > 0``, else 0."""
    return AUGMENT_DIM if augment_probability(cfg) > 0 else 0


def build_model(cfg: dict, data_shape: tuple[int, ...], num_classes: int | None = None) -> RunModel:
    """Process + network (+ parameterization for diffusion runs) from a full config."""
    process = build_process(cfg["process"])
    net = build_net(cfg["model"], tuple(data_shape), process, num_classes, augment_dim(cfg))
    if cfg["model"].get("checkpointing") and not enable_checkpointing(net):
        raise ValueError(f"model.checkpointing=true needs a U-Net (model.net unet, unet_xattn or unet_text); "
                         f"model.net={cfg['model'].get('net')!r} has none")
    schedule = getattr(process, "schedule", None)
    deq = cfg["model"].get("dequantizer")
    if run_kind(cfg) in ("diffusion", "latent") and (isinstance(schedule, nn.Module) or deq):
        # a learned schedule and a variational dequantizer train with the network, so one module holds them all
        # (nets.LikelihoodNet: the trainer optimizes, averages and saves it); the process reads the schedule there
        if deq and len(data_shape) != 3:
            raise ValueError(f"model.dequantizer=true needs image data (C, H, W), got examples of shape {data_shape}")
        net = LikelihoodNet(net, schedule if isinstance(schedule, nn.Module) else None,
                            VariationalDequantizer(int(data_shape[0])) if deq else None)
    return wrap_net(cfg, net, process)


def load_run(run: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> tuple[RunModel, dict]:
    """Load a trained run folder: its model object (:func:`wrap_net`; EMA weights by default) and its config."""
    run = Path(run)
    if not run.is_dir():
        raise ValueError(f"run folder not found: {run}")
    device = resolve_device(device)
    cfg = with_defaults(load_json(run / "config.json"))
    info = cfg.get("run")
    if not isinstance(info, dict) or not info.get("data_shape"):
        raise ValueError(f"{run}/config.json has no 'run' section: not a training run folder")
    try:
        check_values(cfg)
    except ValueError as e:
        raise ValueError(f"{run}/config.json: {e}") from None
    model = build_model(cfg, tuple(info["data_shape"]), info.get("num_classes"))
    weights = run / ("ema.safetensors" if ema else "model.safetensors")
    tensors, meta = load_tensors(weights)
    if not check_binding(cfg, meta, weights):
        # (weights written before the binding existed: loaded, with a warning, so that old runs stay usable)
        warnings.warn(f"{weights} carries no record of the config it was trained with (written before that record "
                      "existed), so its config.json cannot be checked against it; resume training or save_pretrained "
                      "to add one", stacklevel=2)
    try:
        net_of(model).load_state_dict(tensors)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {weights} does not match the config's network: {str(e)[:200]}") from None
    return model.to(device).eval(), cfg


def load_classifier(run: str | Path, ema: bool = True,
                    device: str | torch.device = "cpu") -> tuple[Classifier, dict]:
    """Load a noise-conditional classifier run (``model.net = "classifier"``, e.g. preset ``classifier_digits``):
    a :class:`Classifier` whose ``.net(x, t)`` gives the logits of ``p_phi(y | x_t, t)`` and whose
    ``.process`` is the process it was trained on (for
    :class:`torchdiffusion.parameterization.guidance.ClassifierGuidance`)."""
    model, cfg = load_run(run, ema=ema, device=device)
    if cfg["model"].get("net") != "classifier":
        raise ValueError(f"{run} is not a classifier run (model.net={cfg['model'].get('net')!r}); "
                         "train one with the classifier_digits preset")
    return model, cfg
