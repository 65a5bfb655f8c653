"""The 8-Gaussian ring: the README's ring figures (training time, sample NLL, learned-score error), measured.

Run (a few minutes on one CPU thread):
    .venv/bin/python benchmarks/ring.py      # trains the demo's ring run into runs/ring_bench (resumed if present)

The run is the one ``torchdiffusion demo`` trains (preset ``ring``, 3000 steps, one thread). The figures come from
the command line, each command printed in the results file:

- ``torchdiffusion eval RUN --sampler ddpm --steps 200 --grid G``: mean NLL (nats, with its standard error) of 4000
  ancestral samples under the ring's exact density, beside 4000 exact samples, for the grid the demo pins
  (``trailing``) and DDPM's default (``logsnr``);
- ``torchdiffusion scorefield RUN --sigma 0.2``: the density-weighted relative squared error of the learned score
  against the exact noised score at sigma = 0.2.

The README's two ring pictures are written by the same invocation from the same run, by the commands printed in the
results file: ``docs/images/ring_samples.png`` (``torchdiffusion sample``: 2000 DDPM samples on the ``trailing``
grid beside the data) and ``docs/images/ring_scorefield.png`` (the scorefield command above, ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _report
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "torchdiffusion"]
SETS = ["train.steps=3000", "train.ckpt_every=1000", "train.threads=1"]  # the demo's (runs/demo.py toy_demo)
GRIDS = ("trailing", "logsnr")


def cli(args: list[str]) -> str:
    """Run ``torchdiffusion ARGS`` on one thread; its stdout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=ROOT)
    if res.returncode:
        raise SystemExit(f"torchdiffusion {' '.join(args)} failed: {res.stderr.strip()}")
    return res.stdout


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", default="runs/ring_bench", help="where to train (resumed if present)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ring.md"))
    ap.add_argument("--images", default="docs/images", help="where the README's ring pictures are written")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()
    res = build_trainer(config_mod.resolve("ring", SETS), a.run, progress=False).run()
    trained = (f"trained {res['steps_run']} steps in {res['seconds']:.0f} s (wall-clock) in this invocation"
               if res["steps_run"] else "reused (trained by an earlier invocation)")
    print(f"ring: {res['step']} steps, {trained}", flush=True)
    rows = []
    head = ("| command | samples | NLL of samples (nats) | NLL of exact samples (nats) |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for grid in GRIDS:
            args = ["eval", a.run, "--sampler", "ddpm", "--steps", "200", "--grid", grid, "--quiet"]
            cli([*args, "--json", f"{tmp}/{grid}.json"])
            r = json.loads(Path(f"{tmp}/{grid}.json").read_text())
            rows.append(f"| `torchdiffusion {' '.join(args)}` | {r['samples']} | {r['nll']:.3f} +- {r['nll_se']:.3f} "
                        f"| {r['exact_nll']:.3f} +- {r['exact_nll_se']:.3f} |")
            print(rows[-1], flush=True)
    pictures = {"samples": ["sample", a.run, "--sampler", "ddpm", "--steps", "200", "--grid", "trailing", "--n", "2000",
                            "--seed", "0", "--quiet", "--out", f"{a.images}/ring_samples.png"]}
    cli(pictures["samples"])
    sf_args = ["scorefield", a.run, "--sigma", "0.2"]
    pictures["score field"] = [*sf_args, "--out", f"{a.images}/ring_scorefield.png"]
    m = re.search(r"relative squared error of the learned score: ([0-9.]+)", cli(pictures["score field"]))
    if m is None:
        raise SystemExit("scorefield printed no error")
    sf = (f"`torchdiffusion {' '.join(sf_args)}`: density-weighted relative squared error of the learned score "
          f"**{m[1]}**")
    print(sf)
    text = "\n".join([
        "# The 8-Gaussian ring: training time, sample NLL, learned score", "",
        _report.command("ring.py", argv), "", _report.machine(t0, load0=load0), "",
        f"Run: preset `ring` --set {' '.join(SETS)} (what `torchdiffusion demo` trains) in `{a.run}`: {res['step']} "
        f"steps, {trained}.", "",
        "Sample NLL: DDPM ancestral sampling, 200 steps, seed 0; mean and standard error over the samples, under "
        "the exact density (the exact samples' NLL is the data's entropy to Monte Carlo error). `trailing` is the "
        "grid the demo pins; `logsnr` is DDPM's default.", "",
        head, *rows, "",
        f"Learned score at sigma = 0.2: {sf}.", "",
        "Pictures (written by this invocation from the same run): " + "; ".join(
            f"{k}: `{a.images}/{Path(v[-1]).name}` (`torchdiffusion {' '.join(v)}`)" for k, v in pictures.items())
        + "."])
    _report.write_results(Path(a.out), text.split("\n"), echo=False,
                          figures={"learned score error at sigma 0.2": m[1]})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
