"""Latent diffusion on 16x16 digits against pixel-space diffusion, and a 2-D latent VAE.

Run (training included: about 35 minutes on one thread of a busy 2-core machine; finished runs are reused):
    .venv/bin/python benchmarks/latent.py                       # runs in runs/latent_bench, pictures in docs/images
    .venv/bin/python benchmarks/latent.py --pixel-run RUN       # pixel-space baseline (default runs/digits16_quality)
    .venv/bin/python benchmarks/latent.py --quick               # fewer samples (smoke test)

The VAE, the latent model and the pixel-space baseline hold out the evaluator's held-out digits (``data.holdout``
= ``metrics.HOLDOUT``, the same seed-0 permutation; the presets set it, and a run that does not is refused): they
train on the evaluator's training digits only, so the FD floor's digits are unseen by all three.

1. ``vae_digits``: a VAE on 16x16 digits (8x8 digits resized) with a 4x4x4 latent (64 numbers per 256-pixel
   image), Gaussian decoder N(D(z), 0.1^2 I), beta = 1.
2. ``latent``: a class-conditional diffusion model (cosine DDPM, v-prediction) on the VAE's scaled latents, its
   U-Net conditioned through tau(y) (4 class tokens) and cross-attention, label dropout 0.1 for CFG.
3. Samples for 50 of each class at CFG scales w, decoded, scored with the real-data classifier
   (``metrics.DigitsEvaluator(16)``): conditional accuracy and class-matched Frechet distance; the same for a
   pixel-space class-conditional diffusion model on 16x16 digits (preset ``digits16``, trained into --pixel-run
   if it is not there) with the same sampler and steps; sampling seconds per image side by side (one thread, same
   batch size).
4. ``vae2d_digits``: a VAE with a 2-D latent on 8x8 digits (learned-variance discretized decoder, 17 levels):
   posterior means of every digit coloured by class -> docs/images/vae_latent2d.png.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

import _report
from digits_quality import where
from torchdiffusion.data.datasets import digits
from torchdiffusion.evaluation.metrics import HOLDOUT, DigitsEvaluator
from torchdiffusion.evaluation.viz import _mpl, save_image_grid
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs import latent
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.generate import generate
from torchdiffusion.runs.train import train

ROOT = Path(__file__).resolve().parents[1]


def train_run(preset: str, out: Path, sets: list[str], quiet: bool, scored: bool = True) -> str:
    """Train (or resume; a finished run is reused) and describe the run. A ``scored`` run (one whose samples the
    evaluator scores, or their autoencoder) must hold out exactly the evaluator's held-out digits."""
    cfg = config_mod.resolve(preset, sets)
    holdout = float(cfg["data"]["holdout"])
    if scored and holdout != HOLDOUT:
        raise SystemExit(f"{out}: data.holdout is {holdout:g}, not the evaluator's {HOLDOUT:g}; the scored runs must "
                         "not train on the FD floor's held-out digits")
    res = train(cfg, out, progress=not quiet)
    log = (out / "log.csv").read_text().strip().splitlines()
    secs = float(log[-1].split(",")[-1]) if len(log) > 1 else float("nan")
    return (f"`{preset}`{''.join(' --set ' + s for s in sets)} -> `{out}`: {res['step']} steps, "
            f"`data.holdout` = {holdout:g} (training log: {secs:.0f} s for the last session)")


def relative(path: str) -> Path:
    """``path`` relative to the repository (as the CLI would store a run folder)."""
    return Path(os.path.relpath(Path(path).resolve(), ROOT))


def n_params(m: torch.nn.Module) -> int:
    """The number of parameters of ``m``."""
    return sum(p.numel() for p in m.parameters())


def score(ev: DigitsEvaluator, x: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """Conditional accuracy, FD (``ev.fd``: the mean over chunks matched to the held-out class counts) and the
    number of such chunks (0: too few samples for one, FD of all of them at once)."""
    return ev.accuracy(x, labels), ev.fd(x, labels), len(ev.fd_per_chunk(x, labels))


def timed_samples(model: torch.nn.Module, shape: tuple[int, ...], labels: torch.Tensor, w: float, steps: int,
                  decode: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """DDIM samples (seed 0) for ``labels`` at guidance scale ``w``, decoded when ``decode`` is given, in [-1, 1],
    and the seconds they took."""
    m = CFG(model, w) if w else model
    t0 = time.perf_counter()
    with torch.no_grad():
        x = generate(m, shape, len(labels), sampler="ddim", steps=steps, seed=0, cond=labels)
        if decode is not None:
            x = decode(x)
    return x.clamp(-1, 1), time.perf_counter() - t0


def scatter_2d(run: Path, path: Path) -> str:
    """Plot the 2-D VAE run's posterior means of all digits at ``path`` and its decoded latent manifold beside it;
    returns the two paths, for the report."""
    net, _ = latent.load_autoencoder(run)
    d = digits(8)
    z = latent.encode(net, d.x)
    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6.2, 5.6))
    for c in range(10):
        p = z[d.y == c]
        ax.scatter(p[:, 0], p[:, 1], s=5, alpha=0.7, color=plt.cm.tab10(c), label=str(c))
    ax.legend(title="digit", markerscale=3, fontsize=8, loc="best")
    ax.set_xlabel("z1 (posterior mean)")
    ax.set_ylabel("z2")
    ax.set_title("VAE with a 2-D latent on 8x8 digits: E_mu(x) of all 1797 digits")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    # the decoded latent manifold on a grid of prior quantiles
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.linspace(0.05, 0.95, 12))
    zz = torch.stack(torch.meshgrid(q, -q, indexing="xy"), -1).reshape(-1, 2)
    save_image_grid(latent.decode(net, zz).clamp(-1, 1), path.with_name("vae_latent2d_manifold.png"), nrow=12)
    return f"{path.relative_to(ROOT)} and {path.with_name('vae_latent2d_manifold.png').relative_to(ROOT)}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default=str(ROOT / "runs" / "latent_bench"))
    ap.add_argument("--pixel-run", default=str(ROOT / "runs" / "digits16_quality"))
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps for both models")
    ap.add_argument("--per-class", type=int, default=50)
    ap.add_argument("--guidance", type=float, nargs="+", default=[0.0, 1.0, 2.0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--report", default=str(ROOT / "benchmarks" / "results" / "latent.md"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()
    runs, pixel_run, images = relative(a.runs), relative(a.pixel_run), ROOT / "docs" / "images"
    os.chdir(ROOT)  # run folders are named relative to the repository (as the CLI would store them)
    per_class = 10 if a.quick else a.per_class
    notes = []

    notes.append(train_run("vae_digits", runs / "vae", [], a.quiet))
    notes.append(train_run("latent", runs / "latent", [f"data.autoencoder={runs / 'vae'}"], a.quiet))
    notes.append(train_run("vae2d_digits", runs / "vae2d", [], a.quiet, scored=False))
    notes.append(train_run("digits16", pixel_run, [], a.quiet))

    ev = DigitsEvaluator(16)
    fl = ev.fd_floor_bootstrap()
    vae, _ = latent.load_autoencoder(runs / "vae")
    rec = latent.decode(vae, latent.encode(vae, ev.x_heldout)).clamp(-1, 1)
    rec_mse, rec_acc = float(((rec - ev.x_heldout) ** 2).mean()), ev.accuracy(rec, ev.y_heldout)
    g = torch.Generator().manual_seed(0)
    prior = latent.decode(vae, torch.randn(100, *vae.latent_shape, generator=g)).clamp(-1, 1)
    save_image_grid(prior, images / "vae_prior_samples.png", nrow=10)
    z_prior = torch.randn(718, *vae.latent_shape, generator=torch.Generator().manual_seed(0))
    prior_fd = ev.fd(latent.decode(vae, z_prior).clamp(-1, 1))  # 2 chunks of 359, no labels: unmatched
    grid, nrow = latent.reconstruction_grid(vae, ev.x_heldout[:50])
    save_image_grid(grid, images / "vae_reconstructions.png", nrow=nrow)
    plot = scatter_2d(runs / "vae2d", images / "vae_latent2d.png")

    lat_model, lat_cfg = load_run(runs / "latent")
    info = lat_cfg["run"]
    labels = torch.arange(10).repeat_interleave(per_class)
    rows = []
    lat_dec = lambda z: latent.to_images(z, info)[0]  # noqa: E731
    for w in a.guidance:
        x, secs = timed_samples(lat_model, tuple(info["data_shape"]), labels, w, a.steps, lat_dec)
        rows.append(("latent", w, *score(ev, x, labels), secs / len(labels)))
        print(rows[-1], flush=True)
        if w == 1.0:
            save_image_grid(x.reshape(10, per_class, *x.shape[1:])[:, :10].flatten(0, 1),
                            images / "latent_digits.png", nrow=10)
    pix, pcfg = load_run(pixel_run)
    for w in a.guidance:
        x, secs = timed_samples(pix, tuple(pcfg["run"]["data_shape"]), labels, w, a.steps)
        rows.append(("pixel", w, *score(ev, x, labels), secs / len(labels)))
        print(rows[-1], flush=True)

    n_held, n_train = len(ev.y_heldout), len(ev.y_train)
    lines = ["# Latent diffusion benchmark: 16x16 digits, latent vs pixel space", "",
             _report.command("latent.py", argv), "", _report.machine(t0, "1 thread", load0), "",
             "Runs (finished runs are reused; the training log's seconds are those of the session that trained "
             "it):", *[f"- {n}" for n in notes], "",
             f"Held-out data: the VAE, the latent model and the pixel model hold out exactly the evaluator's held-out "
             f"digits (`data.holdout` = {HOLDOUT:g}, the same seed-0 permutation): they trained on the evaluator's "
             f"{n_train} training digits only (the latent model on their latents), so the {n_held} held-out digits "
             "of the FD floor are unseen by all three. (`vae2d_digits`, not scored, only draws the latent-space "
             "plot.)", "",
             f"VAE: latent {tuple(vae.latent_shape)} (64 numbers for 256 pixels), scale factor c = "
             f"{info['latent']['scale']:.4f} (1/std of the training split's posterior means); on the {n_held} "
             f"held-out digits, reconstruction MSE {rec_mse:.5f} on [-1, 1] and the real-data classifier's accuracy "
             f"on the reconstructions {rec_acc:.3f} (on the real held-out digits {ev.heldout_accuracy():.3f}). The "
             f"VAE's own prior samples D(z), z ~ N(0, I), are poor digits: FD {prior_fd:.1f} (718 samples, "
             f"unlabelled chunks of {n_held}), which is what the latent diffusion model fixes.",
             f"U-Net parameters: latent {n_params(lat_model.net):,}, pixel {n_params(pix.net):,}.", "",
             f"Samples: {per_class} per class (labels 0..9), DDIM {a.steps} steps, seed 0, batch {len(labels)}; "
             "w = classifier-free guidance scale (eps = (1+w) eps(x, y) - w eps(x, null), one batched call of "
             "twice the batch per step). Scores by `metrics.DigitsEvaluator(16)` (trained only on the real training "
             f"digits): conditional accuracy, and FD to the training digits, averaged over chunks of {n_held} samples "
             "with the held-out class counts (the chunks column). FD floor = the real held-out digits' FD: "
             f"**{fl.floor:.2f}**, class-stratified bootstrap 95 % interval **{fl.lo:.2f}-{fl.hi:.2f}** "
             f"(`DigitsEvaluator.fd_floor_bootstrap`). Seconds per image include decoding for the latent model.", "",
             "| model | w | accuracy | FD | chunks | vs floor interval | seconds / image |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {m} | {w:g} | {acc:.3f} | {fd:.2f} | {k} | {where(fd, fl)} | {s:.4f} |"
              for m, w, acc, fd, k, s in rows]
    best = max((r for r in rows if r[0] == "latent"), key=lambda r: r[2])
    speed = {(m, w): s for m, w, *_, s in rows}
    ratios = [speed[("pixel", w)] / speed[("latent", w)] for w in a.guidance]
    unguided = [f"the {m} model's {fd:.2f} is {where(fd, fl)} the floor's interval" for m, w, _, fd, _, _ in rows
                if w == 0]
    trend = []  # what guidance does to each model's accuracy and FD, read off the rows
    for m in dict.fromkeys(r[0] for r in rows):
        by_w = sorted((w, acc, fd) for mm, w, acc, fd, _, _ in rows if mm == m)
        if len(by_w) > 1:
            acc_up = all(hi[1] >= lo[1] for lo, hi in zip(by_w, by_w[1:]))
            fd_up = all(hi[2] >= lo[2] for lo, hi in zip(by_w, by_w[1:]))
            trend.append(f"{m}: accuracy {'rises' if acc_up else 'does not rise'} and FD "
                         f"{'rises' if fd_up else 'does not rise'} with w at every step")
    lines += ["", f"**Goal accuracy >= 0.95**: {'PASS' if best[2] >= 0.95 else 'FAIL'} "
              f"(latent, w = {best[1]:g}: {best[2]:.3f}).",
              f"Latent sampling is {min(ratios):.1f}-{max(ratios):.1f}x faster per image than pixel space at the "
              "same steps.", "",
              f"Pictures: docs/images/latent_digits.png (latent model, w = 1, one row per class), "
              f"docs/images/vae_reconstructions.png (rows: held-out digits, their reconstructions), "
              f"docs/images/vae_prior_samples.png (D(z), z ~ N(0, I)), {plot}.", "",
              "Notes: 16x16 digits because at 8x8 a 4x4x4 latent would hold as many numbers as the image. Seconds are "
              "wall-clock on a shared 2-core machine with other jobs running, so single numbers vary by tens of "
              "percent; the ratio is the robust part: the latent U-Net runs at 4x4 (16 positions) instead of 16x16 "
              "(256). Guidance: " + ("; ".join(trend) if trend else "one scale only") + ". Unguided, "
              + ("; ".join(unguided) if unguided else "(no w = 0 setting)")
              + ": the floor's digits are unseen by both models, so an FD below the interval would mean samples "
              "closer to the training digits than unseen real digits are (memory), not better than real data."]
    _report.write_results(Path(a.report), lines)

if __name__ == "__main__":
    main()
