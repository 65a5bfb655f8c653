"""Generation from a trained model to files: PNG grids for images, scatter PNGs for 2-D data, ``.npz``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import viz
from .samplers import sample


def generate(model, shape: tuple[int, ...], n: int, *, sampler: str = "ddim", steps: int = 50,
             grid: str | None = None, seed: int = 0, cond=None, device: str | torch.device = "cpu",
             callback=None, **options) -> Tensor:
    """Draw ``x_T`` from the prior with a seeded generator and run ``sample``."""
    if int(n) < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    x_T = model.process.prior_sample((int(n), *shape), generator=g).to(device)
    return sample(model, x_T, sampler, steps, grid=grid, generator=g, cond=cond, callback=callback, **options)


def save_samples(x: Tensor, path: str | Path, *, data: Tensor | None = None, nrow: int | None = None,
                 value_range=(-1.0, 1.0), title: str = "") -> Path:
    """Write samples: ``.npz`` (array ``x``), or a PNG (image grid, or 2-D scatter beside ``data``)."""
    path = Path(path)
    if path.suffix == ".npz":
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, x=x.detach().cpu().numpy())
        return path
    if path.suffix != ".png":
        raise ValueError(f"output must end in .png or .npz, got {path.name}")
    if x.ndim == 4:
        return viz.save_image_grid(x, path, nrow=nrow, value_range=value_range)
    if x.ndim == 2 and x.shape[1] == 2:
        return viz.save_scatter(x, path, data=data, title=title)
    raise ValueError(f"cannot draw samples of shape {tuple(x.shape[1:])} as PNG; use .npz")


def generate_to_file(model, cfg: dict, run_info: dict, path: str | Path, *, data=None, n: int | None = None,
                     **overrides) -> Path:
    """Sample with the run's ``sample`` config (overridable) and save to ``path``."""
    s = {**cfg["sample"], **{k: v for k, v in overrides.items() if v is not None}}
    n = n or int(s["n"])
    device = next(model.parameters()).device if hasattr(model, "parameters") else "cpu"
    x = generate(model, tuple(run_info["data_shape"]), n, sampler=s["sampler"], steps=int(s["steps"]),
                 grid=s.get("grid"), seed=int(s.get("seed", 0)), device=device)
    ref = data.x[:2000] if data is not None and data.x.ndim == 2 else None
    from .latent import to_images  # latent runs are decoded to images

    x, vr = to_images(x, run_info)
    return save_samples(x, path, data=ref, value_range=vr)
