"""Choose the likelihood_digits recipe without the test digits (issue 17): every candidate trains on digits[:1000] and
is scored on digits[1000:1200], a validation split inside the likelihood benchmark's training digits[:1200]. The
test digits[1200:] are never loaded here.

    .venv/bin/python benchmarks/likelihood_select.py --candidates baseline,no-fourier # train + score (resumable)
    .venv/bin/python benchmarks/likelihood_select.py --report                         # table from cached scores

Per candidate: the validation bound (32 stratified times, the same generator seed at every point) every ``--every``
steps of its run (a learning curve under that run's own cosine schedule), then at the end the probability-flow ODE
(the likelihood benchmark's settings) and the bound on the 200 validation digits, and the paired difference of both
to the ``baseline`` candidate (the same digits, the same dequantization draws). Results:
benchmarks/results/likelihood_select.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from _report import command, machine, write_results
from likelihood import LEVELS, ODE  # the likelihood benchmark's levels and ODE settings
from torchdiffusion.data.datasets import Dataset, load
from torchdiffusion.likelihood import bits_per_dim
from torchdiffusion.runs import config
from torchdiffusion.runs.train import build_trainer, ema_model

N_FIT, N_VAL = 1000, 200
# The recipe before augmentation: likelihood_digits with data.augment = 0 and 3000 steps (its former default). Every
# candidate is that recipe with the changes listed (later --set values win).
BASE = ["data.augment=0", "train.steps=3000"]
# name -> (--set overrides on BASE, what it tries)
CANDIDATES: dict[str, tuple[list[str], str]] = {
    "baseline": ([], "likelihood_digits before augmentation (3000 steps, Fourier features, dropout 0.1)"),
    "no-fourier": (["model.fourier_features=[]"], "no Fourier features"),
    "dropout-0.2 (4500 steps)": (["model.dropout=0.2", "train.steps=4500"], "more dropout, 1.5x the steps"),
    "augment-0.2 (4500 steps)": (["data.augment=0.2", "train.steps=4500"],
                                 "non-leaking augmentation (flips, quarter turns, 1-pixel shifts; each p = 0.2), "
                                 "1.5x the steps"),
    "augment-0.3 (6000 steps)": (["data.augment=0.3", "train.steps=6000"], "augmentation p = 0.3, 2x the steps"),
    "augment-0.2 (9000 steps)": (["data.augment=0.2", "train.steps=9000"],
                                 "augmentation p = 0.2, 3x the steps (the 30-minute budget on 2 idle cores)"),
}


def split() -> tuple[Dataset, torch.Tensor]:
    d = load("digits")
    fit = Dataset(d.x[:N_FIT], d.y[:N_FIT], levels=LEVELS, num_classes=10, name="digits")
    return fit, d.x[N_FIT:N_FIT + N_VAL]


def score(model, val: torch.Tensor, method: str) -> torch.Tensor:
    """Per-digit bits/dim of the validation digits (generator seed 0: the same draws for every model and step)."""
    opts = dict(ODE) if method == "ode" else {"n_t": 32, "dequantize": "uniform"}
    g = torch.Generator().manual_seed(0)
    r = bits_per_dim(model, val, method=method, levels=LEVELS, value_range=(-1, 1), generator=g, **opts)
    return r.bpd.detach().double()


def run(name: str, fit: Dataset, val: torch.Tensor, work: Path, every: int, threads: int, quick: bool) -> dict:
    sets, what = CANDIDATES[name]
    sets = [*sets, *(["train.steps=20"] if quick else [])]
    cfg = config.resolve("likelihood_digits", [*BASE, *sets, "train.device=cpu", f"train.threads={threads}",
                                               "train.ckpt_every=500", "train.log_every=100"])
    out = work / name
    out.mkdir(parents=True, exist_ok=True)
    curve_file = out / "curve.json"
    curve = json.loads(curve_file.read_text()) if curve_file.is_file() else {"points": [], "train_s": 0.0}
    tr = build_trainer(cfg, out, dataset=fit, progress=False, resume=True)
    torch.set_num_threads(threads)  # scoring too (Trainer.run gives the caller's count back after each chunk)
    total = int(cfg["train"]["steps"])
    while tr.step < total:
        t0 = time.time()
        tr.run(stop_after=every - tr.step % every)
        curve["train_s"] += time.time() - t0
        b = score(ema_model(tr), val, "vlb")
        curve["points"].append([tr.step, float(b.mean())])
        curve_file.write_text(json.dumps(curve))
        print(f"{name}: step {tr.step}: validation bound {float(b.mean()):.4f}", flush=True)
    model = ema_model(tr)
    t0 = time.time()
    ode = score(model, val, "ode")
    ode_s = time.time() - t0
    vlb = score(model, val, "vlb")
    print(f"{name}: ODE {float(ode.mean()):.4f} bound {float(vlb.mean()):.4f} ({ode_s:.0f} s)", flush=True)
    return {"name": name, "sets": sets, "what": what, "steps": total, "train_s": curve["train_s"],
            "curve": curve["points"], "ode": ode.tolist(), "vlb": vlb.tolist(), "ode_s": ode_s}


def mean_se(v: list[float]) -> tuple[float, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(len(t)))


def report(work: Path, out: Path, t0: float, load0: tuple[float, ...], notes: list[str]) -> None:
    res = {json.loads(p.read_text())["name"]: json.loads(p.read_text()) for p in work.glob("*/select_result.json")}
    base = res.get("baseline")
    lines = ["# Choosing likelihood_digits' recipe on a validation split (issue 17)", "",
             machine(t0, "train.threads as given per candidate", load0), "", command("likelihood_select.py"), "",
             f"Fit: digits[:{N_FIT}]; validation: digits[{N_FIT}:{N_FIT + N_VAL}] (both inside the likelihood "
             "benchmark's training digits[:1200]; its test digits[1200:] are not loaded). Bits/dim of the 17-level "
             "digits, EMA weights; ODE and bound as in benchmarks/likelihood.py (one dequantization draw per digit, "
             "generator seed 0). \"vs baseline\": the paired mean difference over the 200 digits +- its SE. Every "
             "candidate is the baseline (likelihood_digits before augmentation: data.augment=0, 3000 steps) with the "
             "changes its name lists.", "",
             "| candidate | what | steps | train s | val ODE | SE | vs baseline | val bound | SE | vs baseline | "
             "bound curve (step: bits/dim) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in [n for n in CANDIDATES if n in res]:
        r = res[name]
        cells = []
        for key in ("ode", "vlb"):
            m, se = mean_se(r[key])
            d = "" if base is None or name == "baseline" else \
                "{:+.3f} +- {:.3f}".format(*mean_se([a - b for a, b in zip(r[key], base[key])]))
            cells += [f"{m:.3f}", f"{se:.3f}", d]
        curve = ", ".join(f"{s}: {b:.3f}" for s, b in r["curve"])
        what = CANDIDATES[name][1]
        lines.append(f"| {name} | {what} | {r['steps']} | {r['train_s']:.0f} | {' | '.join(cells)} | {curve} |")
    lines += ["", "The curve is the validation bound of the EMA weights during the candidate's own run (its cosine "
              "learning-rate schedule ends at its own step count), so a curve's minimum is not the best length for "
              "another step count."]
    write_results(out, lines, notes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--candidates", default=",".join(CANDIDATES), help="comma-separated subset of: "
                    + ", ".join(CANDIDATES))
    ap.add_argument("--every", type=int, default=500, help="steps between points of the validation curve")
    ap.add_argument("--threads", type=int, default=1, help="train.threads of each candidate")
    ap.add_argument("--work", default="runs/likelihood_select")
    ap.add_argument("--report", action="store_true", help="only write the table from the cached scores")
    ap.add_argument("--out", default="benchmarks/results/likelihood_select.md")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 16 validation digits, loose ODE")
    ap.add_argument("--note", action="append", default=[], help="a line about this run for the results file")
    a = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    work = Path(a.work)
    fit, val = split()
    if a.quick:
        val = val[:16]
        ODE.update(rtol=1e-3, atol=1e-3)
    if not a.report:
        for name in a.candidates.split(","):
            if name not in CANDIDATES:
                raise SystemExit(f"unknown candidate {name!r}; allowed: {', '.join(CANDIDATES)}")
            if (work / name / "select_result.json").is_file():
                print(f"{name}: cached", flush=True)
                continue
            res = run(name, fit, val, work, a.every, a.threads, a.quick)
            (work / name / "select_result.json").write_text(json.dumps(res))
    report(work, Path(a.out), t0, load0, a.note)


if __name__ == "__main__":
    sys.exit(main())
