"""Generation from a trained model to files: PNG grids for images, scatter PNGs for 2-D data, ``.npz``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from torchdiffusion.evaluation.viz import save_samples
from torchdiffusion.runs.latent import to_images
from torchdiffusion.samplers import sample


def generate(model, shape: tuple[int, ...], n: int, *, sampler: str = "ddim", steps: int = 50,
             grid: str | None = None, seed: int = 0, cond=None, device: str | torch.device = "cpu",
             callback=None, **options) -> Tensor:
    """Draw ``x_T`` from the prior with a seeded generator and run ``sample``."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = model.process.prior_sample((int(n), *shape), generator=g).to(device)
    return sample(model, x_T, sampler, steps, grid=grid, generator=g, cond=cond, callback=callback, **options)


def generate_to_file(model, cfg: dict, run_info: dict, path: str | Path, *, data=None, n: int | None = None,
                     **overrides) -> Path:
    """Sample with the run's ``sample`` config (overridable) and save to ``path``."""
    s = {**cfg["sample"], **{k: v for k, v in overrides.items() if v is not None}}
    n = n or int(s["n"])
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    x = generate(model, tuple(run_info["data_shape"]), n, sampler=s["sampler"], steps=int(s["steps"]),
                 grid=s.get("grid"), seed=int(s.get("seed", 0)), device=device)
    x_data = getattr(data, "x", None)  # (a streamed image folder has none; only 2-D data is drawn under samples)
    ref = x_data[:2000] if x_data is not None and x_data.ndim == 2 else None

    x, vr = to_images(x, run_info)
    return save_samples(x, path, data=ref, value_range=vr)
