"""Round trip with diffusers model folders (issue 19).

- :func:`export_diffusers` writes a DDPM run as a diffusers pipeline folder: ``unet/`` (a ``UNet2DModel``, the
  identical twin of our U-Net, :func:`~torchdiffusion.parameterization.interop.unet2d_from_unet`),
  ``scheduler/scheduler_config.json`` (the run's DDPM schedule and prediction type, no clipping) and
  ``model_index.json``, so that ``DDPMPipeline.from_pretrained(OUT)`` (or ``DDIMPipeline``) runs offline.
  Writing needs no diffusers.
- :func:`load_diffusers_folder` reads a local diffusers folder (``unet/`` + ``scheduler/``) as a Denoiser and a
  run-like config for :class:`~torchdiffusion.runs.pipeline.Pipeline`; it needs diffusers (imported here only).
"""

from __future__ import annotations

import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from torchdiffusion._files import FileError, cause, is_run_folder
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.parameterization.interop import (
    denoiser_from_diffusers,
    diffusers_scheduler_config,
    read_diffusers_config,
    unet2d_from_unet,
)
from torchdiffusion.runs.build import load_run, run_kind
from torchdiffusion.training.checkpoint import model_files, save_json, save_tensors

PIPELINES = {"ddpm": ("DDPMPipeline", "DDPMScheduler"), "ddim": ("DDIMPipeline", "DDIMScheduler")}
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"


def is_diffusers_folder(path: str | Path) -> bool:
    """A diffusers pipeline folder: ``model_index.json``, or ``unet/config.json`` beside ``scheduler/``."""
    path = Path(path)
    return (path / "model_index.json").is_file() or (
        (path / "unet" / "config.json").is_file() and (path / "scheduler" / "scheduler_config.json").is_file())


def _diffusers_version() -> str:
    try:
        return version("diffusers")
    except PackageNotFoundError:
        return "0.25.0"


def export_diffusers(run: str | Path, out: str | Path, *, pipeline: str = "ddpm", ema: bool = True,
                     force: bool = False) -> Path:
    """Write the run folder ``run`` as the diffusers pipeline folder ``out`` (module doc).

    ``pipeline``: ``ddpm`` (``DDPMPipeline`` + ``DDPMScheduler``, ancestral sampling with beta-tilde) or
    ``ddim`` (``DDIMPipeline`` + ``DDIMScheduler``). Only diffusion runs on the DDPM process with an unconditioned
    time input (``precond="none"``) and eps / x0 / v prediction have a diffusers twin; anything else is refused
    with one line. ``out`` must be empty or absent unless ``force`` (which replaces its ``unet/`` and
    ``scheduler/`` whole); a run folder is refused even with ``force`` (one model per folder).
    """
    if pipeline not in PIPELINES:
        raise ValueError(f"unknown pipeline {pipeline!r}; allowed: {', '.join(PIPELINES)}")
    out = Path(out)
    if is_run_folder(out) or model_files(out):
        raise FileError(f"{out} is a torchdiffusion run folder; a folder holds one model, so export-diffusers will "
                        "not write there, even with --force: choose another folder")
    if out.exists() and not out.is_dir():
        raise FileError(f"cannot write {out}: it is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not force:
        raise ValueError(f"{out} exists and is not an empty folder; pass --force to overwrite it")
    model, cfg = load_run(run, ema=ema)
    kind = run_kind(cfg)
    if kind != "diffusion":
        raise ValueError(f"{run} is a{'n' if kind[0] in 'aeiou' else ''} {kind} run; export-diffusers needs a "
                         "diffusion run (a UNet2DModel + scheduler pipeline)")
    if model.precond != "none":
        raise ValueError(f"{run} uses {model.precond} preconditioning; diffusers' DDPM-type pipelines call the "
                         "UNet with the raw timestep, so only precond=none runs can be exported")
    unet_cfg, tensors = unet2d_from_unet(model.net)
    pipe_name, sched_name = PIPELINES[pipeline]
    sched_cfg = diffusers_scheduler_config(model.process, model.prediction, sched_name)
    dv = _diffusers_version()
    for part in ("unet", "scheduler"):  # (--force) the components replaced whole: no stale weights stay beside them
        if (out / part).is_dir():
            try:
                shutil.rmtree(out / part)
            except OSError as e:
                raise FileError(f"cannot replace {out / part}: {cause(e)}") from None
    save_json({**unet_cfg, "_diffusers_version": dv}, out / "unet" / "config.json")
    save_tensors(tensors, out / "unet" / UNET_WEIGHTS, {"saved_by": "torchdiffusion export-diffusers",
                                                          "run": str(run)})
    save_json({**sched_cfg, "_diffusers_version": dv}, out / "scheduler" / "scheduler_config.json")
    save_json({"_class_name": pipe_name, "_diffusers_version": dv, "unet": ["diffusers", "UNet2DModel"],
               "scheduler": ["diffusers", sched_name]}, out / "model_index.json")
    return out


def load_diffusers_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict]:
    """A local diffusers folder (``unet/`` holding a ``UNet2DModel``, ``scheduler/``) as ``(Denoiser, config)``.

    The config has the Pipeline's ``run`` section (``data_shape`` from the UNet's ``sample_size`` and channels,
    ``num_classes`` from ``num_class_embeds``, values in [-1, 1]) and ``sample`` defaults (ddim, 50 steps); its
    ``run.diffusers`` names the folder. Nothing is downloaded (``local_files_only``).
    """
    path = Path(path)
    if not is_diffusers_folder(path):
        raise ValueError(f"{path} is not a diffusers folder (no model_index.json, or unet/ and scheduler/)")
    if not (path / "unet" / "config.json").is_file():
        raise ValueError(f"{path} has no unet/ subfolder; a Pipeline reads UNet2DModel pipelines "
                         "(DDPMPipeline, DDIMPipeline, ScoreSdeVePipeline, ...)")
    try:
        from diffusers import UNet2DModel
    except ImportError:
        raise ValueError("reading a diffusers folder needs diffusers: pip install 'torchdiffusion[diffusers]'") \
            from None
    try:
        unet = UNet2DModel.from_pretrained(str(path / "unet"), local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"cannot load {path / 'unet'} as a UNet2DModel: {str(e).splitlines()[0]}") from None
    unet = unet.to(device).eval()
    model = denoiser_from_diffusers(unet, path)
    size = unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    ncls = unet.config.num_class_embeds
    cls_name, _ = read_diffusers_config(path)
    config = {
        "run": {"data_shape": [int(unet.config.in_channels), int(h), int(w)], "num_classes": ncls,
                "value_range": [-1.0, 1.0], "diffusers": str(path), "scheduler": cls_name},
        "process": model.process.config(),
        "model": {"prediction": model.prediction, "precond": model.precond, "sigma_data": model.sigma_data},
        "sample": {"sampler": "ddim", "steps": 50, "grid": None},
    }
    return model, config
