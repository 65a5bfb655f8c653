"""``torchdiffusion eval RUN``: score a trained run's samples against exact or independent references.

- 2-D toys (ring, moons, swiss_roll, checkerboard, gmm): the mean negative log-likelihood of generated samples
  under the toy's exact density, beside the same number for exact samples (the data's entropy, to Monte Carlo
  error); both with standard errors.
- The generated shapes (a folder written by ``make-data shapes``, found by its ``dataset.json``; for a latent run,
  the autoencoder's data): the judge of ``evaluation/shapes.py`` (trained only on the real train split): accuracy,
  shape and colour-family accuracy, the free attributes' mix, and the Frechet distance to the held-out test split
  beside the real-data floor and its bootstrap interval.
- Digits (8x8, or upscaled): conditional accuracy (for class-conditional runs: the fraction of samples that a
  classifier trained only on real digits assigns to the requested class) and the Frechet distance in that
  classifier's feature space, beside the real-data floor (held-out vs training digits); see ``metrics.py``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from torchdiffusion import samplers
from torchdiffusion._files import prepare_output, read_json, write_json
from torchdiffusion._tensor import check_finite_values
from torchdiffusion.cli.commands import StepBar, command
from torchdiffusion.cli.evalref import add_ref_arguments, eval_against_folder
from torchdiffusion.data.datasets import toy_density
from torchdiffusion.data.shapes import read_marker
from torchdiffusion.evaluation.metrics import DigitsEvaluator
from torchdiffusion.evaluation.shapes import ShapesJudge
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.pipeline import Pipeline, default_guidance, require_kind

TOYS = ("ring", "moons", "swiss_roll", "checkerboard", "gmm")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `torchdiffusion train`")
    p.add_argument("--n", type=int, default=None, help="samples (default: 4000 for toys, 1077 for digits)")
    p.add_argument("--sampler", default=None, help="sampler (default: the run's sample.sampler)")
    p.add_argument("--steps", type=int, default=None, help="network evaluations (default: the run's)")
    p.add_argument("--grid", default=None, help="time grid (default: the sampler's/process's)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale w (conditional runs; default: the run's sample.guidance)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_ref_arguments(p)


def _mean_se(v) -> tuple[float, float]:
    v = v.double()
    return float(v.mean()), float(v.std() / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def _eval_toy(model, cfg: dict, a, sampler: str, steps: int) -> dict:
    n = a.n or 4000
    dens = toy_density(cfg["data"]["name"])
    x = _draw(model, cfg, model, n, None, a, sampler, steps).double()
    exact, _ = dens.sample(n, torch.Generator().manual_seed(a.seed + 1))
    nll, se = _mean_se(-dens.log_prob(x))
    ref, ref_se = _mean_se(-dens.log_prob(exact))
    return {"samples": n, "nll": nll, "nll_se": se, "exact_nll": ref, "exact_nll_se": ref_se}


def _eval_digits(model, cfg: dict, info: dict, a, sampler: str, steps: int) -> dict:
    shape = tuple(info["data_shape"])
    ev = DigitsEvaluator(shape[-1])
    n = a.n or 3 * len(ev.y_heldout)
    cond, base = None, model
    if info.get("num_classes"):
        cond = ev.y_heldout.repeat(n // len(ev.y_heldout) + 1)[:n]  # the held-out class counts
        if a.guidance:
            model = CFG(model, a.guidance)
    x = _draw(base, cfg, model, n, cond, a, sampler, steps)
    out = {"samples": n, "fd": ev.fd(x, cond), "fd_floor": ev.fd_floor()}
    if cond is not None:
        out["accuracy"] = ev.accuracy(x, cond)
    out["finite"] = bool(torch.isfinite(x).all())
    return out


def shapes_root(cfg: dict) -> str | None:
    """The shapes folder a run was trained on (its image data, or for a latent run its autoencoder's), or
    ``None`` when its data is not a shapes folder (no ``dataset.json`` of ``make-data shapes``)."""
    name = cfg["data"].get("name")
    lat = cfg.get("run", {}).get("latent")
    if lat:
        ae_cfg = Path(lat["autoencoder"]) / "config.json"
        name = read_json(ae_cfg, "autoencoder run config")["data"]["name"] if ae_cfg.is_file() else None
    info = read_marker(name) if isinstance(name, str) and Path(name).is_dir() else None
    return info["root"] if info else None


def _eval_shapes(model, cfg: dict, info: dict, a, sampler: str, steps: int, root: str) -> dict:
    def bar(it):
        return tqdm(it, desc="training the judge (once; cached)", unit="epoch", disable=a.quiet)
    judge = ShapesJudge(root, progress=bar)
    n = a.n or judge.n_ref
    cond, base = None, model
    if info.get("num_classes"):
        cond = judge.reference_labels(n)  # the reference's class counts, so that FD chunks match them
        if a.guidance:
            model = CFG(model, a.guidance)
    x = _draw(base, cfg, model, n, cond, a, sampler, steps, batch_size=250)
    res = judge.score(x, cond)
    res["judge_test_accuracy"] = judge.real_accuracy()["label"]
    res["finite"] = bool(torch.isfinite(x).all())
    return res


def _draw(base, cfg: dict, model, n: int, cond, a, sampler: str, steps: int, batch_size: int | None = None):
    """``n`` samples of ``model`` (``base`` or a guidance wrapper around it) through the run's Pipeline, with a
    progress bar: the same samples as ``torchdiffusion sample --seed``."""
    bar = StepBar("eval", a.quiet)
    pipe = Pipeline(base, cfg, path=a.run)
    try:
        x = pipe.generate(model, n, cond=cond, sampler=sampler, steps=steps, grid=a.grid,
                          generator=torch.Generator().manual_seed(a.seed), callback=bar, max_batch=batch_size)
    finally:
        bar.close()
    if pipe.note and pipe.note.startswith("using "):
        print(pipe.note)
    return x


def _run(a) -> int:
    if a.json:
        prepare_output(a.json)  # refuse an unwritable --json before the work
    model, cfg = load_run(a.run, ema=not a.no_ema)

    require_kind(cfg, a.run, ("diffusion", "latent"), "eval")
    if a.n is not None and a.n < 1:
        raise ValueError(f"--n must be >= 1, got {a.n}")
    info = cfg["run"]
    sampler = a.sampler or cfg["sample"]["sampler"]
    samplers.get(sampler)
    steps = a.steps if a.steps is not None else int(cfg["sample"]["steps"])
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    # a.grid None: a stored fit for this sampler and steps, else the run's own grid (the Pipeline decides)
    name = info.get("data_name") or cfg["data"]["name"]
    if a.guidance and not info.get("num_classes"):
        raise ValueError("--guidance needs a class-conditional run (trained with data.conditional=true)")
    if a.guidance is None:  # the run's sample.guidance for a class-conditional run (runs/pipeline.default_guidance)
        a.guidance = default_guidance(cfg, bool(info.get("num_classes")))
    if a.ref:  # real images against a reference folder (issue 19)
        res = check_finite_values(eval_against_folder(a, model, cfg, sampler, steps), "the evaluation")
        print(f"{res['samples']} samples ({sampler}, {steps} NFE) against {a.ref}: "
              + ", ".join(f"{k} {v:.4g}" for k, v in res.items() if k not in ("samples", "reference")))
    elif (root := shapes_root(cfg)) is not None:
        res = check_finite_values(_eval_shapes(model, cfg, info, a, sampler, steps, root), "the evaluation")
        acc = (f"accuracy {res['accuracy']:.3f} (shape {res['accuracy_shape']:.3f}, colour family "
               f"{res['accuracy_color_family']:.3f}), " if "accuracy" in res else "")
        print(f"shapes: {res['samples']} samples ({sampler}, {steps} NFE, w={a.guidance}): {acc}FD {res['fd']:.2f} "
              f"(real-data floor {res['fd_floor']:.2f}, 95 % interval {res['fd_floor_lo']:.2f}-"
              f"{res['fd_floor_hi']:.2f}); judge accuracy on real test images {res['judge_test_accuracy']:.3f}")
    elif name in TOYS:
        res = check_finite_values(_eval_toy(model, cfg, a, sampler, steps), "the evaluation")
        print(f"{name}: {res['samples']} samples ({sampler}, {steps} NFE): NLL {res['nll']:.4f} +- "
              f"{res['nll_se']:.4f} nats; exact samples {res['exact_nll']:.4f} +- {res['exact_nll_se']:.4f}")
    elif name == "digits":
        res = check_finite_values(_eval_digits(model, cfg, info, a, sampler, steps), "the evaluation")
        acc = f"accuracy {res['accuracy']:.3f}, " if "accuracy" in res else ""
        print(f"digits: {res['samples']} samples ({sampler}, {steps} NFE, w={a.guidance}): {acc}"
              f"FD {res['fd']:.2f} (real-data floor {res['fd_floor']:.2f})")
    else:
        raise ValueError(f"eval knows the 2-D toys ({', '.join(TOYS)}), digits and shapes folders; this run's data "
                         f"is {name!r} (use `torchdiffusion likelihood` for bits/dim of other data)")
    if a.json:
        write_json(a.json, {"run": str(a.run), "sampler": sampler, "steps": steps, **res})
    return 0


command("eval", "score samples of a trained run (toys: exact NLL; digits, shapes: accuracy and Frechet distance)")(
    (_args, _run))
