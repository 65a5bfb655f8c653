"""Text-to-image on the shapes data (issue 30): does the model follow a prompt, including attribute combinations it
never saw?

Run (needs the shapes judge, torchdiffusion.evaluation.shapes, and the data set
`torchdiffusion make-data shapes data/shapes32 --n 20000 --n-test 2000 --seed 0`):
    .venv/bin/python benchmarks/text_to_image.py                 # trains preset shapes32_text into --run if missing
    .venv/bin/python benchmarks/text_to_image.py --run RUN       # score a trained text run
    .venv/bin/python benchmarks/text_to_image.py --quick         # smoke test: a small 16x16 set and a tiny run in a
                                                                 # temporary folder (its numbers mean nothing)

1. The run (preset ``shapes32_text``) trains on the captions of ``train/`` less ``config.TEXT_HOLDOUT`` (every blue
   triangle, every large star in the lower right: ``data.exclude``); its training time is reported when trained here.
2. Prompts are the captions of the ``test/`` split, which no run trains on: the rows of held-out combinations are
   the held-out prompts; the others are split by position into a validation half (even rows) and a test half (odd
   rows). One sample per prompt, seeded, at every guidance w in --guidance.
3. The judge (a CNN trained only on real ``train/`` images) reads shape, colour, size, position and background of
   every sample; accuracy = the fraction matching the prompt's attributes. The reported w is the one with the best
   mean accuracy on the validation prompts (never chosen on the test prompts); Frechet distance in the judge's
   features to the real test images at w = 0 and at that w.
4. Negative prompts: for each colour, prompts naming only a shape ("a star") sampled at the chosen w (the largest
   w if 0 was chosen) without and with that colour as the negative prompt; the judged frequency of the colour.
5. A grid of prompts -> images (seen and held-out prompts) for the README.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import _report
import torchdiffusion as td
from torchdiffusion.data import shapes as shapes_data
from torchdiffusion.data.folder import excluded
from torchdiffusion.evaluation import shapes as judge_mod  # the shapes judge (issue 27)
from torchdiffusion.evaluation.viz import save_samples
from torchdiffusion.runs import config
from torchdiffusion.runs.train import train

ATTRS = tuple(shapes_data.ATTRIBUTES)  # shape, color, size, position, background
GRID_PROMPTS = ["a small red star in the center on a plain background", "a large green circle at the top on a "
                "striped background", "a medium yellow square on the left on a checkered background",
                "a small purple cross in the lower left on a gradient background",
                "a medium blue triangle in the center on a plain background",  # held out
                "a large orange star in the lower right on a plain background"]  # held out


def sample(pipe: td.Pipeline, prompts: list[str], w: float, seed: int, negative: str | None = None) -> torch.Tensor:
    """One sample per prompt, seeded, at guidance ``w`` (images in [-1, 1])."""
    return pipe(len(prompts), prompt=prompts, guidance=w, negative_prompt=negative, max_batch=100,
                generator=torch.Generator().manual_seed(seed))


def accuracy(judge: judge_mod.ShapesJudge, x: torch.Tensor, rows: list[dict]) -> dict[str, float]:
    """Per-attribute fraction of samples whose judged attribute is the prompt's."""
    pred, want = judge.predict(x), shapes_data.attribute_indices(rows)
    return {a: float((pred[a] == torch.from_numpy(want[a])).float().mean()) for a in ATTRS}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shapes32", help="shapes folder (train/ and test/)")
    ap.add_argument("--run", default="runs/shapes32_text", help="text run folder (trained here if missing)")
    ap.add_argument("--guidance", default="0,1,3,5", help="guidance scales w, comma-separated")
    ap.add_argument("--n", type=int, default=300, help="prompts per set (validation, test, held-out) at most")
    ap.add_argument("--quick", action="store_true", help="smoke test in a temporary folder")
    ap.add_argument("--out", default="benchmarks/results/text_to_image.md")
    a = ap.parse_args()
    torch.set_num_threads(1)
    t0, load0 = time.time(), os.getloadavg()
    ws = [float(v) for v in a.guidance.split(",")]
    tmp = tempfile.TemporaryDirectory() if a.quick else None
    root, run, out = Path(a.data), Path(a.run), Path(a.out)
    sets = []
    if a.quick:
        root, run, out = Path(tmp.name) / "shapes", Path(tmp.name) / "run", Path(tmp.name) / "text_to_image.md"
        shapes_data.write_shapes(root, 600, n_test=200, size=16, seed=0)
        sets = ["data.size=16", "model.channels=16", "model.channel_mult=[1,2]", "model.attn_resolutions=[8]",
                "train.steps=40", "train.batch=32", "sample.steps=10"]
        ws, a.n = ws[:2], min(a.n, 24)
    if not (root / "test" / "metadata.jsonl").is_file():
        raise SystemExit(f"no shapes data in {root}: run `torchdiffusion make-data shapes {root} --n 20000 "
                         "--n-test 2000 --seed 0`")
    train_minutes = None
    if not (run / "ema.safetensors").is_file():
        cfg = config.resolve("shapes32_text", [f"data.name={root / 'train'}", *sets])
        t1 = time.time()
        train(cfg, run, progress=True)
        train_minutes = (time.time() - t1) / 60
    pipe = td.Pipeline.from_pretrained(run)
    holdout = pipe.config["data"].get("exclude") or []
    judge = judge_mod.ShapesJudge(root, **({"n_train": 500, "n_ref": 100, "epochs": 2} if a.quick else {}))
    rows = shapes_data.read_metadata(root / "test")
    seen = [r for r in rows if not excluded(r, holdout)]
    parts = {"validation": seen[0::2][:a.n], "test": seen[1::2][:a.n],
             "held-out": [r for r in rows if excluded(r, holdout)][:a.n]}
    acc: dict[tuple[str, float], dict[str, float]] = {}
    images: dict[tuple[str, float], torch.Tensor] = {}
    for w in ws:
        for name, part in parts.items():
            x = sample(pipe, [r["text"] for r in part], w, seed=1)
            acc[name, w], images[name, w] = accuracy(judge, x, part), x
            print(f"w={w:g} {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc[name, w].items()), flush=True)
    best = max(ws, key=lambda w: sum(acc["validation", w].values()))
    fd = {w: judge.fd(images["test", w]) for w in sorted({ws[0], best})}
    # negative prompts: the judged frequency of a colour without and with it as the negative prompt
    neg_rows, w_neg = [], best if best > 0 else max(ws)  # (a negative prompt needs guidance)
    for c, colour in enumerate(shapes_data.COLOR_NAMES):
        prompts = [f"a {s}" for s in shapes_data.SHAPES] * max(1, a.n // (5 * 3))
        f = [float((judge.predict(sample(pipe, prompts, w_neg, seed=2, negative=n))["color"] == c).float().mean())
             for n in (None, colour)]
        neg_rows.append(f"| {colour} | {f[0]:.3f} | {f[1]:.3f} |")
    grid = torch.cat([sample(pipe, [p] * 6, best, seed=3) for p in GRID_PROMPTS])
    png = save_samples(grid, out.with_suffix(".png"), nrow=6, value_range=(-1, 1))
    lines = ["# Text-to-image on shapes (issue 30)", "", _report.command("text_to_image.py"),
             _report.machine(t0, load0=load0), "",
             f"Run `{run}` (preset {pipe.config.get('preset', '?')}); held out of training: {holdout}; "
             + (f"trained here in {train_minutes:.1f} min" if train_minutes else "trained before this benchmark")
             + f". Prompts: test-split captions, {', '.join(f'{k} {len(v)}' for k, v in parts.items())}; one "
             f"sample each; sampler {pipe.config['sample']['sampler']}, {pipe.config['sample']['steps']} steps.", "",
             "| prompts | w | " + " | ".join(ATTRS) + " |", "|---|---|" + "---|" * len(ATTRS)]
    for name in parts:
        for w in ws:
            lines.append(f"| {name} | {w:g} | " + " | ".join(f"{acc[name, w][k]:.3f}" for k in ATTRS) + " |")
    lines += ["", f"Chosen on the validation prompts: w = {best:g}. FD (judge features, test prompts vs real test "
              "images): " + ", ".join(f"w = {w:g}: {v:.2f}" for w, v in fd.items()) + ".", "",
              f"Negative prompts (prompts 'a SHAPE', w = {w_neg:g}): judged frequency of the colour",
              "", "| colour | without | with it as the negative prompt |", "|---|---|---|", *neg_rows, "",
              f"![prompts -> images]({png.name}) rows: " + "; ".join(GRID_PROMPTS) + " (the last two held out)."]
    figures = {"w chosen on validation": f"{best:g}", **{f"FD at w = {w:g}": f"{v:.2f}" for w, v in fd.items()}}
    _report.write_results(out, lines, figures=figures)  # the README cites these as text_to_image.figures.NAME
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
