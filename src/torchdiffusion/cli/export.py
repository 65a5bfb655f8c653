"""``torchdiffusion export-diffusers RUN OUT``: write a DDPM run as a diffusers pipeline folder (``unet/`` with a
``UNet2DModel``, ``scheduler/``, ``model_index.json``) that ``DDPMPipeline.from_pretrained(OUT)`` (or
``DDIMPipeline`` with ``--pipeline ddim``) loads offline; see :mod:`torchdiffusion.runs.diffusers_io`."""

from __future__ import annotations

import argparse

from torchdiffusion.cli.commands import command
from torchdiffusion.runs.diffusers_io import PIPELINES, export_diffusers


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `torchdiffusion train` (DDPM process, net=unet)")
    p.add_argument("out", help="folder to write (must be empty or absent unless --force)")
    p.add_argument("--pipeline", default="ddpm", choices=sorted(PIPELINES),
                   help="diffusers pipeline and scheduler: ddpm (DDPMPipeline) or ddim (DDIMPipeline)")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--force", action="store_true", help="write into a folder that is not empty")


def _run(a) -> int:
    out = export_diffusers(a.run, a.out, pipeline=a.pipeline, ema=not a.no_ema, force=a.force)
    name = PIPELINES[a.pipeline][0]
    print(f"wrote {out} (diffusers {name}: load it with {name}.from_pretrained({str(out)!r}))")
    return 0


command("export-diffusers", "write a DDPM run as a diffusers UNet2DModel pipeline folder")((_args, _run))
