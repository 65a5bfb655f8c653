"""``torchdiffusion scorefield RUN --out field.png``: learned vs exact score arrows of a 2-D toy run.

The exact score is the oracle's noised score ``grad log p_t`` of the toy's Gaussian-mixture density
(:func:`torchdiffusion.data.datasets.toy_density`) at the same time ``t``; the background is the noised density.
The command also prints the density-weighted relative error ``sum p ||s_theta - s||^2 / sum p ||s||^2`` over
the grid (the Fisher divergence of T-SM-1, relative to the Fisher information).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from torchdiffusion.cli.commands import command
from torchdiffusion.data.datasets import TOYS, toy_density
from torchdiffusion.evaluation.viz import save_score_field
from torchdiffusion.processes import times_from_ve_sigmas
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


def score_field(model, density, sigma: float, lim: float = 2.5, n: int = 41):
    """``(t, learned(x), exact(x), log_density(x), relative_error)`` at VE noise level ``sigma`` for a 2-D
    model and a toy density (``exact`` and the error are ``None`` for densities without a score)."""
    proc = model.process
    if not sigma > 0:
        raise ValueError(f"--sigma must be > 0, got {sigma}")
    t = times_from_ve_sigmas(proc, torch.tensor([float(sigma)], dtype=torch.float64))[0]
    t = t.clamp(proc.t_min, proc.t_max)
    dtype = next(model.net.parameters()).dtype if hasattr(model.net, "parameters") else torch.float32

    def learned(x):
        with torch.no_grad():
            return model.score(x.to(dtype), t).double()

    exact = (lambda x: density.score(x, proc, t)) if hasattr(density, "score") else None
    if hasattr(density, "score"):
        def log_density(x):
            return density.log_prob(x, proc, t)
    else:
        log_density = density.log_prob
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    err = None
    if exact is not None:
        w = log_density(pts).exp()
        s, s_hat = exact(pts), learned(pts)
        err = float((w * ((s_hat - s) ** 2).sum(1)).sum() / (w * (s**2).sum(1)).sum())
    return float(t), learned, exact, log_density, err


def _run(a) -> int:
    model, cfg = load_run(a.run, ema=not a.no_ema)

    require_kind(cfg, a.run, ("diffusion",), "scorefield")
    info = cfg["run"]
    name = cfg["data"]["name"]
    if list(info["data_shape"]) != [2] or name not in TOYS:
        raise ValueError(f"scorefield needs a run trained on a 2-D toy ({', '.join(TOYS)}); this run has data "
                         f"{name!r} of shape {tuple(info['data_shape'])}")
    if a.n < 2:
        raise ValueError(f"--n must be >= 2, got {a.n}")
    t, learned, exact, log_density, err = score_field(model, toy_density(name), a.sigma, a.lim)
    fields = {"learned": learned} if exact is None else {"learned": learned, "exact": exact}
    out = Path(a.out) if a.out else Path(a.run) / "scorefield.png"
    if out.suffix != ".png":
        raise ValueError(f"--out must end in .png, got {out.name}")
    title = f"{name}: score at sigma={a.sigma:g} (t={t:.3g})"
    save_score_field(fields, out, log_density=log_density, lim=a.lim, n=a.n, title=title)
    msg = f"wrote {out}"
    if err is not None:
        msg += f"; density-weighted relative squared error of the learned score: {err:.3f}"
    print(msg)
    return 0


command("scorefield", "draw learned vs exact score arrows of a 2-D toy run")((_args, _run))
