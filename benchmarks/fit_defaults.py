"""Which sampler and grid a user should get by default on a learned model (issue 33, item 1): the trained digits
model scored by the held-out judge (``DigitsEvaluator``: a classifier trained only on real digits; Frechet distance
in its features against the real training split, compared with the floor of the real held-out digits).

Run (one thread):
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/fit_defaults.py --run runs/digits   # a `digits` preset run

Settings (class-conditional, w = 0, the 359 held-out labels, one chunk of 359 samples each, seed 0, through the
Pipeline as a user samples): the previous default (ddim, 50 steps, the process's default grid ``logsnr``), ddim 50
on ``trailing``, and unipc at 20 and 10 steps on the process's grid, on ``trailing`` and on its stored fit
(``Pipeline.fit``: 128 pilot states drawn from the prior with seed 0, classes in turn -- no digit image, real or
generated, enters the fit; 30 sampling runs plus one reference solve; written to ``RUN/fits/``). The FD of one chunk
of 359 samples varies by about the floor's bootstrap standard error, given with the floor.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

import _report
from torchdiffusion.evaluation.metrics import DigitsEvaluator
from torchdiffusion.runs import fits
from torchdiffusion.runs.pipeline import Pipeline

N_PILOT = 128  # pilot states of the fits (the seconds grow with it, the cost in network calls does not)
SETTINGS = (("ddim", 50, "default"), ("ddim", 50, "trailing"), ("unipc", 20, "default"), ("unipc", 20, "trailing"),
            ("unipc", 20, "fit"), ("unipc", 10, "default"), ("unipc", 10, "trailing"), ("unipc", 10, "fit"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a trained `digits` preset run folder (EMA weights)")
    ap.add_argument("--only", default=None, help="comma-separated setting indices (0-based) to run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "fit_defaults.md"))
    ap.add_argument("--note", action="append", default=[], help="a line for 'About this run' (repeatable)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()
    pipe = Pipeline.from_pretrained(a.run)
    if pipe.num_classes != 10 or pipe.config.get("preset") != "digits":
        raise SystemExit(f"{a.run}: expected a run of the `digits` preset (class-conditional, 10 classes)")
    ev = DigitsEvaluator(pipe.data_shape[-1])
    fl = ev.fd_floor_bootstrap()
    y = ev.y_heldout
    default_grid = pipe.config["sample"].get("grid") or "logsnr"
    chosen = SETTINGS if a.only is None else [SETTINGS[int(i)] for i in a.only.split(",")]
    rows, data = [], []
    for sampler, steps, grid in chosen:
        fit_note = ""
        if grid == "fit":
            s = time.time()
            rec = pipe.fit(sampler, steps, n_pilot=N_PILOT)
            fit_note = (f"{rec['decision']} ({', '.join(f'{k}={v}' for k, v in rec['options'].items())}); cost "
                        f"{rec['cost_runs']:.0f} runs ({rec['search_runs']:.0f} + reference {rec['reference_nfe']} "
                        f"calls), {time.time() - s:.0f} s")
        s = time.time()
        x = pipe(len(y), sampler=sampler, steps=steps, grid=None if grid in ("fit", "default") else grid,
                 class_labels=y, generator=torch.Generator().manual_seed(0))
        sec = time.time() - s
        used = pipe.note or ""
        if grid == "fit" and not used.startswith("using"):
            raise SystemExit(f"the stored fit was not used: {used}")
        fd, acc = ev.fd(x, y), ev.accuracy(x, y)
        label = default_grid + " (process default)" if grid == "default" else grid
        if grid == "fit":
            label = f"stored fit: {fit_note}"
        data.append({"sampler": sampler, "steps": steps, "grid": grid, "fd": fd, "fd_floor": fd / fl.floor,
                     "accuracy": acc, "seconds": sec})
        rows.append(f"| {sampler} | {steps} | {label} | {acc:.3f} | {fd:.2f} | {fd / fl.floor:.2f} | {sec:.0f} |")
        print(rows[-1], flush=True)
    prev = next((d for d in data if d["sampler"] == "ddim" and d["steps"] == 50 and d["grid"] == "default"), None)
    lines = [
        "# Default sampler and grid on the trained digits model (issue 33)", "",
        _report.command("fit_defaults.py"), "", _report.machine(t0, load0=load0), "",
        f"Model: `{a.run}` (the `digits` preset, EMA weights). Judge: `DigitsEvaluator({pipe.data_shape[-1]})`, "
        f"trained on real digits only; FD floor (real held-out vs real train) **{fl.floor:.2f}**, bootstrap standard "
        f"error {fl.se:.2f}, 95 % interval {fl.lo:.2f}-{fl.hi:.2f}. One chunk of {len(y)} samples per setting (the "
        "held-out labels, w = 0, seed 0), sampled through the Pipeline. The fit sees no digit image: pilot noise and "
        f"labels only ({fits.AUTO_CHOICES.get('unipc')} chosen for unipc).", "",
        "| sampler | steps (NFE) | grid | accuracy | FD | FD / floor | seconds |", "|---|---|---|---|---|---|---|",
        *rows, ""]
    if prev:
        lines.append(f"Previous default (ddim 50, {default_grid}): FD {prev['fd']:.2f} ({prev['fd_floor']:.2f}x the "
                     "floor).")
    out = Path(a.out)
    _report.write_results(out, lines, a.note, data={"floor": fl.floor, "floor_se": fl.se, "rows": data},
                          figures={"floor": float(fl.floor), "floor_se": float(fl.se)})


if __name__ == "__main__":
    main()
