"""How many torch threads to sample with (issue 29): the default of ``sample.threads``.

DDIM, 50 steps, 1000 samples of the ``ring`` preset's MLP (and 64 digits of the ``digits`` U-Net) through
``td.Pipeline`` at 1 and 2 threads (and torch's default), alternating, the median of ``--repeats`` runs each.
Weights are the freshly initialised ones: the time of a network call does not depend on its values.
Writes benchmarks/results/sample_threads.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

import torchdiffusion as td
from _report import command, machine, write_results
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import build_model

OUT = Path(__file__).parent / "results" / "sample_threads.md"


def pipeline(preset: str, shape: tuple[int, ...], ncls: int | None) -> td.Pipeline:
    cfg = config_mod.resolve(preset)
    torch.manual_seed(0)
    model = build_model(cfg, shape, ncls).eval()
    return td.Pipeline(model, {**cfg, "run": {"data_shape": list(shape), "num_classes": ncls,
                                              "value_range": [-1.0, 1.0]}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()
    default = torch.get_num_threads()
    cases = [("ring (MLP), 1000 samples", pipeline("ring", (2,), None), 1000, None),
             ("digits (U-Net), 64 samples", pipeline("digits", (1, 8, 8), 10), 64, 3)]
    settings = [1, 2] + ([0] if default not in (1, 2) else [])
    lines = ["DDIM, 50 steps, through `td.Pipeline(threads=...)`; median wall-clock seconds of "
             f"{a.repeats} runs, settings alternating.", "",
             "| model | " + " | ".join(f"threads={s or f'0 (torch default, {default})'}" for s in settings) + " |",
             "|---|" + "---|" * len(settings)]
    for name, pipe, n, label in cases:
        times: dict[int, list[float]] = {s: [] for s in settings}
        for _ in range(a.repeats):
            for s in settings:
                t = time.perf_counter()
                pipe(n=n, sampler="ddim", steps=50, class_labels=label, generator=torch.Generator().manual_seed(0),
                     threads=s, progress=False)
                times[s].append(time.perf_counter() - t)
        lines.append(f"| {name} | " + " | ".join(f"{statistics.median(times[s]):.2f} s" for s in settings) + " |")
        print(lines[-1], flush=True)
    head = ["# Sampling threads", "", command("sample_threads.py"),
            machine(t0, f"torch default {default} threads", load0), ""]
    write_results(OUT, head + lines)


if __name__ == "__main__":
    main()
