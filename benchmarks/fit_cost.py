"""What a fitted grid costs and whether it carries over (issue 33, items 2 and 3): issue 16's fit against the
default fit of issue 33, on exact Gaussian-mixture models, scored on fresh states never used in either fit.

Run (one thread; a few minutes on an idle 2-core machine):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_cost.py               # ring-2d, outliers-16d, gmm48, gmm32
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_cost.py --rows all    # also aniso-64d and gmm64 (slow)
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_cost.py --rows gmm32  # problems whose name contains gmm32

Rows: (problem, NFE) for unipc with its order and final step chosen by the fit (``fits.AUTO_CHOICES``). Problems:
three of ``benchmarks/samplers.py`` (ring-2d/linear, outliers-16d/linear, aniso-64d/linear: the mixtures and
schedules are imported from there) and three new ones made here for this benchmark, never used to design the fit:
``gmm32/linear`` (32-D, 6 components, rotated spectra 0.2 .. 1e-3), ``gmm64/scaled_linear`` (64-D, 8 components,
rotated spectra 0.3 .. 1e-4, uneven weights) and ``gmm48/linear`` (48-D, 5 tight components far apart, std
0.05: flips between components are likely).

For each problem: 256 pilot states (seed 1000) and 256 fresh scored states (seed 0, never seen by a fit), both
exact draws of p(x_T); the fits' reference is ``gridfit.end_state`` of the pilot (dopri5, rtol = atol = 1e-6, solved
once per problem and shared by both fits: its cost, in network calls, is stated once per problem); the score is the
RMS against the fresh states' end state at rtol = atol = 1e-7.

- issue 16's fit: ``grids.optimize(..., method="search", robust=False, budget=300, starts=(logsnr, karras,
  optimized))``: every start grid with every option combination, pattern search, the best on validation along the
  path;
- issue 33's default fit: ``grids.optimize(...)`` with its defaults: ``method="fast"`` with ``max_runs=30`` (30
  sampling runs of the pilot batch, plus the reference solve), start grids logsnr / karras / optimized / trailing,
  and the robust selection (a paired test on the held-out third of the pilot: the fitted grid is kept only when it
  beats the best fixed start grid by 2 standard errors, else that fixed grid is returned);
- the best fixed grid: the best of the four start grids x the four option combinations, chosen on the fresh states
  themselves (an oracle choice no fit can make: the hardest comparison for "never worse than the best fixed grid").

Goals: cost <= 30 runs + one reference solve, fresh RMS within 10 % of issue 16's fit (ratio <= 1.10), and not worse
than the best fixed grid on fresh states (a paired comparison on the 256 fresh states: the difference in mean squared
error and its standard error are given; "worse" means more than 2 standard errors above).
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
from tqdm.auto import tqdm

import _report
import torchdiffusion as td

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import Counter  # noqa: E402  (the network-call counter of the grid-fit tests, as faults.py uses theirs)
from samplers import SCHEDULES, _rotated, aniso_64d, outliers_16d, ring_2d
from torchdiffusion.parameterization.interop import process_from_diffusers
from torchdiffusion.runs.fits import AUTO_CHOICES
from torchdiffusion.samplers import gridfit

D = torch.float64
SAMPLER = "unipc"
CHOICES = AUTO_CHOICES[SAMPLER]
STARTS = ("logsnr", "karras", "optimized", "trailing")
N_PILOT, N_FRESH, PILOT_SEED, FRESH_SEED = 256, 256, 1000, 0
OLD = {"method": "search", "robust": False, "budget": 300, "starts": ("logsnr", "karras", "optimized")}


def gmm32() -> td.GaussianMixture:
    """32-D, 6 components, random rotations of a spectrum 0.2 .. 1e-3, means of norm ~1."""
    g = torch.Generator().manual_seed(3201)
    means, covs = _rotated(32, 6, torch.logspace(math.log10(0.2), -3, 32, dtype=D), 0.18, g)
    return td.GaussianMixture(torch.ones(6), means, covs)


def gmm64() -> td.GaussianMixture:
    """64-D, 8 components with uneven weights, random rotations of a spectrum 0.3 .. 1e-4."""
    g = torch.Generator().manual_seed(6401)
    means, covs = _rotated(64, 8, torch.logspace(math.log10(0.3), -4, 64, dtype=D), 0.15, g)
    return td.GaussianMixture(torch.rand(8, generator=g, dtype=D) + 0.2, means, covs)


def gmm48() -> td.GaussianMixture:
    """48-D, 5 tight isotropic components (std 0.05) with means of norm ~2 (far apart: flips are costly)."""
    g = torch.Generator().manual_seed(4801)
    means = torch.randn(5, 48, generator=g, dtype=D)
    means = 2 * means / means.norm(dim=1, keepdim=True)
    return td.GaussianMixture(torch.ones(5), means, torch.full((5,), 0.0025, dtype=D))


PROBLEMS = {  # name: (mixture, schedule, NFEs, new here)
    "ring-2d/linear": (ring_2d, "linear", (5, 10), False),
    "outliers-16d/linear": (outliers_16d, "linear", (10,), False),
    "gmm48/linear": (gmm48, "linear", (5, 10), True),
    "gmm32/linear": (gmm32, "linear", (5, 10), True),
    "aniso-64d/linear": (aniso_64d, "linear", (10,), False),
    "gmm64/scaled_linear": (gmm64, "scaled_linear", (5, 10), True),
}
DEFAULT_ROWS = "ring-2d,outliers-16d,gmm48,gmm32"  # the full-covariance 64-D problems take far longer: --rows all


def sq_err(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return ((x.to(D) - ref) ** 2).reshape(len(x), -1).mean(1)


def paired(e_a: torch.Tensor, e_b: torch.Tensor) -> tuple[float, float]:
    return gridfit.paired_gain(e_a, e_b)


def run_problem(name: str, nfes: tuple[int, ...]) -> tuple[list[dict], dict]:
    make, schedule, _, new = PROBLEMS[name]
    gm = make()
    proc = process_from_diffusers({"num_train_timesteps": 1000, **SCHEDULES[schedule]})
    net = Counter(gm.net(proc, "eps"))
    model = td.Denoiser(net, proc, prediction="eps")
    pilot = gm.sample_t(N_PILOT, proc, proc.t_max, generator=torch.Generator().manual_seed(PILOT_SEED))
    fresh = gm.sample_t(N_FRESH, proc, proc.t_max, generator=torch.Generator().manual_seed(FRESH_SEED))
    t0 = time.time()
    ref_pilot, ref_nfe = gridfit.end_state(model, pilot)
    ref_s = time.time() - t0
    ref_fresh, _ = gridfit.end_state(model, fresh, rtol=1e-7, atol=1e-7)
    rows = []
    for nfe in nfes:
        row = {"problem": name, "new_problem": new, "nfe": nfe, "dim": gm.dim}
        for key, kw in (("old", OLD), ("new", {})):
            net.calls = 0
            t0 = time.time()
            ts, info = td.grids.optimize(model, SAMPLER, nfe, x_T=pilot, reference=ref_pilot, choices=CHOICES,
                                         return_info=True, **kw)
            secs = time.time() - t0
            e = sq_err(td.sample(model, fresh, SAMPLER, grid=ts, **info["options"]), ref_fresh)
            row[key] = {"runs": info["search_runs"], "calls": net.calls, "seconds": secs, "val": info["val"],
                        "fresh": float(e.mean().sqrt()), "options": info["options"],
                        "decision": info.get("decision", "fitted"), "fixed": info.get("fixed"),
                        "gain_z": (info["gain"] / info["gain_se"] if info.get("gain_se") else None)}
            row[key + "_err"] = e
        fixed = {}
        for g in STARTS:
            for o in CHOICES["order"]:
                for f in CHOICES["final_step"]:
                    x = td.sample(model, fresh, SAMPLER, grid=td.grids.get(g, proc, nfe), order=o, final_step=f)
                    fixed[(g, o, f)] = sq_err(x, ref_fresh)
        best = min(fixed, key=lambda k: float(fixed[k].mean()))
        e_best = fixed[best]
        row["best_fixed"] = {"config": f"{best[0]}, order {best[1]}, {best[2]}", "fresh": float(e_best.mean().sqrt())}
        for key in ("old", "new"):
            m, se = paired(row.pop(key + "_err"), e_best)
            row[key]["vs_fixed_diff"], row[key]["vs_fixed_se"] = m, se
        rows.append(row)
        print(f"{name} NFE {nfe}: old {row['old']['fresh']:.3e} ({row['old']['runs']:.0f} runs), new "
              f"{row['new']['fresh']:.3e} ({row['new']['runs']:.0f} runs, {row['new']['decision']}), best fixed "
              f"{row['best_fixed']['fresh']:.3e} ({row['best_fixed']['config']})", flush=True)
    return rows, {"problem": name, "reference_nfe": ref_nfe, "reference_seconds": ref_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=DEFAULT_ROWS,
                    help="comma-separated parts of problem names to run, or 'all' (default: %(default)s)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_cost.md"))
    ap.add_argument("--note", action="append", default=[], help="a line for 'About this run' (repeatable)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()
    parts = args.rows.split(",")
    names = [n for n in PROBLEMS if args.rows == "all" or any(p in n for p in parts)]
    if not names:
        raise SystemExit(f"no problem matches {args.rows!r}; problems: {', '.join(PROBLEMS)}")
    rows, refs = [], []
    for name in tqdm(names, desc="problems"):
        r, ref = run_problem(name, PROBLEMS[name][2])
        rows += r
        refs.append(ref)
    within = [r for r in rows if r["new"]["fresh"] <= 1.10 * r["old"]["fresh"]]
    worse = [r for r in rows if r["new"]["vs_fixed_diff"] > 2 * r["new"]["vs_fixed_se"]]
    worse_old = [r for r in rows if r["old"]["vs_fixed_diff"] > 2 * r["old"]["vs_fixed_se"]]
    cost_ok = [r for r in rows if r["new"]["runs"] <= 30]
    lines = [
        "# Fitted grids: cost and carry-over to fresh states (issue 33)", "",
        _report.command("fit_cost.py"), "",
        _report.machine(t0, load0=load0), "",
        "Method and problems: see the module docstring of `benchmarks/fit_cost.py`. unipc, order and final step "
        "chosen by each fit; 256 pilot states, scored on 256 fresh states never used by either fit; RMS per "
        "coordinate against the PF-ODE end state. 'old' = issue 16's fit (budget 300, every start x option, pattern "
        "search, best on validation along the path); 'new' = issue 33's default `td.grids.optimize` (fast method, 30 "
        "runs, robust selection with fallback to the best fixed grid); 'best fixed' = the best of 4 grids x 4 option "
        "combinations chosen on the fresh states themselves. Cost in sampling runs of the pilot batch (NFE network "
        "calls each), the reference solve not included (stated per problem below, shared by both fits).", "",
        f"- Cost goal (new <= 30 runs + one reference solve): {len(cost_ok)} of {len(rows)} rows.",
        f"- Accuracy goal (new fresh RMS <= 1.10 x old): {len(within)} of {len(rows)} rows.",
        f"- Never worse than the best fixed grid on fresh states (paired difference in squared error <= 2 standard "
        f"errors): new {len(rows) - len(worse)} of {len(rows)} rows; old {len(rows) - len(worse_old)} of {len(rows)}.",
        "",
        "| problem | NFE | old: runs | old: fresh RMS | new: runs | new: decision | new: fresh RMS | new / old | "
        "best fixed (on fresh) | best fixed RMS | new vs best fixed: diff +- se (x1e-6) | old vs best fixed: diff +- "
        "se (x1e-6) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        o, n, b = r["old"], r["new"], r["best_fixed"]
        star = " (new)" if r["new_problem"] else ""
        dec = n["decision"] if n["decision"] == "fitted" else f"fixed: {n['fixed']}"
        lines.append(
            f"| {r['problem']}{star} | {r['nfe']} | {o['runs']:.0f} | {o['fresh']:.3e} | {n['runs']:.0f} | {dec} | "
            f"{n['fresh']:.3e} | {n['fresh'] / o['fresh']:.3f} | {b['config']} | {b['fresh']:.3e} | "
            f"{1e6 * n['vs_fixed_diff']:+.3g} +- {1e6 * n['vs_fixed_se']:.2g} | "
            f"{1e6 * o['vs_fixed_diff']:+.3g} +- {1e6 * o['vs_fixed_se']:.2g} |")
    lines += ["", "Reference solves of the pilot (dopri5, rtol = atol = 1e-6; counted once per problem, on top of the "
              "runs above): " + "; ".join(f"{x['problem']} {x['reference_nfe']} network calls "
                                           f"({x['reference_seconds']:.0f} s)" for x in refs) + "."]
    out = Path(args.out)
    json_rows = [{**r, "old": {k: v for k, v in r["old"].items()}, "new": r["new"]} for r in rows]
    raw = json.loads(json.dumps({"rows": json_rows, "references": refs}, default=str))
    _report.write_results(out, lines, args.note, data=raw)  # NAME.json: the tables, and the raw rows as "data"


if __name__ == "__main__":
    sys.exit(main())
