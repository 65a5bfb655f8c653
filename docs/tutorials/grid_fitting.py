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
# # Fitting a time grid to your model, and handing it to diffusers
#
# A deterministic sampler solves the probability-flow ODE; with few steps, *where* it puts them (the time grid)
# matters as much as which solver it is. `td.grids.optimize` fits the grid to your model and sampler: it solves
# the ODE accurately from a batch of pilot noise, and moves the grid's interior times to minimize the few-step
# sampler's error against those solutions. The result is a tensor of times that `td.sample`, the Pipeline and
# `torchdiffusion sample --grid FILE.json` accept, and that diffusers' schedulers can use too.
#
# The settings cell reads `TD_TUTORIAL_SIZE`: `small` (the test suite) or `full` (the default).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import torchdiffusion as td
from torchdiffusion.parameterization.interop import diffusers_scheduler_config
from torchdiffusion.runs.config import resolve
from torchdiffusion.runs.train import train
from torchdiffusion.samplers.gridfit import end_state

SMALL = os.environ.get("TD_TUTORIAL_SIZE", "full") == "small"
OUT = Path(os.environ.get("TD_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="td-tutorial-"))
TRAIN_STEPS = 300 if SMALL else 1500
BUDGET = 300                           # the fit's cost, in sampling runs' worth of network calls (the default)
NFE = 6                                # the few-step budget we fit for
N_TEST = 256
torch.set_num_threads(1)

# %% [markdown]
# ## 1. A model
#
# Any model works; here a small 2-D MLP trained on the 8-Gaussian ring (see the
# [first tutorial](gaussian_mixture.py)). The grid is fitted to the *model's* ODE, whatever its quality.

# %%
run = OUT / "ring"
cfg = resolve("ring", [f"train.steps={TRAIN_STEPS}", "train.ckpt_every=0", "train.threads=1", "train.device=cpu",
                       "model.hidden=128", "model.depth=3"])
train(cfg, run, progress=False, force=True)
pipe = td.Pipeline.from_pretrained(run)
model, proc = pipe.model, pipe.process
print(proc, "| prediction:", model.prediction)

# %% [markdown]
# ## 2. The error to beat
#
# Test noise (never used by the fit), and the reference: an accurate adaptive solve of the same ODE from the same
# noise (`end_state`). The error of a sampler is the RMS distance of its samples to the reference.

# %%
x_test = proc.prior_sample((N_TEST, 2), generator=torch.Generator().manual_seed(123))
reference, ref_nfe = end_state(model, x_test)
print(f"reference solve: {ref_nfe} network calls for {N_TEST} states")


def rms(x):
    return float((x.double() - reference).pow(2).sum(1).mean().sqrt())


errors = {}
for grid in ("logsnr", "karras", "optimized"):
    errors[f"unipc, {grid} grid"] = rms(td.sample(model, x_test, "unipc", steps=NFE, grid=grid))
for k, v in errors.items():
    print(f"{k:>24}: RMS error {v:.4f} at {NFE} evaluations")

# %% [markdown]
# ## 3. Fitting the grid
#
# `td.grids.optimize(model, sampler, steps, shape=...)` draws its own pilot noise (seeded; or pass `x_T=`), keeps a
# third of it aside to validate, and returns the best grid it found on that held-out part. With
# `choices=` it can also pick sampler options; `return_info=True` returns what it chose and what it cost.

# %%
fitted, info = td.grids.optimize(model, "unipc", NFE, shape=(2,), budget=BUDGET,
                                 choices={"order": [2, 3]}, return_info=True)
print("fitted grid (times):", [round(float(t), 1) for t in fitted])
print("chosen options:", info["options"])
errors["unipc, fitted grid"] = rms(td.sample(model, x_test, "unipc", grid=fitted, **info["options"]))
print(f"      unipc, fitted grid: RMS error {errors['unipc, fitted grid']:.4f}")
best_default = min(v for k, v in errors.items() if "fitted" not in k)
print(f"ratio to the best built-in grid: {errors['unipc, fitted grid'] / best_default:.2f}")

# %%
fig, ax = plt.subplots(figsize=(7, 2.2))
shown = {"logsnr": td.grids.get("logsnr", proc, NFE), "karras": td.grids.get("karras", proc, NFE), "fitted": fitted}
for i, (name, ts) in enumerate(shown.items()):
    lam = proc.log_snr(ts[:-1].clamp_min(proc.t_min))
    ax.plot(lam, [i] * len(lam), "o-", label=name)
ax.set_yticks([0, 1, 2], ["logsnr", "karras", "fitted"])
ax.set_xlabel("log-SNR of the grid's times (left: pure noise; the last step goes to clean data)")
plt.show()

# %% [markdown]
# ## 4. Saving it, and using it from the command line
#
# `td.grids.save` writes the grid as JSON; `torchdiffusion sample RUN --sampler unipc --grid grid.json` samples on
# it, and `td.grids.load` reads it back.

# %%
grid_file = td.grids.save(OUT / "unipc_grid.json", fitted, sampler="unipc", steps=NFE, **info["options"])
assert torch.equal(td.grids.load(grid_file), fitted)
print("wrote", grid_file)
x_pipe = pipe(n=8, sampler="unipc", grid=td.grids.load(grid_file), generator=torch.Generator().manual_seed(0),
              **info["options"])
print("the Pipeline samples on it too:", tuple(x_pipe.shape))

# %% [markdown]
# ## 5. Handing the grid to diffusers
#
# diffusers' schedulers walk integer `timesteps` with matching `sigmas`. Our DDPM process maps to a diffusers
# scheduler config (`diffusers_scheduler_config`), and after `set_timesteps(n)` we replace the scheduler's
# `timesteps` and `sigmas` by the fitted grid's (fractional timesteps are fine for a 2-D MLP: the net takes a
# float time). We compare diffusers' DPM-Solver++(2M) on its own spacing with the same scheduler on our grid.

# %%
import diffusers  # noqa: E402  (the optional `diffusers` extra; in `dev`)


def diffusers_sample(x_T, steps, grid=None):
    config = diffusers_scheduler_config(proc, model.prediction, "DPMSolverMultistepScheduler")
    sch = diffusers.DPMSolverMultistepScheduler.from_config(config)  # (ignores keys it does not have)
    sch.set_timesteps(steps)
    if grid is not None:
        ts = grid[:-1]
        sch.timesteps = ts.clone()
        sch.sigmas = torch.cat([(proc.sigma(ts) / proc.alpha(ts)).double(), torch.zeros(1, dtype=torch.float64)])
    x = x_T.clone() * sch.init_noise_sigma
    with torch.no_grad():
        for t in sch.timesteps:
            out = model.net(sch.scale_model_input(x, t), torch.as_tensor(t, dtype=torch.float32).expand(len(x)))
            x = sch.step(out, t, x).prev_sample
    return x


fitted_2m = td.grids.optimize(model, "dpmpp_2m", NFE, shape=(2,), budget=BUDGET)
errors["diffusers DPM++2M, its spacing"] = rms(diffusers_sample(x_test, NFE))
errors["diffusers DPM++2M, our fitted grid"] = rms(diffusers_sample(x_test, NFE, fitted_2m))
errors["ours dpmpp_2m, our fitted grid"] = rms(td.sample(model, x_test, "dpmpp_2m", grid=fitted_2m))
for k in list(errors)[-3:]:
    print(f"{k:>36}: RMS error {errors[k]:.4f}")

# %%
same = abs(errors["diffusers DPM++2M, our fitted grid"] - errors["ours dpmpp_2m, our fitted grid"])
print(f"ours and diffusers' DPM-Solver++(2M) on the same grid differ by {same:.1e} in RMS error")

# %% [markdown]
# Our `dpmpp_2m` and diffusers' scheduler are the same method, so on the same grid they give the same samples
# (the difference printed above is round-off): a grid fitted here is a grid you can use there. Which grid wins
# depends on the model, the sampler and the budget, and the numbers above are this model's. What the fit promises
# is narrower: on held-out pilot noise, its grid is never worse than the grid it started from (the best of the
# process's default, `logsnr`, `karras` and `optimized`), for the sampler it was fitted for. The benchmark
# `benchmarks/samplers.py` makes the comparison at scale, against every diffusers scheduler and spacing
# ([results](../results/samplers.md)).
