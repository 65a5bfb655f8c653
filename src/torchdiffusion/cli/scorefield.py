"""``torchdiffusion scorefield RUN --out field.png``: learned vs exact score arrows of a 2-D toy run.

The exact score is the oracle's noised score ``grad log p_t`` of the toy's Gaussian-mixture density
(:func:`torchdiffusion.data.datasets.toy_density`) at the same time ``t``
(:func:`torchdiffusion.evaluation.scorefield.score_field`); the background is the noised density.
The command also prints the density-weighted relative error ``sum p ||s_theta - s||^2 / sum p ||s||^2`` over
the grid (the Fisher divergence of T-SM-1, relative to the Fisher information).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from torchdiffusion._files import prepare_output
from torchdiffusion._tensor import check_number
from torchdiffusion.cli.commands import command
from torchdiffusion.data.datasets import TOYS, toy_density
from torchdiffusion.evaluation.scorefield import score_field  # noqa: F401  (also imported from here)
from torchdiffusion.evaluation.viz import save_score_field
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.pipeline import require_kind


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder of a model trained on a 2-D toy (ring, moons, swiss_roll, gmm, ...)")
    p.add_argument("--out", default=None, help="output PNG (default RUN/scorefield.png)")
    p.add_argument("--sigma", type=float, default=0.2,
                   help="noise level sigma/alpha at which to compare the scores (default 0.2)")
    p.add_argument("--lim", type=float, default=2.5, help="half-width of the plotted square")
    p.add_argument("--n", type=int, default=21, help="arrows per side")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")


def ve_sigma(process, t: float) -> float:
    """The noise level ``sigma(t) / alpha(t)`` of ``process`` at time ``t`` (inf where alpha is 0)."""
    tt = torch.tensor(float(t), dtype=torch.float64)
    a = float(process.alpha(tt))
    return float(process.sigma(tt)) / a if a > 0 else math.inf


def _run(a) -> int:
    out = Path(a.out) if a.out else Path(a.run) / "scorefield.png"
    if out.suffix != ".png":
        raise ValueError(f"--out must end in .png, got {out.name}")
    if not check_number(a.sigma, "--sigma") > 0 or not check_number(a.lim, "--lim") > 0:
        raise ValueError(f"--sigma and --lim must be > 0, got {a.sigma:g} and {a.lim:g}")
    model, cfg = load_run(a.run, ema=not a.no_ema)

    require_kind(cfg, a.run, ("diffusion",), "scorefield")
    info = cfg["run"]
    name = cfg["data"]["name"]
    if list(info["data_shape"]) != [2] or name not in TOYS:
        raise ValueError(f"scorefield needs a run trained on a 2-D toy ({', '.join(TOYS)}); this run has data "
                         f"{name!r} of shape {tuple(info['data_shape'])}")
    if a.n < 2:
        raise ValueError(f"--n must be >= 2, got {a.n}")
    lo, hi = (ve_sigma(model.process, t) for t in (model.process.t_min, model.process.t_max))
    if not lo <= a.sigma <= hi:  # score_field would clamp to the range: the picture would show another sigma
        raise ValueError(f"--sigma must lie in [{lo:.4g}, {hi:.4g}] (the noise levels of this run's process), "
                         f"got {a.sigma:g}")
    t, learned, exact, log_density, err = score_field(model, toy_density(name), a.sigma, a.lim)
    fields = {"learned": learned} if exact is None else {"learned": learned, "exact": exact}
    prepare_output(out)
    title = f"{name}: score at sigma={ve_sigma(model.process, t):.3g} (t={t:.3g})"  # the sigma of the t used
    save_score_field(fields, out, log_density=log_density, lim=a.lim, n=a.n, title=title)
    msg = f"wrote {out}"
    if err is not None:
        msg += f"; density-weighted relative squared error of the learned score: {err:.3f}"
    print(msg)
    return 0


command("scorefield", "draw learned vs exact score arrows of a 2-D toy run")((_args, _run))
