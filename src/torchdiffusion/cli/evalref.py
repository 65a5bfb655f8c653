"""``eval RUN --ref DIR --metrics fid,kid,isc,prc``: a run's samples against a folder of real images, with
torch-fidelity (issue 19); called from :mod:`torchdiffusion.cli.eval`. The ``--n`` samples are written as
numbered PNGs to ``--samples`` (default ``RUN/eval_samples/``, resumable, the same images as ``sample --out``
with the same seed) and scored from there."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from torchdiffusion.cli.commands import StepBar
from torchdiffusion.evaluation.images import fidelity_metrics, parse_metrics, read_png_folder, require_torch_fidelity
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.runs.sample_folder import sample_to_folder


def add_ref_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ref", default=None, metavar="DIR",
                   help="score against this folder of real images (torch-fidelity: FID, KID, IS, precision/recall)")
    p.add_argument("--metrics", default="fid,kid,isc,prc", help="with --ref: comma-separated fid, kid, isc, prc")
    p.add_argument("--samples", default=None, metavar="DIR",
                   help="with --ref: folder for the numbered sample PNGs (default RUN/eval_samples/; resumable)")
    p.add_argument("--feature-extractor", default=None,
                   help="with --ref: a torch-fidelity feature extractor name (default inception-v3-compat)")
    p.add_argument("--batch-size", type=int, default=None, help="with --ref: samples per batch")


def eval_against_folder(a, model, cfg: dict, sampler: str, steps: int) -> dict:
    """Sample ``--n`` (default: as many as the reference has) into ``--samples`` and score them (module doc)."""
    names = parse_metrics(a.metrics)
    require_torch_fidelity()  # refuse before sampling
    ref = read_png_folder(a.ref)
    n = a.n or len(ref)
    out = Path(a.samples) if a.samples else Path(a.run) / "eval_samples"
    ncls = cfg["run"].get("num_classes")
    cond = torch.arange(n) % ncls if ncls else None  # every class in turn
    guided = CFG(model, a.guidance) if a.guidance else model
    bar = StepBar("eval", a.quiet)
    try:
        sample_to_folder(Pipeline(model, cfg, path=a.run), guided, n, out, seed=a.seed, cond=cond,
                         batch_size=a.batch_size, sampler=sampler, steps=steps, grid=a.grid, callback=bar)
    finally:
        bar.close()
    samples = read_png_folder(out, channels=int(ref.shape[1]))[:n]  # names sort as indices: 000000.png, ...
    res = fidelity_metrics(samples, ref, names, feature_extractor=a.feature_extractor)
    return {"samples": n, "reference": len(ref), **res}
