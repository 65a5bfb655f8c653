"""diffusers interoperability: read a diffusers scheduler (or its config) as a :class:`~torchdiffusion.DDPM`
process, and wrap a diffusers ``UNet2DModel`` (or any ``model(x, t).sample``) as a torchdiffusion network.

diffusers itself is optional (``pip install torchdiffusion[diffusers]``): nothing here imports it. Conventions
match (DESIGN.md section 2): the DDPM time is the training timestep ``0 .. T-1`` that diffusers' UNets take, so
``td.sample(td.Denoiser(DiffusersNet(unet), process_from_diffusers(scheduler)), x_T, "ddim", 10,
grid="leading")`` walks the same timesteps as diffusers' ``DDIMScheduler`` with ``timestep_spacing="leading"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.processes import DDPM

_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_DIFFUSERS_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}


def _config(scheduler_or_config: Any) -> Mapping:
    cfg = getattr(scheduler_or_config, "config", scheduler_or_config)
    if not isinstance(cfg, Mapping):
        raise TypeError("expected a diffusers scheduler or its config dict, "
                        f"got {type(scheduler_or_config).__name__}")
    return cfg


def process_from_diffusers(scheduler_or_config: Any) -> DDPM:
    """The :class:`DDPM` process of a diffusers scheduler (or its config dict / ``scheduler.config``).

    Reads ``num_train_timesteps``, ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2`` =
    our ``cosine``, B-7), ``beta_start``/``beta_end``, ``trained_betas`` and ``rescale_betas_zero_snr`` (Lin et
    al. 2024). Missing keys take diffusers' defaults (linear 1e-4 .. 0.02, T = 1000).
    """
    cfg = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in _config(scheduler_or_config).items() if v is not None}}
    T = int(cfg["num_train_timesteps"])
    rescale = bool(cfg.get("rescale_betas_zero_snr", False))
    if cfg.get("trained_betas") is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64)
        if len(betas) != T:
            raise ValueError(f"trained_betas has {len(betas)} entries but num_train_timesteps is {T}")
        return DDPM(betas=betas, rescale_zero_snr=rescale)
    kind = cfg["beta_schedule"]
    if kind not in _SCHEDULES:
        raise ValueError(f"unsupported diffusers beta_schedule {kind!r}; allowed: {', '.join(_SCHEDULES)} "
                         "or trained_betas")
    if kind == "squaredcos_cap_v2":
        return DDPM(betas="cosine", T=T, rescale_zero_snr=rescale)
    return DDPM(betas=_SCHEDULES[kind], T=T, beta_start=float(cfg["beta_start"]), beta_end=float(cfg["beta_end"]),
                rescale_zero_snr=rescale)


def prediction_from_diffusers(scheduler_or_config: Any) -> str:
    """Our prediction name for diffusers' ``prediction_type``: epsilon -> eps, sample -> x0, v_prediction -> v."""
    kind = _config(scheduler_or_config).get("prediction_type", "epsilon")
    if kind not in _PREDICTIONS:
        raise ValueError(f"unsupported diffusers prediction_type {kind!r}; allowed: {', '.join(_PREDICTIONS)}")
    return _PREDICTIONS[kind]


class DiffusersNet(nn.Module):
    """``DiffusersNet(unet)``: a diffusers model called as ``net(x, t[, cond])`` for :class:`Denoiser`.

    ``unet(x, t, **{cond_kwarg: cond})`` is called with the timesteps ``t`` (DDPM training steps, float64 is
    fine: diffusers' time embedding casts to float) and ``x`` cast to the model's dtype; the result's
    ``.sample`` (or first element) is returned in ``x``'s dtype. ``cond`` goes to ``class_labels`` by default
    (``UNet2DModel`` with ``num_class_embeds``); pass ``cond_kwarg="encoder_hidden_states"`` for a
    ``UNet2DConditionModel``. Models with learned variances (``2 C`` output channels) keep the first ``C``.
    """

    def __init__(self, unet: nn.Module, cond_kwarg: str = "class_labels"):
        super().__init__()
        if not callable(unet):
            raise TypeError(f"unet must be callable as unet(x, t), got {type(unet).__name__}")
        self.unet = unet
        self.cond_kwarg = cond_kwarg

    def forward(self, x: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        dtype = next(iter(self.unet.parameters()), x).dtype if isinstance(self.unet, nn.Module) else x.dtype
        kwargs = {} if cond is None else {self.cond_kwarg: cond}
        out = self.unet(x.to(dtype), t, **kwargs)
        out = getattr(out, "sample", out)
        if isinstance(out, tuple | list):
            out = out[0]
        if out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)


def denoiser_from_diffusers(unet: nn.Module, scheduler_or_config: Any, cond_kwarg: str = "class_labels") -> Denoiser:
    """A :class:`Denoiser` for a diffusers UNet trained with the given scheduler (process and prediction type)."""
    return Denoiser(DiffusersNet(unet, cond_kwarg), process_from_diffusers(scheduler_or_config),
                    prediction_from_diffusers(scheduler_or_config))
