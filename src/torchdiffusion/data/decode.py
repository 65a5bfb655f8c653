"""Decoding one image of an image folder (docs/design.md section 8): orientation, the mode rule, resize and
centre crop, and bad images as one line (:class:`BadImageError`). The rule is stated in
:mod:`torchdiffusion.data.folder`'s docstring."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class BadImageError(ValueError):
    """An image that cannot be used (one line naming the file and what is wrong)."""


# --------------------------------------------------------------------------------------------------------
# Decoding one image
# --------------------------------------------------------------------------------------------------------

def convert_mode(im, channels: int):
    """``im`` (a PIL image) as 8-bit ``L`` (``channels=1``) or ``RGB`` (``channels=3``) by the module's rule:
    transparency over white, 16-bit grey scaled by ``255 / 65535``, float images refused (``ValueError``)."""
    from PIL import Image

    target = {1: "L", 3: "RGB"}[channels]
    mode = im.mode
    if mode == "F":
        raise ValueError("32-bit float images (mode F) are not supported; save it as 8- or 16-bit")
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        a = np.clip(a.astype(np.int64), 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
        mode = "L"
    if mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im if im.mode == target else im.convert(target)


def fit(im, size: int):
    """Resize (bicubic) so that the shorter side is ``size``, then centre-crop to ``size x size``."""
    from PIL import Image

    w, h = im.size
    s = size / min(w, h)
    if (w, h) != (size, size):
        im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return im.crop((left, top, left + size, top + size)) if (w, h) != (size, size) else im


def decode(path: str | Path, size: int, channels: int = 3) -> np.ndarray:
    """The image at ``path`` as a ``(channels, size, size)`` uint8 array (module doc: orientation, mode rule,
    resize, centre crop); a :class:`BadImageError` naming the file when it cannot be used."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.format == "JPEG":
                    im.draft(im.mode, (size, size))  # decode at the smallest DCT scale still >= size
                im.load()
                im = ImageOps.exif_transpose(im)
                im = fit(convert_mode(im, channels), size)
                a = np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"image {path} is too large to decode safely (a decompression bomb?): "
                       f"{_first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 -- decoders of untrusted files raise many kinds of error
        raise BadImageError(f"corrupt or unreadable image {path}: {type(e).__name__}: {_first_line(e)}") from None
    return a[None].copy() if a.ndim == 2 else a.transpose(2, 0, 1).copy()


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return (s.splitlines()[0] if s else type(e).__name__)[:200]
