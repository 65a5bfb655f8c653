# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Your own image folder, end to end
#
# An image folder is the user's data ([design section 8](../design.md#8-data-at-image-scale)): image files in
# any format PIL reads, with either one sub-folder per class or a `metadata.jsonl` beside them (the Hugging Face
# `imagefolder` convention: one JSON object per line with `file_name` and columns such as `label` or `text`).
# Training streams it from disk; it is never loaded whole.
#
# To have a folder to work with, we let `torchdiffusion make-data shapes` write one: coloured shapes in 10 classes,
# in exactly the format your own folder would have. Then: look at it, train on it with `data.name=FOLDER`,
# sample from the command line and from Python.
#
# The settings cell reads `TD_TUTORIAL_SIZE`: `small` (the test suite: 16x16 images, a few dozen steps) or `full`
# (the default: 32x32, a few minutes).

# %%
import json
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from PIL import Image

import torchdiffusion as td
from torchdiffusion.cli.main import main as torchdiffusion_cli
from torchdiffusion.evaluation.viz import grid_array

SMALL = os.environ.get("TD_TUTORIAL_SIZE", "full") == "small"
OUT = Path(os.environ.get("TD_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="td-tutorial-"))
SIZE = 16 if SMALL else 32
N_IMAGES = 300 if SMALL else 2000
TRAIN = (["train.steps=40", "model.channels=16", "train.batch=16", "train.ema=0.9"] if SMALL
         else ["train.steps=600", "train.batch=32"])
torch.set_num_threads(1)

# %% [markdown]
# ## 1. An image folder
#
# The command line and Python are the same program: `torchdiffusion_cli([...])` runs exactly what
# `torchdiffusion make-data shapes FOLDER --n N --size S --seed 0` runs in a shell.

# %%
folder = OUT / "shapes"
assert torchdiffusion_cli(["make-data", "shapes", str(folder), "--n", str(N_IMAGES), "--size", str(SIZE),
                           "--seed", "0", "--quiet", "--force"]) == 0
train_dir = folder / "train"
classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
files = sorted(train_dir.rglob("*.png"))
print(f"{len(files)} training images in {len(classes)} class folders:", ", ".join(classes))
with open(train_dir / "metadata.jsonl", encoding="utf-8") as f:
    for _ in range(2):
        print(json.loads(f.readline()))

# %%
fig, axes = plt.subplots(2, 8, figsize=(10, 2.8))
for ax, path in zip(axes.flat, files[:: max(1, len(files) // 16)]):
    ax.imshow(Image.open(path))
    ax.set_title(path.parent.name, fontsize=7)
    ax.axis("off")
plt.show()

# %% [markdown]
# ## 2. Training on the folder
#
# The `shapes32` preset is the class-conditional U-Net for this data; any folder is one `--set` away
# (`data.name=FOLDER`, `data.size=...`). Labels come from the class sub-folders (or from the `label` column of
# `metadata.jsonl`). From a shell this is
# `torchdiffusion train shapes32 --out RUN --set data.name=FOLDER/train --set data.size=32`.

# %%
run = OUT / "shapes_run"
sets = [f"data.name={train_dir}", f"data.size={SIZE}", "train.ckpt_every=0", "train.device=cpu",
        "train.threads=1", "train.log_every=10", *TRAIN]
args = ["train", "shapes32", "--out", str(run), "--quiet", "--force"]
for s in sets:
    args += ["--set", s]
assert torchdiffusion_cli(args) == 0
config = json.loads((run / "config.json").read_text())
print("run folder:", sorted(p.name for p in run.iterdir()))
print("the run's data:", config["run"])

# %%
log = [line.split(",") for line in (run / "log.csv").read_text().splitlines()]
header, rows = log[0], log[1:]
step, loss = header.index("step"), header.index("loss")
plt.figure(figsize=(5, 2.5))
plt.plot([int(r[step]) for r in rows], [float(r[loss]) for r in rows])
plt.xlabel("step")
plt.ylabel("training loss")
plt.show()

# %% [markdown]
# ## 3. Sampling: from the command line and from Python
#
# `torchdiffusion sample RUN --out samples.png` writes a PNG grid; `--class K` asks for one class. The Pipeline
# gives the same samples as tensors (`--seed S` is `generator=torch.Generator().manual_seed(S)`).

# %%
png = OUT / "samples.png"
assert torchdiffusion_cli(["sample", str(run), "--n", "20", "--class", "3", "--steps", "20", "--seed", "0",
                           "--out", str(png), "--quiet"]) == 0
print("wrote", png, Image.open(png).size)

pipe = td.Pipeline.from_pretrained(run)
x = pipe(n=20, class_labels=torch.arange(10).repeat_interleave(2), steps=20,
         generator=torch.Generator().manual_seed(0))
print("samples:", tuple(x.shape), f"values in [{float(x.min()):.2f}, {float(x.max()):.2f}]")
plt.figure(figsize=(8, 2))
plt.imshow(grid_array(x, nrow=10))
plt.title("two samples per class (columns: classes in pairs)", fontsize=9)
plt.axis("off")
plt.show()

# %% [markdown]
# With the `full` settings the samples show the colours and rough shapes of their classes after a few minutes of
# CPU training; the `shapes32` preset's own 3000 steps (`torchdiffusion train shapes32 --out RUN` after
# `torchdiffusion make-data shapes data/shapes32 --n 20000 --n-test 2000 --seed 0`) go much further. Your own
# folder takes the same path: point `data.name` at it.
