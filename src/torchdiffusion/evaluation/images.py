"""Real-image evaluation (issue 19): folders of numbered PNGs and the standard metrics through torch-fidelity.

- :func:`write_png` / :func:`read_png_folder`: uint8 images (``C = 1`` grey or ``3`` RGB) written atomically as
  ``000000.png, 000001.png, ...`` and read back exactly (PNG is lossless).
- :func:`fidelity_metrics`: FID (Heusel et al. 2017), KID (Binkowski et al. 2018), Inception Score (Salimans et
  al. 2016) and precision / recall (Kynkaanniemi et al. 2019) of one image folder against another, computed by
  torch-fidelity (optional: ``pip install 'torchdiffusion[metrics]'``, imported here only) with its standard
  Inception-v3 feature extractor, or any extractor registered with ``torch_fidelity.register_feature_extractor``.
  The images are handed over as uint8 tensors, so torch-fidelity's own folder reader is not used. Missing
  Inception weights offline are one clear error. Our own Frechet distance stays in :mod:`.metrics`.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from torchdiffusion._files import write_bytes

PNG_RE = re.compile(r"^(\d+)\.png$")
METRICS = ("fid", "kid", "isc", "prc")
DIGITS = 6  # 000000.png .. 999999.png (more samples simply get longer names)


def png_name(i: int) -> str:
    """The file name of sample ``i``: ``000042.png``."""
    return f"{i:0{DIGITS}d}.png"


def write_png(img: Tensor | np.ndarray, path: str | Path) -> Path:
    """Write one uint8 image ``(C, H, W)`` (C = 1 or 3) as a PNG, atomically (temp file + rename)."""
    a = img.detach().cpu().numpy() if isinstance(img, Tensor) else np.asarray(img)
    if a.dtype != np.uint8 or a.ndim != 3 or a.shape[0] not in (1, 3):
        raise ValueError(f"write_png needs a uint8 (C, H, W) image with C = 1 or 3, got {a.dtype} {a.shape}")
    pil = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(np.ascontiguousarray(a.transpose(1, 2, 0)),
                                                                            "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return write_bytes(path, buf.getvalue())


def to_uint8_chw(x: Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Tensor:
    """Images in ``value_range`` -> uint8 ``(N, C, H, W)``: ``round(255 (x - lo) / (hi - lo))`` clipped."""
    lo, hi = value_range
    return (((x.detach().float().cpu() - lo) / (hi - lo)).clamp(0, 1) * 255).round().to(torch.uint8)


def numbered_pngs(folder: str | Path) -> dict[int, Path]:
    """``{index: path}`` of the numbered PNGs (``123.png``, ``000123.png``) in ``folder``."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    out = {}
    for p in folder.iterdir():
        m = PNG_RE.match(p.name)
        if m and p.is_file():
            out[int(m.group(1))] = p
    return out


def read_png_folder(folder: str | Path, channels: int | None = None) -> Tensor:
    """Every PNG (also ``.jpg``/``.jpeg``) in ``folder``, sorted by name, as uint8 ``(N, C, H, W)``; ``channels``
    (1 or 3) converts, else the first image's mode decides. All images must share one size."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no .png or .jpg images")
    imgs = []
    for p in files:
        try:
            with Image.open(p) as im:
                if channels is None:
                    channels = 1 if im.mode in ("L", "I", "I;16", "1") else 3
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"))
        except OSError as e:
            raise ValueError(f"cannot read image {p}: {e}") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
        if imgs and a.shape != imgs[0].shape:
            raise ValueError(f"{p} is {a.shape[2]}x{a.shape[1]} but {files[0].name} is "
                             f"{imgs[0].shape[2]}x{imgs[0].shape[1]}; the images of a folder must share one size")
        imgs.append(a)
    return torch.from_numpy(np.stack(imgs))


def parse_metrics(text: str | Sequence[str]) -> list[str]:
    """``"fid,kid"`` -> ``["fid", "kid"]``, checked against :data:`METRICS`."""
    names = [m.strip().lower() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in names if m not in METRICS]
    if not names or bad:
        raise ValueError(f"unknown metric {bad[0] if bad else text!r}; allowed: {', '.join(METRICS)}")
    return names


def require_torch_fidelity():
    """The ``torch_fidelity`` module, or a one-line ValueError saying how to get it (it needs torchvision)."""
    try:
        import torch_fidelity
    except ImportError as e:
        raise ValueError(f"image metrics need torch-fidelity and torchvision (pip install 'torchdiffusion[metrics]'); "
                         f"import failed: {e}") from None
    return torch_fidelity


class _Uint8Images(torch.utils.data.Dataset):
    """uint8 ``(N, 3, H, W)`` images as torch-fidelity expects them (grey is repeated to RGB)."""

    def __init__(self, images: Tensor):
        self.images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> Tensor:
        return self.images[i].contiguous()


def fidelity_metrics(samples: str | Path | Tensor, reference: str | Path | Tensor, metrics: Sequence[str] = METRICS,
                     *, feature_extractor: str | None = None, batch_size: int = 64, kid_subset_size: int = 1000,
                     device: str = "cpu", verbose: bool = False, **fidelity_kwargs) -> dict[str, float]:
    """torch-fidelity's metrics of ``samples`` against ``reference`` (folders or uint8 ``(N, C, H, W)``).

    Returns ``fid``; ``kid_mean``/``kid_std``; ``isc_mean``/``isc_std`` (of the samples); ``precision``,
    ``recall``, ``f_score``. ``feature_extractor``: a name registered with torch-fidelity (default its
    ``inception-v3-compat``). KID's subset size is capped at the smaller set's size.
    """
    names = parse_metrics(metrics)
    tf = require_torch_fidelity()
    a = samples if isinstance(samples, Tensor) else read_png_folder(samples)
    b = reference if isinstance(reference, Tensor) else read_png_folder(reference)
    for what, t in (("samples", a), ("reference", b)):
        if t.dtype != torch.uint8 or t.ndim != 4 or t.shape[1] not in (1, 3):
            raise ValueError(f"{what} must be uint8 (N, C, H, W) images with C = 1 or 3, got {t.dtype} "
                             f"{tuple(t.shape)}")
    kw = dict(input1=_Uint8Images(a), input2=_Uint8Images(b), fid="fid" in names, kid="kid" in names,
              isc="isc" in names, prc="prc" in names, batch_size=batch_size, cuda=device.startswith("cuda"),
              verbose=verbose, save_cpu_ram=True, cache=False,
              kid_subset_size=min(kid_subset_size, len(a), len(b)), **fidelity_kwargs)
    if feature_extractor is not None:
        kw["feature_extractor"] = feature_extractor
    try:
        res = tf.calculate_metrics(**kw)
    except (OSError, RuntimeError) as e:  # no network for the Inception weights, a bad file, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"torch-fidelity failed ({msg}); offline, put the feature extractor's weights in the torch "
                         "hub cache ($TORCH_HOME/hub/checkpoints) or pass feature_extractor_weights_path") from None
    keys = {"frechet_inception_distance": "fid", "kernel_inception_distance_mean": "kid_mean",
            "kernel_inception_distance_std": "kid_std", "inception_score_mean": "isc_mean",
            "inception_score_std": "isc_std", "precision": "precision", "recall": "recall", "f_score": "f_score"}
    return {keys.get(k, k): float(v) for k, v in res.items()}
