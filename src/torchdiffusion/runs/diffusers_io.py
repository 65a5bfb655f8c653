"""Round trip with diffusers model folders (issue 19).

- :func:`export_diffusers` writes a DDPM run as a diffusers pipeline folder: ``unet/`` (a ``UNet2DModel``, the
  identical twin of our U-Net, :func:`~torchdiffusion.parameterization.interop.unet2d_from_unet`),
  ``scheduler/scheduler_config.json`` (the run's DDPM schedule and prediction type, no clipping) and
  ``model_index.json``, so that ``DDPMPipeline.from_pretrained(OUT)`` (or ``DDIMPipeline``) runs offline.
  A class-conditional run also gets ``pipeline.py`` (:mod:`torchdiffusion.runs.diffusers_pipeline`, named by
  ``model_index.json``): ``DiffusionPipeline.from_pretrained(OUT)`` then takes ``class_labels`` and
  ``guidance_scale`` (diffusers' own DDPM/DDIM pipelines cannot pass labels). Its UNet2DModel has
  ``num_class_embeds = num_classes + 1``: the last row is the null class of classifier-free guidance;
  ``model_index.json`` says ``num_classes`` (the real ones), which is what a round trip restores.
  Writing needs no diffusers.
- :func:`load_diffusers_folder` reads a local diffusers folder (``unet/`` + ``scheduler/``) as a Denoiser and a
  run-like config for :class:`~torchdiffusion.runs.pipeline.Pipeline`; it needs diffusers (imported here only).
"""

from __future__ import annotations

import shutil
from importlib import resources
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import Tensor, nn

from torchdiffusion._files import FileError, atomic_write, cause, is_run_folder, read_json
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
CLASS_PIPELINE = ["pipeline", "ClassConditionalPipeline"]  # pipeline.py beside the weights (module doc)
# diffusers' default number of inference steps and our sampler for a scheduler class (a folder's sample defaults)
SCHEDULER_DEFAULTS = {"DDPMScheduler": ("ddpm", 1000), "DDIMScheduler": ("ddim", 50)}
SPACINGS = ("leading", "trailing")  # diffusers timestep_spacing values that are our grids of the same name
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
    vr = [float(v) for v in cfg["run"].get("value_range", (-1, 1))]
    if len(cfg["run"]["data_shape"]) != 3 or vr != [-1.0, 1.0]:
        raise ValueError(f"{run} holds data of shape {cfg['run']['data_shape']} in {vr}; diffusers' image pipelines "
                         "take images in [-1, 1]")
    unet_cfg, tensors = unet2d_from_unet(model.net)
    ncls = cfg["run"].get("num_classes")
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
    index = {"_class_name": pipe_name, "_diffusers_version": dv, "unet": ["diffusers", "UNet2DModel"],
             "scheduler": ["diffusers", sched_name]}
    if ncls:  # diffusers' DDPM/DDIM pipelines pass no class labels: our pipeline.py does (module doc)
        code = resources.files("torchdiffusion.runs").joinpath("diffusers_pipeline.py").read_text()
        atomic_write(out / "pipeline.py", lambda tmp: tmp.write_text(code))
        index.update(_class_name=CLASS_PIPELINE, num_classes=int(ncls))
    elif (out / "pipeline.py").is_file():  # (--force over a conditional export)
        (out / "pipeline.py").unlink()
    save_json(index, out / "model_index.json")
    return out


class NullClassNet(nn.Module):
    """A class-conditional diffusers net whose null class (for classifier-free guidance) is the embedding row
    ``null``: our null condition (``cond=None`` or the label ``-1``) becomes that row."""

    def __init__(self, net: nn.Module, null: int):
        super().__init__()
        self.net, self.null = net, int(null)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        if cond is None:
            cond = torch.full((x.shape[0],), self.null, dtype=torch.long, device=x.device)
        else:
            cond = torch.where(cond < 0, torch.full_like(cond, self.null), cond)
        return self.net(x, t, cond)


def load_diffusers_folder(path: str | Path, device: str | torch.device = "cpu") -> tuple[Denoiser, dict]:
    """A local diffusers folder (``unet/`` holding a ``UNet2DModel``, ``scheduler/``) as ``(Denoiser, config)``.

    The config has the Pipeline's ``run`` section (``data_shape`` from the UNet's ``sample_size`` and channels,
    ``num_classes`` from ``model_index.json`` where our export wrote it -- the null class is then the last
    embedding row -- else from ``num_class_embeds``; values in [-1, 1]) and ``sample`` defaults as diffusers'
    pipeline would sample (``DDPMScheduler``: ddpm, 1000 steps; otherwise ddim, 50 steps; the grid is the
    scheduler's ``timestep_spacing``); its ``run.diffusers`` names the folder. Nothing is downloaded
    (``local_files_only``).
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
    cls_name, sched = read_diffusers_config(path)
    index = read_json(path / "model_index.json", "model index") if (path / "model_index.json").is_file() else {}
    if ncls and isinstance(index.get("num_classes"), int) and index["num_classes"] == ncls - 1:
        ncls = index["num_classes"]  # written by our export: the last embedding row is the null class
        model.net = NullClassNet(model.net, ncls)
    sampler, steps = SCHEDULER_DEFAULTS.get(cls_name, ("ddim", 50))
    spacing = sched.get("timestep_spacing", "leading")
    config = {
        "run": {"data_shape": [int(unet.config.in_channels), int(h), int(w)], "num_classes": ncls,
                "value_range": [-1.0, 1.0], "diffusers": str(path), "scheduler": cls_name},
        "process": model.process.config(),
        "model": {"prediction": model.prediction, "precond": model.precond, "sigma_data": model.sigma_data},
        "sample": {"sampler": sampler, "steps": steps, "grid": spacing if spacing in SPACINGS else None},
    }
    return model, config
