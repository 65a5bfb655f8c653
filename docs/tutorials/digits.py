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
# # Digits: train, sample with every sampler, guidance
#
# scikit-learn's 8x8 digits ship with the library, so this runs anywhere without a download. We train a small
# class-conditional U-Net (the `digits` preset: cosine DDPM schedule, v-prediction, classifier-free guidance
# training with 10 % of labels dropped), sample it with every registered sampler at the same cost, and turn up
# classifier-free guidance. A classifier trained only on real digits scores the samples.
#
# The settings cell reads `TD_TUTORIAL_SIZE`: `small` (the test suite) or `full` (the default, a few minutes).

# %%
import os
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import torchdiffusion as td
from torchdiffusion.evaluation.metrics import DigitsEvaluator
from torchdiffusion.evaluation.viz import grid_array
from torchdiffusion.runs.config import resolve
from torchdiffusion.runs.train import train

SMALL = os.environ.get("TD_TUTORIAL_SIZE", "full") == "small"
OUT = Path(os.environ.get("TD_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="td-tutorial-"))
SETTINGS = (["train.steps=150", "model.channels=16", "train.batch=64", "train.ema=0.99"] if SMALL
            else ["train.steps=1000"])
STEPS = 10 if SMALL else 20          # network evaluations per sample, for every sampler
torch.set_num_threads(1)


def show(x, title="", nrow=10, ax=None):
    """A grid of images in [-1, 1]."""
    ax = ax or plt.figure(figsize=(nrow * 0.45, len(x) / nrow * 0.45 + 0.4)).gca()
    ax.imshow(grid_array(x, nrow=nrow), cmap="gray")
    ax.set_title(title, fontsize=9)
    ax.axis("off")


# %% [markdown]
# ## 1. The data

# %%
data = td.data.digits(8)
print("digits:", tuple(data.x.shape), "values in", data.value_range, "with", data.levels, "grey levels;",
      data.num_classes, "classes")
show(data.x[:30], "real digits")
plt.show()

# %% [markdown]
# ## 2. Training
#
# `resolve("digits", [...])` is the preset with `--set` style overrides; `torchdiffusion config digits` prints it.
# The same run from the command line: `torchdiffusion train digits --out RUN --set train.steps=1000`.

# %%
run = OUT / "digits"
cfg = resolve("digits", SETTINGS + ["train.ckpt_every=0", "train.device=cpu"])
print("process:", cfg["process"]["name"], cfg["process"]["betas"], "| prediction:", cfg["model"]["prediction"],
      "| label dropout:", cfg["loss"]["p_uncond"], "| steps:", cfg["train"]["steps"])
summary = train(cfg, run, progress=False, force=True)
print(f"trained {summary['steps_run']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.3f}")

# %% [markdown]
# ## 3. Every sampler at the same cost
#
# `td.samplers.names()` lists the samplers `td.sample` (and so the Pipeline) accepts. `steps` counts network
# evaluations for all of them, so a second-order sampler takes half as many grid steps. The same generator seed
# gives every sampler the same starting noise; row k asks for digit k.

# %%
pipe = td.Pipeline.from_pretrained(run)
labels = torch.arange(10)
rows, timings = {}, {}
for name in td.samplers.names():
    t0 = time.perf_counter()
    rows[name] = pipe(n=10, sampler=name, steps=STEPS, class_labels=labels,
                      generator=torch.Generator().manual_seed(0))
    timings[name] = time.perf_counter() - t0
print(f"{len(rows)} samplers; seconds for 10 samples:",
      ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))

fig, axes = plt.subplots(len(rows), 1, figsize=(5, len(rows) * 0.6))
for ax, (name, x) in zip(axes, rows.items()):
    ax.imshow(grid_array(x, nrow=10), cmap="gray")
    ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
plt.show()

# %% [markdown]
# `annealed_langevin` is the NCSN sampler: it expects a model trained for it (the `ncsn_digits` preset), and on
# this DDPM model with this budget it is the noisiest row. `ode` is the adaptive solver: it picks its own number
# of evaluations. The deterministic samplers (`ddim` with `eta=0`, `euler`, `heun`, `dpmpp_*`, `unipc`, `ipndm`,
# `rk4`, `ode`) all solve the same probability-flow ODE, so from the same noise they approach the same digits
# as `steps` grows.

# %% [markdown]
# ## 4. Scoring samples with a classifier trained on real digits
#
# `DigitsEvaluator` trains a small classifier on the real training digits (once; cached on disk) and reports the
# conditional accuracy (is a sample of class k read as k?) and the Frechet distance of its features to real
# held-out digits.

# %%
ev = DigitsEvaluator(8)
y = torch.arange(10).repeat_interleave(10 if SMALL else 30)
accuracy = {}
for w in (0.0, 0.5, 2.0):
    x = pipe(n=len(y), sampler="unipc", steps=STEPS, class_labels=y, guidance=w,
             generator=torch.Generator().manual_seed(1))
    accuracy[w] = ev.accuracy(x, y)
    print(f"guidance w = {w}: conditional accuracy {accuracy[w]:.3f} on {len(y)} samples, "
          f"Frechet distance {ev.fd(x, y):.2f}")
print(f"(real held-out digits: accuracy {ev.heldout_accuracy():.3f})")

# %% [markdown]
# ## 5. Classifier-free guidance
#
# `guidance=w` samples with `(1 + w) eps(x, y) - w eps(x)`: the model was trained with labels dropped 10 % of
# the time, so it knows both. Larger `w` gives more typical, less varied digits.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
for ax, w in zip(axes, (0.0, 0.5, 2.0)):
    x = pipe(n=50, sampler="unipc", steps=STEPS, class_labels=torch.arange(10).repeat_interleave(5), guidance=w,
             generator=torch.Generator().manual_seed(2))
    show(x, f"guidance w = {w}", nrow=5 * 2, ax=ax)
plt.show()

# %% [markdown]
# ## 6. Watching the reverse process
#
# A `callback` sees every step: `d["x"]` is the state and `d["x0"]` the model's current guess of the clean image.

# %%
frames = []
pipe(n=10, sampler="ddim", steps=STEPS, class_labels=labels, guidance=0.5,
     generator=torch.Generator().manual_seed(3), callback=lambda d: frames.append(d["x0"].clone()))
picked = [frames[i] for i in sorted({round(i * (len(frames) - 1) / 5) for i in range(6)})]
show(torch.cat(picked), "the x0 prediction along the way (top: first step; bottom: last)", nrow=10)
plt.show()
grid_png = OUT / "digits_grid.png"
plt.imsave(grid_png, grid_array(frames[-1], nrow=10), cmap="gray")
print("wrote", grid_png)
