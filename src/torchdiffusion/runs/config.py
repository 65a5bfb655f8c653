"""Run configuration: defaults, named presets, JSON files and ``--set key=value`` overrides.

A config is a dict of sections (``data``, ``process``, ``model``, ``loss``, ``train``, ``sample``). Every key
that a user may set appears in ``DEFAULTS`` (``None`` where the value is chosen automatically); an unknown key
is an error that lists the allowed ones.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

from torchdiffusion._files import read_json
from torchdiffusion._tensor import check_count

DEFAULTS: dict[str, dict] = {
    "data": {"name": "ring", "n": 10000, "seed": 0, "size": 8, "channels": 3, "key": None, "label_key": None,
             "flip": False, "augment": 0.0, "conditional": False, "holdout": 0.1,
             "autoencoder": None},
    "process": {"name": "ddpm", "betas": "linear", "T": 1000, "beta_start": None, "beta_end": None,
                "rescale_zero_snr": False, "beta_min": 0.1, "beta_max": 20.0, "sigma_min": None,
                "sigma_max": None, "t_min": None, "gamma_min": -10.0, "gamma_max": 6.0, "schedule_hidden": 32},
    "model": {"net": "mlp", "prediction": "eps", "precond": "none", "sigma_data": 0.5, "time_scale": None,
              "hidden": 256, "depth": 4, "emb_dim": 64,
              "channels": 32, "channel_mult": [1, 2], "num_res_blocks": 2, "attn_resolutions": [8],
              "dropout": 0.0, "num_heads": 1, "dim": None,
              "latent_channels": 4, "latent_dim": None, "decoder_var": "fixed", "decoder_std": 0.1, "cond_tokens": 4,
              "fourier_features": [], "dequantizer": False},
    "loss": {"name": "dsm", "weighting": "native", "min_snr_gamma": 5.0, "p_uncond": 0.1, "lambda_vlb": 0.001,
             "ncsn_levels": 10, "ssm_projections": 1, "ssm_dist": "gaussian", "ssm_variance_reduced": True,
             "beta": 1.0, "likelihood": "gaussian", "levels": None, "dae_sigma": 0.2, "vae_samples": 1,
             "dequantize": "none", "time_sampler": "antithetic"},
    "train": {"steps": 3000, "batch": 256, "lr": 1e-3, "weight_decay": 0.0, "warmup": 100,
              "schedule": "cosine", "min_lr_ratio": 0.1, "ema": 0.999, "ema_warmup": True, "clip": 1.0,
              "accum": 1, "seed": 0, "ckpt_every": 1000, "log_every": 50, "sample_every": 0,
              "device": "auto", "precision": "fp32", "compile": False, "threads": 0, "tensorboard": False},
    "sample": {"sampler": "ddim", "steps": 50, "grid": None, "n": 64, "guidance": 0.0},
}

PRESETS: dict[str, dict] = {
    # 2-D toys (under a minute on CPU): DDPM, eps-prediction MLP, lr 3e-3 (measured best of 1e-3/3e-3)
    # one intra-op thread: a small MLP is several times slower with 2 threads on a busy 2-core machine
    **{name: {"data": {"name": name}, "train": {"lr": 3e-3, "threads": 1}}
       for name in ("ring", "moons", "swiss_roll", "checkerboard", "gmm")},
    "toy": {"data": {"name": "ring"}, "train": {"lr": 3e-3, "threads": 1}},
}

# Score-based family on the 2-D ring (T-SDE-7/8, T-NCSN-1/2, T-EBM-1): continuous-time processes trained with
# weighted DSM (weighting "eps" = lambda(t) sigma^2 on the score; "g2" is the likelihood weighting), NCSN on an
# EDM (t = sigma) ladder with annealed Langevin on the matching logsnr grid, and an energy net.
# For images: --set data.name=digits --set model.net=unet (or the *_digits presets below).
_SCORE_TOY = {"data": {"name": "ring"}, "train": {"lr": 3e-3, "threads": 1}, "model": {"hidden": 128, "depth": 3}}
_VE_TOY = {"name": "ve", "sigma_min": 0.01, "sigma_max": 5.0}  # sigma_max ~ the largest distance in the data
PRESETS.update({
    "vp": {**_SCORE_TOY, "process": {"name": "vp"}, "loss": {"weighting": "eps"},
           "sample": {"sampler": "euler_maruyama", "steps": 500}},
    "subvp": {**_SCORE_TOY, "process": {"name": "subvp"}, "loss": {"weighting": "eps"},
              "sample": {"sampler": "euler_maruyama", "steps": 500}},
    "ve": {**_SCORE_TOY, "process": _VE_TOY, "loss": {"weighting": "eps"},
           "sample": {"sampler": "reverse_diffusion", "steps": 500}},
    "ncsn": {**_SCORE_TOY, "process": {"name": "edm", "sigma_min": 0.01, "sigma_max": 5.0},
             "loss": {"name": "ncsn", "ncsn_levels": 10},
             "sample": {"sampler": "annealed_langevin", "steps": 1000, "grid": "logsnr"}},
    "ebm": {**_SCORE_TOY, "process": _VE_TOY, "loss": {"weighting": "eps"},
            "model": {"net": "energy", "prediction": "eps", "hidden": 128, "depth": 3},
            "sample": {"sampler": "euler_maruyama", "steps": 500}},
})


def deep_update(base: dict, over: dict, *, strict: bool = True, path: str = "") -> dict:
    """Recursively merge ``over`` into a copy of ``base``; with ``strict``, unknown keys are errors."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        where = f"{path}{k}"
        if k not in out:
            if strict:
                allowed = ", ".join(sorted(out))
                raise ValueError(f"unknown config key {where!r}; allowed here: {allowed}")
            out[k] = copy.deepcopy(v)
        elif isinstance(out[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"config key {where!r} is a section; give {where}.<key>=value")
            out[k] = deep_update(out[k], v, strict=strict, path=where + ".")
        else:
            _check_kind(where, out[k], v)
            out[k] = copy.deepcopy(v)
    return out


def _check_kind(where: str, default, value) -> None:
    """A value replacing a number, flag or list default must be one too (``--set train.steps=abc`` is an
    error naming the key); every number must be finite (``--set train.lr=NaN``); ``None`` (auto/off) and keys
    whose default is ``None`` or a string are not checked further."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"config key {where!r} must be a finite number, got {value!r}")
    if value is None or default is None:
        return
    if isinstance(default, bool):
        ok, kind = isinstance(value, bool), "true or false"
    elif isinstance(default, (int, float)):
        ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, list):
        ok, kind = isinstance(value, list), "a list such as [1,2]"
    else:
        return
    if not ok:
        raise ValueError(f"config key {where!r} expects {kind}, got {value!r}")


def parse_value(text: str):
    """``--set`` / ``--opt`` values: JSON where it parses (numbers, true/false/null, lists), then Python's float
    spellings (``inf``, ``nan``: checked later, so that a NaN is refused by name), else the raw string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        return float(text)
    except ValueError:
        return text


def apply_sets(cfg: dict, sets: list[str]) -> dict:
    """Apply ``key.sub=value`` overrides (strictly: unknown keys are errors)."""
    over: dict = {}
    for item in sets or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, val = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2:
            raise ValueError(f"--set key must be section.key (sections: {', '.join(DEFAULTS)}), got {key!r}")
        over.setdefault(parts[0], {})[parts[1]] = parse_value(val)
    return deep_update(cfg, over)


def resolve(spec: str | dict | None, sets: list[str] | None = None) -> dict:
    """Defaults <- preset or JSON file (or dict) <- ``--set`` overrides."""
    cfg = copy.deepcopy(DEFAULTS)
    if isinstance(spec, dict):
        cfg = deep_update(cfg, spec)
    elif spec:
        if spec in PRESETS:
            cfg = deep_update(cfg, PRESETS[spec])
            cfg["preset"] = spec
        elif Path(spec).suffix == ".json" or Path(spec).is_file():
            p = Path(spec)
            if not p.is_file():
                raise ValueError(f"config file not found: {p}")
            user = read_json(p, "config file")
            user.pop("preset", None)
            cfg = deep_update(cfg, user)
        else:
            raise ValueError(f"unknown preset {spec!r} (and no such config file); presets: "
                             f"{', '.join(sorted(PRESETS))}")
    return check_values(apply_sets(cfg, sets or []))


# keys that count something: whole numbers >= 1 (0 allowed for the train intervals that 0 switches off)
COUNTS = {"model": ("hidden", "depth", "emb_dim", "channels", "num_res_blocks", "latent_channels", "cond_tokens",
                    "num_heads", "latent_dim"),
          "process": ("T", "schedule_hidden"), "sample": ("steps", "n"), "data": ("size", "channels", "n"),
          "loss": ("ncsn_levels", "ssm_projections", "vae_samples", "levels"),
          "train": ("steps", "batch", "accum", "log_every")}
OPTIONAL_COUNTS = {"train": ("ckpt_every", "sample_every", "warmup", "threads", "seed")}


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def with_defaults(saved: dict) -> dict:
    """A run's saved config completed with the keys this version added since (their defaults), so that a run
    written by an older version loads, resumes and compares equal to the same config resolved today."""
    return deep_update(DEFAULTS, saved, strict=False)


def check_values(cfg: dict) -> dict:
    """Refuse count values that are not whole numbers (``train.steps=2.5``, ``model.hidden=0``, ``process.T=2.5``)
    with one line naming the key; returns ``cfg``."""
    for section, values in cfg.items():
        if section in DEFAULTS and not isinstance(values, dict):
            raise ValueError(f"config section {section!r} must be an object of keys, got {values!r}")
    for table, low in ((COUNTS, 1), (OPTIONAL_COUNTS, 0)):
        for section, keys in table.items():
            for k in keys:
                v = cfg.get(section, {}).get(k)
                if v is not None:
                    check_count(v, f"{section}.{k}", low)
    mult = cfg.get("model", {}).get("channel_mult")
    if mult is not None and not (isinstance(mult, list) and mult and all(_whole(m) and m >= 1 for m in mult)):
        raise ValueError(f"model.channel_mult must be a non-empty list of whole numbers >= 1, got {mult!r}")
    return cfg


# Images (issue 4; defined after deep_update, which builds the variants). Class-conditional DDPM U-Nets with
# label dropout p_uncond = 0.1 for classifier-free guidance at sampling time. Cosine betas with v-prediction:
# at 8x8 the linear schedule leaves little signal for most t (Nichol & Dhariwal 2021), and v stays
# well-conditioned at both ends. train.threads=1: on a busy 2-core machine the intra-op threads of these small
# convolutions cost more in synchronisation than they gain (measured 3x slower wall-clock); set
# train.threads=0 (torch's default) on an idle multi-core machine, or run several processes with torchrun.
_DIGITS = {"data": {"name": "digits", "size": 8, "conditional": True},
           "process": {"name": "ddpm", "betas": "cosine"},
           "model": {"net": "unet", "prediction": "v", "channels": 32, "channel_mult": [1, 2], "num_res_blocks": 1,
                     "attn_resolutions": [4]},
           "loss": {"p_uncond": 0.1},
           "train": {"steps": 2000, "batch": 128, "lr": 2e-3, "warmup": 100, "ema": 0.999, "ckpt_every": 500,
                     "log_every": 50, "threads": 1},
           "sample": {"sampler": "ddim", "steps": 50, "n": 100}}
# Score family on digits: the digits U-Net and training settings, unconditional, eps-prediction
def _score_digits(process: dict, loss: dict, sample: dict) -> dict:
    cfg = deep_update(_DIGITS, {"data": {"conditional": False}, "model": {"prediction": "eps"}, "loss": loss,
                                "sample": sample}, strict=False)
    cfg["process"] = process
    return cfg


PRESETS.update({
    "vp_digits": _score_digits({"name": "vp"}, {"weighting": "eps"}, {"sampler": "euler_maruyama", "steps": 500}),
    "ve_digits": _score_digits({"name": "ve", "sigma_min": 0.01, "sigma_max": 20.0}, {"weighting": "eps"},
                               {"sampler": "pc", "steps": 1000}),
    "ncsn_digits": _score_digits({"name": "edm", "sigma_min": 0.01, "sigma_max": 20.0},
                                 {"name": "ncsn", "ncsn_levels": 20},
                                 {"sampler": "annealed_langevin", "steps": 2000, "grid": "logsnr"}),
})
# Likelihood (issue 17): the digits U-Net trained on VDM's continuous-time bound (Kingma et al. 2021) of uniformly
# dequantized digits -- the bins that the ODE likelihood scores -- with a learned monotone log-SNR schedule
# (endpoints by the bound, shape by the variance of its estimate), antithetic times, Fourier features of the input
# at periods 1/4, 1/8, 1/16 (about 2, 1 and 1/2 grey levels), dropout 0.1, and non-leaking augmentation
# (data.augment = 0.2: flips, quarter turns and 1-pixel shifts, the network told which; EDM, Karras et al. 2022)
# against memorizing the ~1200 digits. Without augmentation the recipe overfits after ~2000-3000 steps; with it
# the validation bound falls until ~7000 of 9000 steps, then levels off. The augmentation, its p and the step count
# were chosen on a validation split of the training digits (benchmarks/results/likelihood_select.md). 9000 steps
# of batch 128: 0.141 s a step with 2 threads, no other job running, 21 minutes (benchmarks/likelihood.py
# --step-time). On the 597 held-out digits: 1.781 bits/dim by the ODE, 1.780 by the bound
# (benchmarks/results/likelihood.md). Score it with `torchdiffusion likelihood RUN --method ode|vlb`.
PRESETS["likelihood_digits"] = deep_update(
    _score_digits({"name": "learned", "gamma_min": -10.0, "gamma_max": 6.0},
                  {"name": "vdm", "dequantize": "uniform", "time_sampler": "antithetic"},
                  {"sampler": "euler_maruyama", "steps": 500}),
    {"data": {"augment": 0.2}, "model": {"fourier_features": [3, 4, 5], "dropout": 0.1},
     "train": {"steps": 9000, "lr": 2e-3, "threads": 2}},
    strict=False)

PRESETS.update({
    "digits": _DIGITS,
    "digits16": deep_update(_DIGITS, {"data": {"size": 16},
                                      "model": {"channel_mult": [1, 2, 2], "attn_resolutions": [4]}}, strict=False),
    # an image folder: --set data.name=PATH (--set data.size=32); sub-folders name classes (data.conditional)
    "images": deep_update(_DIGITS, {"data": {"name": "<image folder>", "size": 32, "channels": 3,
                                             "conditional": False, "flip": True},
                                    "model": {"channels": 64, "channel_mult": [1, 2, 2], "attn_resolutions": [8]},
                                    "train": {"steps": 20000, "batch": 64, "lr": 2e-4, "threads": 0},
                                    "sample": {"n": 64}}, strict=False),
})


# Classifier guidance (issue 8): a noise-conditional classifier p_phi(y | x_t, t) (nets/classifier.py, the U-Net's
# encoder with time embedding) trained with cross-entropy on x_t of the same process as the `digits` model
# (cosine DDPM), so that its time input matches the diffusion model it guides. p_uncond = 0: every label is kept.
PRESETS["classifier_digits"] = deep_update(_DIGITS, {"model": {"net": "classifier", "num_res_blocks": 2},
                                                     "loss": {"name": "classifier", "p_uncond": 0.0},
                                                     "train": {"steps": 3000}}, strict=False)

# Autoencoders and latent diffusion (issue 9; nets/autoencoder.py, ae_losses.py, latent.py). 16x16 digits
# (data.size=16) so that the 4x4x4 latent (64 numbers) is 4x smaller than the image; the decoder is N(D(z),
# 0.1^2 I). vae2d_digits: a 2-D vector latent on 8x8 digits with a learned-variance discretized decoder (17
# levels) for a latent-space plot. `latent`: diffusion on the scaled latents of a trained autoencoder run
# (--set data.autoencoder=RUN), class-conditional through tau(y) tokens and cross-attention (net unet_xattn).
_AE = {"data": {"name": "digits", "size": 16, "conditional": False},
       "model": {"net": "autoencoder", "channels": 16, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                 "latent_channels": 4},
       "loss": {"name": "ae", "p_uncond": 0.0},
       "train": {"steps": 1500, "batch": 128, "lr": 2e-3, "warmup": 100, "ema": 0.999, "ckpt_every": 500,
                 "log_every": 50, "threads": 1},
       "sample": {"n": 64}}
PRESETS.update({
    "ae_digits": _AE,
    "dae_digits": deep_update(_AE, {"loss": {"name": "dae", "dae_sigma": 0.3}}, strict=False),
    "vae_digits": deep_update(_AE, {"model": {"net": "vae"}, "loss": {"name": "vae", "beta": 1.0}}, strict=False),
    "vae2d_digits": deep_update(_AE, {"data": {"size": 8},
                                      "model": {"net": "vae", "channel_mult": [1, 2], "latent_dim": 2,
                                                "decoder_var": "learned"},
                                      "loss": {"name": "vae", "likelihood": "discretized", "levels": 17}},
                                strict=False),
    # an image folder: --set data.name=PATH; 32x32 RGB -> 8x8x4 latents
    "vae_images": deep_update(_AE, {"data": {"name": "<image folder>", "size": 32, "channels": 3, "flip": True},
                                    "model": {"net": "vae", "channels": 64, "channel_mult": [1, 2, 2]},
                                    "loss": {"name": "vae"},
                                    "train": {"steps": 20000, "batch": 64, "lr": 5e-4, "threads": 0}},
                              strict=False),
    "latent": deep_update(_DIGITS, {"data": {"name": "latent", "autoencoder": None, "conditional": True},
                                    "model": {"net": "unet_xattn", "channels": 32, "channel_mult": [1, 2],
                                              "num_res_blocks": 1, "attn_resolutions": [4, 2], "cond_tokens": 4},
                                    "train": {"steps": 3000, "lr": 1e-3}}, strict=False),
})

# Digits models whose samples evaluation.metrics.DigitsEvaluator scores (and the classifier that guides them) hold
# out the evaluator's held-out digits: data.holdout = its HOLDOUT on the same seed-0 permutation (split_dataset), so
# they train on exactly the evaluator's training digits and its FD floor is measured on digits they never saw.
# vae_digits is the autoencoder of the scored latent model (benchmarks/latent.py). SCORED_LATENT: latent diffusion
# on such an autoencoder's digits; its dataset is the latents of all the digits in their order (runs/latent.py), so
# the same holdout leaves the latents of the same held-out digits out of training.
EVALUATOR_HOLDOUT = 0.2  # = evaluation.metrics.HOLDOUT (tests/test_digits_split.py checks the splits are equal)
SCORED_DIGITS = ("digits", "digits16", "classifier_digits", "vp_digits", "ve_digits", "ncsn_digits", "vae_digits")
SCORED_LATENT = ("latent",)
for _name in SCORED_DIGITS + SCORED_LATENT:
    PRESETS[_name] = deep_update(PRESETS[_name], {"data": {"holdout": EVALUATOR_HOLDOUT}}, strict=False)
