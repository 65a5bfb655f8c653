"""The score family on digits: VP, VE and NCSN (presets ``vp_digits``, ``ve_digits``, ``ncsn_digits``), each
trained on the real-data evaluator's training digits and sampled with its native sampler, scored by FD.

Run (training included: about 3.5-5 minutes per model on one idle CPU thread, sampling a few minutes each):
    .venv/bin/python benchmarks/score_digits.py                      # trains into runs/score_digits/<preset>
    .venv/bin/python benchmarks/score_digits.py --presets vp_digits  # a subset

Each model is the digits U-Net, unconditional, eps-prediction, 2000 steps (the presets); samples come from the
preset's ``sample`` settings (sampler, steps, grid) through ``Pipeline.generate`` with seed 0: the same samples
and numbers as ``torchdiffusion eval RUN --n N``. FD: :class:`torchdiffusion.evaluation.metrics.DigitsEvaluator`
(8x8), averaged over chunks of the held-out size (unlabelled samples: chunks cut after a fixed shuffle, so their
class composition is not matched), beside the real-data floor and its bootstrap interval. The presets hold out the
evaluator's held-out digits (``data.holdout`` = ``metrics.HOLDOUT``), so the floor's digits are unseen by every
model. Picture: ``docs/images/score_digits.png`` (the first 100 samples of each model).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

import _report
from torchdiffusion.evaluation.metrics import HOLDOUT, DigitsEvaluator
from torchdiffusion.evaluation.viz import grid_array
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.runs.train import build_trainer

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("vp_digits", "ve_digits", "ncsn_digits")
TITLES = {"vp_digits": "VP SDE", "ve_digits": "VE SDE", "ncsn_digits": "NCSN"}


def train(preset: str, sets: list[str], out: Path, quiet: bool) -> str:
    """Train (or resume) ``preset`` (with ``--set`` overrides) into ``out``; how long it took."""
    res = build_trainer(config_mod.resolve(preset, sets), out, progress=not quiet).run()
    if res["steps_run"]:
        return f"{res['step']} steps, trained in {res['seconds']:.0f} s in this invocation"
    last = (out / "log.csv").read_text().strip().splitlines()[-1].split(",")
    return f"{res['step']} steps (trained earlier: {float(last[-1]):.0f} s in the training log's last session)"


def picture(panels: list[tuple[str, torch.Tensor]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 4.0), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        ax.imshow(np.asarray(grid_array(x[:100], nrow=10)), cmap="gray", interpolation="nearest")
        ax.set_title(title, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--presets", default=",".join(PRESETS), help="comma-separated presets")
    ap.add_argument("--runs", default="runs/score_digits", help="run folders go to RUNS/<preset>")
    ap.add_argument("--n", type=int, default=718, help="samples per model (chunks of the 359 held-out digits)")
    ap.add_argument("--set", action="append", default=[], help="config override for every preset (stated in the "
                    "results), e.g. train.steps=1000")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "score_digits.md"))
    ap.add_argument("--picture", default=str(ROOT / "docs" / "images" / "score_digits.png"))
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()
    ev = DigitsEvaluator(8)
    fl = ev.fd_floor_bootstrap()
    head = ("| preset | process | sampler | NFE | grid | training | FD (mean of chunks) | FD chunk range | FD / floor "
            "| sampling seconds |\n|---|---|---|---|---|---|---|---|---|---|")
    print(head, flush=True)
    rows, summary, panels = [], [], []
    for preset in a.presets.split(","):
        run = Path(a.runs) / preset
        trained = train(preset, a.set, run, a.quiet)
        torch.set_num_threads(1)
        model, cfg = load_run(run)
        if float(cfg["data"]["holdout"]) != HOLDOUT:
            raise SystemExit(f"{run} holds out {cfg['data']['holdout']}, not the evaluator's {HOLDOUT}")
        s = cfg["sample"]
        s0 = time.time()
        x = Pipeline(model, cfg).generate(model, a.n, generator=torch.Generator().manual_seed(0))
        sec = time.time() - s0
        per = ev.fd_per_chunk(x) or [ev.fd(x, matched=False)]  # fewer samples than one chunk: all at once
        fd = sum(per) / len(per)
        rows.append(f"| `{preset}` | {cfg['process']['name']} | {s['sampler']} | {s['steps']} | "
                    f"{s.get('grid') or 'default'} | {trained} | {fd:.2f} | {min(per):.2f}-{max(per):.2f} | "
                    f"{fd / fl.floor:.2f} | {sec:.0f} |")
        print(rows[-1], flush=True)
        summary.append(f"{TITLES.get(preset, preset)} {fd:.2f}")
        panels.append((f"{TITLES.get(preset, preset)}, {s['sampler']} {s['steps']}: FD {fd:.2f}", x))
    picture(panels, Path(a.picture))
    line = (f"Summary: FD {', '.join(summary)}; real-data floor {fl.floor:.2f} (bootstrap 95 % interval "
            f"{fl.lo:.2f}-{fl.hi:.2f}).")
    print(line)
    text = "\n".join([
        "# Score family on digits: VP, VE, NCSN", "",
        _report.command("score_digits.py", argv), "", _report.machine(t0, load0=load0), "",
        "Models: the presets (digits U-Net, unconditional, eps-prediction, one thread; steps in the table), each "
        f"trained on the evaluator's {len(ev.y_train)} training digits (`data.holdout` = {HOLDOUT}: the "
        f"{len(ev.y_heldout)} held-out digits are unseen). Samples: the preset's sampler, steps and grid, seed 0, "
        f"{a.n} per model (`torchdiffusion eval RUN --n {a.n}` gives the same samples).", "",
        f"Evaluator: `DigitsEvaluator(8)`; FD to the training digits, averaged over chunks of {len(ev.y_heldout)} "
        "(unlabelled samples: chunks cut after a fixed shuffle, class composition unmatched). Real-data floor "
        f"(held-out vs training digits) **{fl.floor:.2f}**, bootstrap standard error {fl.se:.2f}, bias-corrected 95 % "
        f"interval {fl.lo:.2f}-{fl.hi:.2f} (`DigitsEvaluator.fd_floor_bootstrap`, class-stratified).", "",
        head, *rows, "", line, "",
        f"![score-family digits]({os.path.relpath(Path(a.picture).resolve(), Path(a.out).resolve().parent)})", ""])
    _report.write_results(Path(a.out), text.split("\n"), echo=False)
    print(f"wrote {a.out} and {a.picture}")


if __name__ == "__main__":
    main()
