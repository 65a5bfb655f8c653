"""``torchdiffusion eval RUN``: score a trained run's samples against exact or independent references.

- 2-D toys (ring, moons, swiss_roll, checkerboard, gmm): the mean negative log-likelihood of generated samples
  under the toy's exact density, beside the same number for exact samples (the data's entropy, to Monte Carlo
  error); both with standard errors.
- Digits (8x8, or upscaled): conditional accuracy (for class-conditional runs: the fraction of samples that a
  classifier trained only on real digits assigns to the requested class) and the Frechet distance in that
  classifier's feature space, beside the real-data floor (held-out vs training digits); see ``metrics.py``.
"""

from __future__ import annotations

import argparse
import math

import torch

from torchdiffusion import samplers
from torchdiffusion._files import prepare_output, write_json
from torchdiffusion._tensor import check_finite_values
from torchdiffusion.cli.commands import StepBar, command
from torchdiffusion.cli.evalref import add_ref_arguments, eval_against_folder
from torchdiffusion.data.datasets import toy_density
from torchdiffusion.evaluation.metrics import DigitsEvaluator
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.pipeline import Pipeline, require_kind

TOYS = ("ring", "moons", "swiss_roll", "checkerboard", "gmm")


def _args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run folder written by `torchdiffusion train`")
    p.add_argument("--n", type=int, default=None, help="samples (default: 4000 for toys, 1077 for digits)")
    p.add_argument("--sampler", default=None, help="sampler (default: the run's sample.sampler)")
    p.add_argument("--steps", type=int, default=None, help="network evaluations (default: the run's)")
    p.add_argument("--grid", default=None, help="time grid (default: the sampler's/process's)")
    p.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance scale w (conditional)")
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


def _draw(base, cfg: dict, model, n: int, cond, a, sampler: str, steps: int):
    """``n`` samples of ``model`` (``base`` or a guidance wrapper around it) through the run's Pipeline, with a
    progress bar: the same samples as ``torchdiffusion sample --seed``."""
    bar = StepBar("eval", a.quiet)
    pipe = Pipeline(base, cfg, path=a.run)
    try:
        x = pipe.generate(model, n, cond=cond, sampler=sampler, steps=steps, grid=a.grid,
                          generator=torch.Generator().manual_seed(a.seed), callback=bar)
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
    if a.ref:  # real images against a reference folder (issue 19)
        res = check_finite_values(eval_against_folder(a, model, cfg, sampler, steps), "the evaluation")
        print(f"{res['samples']} samples ({sampler}, {steps} NFE) against {a.ref}: "
              + ", ".join(f"{k} {v:.4g}" for k, v in res.items() if k not in ("samples", "reference")))
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
        raise ValueError(f"eval knows the 2-D toys ({', '.join(TOYS)}) and digits; this run's data is {name!r} "
                         "(use `torchdiffusion likelihood` for bits/dim of other data)")
    if a.json:
        write_json(a.json, {"run": str(a.run), "sampler": sampler, "steps": steps, **res})
    return 0


command("eval", "score samples of a trained run (toys: exact NLL; digits: accuracy and Frechet distance)")(
    (_args, _run))
