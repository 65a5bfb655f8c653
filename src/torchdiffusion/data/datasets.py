"""Data: generated 2-D toys (with exact densities), scikit-learn's 8x8 digits and ``.npz`` arrays, loaded into
memory as one tensor, and image folders, streamed from disk (:mod:`torchdiffusion.data.folder`); nothing is
downloaded."""

from __future__ import annotations

import dataclasses
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchdiffusion.data.folder import IMAGE_EXTS, ImageFolder  # noqa: F401 (IMAGE_EXTS: re-exported)
from torchdiffusion.data.labels import check_labels
from torchdiffusion.oracle import GaussianMixture

TOYS = ("ring", "moons", "swiss_roll", "checkerboard", "gmm")


@dataclass
class Dataset:
    """In-memory data: ``x`` (N, ...) float32, optional integer labels ``y``, quantization ``levels`` (256
    for 8-bit images, 17 for digits, None for continuous data), an exact ``density`` where one is known, and
    ``value_range`` of the scaled data (for bits/dim accounting)."""

    x: Tensor
    y: Tensor | None = None
    levels: int | None = None
    density: object | None = None
    value_range: tuple[float, float] = (-1.0, 1.0)
    num_classes: int | None = None
    name: str = "data"
    meta: dict = field(default_factory=dict)
    captions: list[str | None] | None = None

    def __post_init__(self):
        if not torch.isfinite(self.x).all():
            raise ValueError(f"dataset {self.name!r} contains NaN or Inf values")
        if len(self.x) == 0:
            raise ValueError(f"dataset {self.name!r} is empty")
        if self.captions is not None and len(self.captions) != len(self.x):
            raise ValueError(f"dataset {self.name!r}: {len(self.captions)} captions for {len(self.x)} examples")
        if self.x[0].numel() == 0:
            raise ValueError(f"dataset {self.name!r}: its examples hold no values (shape {tuple(self.x.shape)}); "
                             "each example needs at least one number")
        if self.y is not None:
            if len(self.y) != len(self.x):
                raise ValueError(f"dataset {self.name!r}: {len(self.y)} labels for {len(self.x)} examples")
            if self.y.ndim == 2:  # condition sequences (token ids of captions: with_targets), not class labels
                if self.y.is_floating_point() or self.y.is_complex() or self.y.dtype == torch.bool:
                    raise ValueError(f"dataset {self.name!r}: condition sequences must be integers, got "
                                     f"{self.y.dtype}")
                self.num_classes = None
            else:
                self.num_classes = check_labels(self.y, self.num_classes, f"dataset {self.name!r}")

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    def __len__(self) -> int:
        return len(self.x)


def labels_from_array(arr: np.ndarray, where: str) -> Tensor:
    """Labels read from a file as a long tensor: integer arrays as they are, float arrays only if every value is a
    whole number (``0.7`` and NaN are refused, never truncated)."""
    if arr.dtype.kind in "ui":
        return torch.tensor(arr.astype(np.int64))
    if arr.dtype.kind == "f":
        bad = ~np.isfinite(arr) | (np.isfinite(arr) & (arr != np.round(np.nan_to_num(arr))))
        if bad.any():
            i = int(np.flatnonzero(bad.reshape(-1))[0])
            bad_value = float(arr.reshape(-1)[i])
            raise ValueError(f"{where}: labels must be whole numbers, got {bad_value!r} at index {i}")
        return torch.tensor(arr.astype(np.int64))
    raise ValueError(f"{where}: labels must be whole numbers, got an array of dtype {arr.dtype}")


# --------------------------------------------------------------------------------------------------------
# 2-D toys: every one except the checkerboard is an exact Gaussian mixture
# --------------------------------------------------------------------------------------------------------

def _curve_mixture(points: np.ndarray, std: float) -> GaussianMixture:
    p = torch.as_tensor(points, dtype=torch.float64)
    return GaussianMixture(torch.ones(len(p)), p, torch.full((len(p),), std**2))


def toy_density(name: str) -> GaussianMixture | Checkerboard:
    """The exact density of a 2-D toy (scaled to roughly unit variance per coordinate)."""
    if name == "ring":  # 8 Gaussians on a circle
        ang = torch.arange(8, dtype=torch.float64) * 2 * math.pi / 8
        means = 1.5 * torch.stack([torch.cos(ang), torch.sin(ang)], 1)
        return GaussianMixture(torch.ones(8), means, torch.full((8,), 0.1**2))
    if name == "gmm":  # an asymmetric 3-component mixture with full covariances
        means = torch.tensor([[-1.2, -0.6], [1.0, 0.9], [0.8, -1.2]], dtype=torch.float64)
        covs = torch.tensor([[[0.12, 0.06], [0.06, 0.10]], [[0.08, -0.03], [-0.03, 0.15]],
                             [[0.05, 0.0], [0.0, 0.05]]], dtype=torch.float64)
        return GaussianMixture(torch.tensor([0.45, 0.35, 0.2]), means, covs)
    if name == "moons":
        s = np.linspace(0, math.pi, 100)
        upper = np.stack([np.cos(s), np.sin(s)], 1)
        lower = np.stack([1 - np.cos(s), 0.5 - np.sin(s)], 1)
        pts = (np.concatenate([upper, lower]) - np.array([0.5, 0.25])) * 1.6
        return _curve_mixture(pts, 0.08)
    if name == "swiss_roll":
        s = np.linspace(1.5 * math.pi, 4.5 * math.pi, 300)
        pts = np.stack([s * np.cos(s), s * np.sin(s)], 1) / 7.0
        return _curve_mixture(pts, 0.06)
    if name == "checkerboard":
        return Checkerboard()
    raise ValueError(f"unknown toy {name!r}; allowed: {', '.join(TOYS)}")


class Checkerboard:
    """Uniform density on the dark squares of a 4x4 board on [-2, 2]^2 (exact log-density)."""

    dim = 2

    def log_prob(self, x: Tensor) -> Tensor:
        inside = (x.abs() < 2).all(1)
        cell = torch.floor(x + 2).long()
        dark = (cell[:, 0] + cell[:, 1]) % 2 == 0
        return torch.where(inside & dark, torch.full_like(x[:, 0], -math.log(8.0)),
                           torch.full_like(x[:, 0], -math.inf))

    def sample(self, n: int, generator: torch.Generator | None = None, dtype=torch.float64):
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        cell = torch.randint(0, 8, (n,), generator=generator)
        row = cell // 2
        col = 2 * (cell % 2) + (row % 2)
        x = torch.stack([col, row], 1).to(torch.float64) + u - 2
        return x.to(dtype), torch.zeros(n, dtype=torch.long)


def toy(name: str, n: int = 10000, seed: int = 0) -> Dataset:
    """``n`` exact samples of a 2-D toy, with its density attached."""
    dens = toy_density(name)
    x, y = dens.sample(n, torch.Generator().manual_seed(seed), dtype=torch.float32)
    return Dataset(x.float(), None, density=dens, name=name)


# --------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------

def _resize(x: Tensor, size: int) -> Tensor:
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                           antialias=size < x.shape[-1])


def digits(size: int = 8) -> Dataset:
    """scikit-learn's 8x8 digits (1797 images, 17 grey levels) mapped to [-1, 1], optionally resized."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 * 2 - 1
    x = _resize(x, int(size)).clamp(-1, 1)
    return Dataset(x, torch.tensor(d.target, dtype=torch.long), levels=17 if size == 8 else None,
                   name="digits", num_classes=10)


def load_npz(path: str | Path, key: str | None = None, label_key: str | None = None) -> Dataset:
    """Arrays from an ``.npz``: data under ``key`` (default ``x``, ``data``, ``images`` or the only array),
    optional labels under ``label_key`` (default ``y`` or ``labels``). uint8 images (N,H,W[,C]) or
    (N,C,H,W) are scaled to [-1, 1]; float arrays are used as they are. A scalar ``levels`` array K marks
    K-level data (for dequantization and bits/dim): integer arrays then hold codes 0..K-1 (scaled to
    ``-1 + 2k/(K-1)``), float arrays must already lie on that grid of [-1, 1]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no such .npz file: {path}")
    if not zipfile.is_zipfile(path):  # numpy would answer with a hint about pickles, which we never load
        raise ValueError(f"cannot read {path}: not a .npz archive (a zip of .npy arrays, as numpy.savez writes)")
    try:
        z = np.load(path, allow_pickle=False)
        keys = list(z.keys())
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:  # damaged archive
        raise ValueError(f"cannot read {path}: damaged .npz archive ({str(e).splitlines()[0][:120]})") from None
    levels_given = _npz_levels(z, path) if "levels" in keys else None
    if key is None:
        data_keys = [k for k in keys if k != "levels"]
        cand = [k for k in ("x", "data", "images", "arr_0") if k in keys] or (data_keys if len(data_keys) == 1 else [])
        if not cand:
            raise ValueError(f"{path}: cannot tell which array holds the data among {keys}; pass key=")
        key = cand[0]
    if key not in keys:
        raise ValueError(f"{path}: no array {key!r}; arrays: {keys}")
    try:
        arr = z[key]
        if label_key is None:
            label_key = next((k for k in ("y", "labels") if k in keys and k != key), None)
        labels = z[label_key] if label_key else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"cannot read {path}: damaged array in the .npz ({str(e).splitlines()[0][:120]})") from None
    if arr.dtype.kind not in "uif" or arr.ndim < 2 or len(arr) == 0:
        raise ValueError(f"{path}: array {key!r} must hold numbers of shape (N, ...) with N >= 1, got dtype "
                         f"{arr.dtype} and shape {arr.shape}")
    levels = None
    if arr.dtype == np.uint8:
        levels = 256
        x = torch.tensor(arr, dtype=torch.float32) / 255 * 2 - 1
        if x.ndim == 3:
            x = x[:, None]
        elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
    else:
        x = torch.tensor(arr, dtype=torch.float32)
    if levels_given is not None:
        if arr.dtype.kind in "ui":  # integer codes 0..K-1
            codes = torch.tensor(arr.astype(np.int64))
            if int(codes.min()) < 0 or int(codes.max()) > levels_given - 1:
                raise ValueError(f"{path}: integer data must hold codes 0..{levels_given - 1} for levels = "
                                 f"{levels_given}, got values in [{int(codes.min())}, {int(codes.max())}]")
            x = codes.to(torch.float32) / (levels_given - 1) * 2 - 1
            if x.ndim == 3:
                x = x[:, None]
            elif x.ndim == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
                x = x.permute(0, 3, 1, 2)
        else:
            k = (x.double() + 1) / 2 * (levels_given - 1)
            if (k - k.round()).abs().max() > 1e-3 or k.min() < -1e-3 or k.max() > levels_given - 1 + 1e-3:
                raise ValueError(f"{path}: float data with levels = {levels_given} must lie on the grid "
                                 f"-1 + 2 k / {levels_given - 1} (k = 0..{levels_given - 1}) of [-1, 1]")
            x = (k.round() / (levels_given - 1) * 2 - 1).to(torch.float32)
        levels = levels_given
    y = labels_from_array(labels, f"{path} array {label_key!r}") if labels is not None else None
    return Dataset(x.contiguous(), y, levels=levels, name=path.stem)


def _npz_levels(z, path: Path) -> int:
    """The scalar ``levels`` array of an ``.npz``: an integer K >= 2 (K-level data, for dequantization and bits/dim)."""
    try:
        lv = z["levels"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ValueError(f"cannot read {path}: damaged array 'levels' ({str(e).splitlines()[0][:120]})") from None
    if lv.shape != () or lv.dtype.kind not in "uif" or float(lv) != int(float(lv)) or int(float(lv)) < 2:
        raise ValueError(f"{path}: 'levels' must be a scalar whole number >= 2 (the number of quantization levels), "
                         f"got shape {lv.shape} dtype {lv.dtype}")
    return int(float(lv))


def load_image_folder(path: str | Path, size: int = 32, channels: int = 3, **kw) -> Dataset:
    """An image folder decoded whole into memory (small folders; training streams them instead: :func:`load`
    returns an :class:`~torchdiffusion.data.folder.ImageFolder`). ``kw``: its options (``label_key``,
    ``num_classes``, ``on_bad_image``)."""
    return examples(ImageFolder(path, size, channels, **kw))


def examples(ds: Dataset | ImageFolder, n: int | None = None, workers: int = 0) -> Dataset:
    """The first ``n`` examples (all by default) of a data set as an in-memory :class:`Dataset`: a slice of one
    already in memory, or decoded from a streamed image folder."""
    if not isinstance(ds, ImageFolder):
        return ds if n is None or n >= len(ds) else _rows(ds, torch.arange(n))
    xs, ys = [], []
    for x, y in ds.batches(256, n, workers=workers):
        xs.append(x)
        ys.append(y)
    caps = captions(ds)
    return Dataset(torch.cat(xs), torch.cat(ys) if ds.labelled else None, levels=ds.levels, name=ds.name,
                   num_classes=ds.num_classes, meta=dict(ds.meta), captions=caps and caps[:sum(map(len, xs))])


def _rows(ds: Dataset, idx: Tensor) -> Dataset:
    """The examples ``idx`` of an in-memory data set (labels and captions along)."""
    caps = None if ds.captions is None else [ds.captions[i] for i in idx.tolist()]
    return dataclasses.replace(ds, x=ds.x[idx], y=None if ds.y is None else ds.y[idx], captions=caps)


def captions(ds: Dataset | ImageFolder) -> list[str | None] | None:
    """The caption of every example (the ``text`` column of an image folder's ``metadata.jsonl``; None for an
    uncaptioned one), or None when the data set has no captions."""
    if isinstance(ds, ImageFolder):
        return None if ds._texts is None else [ds.caption(i) for i in range(len(ds))]
    return None if ds.captions is None else list(ds.captions)


def with_targets(ds: Dataset | ImageFolder, targets: Tensor) -> Dataset | ImageFolder:
    """``ds`` with ``targets`` ``(N, L)`` (integer condition sequences, e.g. the token ids of its captions) in place
    of its labels: the ``y`` that training batches carry as ``cond``."""
    if targets.ndim != 2 or len(targets) != len(ds):
        raise ValueError(f"targets must have shape ({len(ds)}, L), got {tuple(targets.shape)}")
    if isinstance(ds, ImageFolder):
        return ds.with_targets(targets.numpy())
    return dataclasses.replace(ds, y=targets.long(), num_classes=None)


def load(name: str, **kw) -> Dataset | ImageFolder:
    """Dispatch: a toy name, ``digits``, a ``.npz`` path or an image folder (streamed: an
    :class:`~torchdiffusion.data.folder.ImageFolder`; ``kw`` ``size``, ``channels``, ``label_key``, ``classes``,
    ``on_bad_image``); latent codes of an autoencoder run are built by
    :func:`torchdiffusion.runs.latent.dataset_from_config`."""
    classes = kw.get("classes")
    if name in TOYS:
        ds = toy(name, n=int(kw.get("n", 10000)), seed=int(kw.get("seed", 0)))
    elif name == "digits":
        ds = digits(int(kw.get("size", 8)))
    elif Path(name).suffix == ".npz":
        ds = load_npz(Path(name), kw.get("key"), kw.get("label_key"))
    elif Path(name).is_dir():  # streamed (data.folder): its labels are checked as it is indexed
        return ImageFolder(Path(name), int(kw.get("size", 32)), int(kw.get("channels", 3)),
                           label_key=kw.get("label_key"), num_classes=classes,
                           on_bad_image=kw.get("on_bad_image") or "error", exclude=kw.get("exclude"))
    else:
        raise ValueError(f"unknown data {name!r}: use a toy ({', '.join(TOYS)}), 'digits', a .npz file or an "
                         "image folder")
    if kw.get("exclude"):
        raise ValueError(f"data.exclude matches the columns of an image folder's metadata.jsonl; {name!r} is not an "
                         "image folder")
    if classes is not None and ds.y is not None:  # a declared class count (data.classes): labels checked against it
        ds = dataclasses.replace(ds, num_classes=classes)
    return ds


def split_dataset(ds: Dataset | ImageFolder, holdout: float,
                  seed: int = 0) -> tuple[Dataset | ImageFolder, Dataset | ImageFolder | None]:
    """Deterministic (train, test) split: the last ``round(holdout * N)`` examples of a fixed permutation
    (``seed`` 0) are held out; with none held out the test part is ``None``. An image folder is split into two
    subsets of its index (nothing decoded)."""
    if not 0.0 <= holdout < 1.0:
        raise ValueError(f"data.holdout must be in [0, 1), got {holdout}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    n_test = round(holdout * len(ds))
    if n_test == 0:
        return ds, None

    def part(idx: Tensor) -> Dataset | ImageFolder:
        if isinstance(ds, ImageFolder):
            return ds.subset(idx.numpy())
        return _rows(ds, idx)
    return part(perm[: len(ds) - n_test]), part(perm[len(ds) - n_test:])
