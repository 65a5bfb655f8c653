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
# # From the exact Gaussian mixture to a trained 2-D model
#
# A diffusion model learns the **score** of noised data, `grad log p_t(x)`. For a Gaussian mixture that score is
# known in closed form at every noise level, so we can first sample with the *exact* model, then train a small
# network on samples of the same mixture and compare it with the truth: its samples, its score field, and its
# likelihood.
#
# The settings cell below reads `TD_TUTORIAL_SIZE`: `small` (the test suite, seconds) or `full` (the default).

# %%
import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import torchdiffusion as td
from torchdiffusion.data import toy_density
from torchdiffusion.evaluation.scorefield import score_field
from torchdiffusion.likelihood import ode_log_likelihood
from torchdiffusion.runs.config import resolve
from torchdiffusion.runs.train import train

SMALL = os.environ.get("TD_TUTORIAL_SIZE", "full") == "small"
OUT = Path(os.environ.get("TD_TUTORIAL_OUT") or tempfile.mkdtemp(prefix="td-tutorial-"))
TRAIN_STEPS = 400 if SMALL else 2500
N_SAMPLES = 500 if SMALL else 2000
N_LIKELIHOOD = 100 if SMALL else 400
torch.manual_seed(0)
torch.set_num_threads(1)

# %% [markdown]
# ## 1. The data: an 8-Gaussian ring
#
# `toy_density("ring")` is the exact density of the `ring` toy data set: a `td.GaussianMixture` of eight
# isotropic Gaussians on a circle. It can draw samples, evaluate `log_prob`, and, for any process and time,
# give the noised density, its score, and the optimal `eps` and `x0` predictions.

# %%
gm = toy_density("ring")
print(type(gm).__name__, "components:", gm.K, "dimension:", gm.dim)
data, component = gm.sample(N_SAMPLES, generator=torch.Generator().manual_seed(0))  # points and their component
entropy = float(-gm.log_prob(data).mean())
print(f"mean NLL of exact samples (the entropy, by Monte Carlo): {entropy:.3f} nats")

# %% [markdown]
# ## 2. Sampling with the exact model
#
# `gm.net(process, "eps")` is a "network" that returns the exact noise prediction, so `td.Denoiser` wraps it like
# any trained net, and every sampler can use it. Any error we see is the sampler's alone.

# %%
proc = td.DDPM(betas="linear", T=1000)
exact = td.Denoiser(gm.net(proc, "eps"), proc)
g = torch.Generator().manual_seed(1)
x_start = proc.prior_sample((N_SAMPLES, 2), generator=g, dtype=torch.float64)
samples = {}
for name, steps in [("ddim", 10), ("dpmpp_2m", 10), ("ddpm", 100)]:
    samples[name] = td.sample(exact, x_start, name, steps=steps, generator=torch.Generator().manual_seed(2))
    nll = float(-gm.log_prob(samples[name]).mean())
    print(f"{name:>9} with {steps:>3} evaluations: mean NLL {nll:.3f} nats (exact samples {entropy:.3f})")

fig, axes = plt.subplots(1, 4, figsize=(13, 3.3), sharex=True, sharey=True)
axes[0].scatter(*data.T, s=2)
axes[0].set_title("exact samples")
for ax, (name, x) in zip(axes[1:], samples.items()):
    ax.scatter(*x.T, s=2, color="C1")
    ax.set_title(f"{name} on the exact model")
for ax in axes:
    ax.set_aspect("equal")
plt.show()

# %% [markdown]
# ## 3. Training a model on samples
#
# The `ring` preset trains a small MLP with DDPM's noise-prediction loss on 10 000 samples of the same mixture.
# This is what `torchdiffusion train ring --out RUN --set train.steps=...` does from the command line; the run
# folder holds the config, the weights and their moving average (EMA), and a training log.

# %%
run = OUT / "ring"
cfg = resolve("ring", [f"train.steps={TRAIN_STEPS}", "train.ckpt_every=0", "train.threads=1",
                       "train.device=cpu", "model.hidden=128", "model.depth=3"] + (["train.ema=0.99"] if SMALL else []))
summary = train(cfg, run, progress=False, force=True)
print(f"trained {summary['steps_run']} steps in {summary['seconds']:.0f} s, final loss {summary['loss']:.3f}")
print(sorted(p.name for p in run.iterdir()))

# %% [markdown]
# `td.Pipeline.from_pretrained` loads the run (EMA weights) and samples it; `pipe.model` is the trained
# `Denoiser`, which plugs into everything the exact one did.

# %%
pipe = td.Pipeline.from_pretrained(run)
learned = pipe(n=N_SAMPLES, sampler="ddpm", steps=200, generator=torch.Generator().manual_seed(3))
nll_model_samples = float(-gm.log_prob(learned.double()).mean())
print(f"trained model, ddpm 200 steps: mean NLL of its samples under the exact density {nll_model_samples:.3f} "
      f"nats (exact samples {entropy:.3f})")

fig, axes = plt.subplots(1, 2, figsize=(7, 3.5), sharex=True, sharey=True)
axes[0].scatter(*data.T, s=2)
axes[0].set_title("data")
axes[1].scatter(*learned.T, s=2, color="C1")
axes[1].set_title("trained model")
for ax in axes:
    ax.set_aspect("equal")
plt.show()

# %% [markdown]
# ## 4. Score fields: learned against exact
#
# At a noise level `sigma` (in the VE scale `sigma / alpha`), `score_field` gives the learned score, the exact
# score of the noised mixture, and the density-weighted relative squared error between them (0 is perfect; the
# command `torchdiffusion scorefield RUN` draws the same picture).

# %%
errors = {}
fig, axes = plt.subplots(1, 2, figsize=(10, 5))
for ax, sigma in zip(axes, (0.2, 1.0)):
    t, learned_score, exact_score, log_density, err = score_field(pipe.model, gm, sigma)
    errors[sigma] = err
    grid = torch.linspace(-2.2, 2.2, 17, dtype=torch.float64)
    X, Y = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    s_hat, s = learned_score(pts), exact_score(pts)
    scale = float(s.norm(dim=1).max())
    ax.quiver(pts[:, 0], pts[:, 1], s[:, 0], s[:, 1], color="C1", scale=scale * 12, label="exact")
    ax.quiver(pts[:, 0], pts[:, 1], s_hat[:, 0], s_hat[:, 1], color="C0", scale=scale * 12, label="learned")
    ax.set_title(f"sigma = {sigma}: relative error {err:.3f}")
    ax.set_aspect("equal")
    ax.legend(loc="upper right")
    print(f"sigma = {sigma}: DDPM time t = {t:.1f}, density-weighted relative squared error {err:.4f}")
plt.show()

# %% [markdown]
# ## 5. Likelihood by the probability-flow ODE
#
# The probability-flow ODE turns the model into a continuous normalizing flow, so it has an exact
# log-likelihood: integrate the ODE from the data to the prior and add the divergence of its drift along the
# way. In 2-D the divergence is computed exactly. We score held-out exact samples under the trained model and
# under the exact model (whose ODE likelihood should match the true density, up to the small noise level
# `t_min` at which the ODE starts).

# %%
test, _ = gm.sample(N_LIKELIHOOD, generator=torch.Generator().manual_seed(4))
true_nll = float(-gm.log_prob(test).mean())
res_model = ode_log_likelihood(pipe.model, test.float(), divergence="exact", rtol=1e-4, atol=1e-4)
res_exact = ode_log_likelihood(exact, test, divergence="exact", rtol=1e-5, atol=1e-5)
nll_model, nll_exact_ode = float(-res_model.logp.mean()), float(-res_exact.logp.mean())
print(f"true density:                    NLL {true_nll:.3f} nats")
print(f"exact model, ODE likelihood:     NLL {nll_exact_ode:.3f} nats ({res_exact.nfe} drift evaluations)")
print(f"trained model, ODE likelihood:   NLL {nll_model:.3f} nats ({res_model.nfe} drift evaluations)")

# %% [markdown]
# The trained model's likelihood is above the true one (a model can only lose against the truth on average:
# the gap is the KL divergence from the data to the model, plus Monte Carlo error), and it shrinks with
# longer training (`full` settings train six times longer than `small`). Next: the same ideas on images, in the
# [digits tutorial](digits.py).
