"""Pictures: image grids (PNG), 2-D scatter plots beside the data, score-field plots, reverse-process GIFs.

Every file is written atomically (:func:`torchdiffusion._files.atomic_write`): a full disk or an interrupt
leaves the old file, never a truncated one; values to draw or store must be finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchdiffusion._files import atomic_write, prepare_output
from torchdiffusion._tensor import check_finite


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def to_uint8(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Images in ``value_range`` -> uint8 (N, H, W, C)."""
    lo, hi = value_range
    x = ((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_array(x: Tensor, nrow: int | None = None, pad: int = 1, value_range=(-1.0, 1.0)) -> np.ndarray:
    """Tile images (N, C, H, W) into one uint8 array (rows of ``nrow`` images); NaN/Inf is an error."""
    imgs = to_uint8(check_finite(x, "the images to draw"), value_range)
    n, h, w, c = imgs.shape
    nrow = nrow or int(np.ceil(np.sqrt(n)))
    ncol = int(np.ceil(n / nrow))
    out = np.full((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        out[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = imgs[i]
    return out[..., 0] if c == 1 else out


def save_image_grid(x: Tensor, path: str | Path, nrow: int | None = None, scale: int = 4,
                    value_range=(-1.0, 1.0)) -> Path:
    """Write a PNG grid of images (nearest-neighbour upscaled by ``scale`` so small images are visible)."""
    from PIL import Image

    arr = grid_array(x, nrow, value_range=value_range)
    im = Image.fromarray(arr)
    if scale > 1:
        im = im.resize((im.width * scale, im.height * scale), Image.NEAREST)
    return atomic_write(path, lambda tmp: im.save(tmp, format="PNG"))


def save_gif(frames: list[Tensor], path: str | Path, nrow: int | None = None, scale: int = 4,
             duration_ms: int = 80, value_range=(-1.0, 1.0)) -> Path:
    """Write an animated GIF, one grid per frame (e.g. the reverse process from the callback)."""
    from PIL import Image

    ims = []
    for f in frames:
        im = Image.fromarray(grid_array(f, nrow, value_range=value_range))
        ims.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST) if scale > 1 else im)
    if not ims:
        raise ValueError(f"no frames to write to {path}")
    return atomic_write(path, lambda tmp: ims[0].save(tmp, format="GIF", save_all=True,
                                                      append_images=ims[1:] + [ims[-1]] * 10,
                                                      duration=duration_ms, loop=0))


def _square(ax, lim: float) -> None:
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")


def _save_figure(fig, path: str | Path) -> Path:
    """Lay out, write atomically as PNG, and close a matplotlib figure."""
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        _mpl().close(fig)


def save_scatter(samples: Tensor, path: str | Path, data: Tensor | None = None, title: str = "",
                 lim: float | None = None) -> Path:
    """2-D samples as a scatter PNG, beside the training data when given."""
    check_finite(samples, "the samples to plot")
    plt = _mpl()
    panels = [("data", data), ("samples", samples)] if data is not None else [("samples", samples)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    pts = torch.cat([p for _, p in panels if p is not None]).detach().cpu().float()
    lim = lim or float(pts.abs().quantile(0.995)) * 1.15
    for ax, (name, p) in zip(axes[0], panels):
        p = p.detach().cpu().float()
        ax.scatter(p[:, 0], p[:, 1], s=2, alpha=0.5, color="C0" if name == "data" else "C3")
        _square(ax, lim)
        ax.set_title(f"{name} (n={len(p)})")
    if title:
        fig.suptitle(title)
    return _save_figure(fig, path)


def save_score_field(score_fns: dict, path: str | Path, log_density=None, lim: float = 3.0, n: int = 21,
                     title: str = "") -> Path:
    """Arrows of one or more 2-D score fields (``{"learned": f, "exact": g}``, each ``f(x) -> score``) over
    the log-density when given."""
    plt = _mpl()
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    if log_density is not None:
        gd = torch.linspace(-lim, lim, 200, dtype=torch.float64)
        XX, YY = torch.meshgrid(gd, gd, indexing="xy")
        lp = log_density(torch.stack([XX.flatten(), YY.flatten()], 1)).reshape(200, 200)
        ax.imshow(lp.exp().numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="Greys", alpha=0.6)
    for i, (name, f) in enumerate(score_fns.items()):
        s = check_finite(f(pts).detach().double(), f"the {name} score field")
        norm = s.norm(dim=1, keepdim=True).clamp_min(1e-12)
        s = s / norm * norm.log1p() / norm.log1p().max()  # compress magnitudes for legibility
        ax.quiver(pts[:, 0], pts[:, 1], s[:, 0], s[:, 1], color=f"C{i}", label=name, alpha=0.8,
                  angles="xy", scale_units="xy", scale=1.0 / (2 * lim / n))
    _square(ax, lim)
    ax.legend(loc="upper right")
    if title:
        ax.set_title(title)
    return _save_figure(fig, path)


SAMPLE_FORMATS = (".png", ".npz")


def check_sample_path(path: str | Path) -> Path:
    """``path`` as a :class:`Path` if :func:`save_samples` can write it (``.png`` or ``.npz`` in a writable
    folder), else a one-line error (callers check before doing the work); stale temp files there are removed."""
    path = Path(path)
    if path.suffix not in SAMPLE_FORMATS:
        raise ValueError(f"output must end in .png or .npz, got {path.name}")
    return prepare_output(path)


def save_samples(x: Tensor, path: str | Path, *, data: Tensor | None = None, nrow: int | None = None,
                 value_range=(-1.0, 1.0), title: str = "") -> Path:
    """Write samples: ``.npz`` (array ``x``), or a PNG (image grid, or 2-D scatter beside ``data``)."""
    path = check_sample_path(path)
    check_finite(x, f"the samples for {path}")
    if path.suffix == ".npz":
        arr = x.detach().cpu().numpy()

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, x=arr)
        return atomic_write(path, write)
    if x.ndim == 4:
        return save_image_grid(x, path, nrow=nrow, value_range=value_range)
    if x.ndim == 2 and x.shape[1] == 2:
        return save_scatter(x, path, data=data, title=title)
    raise ValueError(f"cannot draw samples of shape {tuple(x.shape[1:])} as PNG; use .npz")


def save_loss_curve(log: str | Path, path: str | Path) -> Path:
    """The training loss (and the held-out ``val_loss`` where logged) against the step, from a run's ``log.csv``,
    as a PNG (written atomically: a reader never sees half a picture). A logarithmic loss axis when every value
    is positive (losses that can be negative, e.g. a VLB in nats, stay linear)."""
    import csv

    with open(log, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("step")]

    def column(key: str) -> tuple[list[int], list[float]]:
        pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        pts = [(s, v) for s, v in pts if np.isfinite(v)]
        return [p[0] for p in pts], [p[1] for p in pts]

    plt = _mpl()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    values = []
    for key, label in (("loss", "training loss (mean over the log interval)"), ("val_loss", "held-out loss (EMA)")):
        steps, vals = column(key)
        if steps:
            ax.plot(steps, vals, label=label, marker="o" if key == "val_loss" else None, ms=3)
            values += vals
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return _save_figure(fig, path)
