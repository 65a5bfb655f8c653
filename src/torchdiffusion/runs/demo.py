"""``torchdiffusion demo``: train on the embedded defaults and write the pictures people look at.

1. ``ring/samples.png``: a DDPM on the 8-Gaussian ring, ancestral samples beside the data.
2. ``digits/digits_grid.png`` (10x10, one row per digit 0..9) and ``digits/digits_reverse.gif`` (the reverse
   process of one row per digit): a class-conditional U-Net DDPM (``digits`` preset) on scikit-learn's 8x8
   digits, sampled with DDIM and classifier-free guidance, scored by a classifier trained on real digits.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from torchdiffusion.data.datasets import toy_density
from torchdiffusion.evaluation.metrics import HOLDOUT, DigitsEvaluator
from torchdiffusion.evaluation.viz import save_gif, save_image_grid, save_samples
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.generate import generate
from torchdiffusion.runs.train import MODEL_SECTIONS, build_trainer, ema_model
from torchdiffusion.training.checkpoint import load_json

DIGITS_GUIDANCE = 0.5  # w of the pictures: accuracy 1.000, FD inside the floor's interval (digits_quality.md)


def _finished(folder: Path, cfg: dict) -> bool:
    """Whether ``folder`` holds a resumable run of the same model configuration (then ``force`` is not needed)."""
    try:
        saved = config_mod.with_defaults(load_json(folder / "config.json"))
    except ValueError:
        return False
    return (folder / "train_state.safetensors").is_file() and all(saved.get(k) == cfg.get(k)
                                                                 for k in MODEL_SECTIONS)


def _trained(name: str, res: dict) -> str:
    if not res["steps_run"]:
        return f"{name}: reusing the trained run in {res['out']} ({res['step']} steps)"
    return f"{name}: trained {res['step']} steps in {res['seconds']:.0f}s (loss {res['loss']:.3f})"


def toy_demo(out: Path, quick: bool = False, force: bool = False) -> Iterator[str]:
    """A DDPM on the 8-Gaussian ring with an MLP; ancestral samples (200 steps) beside the data, their NLL."""
    steps = 300 if quick else 3000
    # one intra-op thread: this small MLP is many times slower with 2 threads on a busy 2-core machine
    cfg = config_mod.resolve("ring", [f"train.steps={steps}", "train.ckpt_every=1000", "train.threads=1"])
    tr = build_trainer(cfg, out / "ring", force=force and not _finished(out / "ring", cfg))
    res = tr.run()
    yield _trained("ring", res)
    model = ema_model(tr)
    # ancestral sampling: with this learned MLP it reaches the data's entropy (0.32 vs 0.32 nats), while the
    # deterministic PF-ODE samplers stop at about 0.58 whatever the steps (the net's error, not the solver's).
    # The `trailing` grid (diffusers' spacing, DDPM's default before issue 13; the README's figure) stops at t = 4
    # and denoises from there: on this MLP it measured NLL 0.37 against 0.49 for the new default `logsnr`, which
    # also visits t = 0..3, where the net is least accurate (4000 samples, ring preset, `torchdiffusion eval`).
    x = generate(model, (2,), 2000, sampler="ddpm", steps=200, seed=0, grid="trailing")
    dens = toy_density("ring")
    exact, _ = dens.sample(2000, torch.Generator().manual_seed(1))
    nll, nll_exact = -dens.log_prob(x.double()).mean().item(), -dens.log_prob(exact).mean().item()
    p = save_samples(x, out / "ring" / "samples.png", data=tr.data.x[:2000],
                     title=f"DDPM 200 steps: NLL {nll:.3f} (exact samples {nll_exact:.3f})")
    yield f"ring: DDPM-200 samples NLL {nll:.3f} nats vs {nll_exact:.3f} for exact samples -> {p}"


def digits_demo(out: Path, quick: bool = False, force: bool = False) -> Iterator[str]:
    """Class-conditional digits: train the ``digits`` preset (a few minutes on 2 CPU cores; ``quick``: a tiny
    net for a few seconds), write a 10x10 grid (row k = digit k) and a GIF of the reverse process, and score the
    samples with the real-data classifier (conditional accuracy, Frechet distance vs the real-data floor and its
    bootstrap interval). The ``digits`` preset holds out the evaluator's held-out digits, so the floor is measured on
    digits the model never saw."""
    sets = ["train.steps=60", "model.channels=16", "train.batch=64", "train.ckpt_every=0"] if quick else []
    cfg = config_mod.resolve("digits", sets)
    tr = build_trainer(cfg, out / "digits", force=force and not _finished(out / "digits", cfg))
    res = tr.run()
    yield _trained("digits", res)
    model = CFG(ema_model(tr), DIGITS_GUIDANCE)
    steps = 10 if quick else 50
    y = torch.arange(10).repeat_interleave(10)
    x = generate(model, tr.data.shape, 100, sampler="ddim", steps=steps, seed=0, cond=y)
    grid = save_image_grid(x, out / "digits" / "digits_grid.png", nrow=10)
    frames: list[torch.Tensor] = []
    generate(model, tr.data.shape, 10, sampler="ddim", steps=steps, seed=1, cond=torch.arange(10),
             callback=lambda d: frames.append(d["x"].clone()))
    keep = sorted({round(i * (len(frames) - 1) / 24) for i in range(25)})  # at most 25 frames, the last included
    gif = save_gif([frames[i] for i in keep], out / "digits" / "digits_reverse.gif", nrow=10, scale=6,
                   duration_ms=120)
    yield f"digits: DDIM-{steps} with guidance w={DIGITS_GUIDANCE} -> {grid} (row k = digit k), {gif}"
    if not quick:
        ev = DigitsEvaluator(tr.data.shape[-1])
        y_ev = ev.y_heldout  # the class counts of the real held-out digits, so that the FDs compare
        x_ev = generate(model, tr.data.shape, len(y_ev), sampler="ddim", steps=steps, seed=2, cond=y_ev)
        fl = ev.fd_floor_bootstrap()
        unseen = "never saw" if float(cfg["data"].get("holdout", 0.0)) == HOLDOUT else "partly trained on"
        yield (f"digits: {len(y_ev)} samples scored by a classifier trained on real digits: conditional accuracy "
               f"{ev.accuracy(x_ev, y_ev):.3f} (real held-out digits {ev.heldout_accuracy():.3f}), Frechet "
               f"distance {ev.fd(x_ev, y_ev):.2f} against the real-data floor {fl.floor:.2f} (95 % interval "
               f"{fl.lo:.2f}-{fl.hi:.2f}), measured on held-out digits this model {unseen}")


def run_demo(out: Path, quick: bool = False, force: bool = False) -> Iterator[str]:
    """Every demo part in turn; yields one line per result. A part whose folder holds a run of another
    configuration (say, the ``quick`` one) is refused unless ``force``, which retrains it."""
    yield from toy_demo(out, quick, force)
    yield from digits_demo(out, quick, force)
