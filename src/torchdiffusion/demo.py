"""``torchdiffusion demo``: train on the embedded defaults and write the pictures people look at."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from . import config as config_mod
from .data import toy_density
from .generate import generate, save_samples
from .train import Trainer


def toy_demo(out: Path, quick: bool = False) -> Iterator[str]:
    """A DDPM on the 8-Gaussian ring with an MLP; DDIM samples beside the data, NLL under the true density."""
    steps = 300 if quick else 3000
    cfg = config_mod.resolve("ring", [f"train.steps={steps}", "train.ckpt_every=1000"])
    tr = Trainer(cfg, out / "ring")
    res = tr.run()
    yield f"ring: trained {res['step']} steps in {res['seconds']:.0f}s (loss {res['loss']:.3f})"
    model = tr.ema_model()
    x = generate(model, (2,), 2000, sampler="ddim", steps=50, seed=0)
    dens = toy_density("ring")
    exact, _ = dens.sample(2000, torch.Generator().manual_seed(1))
    nll, nll_exact = -dens.log_prob(x.double()).mean().item(), -dens.log_prob(exact).mean().item()
    p = save_samples(x, out / "ring" / "samples.png", data=tr.data.x[:2000],
                     title=f"DDIM 50 steps: NLL {nll:.3f} (exact samples {nll_exact:.3f})")
    yield f"ring: DDIM-50 samples NLL {nll:.3f} nats vs {nll_exact:.3f} for exact samples -> {p}"


def run_demo(out: Path, quick: bool = False) -> Iterator[str]:
    """Every demo part in turn; yields one line per result."""
    out.mkdir(parents=True, exist_ok=True)
    yield from toy_demo(out, quick)
