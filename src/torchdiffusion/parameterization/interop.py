"""diffusers interoperability: read a diffusers scheduler (an object, its config dict, a ``scheduler_config.json``
or a model folder) as one of our processes, wrap a diffusers ``UNet2DModel`` (or any ``model(x, t).sample``)
as a torchdiffusion network, and write our DDPM schedule back as a diffusers scheduler config.

diffusers itself is optional (``pip install torchdiffusion[diffusers]``): nothing here imports it. Families
(docs/design.md section 2 conventions):

- DDPM-type (``DDPMScheduler``, ``DDIMScheduler``, ``PNDMScheduler``, ``DPMSolver*``, ``Euler*``, ``Heun``,
  ``LMS``, ``KDPM2*``, ``UniPC``, ``DEIS``, ``SASolver``, ``LCM``, ``TCD``, ``RePaint``, ``UnCLIP``, ``CogVideoX*``):
  our :class:`DDPM` with the same ``alphas_cumprod``; the time is the training timestep ``0 .. T-1`` that
  diffusers' UNets take, so ``td.sample(denoiser_from_diffusers(unet, sch), x_T, "ddim", 10, grid="leading")``
  walks the same timesteps as ``DDIMScheduler`` with ``timestep_spacing="leading"``.
- Score-SDE VE (``ScoreSdeVeScheduler``): our :class:`VE`. diffusers writes ``sigma(t) = s_min (s_max/s_min)^t``;
  our VE is the exact marginal of the same SDE, ``sigma(t) = sqrt(s(t)^2 - s_min^2)`` (T-SDE-5), so the same
  noise levels sit at other times: ``t_min`` is our time of diffusers' smallest level ``s(sampling_eps)``, and a
  diffusers level ``s`` is our time ``times_from_ve_sigmas(process, s)``. The network is given ``sigma`` (as
  diffusers' ``ScoreSdeVePipeline`` does) and predicts the score.
- Score-SDE VP (``ScoreSdeVpScheduler``): our :class:`VP` (same ``beta_min``, ``beta_max``, ``t_min = sampling_eps``).
- EDM (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): our :class:`EDM` (``t = sigma``) with EDM
  preconditioning (``c_noise = ln(sigma)/4``, B-9); ``prediction_type="v_prediction"`` is the same with ``c_out``
  negated. ``CMStochasticIterativeScheduler``, ``CosineDPMSolverMultistepScheduler`` and ``KarrasVeScheduler``
  share the EDM process but not its preconditioning: their process is read, a denoiser is refused.
- Flow matching (``FlowMatch*`` and every scheduler with flow sigmas or ``flow_prediction``) is refused: its
  interpolation ``x_t = (1 - t) x0 + t eps`` and velocity target are not a diffusion process of ours.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchdiffusion.nets.unet import AttentionBlock, ResBlock, UNet
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.processes import DDPM, EDM, VE, VP, Process

_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid", "laplace")
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DDPM_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}

DDPM_SCHEDULERS = frozenset({
    "DDPMScheduler", "DDPMParallelScheduler", "DDIMScheduler", "DDIMInverseScheduler", "DDIMParallelScheduler",
    "PNDMScheduler", "DPMSolverMultistepScheduler", "DPMSolverMultistepInverseScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler", "SASolverScheduler",
    "LCMScheduler", "TCDScheduler", "RePaintScheduler", "UnCLIPScheduler", "CogVideoXDDIMScheduler",
    "CogVideoXDPMScheduler",
})
VE_SCHEDULERS = frozenset({"ScoreSdeVeScheduler"})
VP_SCHEDULERS = frozenset({"ScoreSdeVpScheduler"})
EDM_SCHEDULERS = frozenset({"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"})
# the EDM process (x = x0 + sigma eps) with another network parameterization: process only, no denoiser
EDM_PROCESS_ONLY = {"CMStochasticIterativeScheduler": "a consistency model's boundary-condition c_skip / c_out",
                    "CosineDPMSolverMultistepScheduler": "c_noise = atan(sigma) / (pi / 2)",
                    "KarrasVeScheduler": "its pipeline's input and output rescaling"}
_EDM_DEFAULTS = {"CMStochasticIterativeScheduler": (0.002, 80.0), "CosineDPMSolverMultistepScheduler": (0.3, 500.0),
                 "KarrasVeScheduler": (0.02, 100.0)}
FLOW_SCHEDULERS = frozenset({"FlowMapEulerDiscreteScheduler", "HeliosScheduler", "HeliosDMDScheduler",
                             "LTXEulerAncestralRFScheduler", "MiniMaxH3Scheduler", "PiflowScheduler"})
SUPPORTED = sorted(DDPM_SCHEDULERS | VE_SCHEDULERS | VP_SCHEDULERS | EDM_SCHEDULERS | set(EDM_PROCESS_ONLY))


def read_diffusers_config(source: Any) -> tuple[str | None, dict]:
    """``(class name or None, config dict)`` of a diffusers scheduler, its config (a dict, e.g.
    ``scheduler.config``), a ``scheduler_config.json`` file, a scheduler folder holding one, or a model folder
    with a ``scheduler/`` subfolder. ``None`` values are dropped (diffusers' "use the default")."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        candidates = [path] if path.is_file() else [path / "scheduler_config.json",
                                                    path / "scheduler" / "scheduler_config.json"]
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise ValueError(f"{path} is neither a scheduler_config.json nor a folder holding one (directly or in "
                             "scheduler/)")
        try:
            cfg = json.loads(found.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read {found}: {e}") from None
        if not isinstance(cfg, dict):
            raise ValueError(f"{found} does not hold a JSON object")
        name = cfg.get("_class_name")
    elif isinstance(source, Mapping):
        cfg, name = dict(source), source.get("_class_name")
    elif isinstance(getattr(source, "config", None), Mapping):
        cfg, name = dict(source.config), type(source).__name__
    else:
        raise TypeError("expected a diffusers scheduler, its config dict, a scheduler_config.json or a folder, "
                        f"got {type(source).__name__}")
    return (None if name is None else str(name)), {k: v for k, v in cfg.items() if v is not None}


def scheduler_family(source: Any) -> str:
    """``ddpm``, ``ve``, ``vp`` or ``edm`` for a diffusers scheduler (see :func:`read_diffusers_config`);
    a flow-matching or unknown scheduler is a one-line ValueError. A config without ``_class_name`` is read as
    DDPM-type (the keys every DDPM-type scheduler shares)."""
    return _family(*read_diffusers_config(source))


def _family(name: str | None, cfg: dict) -> str:
    flow = (name is not None and ("FlowMatch" in name or name in FLOW_SCHEDULERS)) or cfg.get("use_flow_sigmas") \
        or cfg.get("prediction_type") == "flow_prediction"
    if flow:
        raise ValueError(f"{name or 'this scheduler'} is flow matching (x_t = (1-t) x0 + t eps, velocity target), "
                         "not a diffusion process; supported: DDPM-type, score-SDE VE/VP and EDM schedulers")
    if name is None or name in DDPM_SCHEDULERS:
        return "ddpm"
    if name in VE_SCHEDULERS:
        return "ve"
    if name in VP_SCHEDULERS:
        return "vp"
    if name in EDM_SCHEDULERS or name in EDM_PROCESS_ONLY:
        return "edm"
    raise ValueError(f"unknown diffusers scheduler {name!r}; supported: {', '.join(SUPPORTED)}")


def _laplace_abar(t: float) -> float:
    """diffusers' ``laplace`` alpha-bar: log-SNR ``-sign(1/2 - t) log(1 - 2|1/2 - t| + 1e-6) / 2``, then
    ``abar = sqrt(sigmoid(lambda))`` as diffusers writes it."""
    lam = -0.5 * math.copysign(1.0, 0.5 - t) * math.log(1 - 2 * abs(0.5 - t) + 1e-6)
    return math.sqrt(math.exp(lam) / (1 + math.exp(lam)))


# The numeric scheduler keys we read, with what each may hold: (whole number?, low, low open?, high, high open?).
# A config outside them (``num_train_timesteps: 2.7``, a negative ``beta_min``) is refused with one line naming the
# key, never truncated or turned into a process with negative rates.
_SCHEDULER_RANGES = {
    "num_train_timesteps": (True, 2, False, None, False), "beta_start": (False, 0.0, True, 1.0, True),
    "beta_end": (False, 0.0, True, 1.0, True), "beta_min": (False, 0.0, False, None, False),
    "beta_max": (False, 0.0, True, None, False), "sampling_eps": (False, 0.0, True, 1.0, True),
    "sigma_min": (False, 0.0, True, None, False), "sigma_max": (False, 0.0, True, None, False),
    "snr_shift_scale": (False, 0.0, True, None, False),
}


def _scheduler_number(cfg: dict, key: str, default: float | int) -> float | int:
    """``cfg[key]`` (``default`` when absent or null), checked against :data:`_SCHEDULER_RANGES`."""
    v = cfg.get(key)
    if v is None:
        return default
    whole, lo, lo_open, hi, hi_open = _SCHEDULER_RANGES[key]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (not whole or float(v).is_integer()) and (v > lo if lo_open else v >= lo)
    ok = ok and (hi is None or (v < hi if hi_open else v <= hi))
    if not ok:
        kind = "a whole number" if whole else "a number"
        where = (f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}" if hi is not None
                 else f"{'>' if lo_open else '>='} {lo:g}")
        raise ValueError(f"diffusers scheduler config: {key} must be {kind} {where}, got {v!r}")
    return int(v) if whole else float(v)


def _ddpm_betas(cfg: dict, T: int) -> tuple[str, Tensor | None]:
    """A named schedule our :func:`~torchdiffusion.processes.make_betas` knows, or explicit betas (float64)."""
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten()
        if len(betas) != T:
            raise ValueError(f"trained_betas has {len(betas)} entries but num_train_timesteps is {T}")
        if not (torch.isfinite(betas).all() and (betas > 0).all() and (betas < 1).all()):
            raise ValueError("diffusers scheduler config: trained_betas must all lie in (0, 1)")
        return "given", betas
    kind = cfg["beta_schedule"]
    if kind not in _SCHEDULES:
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r}; allowed: {', '.join(_SCHEDULES)} "
                         "or trained_betas")
    b0, b1 = _scheduler_number(cfg, "beta_start", 0.0001), _scheduler_number(cfg, "beta_end", 0.02)
    if kind == "sigmoid":  # GeoDiff: sigmoid(linspace(-6, 6, T)) scaled into [beta_start, beta_end]
        return "given", torch.sigmoid(torch.linspace(-6, 6, T, dtype=torch.float64)) * (b1 - b0) + b0
    if kind == "laplace":  # betas_k = min(1 - abar((k+1)/T) / abar(k/T), 0.999)
        ab = torch.tensor([_laplace_abar(k / T) for k in range(T + 1)], dtype=torch.float64)
        return "given", (1 - ab[1:] / ab[:-1]).clamp(max=0.999)
    return kind, None


def _ddpm_process(name: str | None, cfg: dict) -> DDPM:
    cfg = {**_DDPM_DEFAULTS, **cfg}
    if name == "UnCLIPScheduler":  # UnCLIP takes only squaredcos_cap_v2
        cfg["beta_schedule"] = cfg.get("beta_schedule", "squaredcos_cap_v2")
    T = _scheduler_number(cfg, "num_train_timesteps", 1000)
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    kind, betas = _ddpm_betas(cfg, T)
    cog = name is not None and name.startswith("CogVideoX")
    shift = _scheduler_number(cfg, "snr_shift_scale", None) if cog and cfg.get("snr_shift_scale") is not None else None
    if shift is not None:  # CogVideoX: abar / (s + (1 - s) abar), i.e. the SNR divided by s
        ac = DDPM(betas=betas if betas is not None else ("cosine" if kind == "squaredcos_cap_v2" else kind), T=T,
                  beta_start=float(cfg["beta_start"]), beta_end=float(cfg["beta_end"]),
                  rescale_zero_snr=rescale).alphas_cumprod
        return DDPM(alphas_cumprod=ac / (float(shift) + (1 - float(shift)) * ac))
    if betas is not None:
        return DDPM(betas=betas, rescale_zero_snr=rescale)
    if kind == "squaredcos_cap_v2":
        return DDPM(betas="cosine", T=T, rescale_zero_snr=rescale)
    return DDPM(betas=kind, T=T, beta_start=float(cfg["beta_start"]), beta_end=float(cfg["beta_end"]),
                rescale_zero_snr=rescale)


def process_from_diffusers(source: Any) -> Process:
    """Our process for a diffusers scheduler, its config, a ``scheduler_config.json`` or a (model) folder.

    DDPM-type: ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` =
    our ``cosine`` (B-7), ``sigmoid``, ``laplace``), ``beta_start``/``beta_end``, ``trained_betas``,
    ``rescale_betas_zero_snr`` (Lin et al. 2024), CogVideoX's ``snr_shift_scale``; missing keys take diffusers'
    defaults. ``ScoreSdeVeScheduler`` gives :class:`VE`, ``ScoreSdeVpScheduler`` :class:`VP`, the EDM schedulers
    :class:`EDM` (module doc). Flow-matching and unknown schedulers are refused with one line.
    """
    name, cfg = read_diffusers_config(source)
    family = _family(name, cfg)
    if family == "ddpm":
        return _ddpm_process(name, cfg)
    if family == "ve":
        s_min, s_max = _scheduler_number(cfg, "sigma_min", 0.01), _scheduler_number(cfg, "sigma_max", 1348.0)
        eps = _scheduler_number(cfg, "sampling_eps", 1e-5)
        proc = VE(s_min, s_max)
        s_lo = torch.tensor(s_min * (s_max / s_min) ** eps, dtype=torch.float64)  # diffusers' smallest level
        return VE(s_min, s_max, t_min=float(proc.t_from_log_snr(-2 * torch.log(s_lo))))
    if family == "vp":
        return VP(_scheduler_number(cfg, "beta_min", 0.1), _scheduler_number(cfg, "beta_max", 20.0),
                  t_min=_scheduler_number(cfg, "sampling_eps", 1e-3))
    lo, hi = _EDM_DEFAULTS.get(name, (0.002, 80.0))
    return EDM(_scheduler_number(cfg, "sigma_min", lo), _scheduler_number(cfg, "sigma_max", hi))


def prediction_from_diffusers(source: Any) -> str:
    """Our prediction name for a diffusers scheduler: DDPM-type ``prediction_type`` epsilon -> eps,
    sample -> x0, v_prediction -> v; score-SDE VE -> score; EDM -> x0 (through EDM preconditioning)."""
    name, cfg = read_diffusers_config(source)
    family = _family(name, cfg)
    if family == "ve":
        return "score"
    if family == "edm":
        return "x0"
    kind = cfg.get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(f"unsupported diffusers prediction_type {kind!r}; allowed: {', '.join(_PREDICTIONS)}")
    return _PREDICTIONS[kind]


class DiffusersNet(nn.Module):
    """``DiffusersNet(unet)``: a diffusers model called as ``net(x, t[, cond])`` for :class:`Denoiser`.

    ``unet(x, time_input(t), **{cond_kwarg: cond})`` is called with ``x`` cast to the model's dtype and the
    times as they are (DDPM training steps; EDM's ``c_noise``) or mapped by ``time_input`` (VE: ``sigma(t)``);
    the result's ``.sample`` (or first element), times ``out_sign``, is returned in ``x``'s dtype. ``cond`` goes
    to ``class_labels`` by default (``UNet2DModel`` with ``num_class_embeds``); pass
    ``cond_kwarg="encoder_hidden_states"`` for a ``UNet2DConditionModel``. Models with learned variances
    (``2 C`` output channels) keep the first ``C``.
    """

    def __init__(self, unet: nn.Module, cond_kwarg: str = "class_labels", *,
                 time_input: Callable[[Tensor], Tensor] | None = None, out_sign: float = 1.0):
        super().__init__()
        if not callable(unet):
            raise TypeError(f"unet must be callable as unet(x, t), got {type(unet).__name__}")
        self.unet = unet
        self.cond_kwarg = cond_kwarg
        self.time_input = time_input
        self.out_sign = float(out_sign)

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        dtype = next(iter(self.unet.parameters()), x).dtype if isinstance(self.unet, nn.Module) else x.dtype
        kwargs = {} if cond is None else {self.cond_kwarg: cond}
        if self.time_input is not None:
            t = self.time_input(t).to(device=x.device, dtype=torch.float32)
        out = self.unet(x.to(dtype), t, **kwargs)
        out = getattr(out, "sample", out)
        if isinstance(out, tuple | list):
            out = out[0]
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]
        return (out * self.out_sign if self.out_sign != 1.0 else out).to(x.dtype)


def denoiser_from_diffusers(unet: nn.Module, source: Any, cond_kwarg: str = "class_labels") -> Denoiser:
    """A :class:`Denoiser` for a diffusers UNet trained with the given scheduler (module doc): DDPM-type nets
    take the timestep and predict eps / x0 / v; score-SDE VE nets take ``sigma`` and predict the score; EDM nets
    are preconditioned (``c_out`` negated for ``v_prediction``)."""
    name, cfg = read_diffusers_config(source)
    family = _family(name, cfg)
    process = process_from_diffusers(source)
    if family == "ddpm":
        if cfg.get("timestep_type") == "continuous":
            raise ValueError(f"{name} with timestep_type='continuous' feeds the UNet 0.25 log(sigma) and a scaled "
                             "input; a denoiser is supported for its discrete timesteps only")
        return Denoiser(DiffusersNet(unet, cond_kwarg), process, prediction_from_diffusers(source))
    if family == "ve":
        return Denoiser(DiffusersNet(unet, cond_kwarg, time_input=process.sigma), process, "score")
    if family == "edm" and name not in EDM_PROCESS_ONLY:
        kind = cfg.get("prediction_type", "epsilon")
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported EDM prediction_type {kind!r}; allowed: epsilon, v_prediction")
        return Denoiser(DiffusersNet(unet, cond_kwarg, out_sign=-1.0 if kind == "v_prediction" else 1.0), process,
                        "x0", precond="edm", sigma_data=float(cfg.get("sigma_data", 0.5)))
    why = EDM_PROCESS_ONLY.get(name, "a network conditioning torchdiffusion does not model")
    raise ValueError(f"{name} is read as a process, but its network uses {why}; a denoiser is supported for "
                     "DDPM-type, ScoreSdeVeScheduler and EDMEuler/EDMDPMSolverMultistep schedulers")


def diffusers_scheduler_config(process: Process, prediction: str, class_name: str = "DDPMScheduler") -> dict:
    """A diffusers ``scheduler_config.json`` dict for our :class:`DDPM` process and prediction type (the inverse
    of :func:`process_from_diffusers`; no clipping, ``fixed_small`` variance = our ``ddpm`` sampler)."""
    if not isinstance(process, DDPM):
        raise ValueError(f"only a DDPM process has a diffusers DDPM-type scheduler; got {process.name}")
    inverse = {v: k for k, v in _PREDICTIONS.items()}
    if prediction not in inverse:
        raise ValueError(f"prediction {prediction!r} has no diffusers prediction_type; allowed: "
                         f"{', '.join(inverse)}")
    pcfg = process.config()
    cfg: dict = {"_class_name": class_name, "num_train_timesteps": process.T, "prediction_type": inverse[prediction],
                 "clip_sample": False, "rescale_betas_zero_snr": bool(process.rescale_zero_snr)}
    if class_name == "DDPMScheduler":
        cfg["variance_type"] = "fixed_small"
    if class_name in ("DDIMScheduler", "PNDMScheduler"):
        cfg["set_alpha_to_one"] = True
    if pcfg["betas"] == "given" or isinstance(pcfg["betas"], list):
        # the final betas (after any zero-SNR rescaling) as trained_betas
        cfg.update(beta_schedule="linear", trained_betas=process.betas.tolist(), rescale_betas_zero_snr=False)
    elif pcfg["betas"] == "cosine":
        cfg["beta_schedule"] = "squaredcos_cap_v2"
    else:
        default = (1e-4, 0.02) if pcfg["betas"] == "linear" else (0.00085, 0.012)
        cfg.update(beta_schedule=pcfg["betas"], beta_start=pcfg.get("beta_start") or default[0],
                   beta_end=pcfg.get("beta_end") or default[1])
    return cfg


# --- our U-Net as a diffusers UNet2DModel -------------------------------------------------------------------
def _linear_from_conv1x1(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], w.shape[1])


def _resblock_tensors(block: ResBlock, prefix: str) -> dict[str, Tensor]:
    """ResBlock -> diffusers ResnetBlock2D (norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut)."""
    out = {}
    for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("emb_proj.1", "time_emb_proj"),
                         ("norm2", "norm2"), ("conv2", "conv2")):
        mod = block.get_submodule(ours)
        out[f"{prefix}.{theirs}.weight"], out[f"{prefix}.{theirs}.bias"] = mod.weight, mod.bias
    if isinstance(block.skip, nn.Conv2d):
        out[f"{prefix}.conv_shortcut.weight"], out[f"{prefix}.conv_shortcut.bias"] = block.skip.weight, block.skip.bias
    return out


def _attention_tensors(block: AttentionBlock, prefix: str) -> dict[str, Tensor]:
    """Our fused 1x1-conv ``qkv`` (rows q | k | v, heads contiguous within each) -> diffusers Attention's
    ``to_q``, ``to_k``, ``to_v`` linears; ``proj_out`` -> ``to_out.0``; the GroupNorm -> ``group_norm``."""
    a = block.self_attn
    C = a.proj_out.weight.shape[0]
    w, b = _linear_from_conv1x1(a.qkv.weight), a.qkv.bias
    out = {f"{prefix}.group_norm.weight": a.norm.weight, f"{prefix}.group_norm.bias": a.norm.bias,
           f"{prefix}.to_out.0.weight": _linear_from_conv1x1(a.proj_out.weight),
           f"{prefix}.to_out.0.bias": a.proj_out.bias}
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{prefix}.{name}.weight"], out[f"{prefix}.{name}.bias"] = w[i * C:(i + 1) * C], b[i * C:(i + 1) * C]
    return out


def unet2d_from_unet(net: nn.Module) -> tuple[dict, dict[str, Tensor]]:
    """``(config, state_dict)`` of the diffusers ``UNet2DModel`` that computes exactly what our :class:`UNet`
    computes (its identical twin): ``DownBlock2D``/``AttnDownBlock2D`` per level (attention where the level's
    resolution is in ``attn_resolutions``), ``UNetMidBlock2D``, the mirrored up blocks, the sinusoidal time
    embedding with sines first and frequencies ``10000^(-i/(h-1))`` (``flip_sin_to_cos=False``, ``freq_shift=1``),
    and a class embedding of ``num_classes + 1`` rows (the last is our null class).

    Refused with one line where no twin exists: a time scale other than 1 (diffusers embeds the timestep as
    given), cross-attention, Fourier input features, GroupNorms with different group counts, or several heads
    whose size differs between attention levels. The embedding of augmentation labels (``augment_dim``, zero at
    sampling time, when it adds nothing) is left out: the twin computes the net of un-augmented data.
    """
    if not isinstance(net, UNet):
        raise ValueError(f"only torchdiffusion's UNet has a diffusers UNet2DModel twin, got {type(net).__name__}")
    if net.context_dim is not None:
        raise ValueError("a UNet with cross-attention (context_dim) has no UNet2DModel twin")
    if net.fourier_features:
        raise ValueError("a UNet with Fourier input features (model.fourier_features) has no UNet2DModel twin")
    if net.time_scale != 1.0:
        raise ValueError(f"the UNet embeds {net.time_scale:g} * t; UNet2DModel embeds the timestep as given, so only "
                         "time_scale = 1 (a DDPM run without preconditioning) can be exported")
    groups = {m.num_groups for m in net.modules() if isinstance(m, nn.GroupNorm)}
    if len(groups) != 1:
        raise ValueError(f"the UNet's GroupNorms use {sorted(groups)} groups; UNet2DModel has one norm_num_groups")
    attn = [m.self_attn for m in net.modules() if isinstance(m, AttentionBlock)]
    head_dims = {a.proj_out.weight.shape[0] // a.num_heads for a in attn}
    heads = {a.num_heads for a in attn}
    if heads != {1} and len(head_dims) != 1:
        raise ValueError("the UNet's attention heads differ in size between levels; UNet2DModel has one "
                         "attention_head_dim (or one head per block)")
    levels = len(net.channel_mult)
    attn_levels = [(net.image_size // 2 ** i) in net.attn_resolutions for i in range(levels)]
    dropout = next((m.p for m in net.modules() if isinstance(m, nn.Dropout)), 0.0)
    config = {
        "_class_name": "UNet2DModel", "sample_size": net.image_size, "in_channels": net.in_channels,
        "out_channels": net.out_channels, "center_input_sample": False, "time_embedding_type": "positional",
        "freq_shift": 1, "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn_levels],
        "mid_block_type": "UNetMidBlock2D",
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn_levels)],
        "block_out_channels": [net.channels * m for m in net.channel_mult], "layers_per_block": net.num_res_blocks,
        "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": float(dropout), "act_fn": "silu",
        "attention_head_dim": None if heads == {1} else head_dims.pop(), "norm_num_groups": groups.pop(),
        "norm_eps": 1e-5, "resnet_time_scale_shift": "default", "add_attention": True,
        "num_class_embeds": None if net.num_classes is None else net.num_classes + 1,
    }
    sd: dict[str, Tensor] = {"conv_in.weight": net.conv_in.weight, "conv_in.bias": net.conv_in.bias,
                             "conv_norm_out.weight": net.norm_out.weight, "conv_norm_out.bias": net.norm_out.bias,
                             "conv_out.weight": net.conv_out.weight, "conv_out.bias": net.conv_out.bias}
    for ours, theirs in (("0", "linear_1"), ("2", "linear_2")):
        lin = net.time_embed.mlp.get_submodule(ours)
        sd[f"time_embedding.{theirs}.weight"], sd[f"time_embedding.{theirs}.bias"] = lin.weight, lin.bias
    if net.class_embed is not None:
        sd["class_embedding.weight"] = net.class_embed.weight

    def walk(blocks: nn.ModuleList, side: str, level_order: list[int], per_level: int) -> None:
        it = iter(blocks)
        for k, _ in enumerate(level_order):
            for j in range(per_level):
                stage = next(it)
                sd.update(_resblock_tensors(stage.res, f"{side}_blocks.{k}.resnets.{j}"))
                if stage.attn is not None:
                    sd.update(_attention_tensors(stage.attn, f"{side}_blocks.{k}.attentions.{j}"))
            if k != len(level_order) - 1:
                conv = next(it).conv
                name = "downsamplers" if side == "down" else "upsamplers"
                sd[f"{side}_blocks.{k}.{name}.0.conv.weight"] = conv.weight
                sd[f"{side}_blocks.{k}.{name}.0.conv.bias"] = conv.bias

    walk(net.down, "down", list(range(levels)), net.num_res_blocks)
    walk(net.up, "up", list(reversed(range(levels))), net.num_res_blocks + 1)
    sd.update(_resblock_tensors(net.mid.res, "mid_block.resnets.0"))
    sd.update(_attention_tensors(net.mid.attn, "mid_block.attentions.0"))
    sd.update(_resblock_tensors(net.mid_res2, "mid_block.resnets.1"))
    return config, {k: v.detach().clone().contiguous() for k, v in sd.items()}
