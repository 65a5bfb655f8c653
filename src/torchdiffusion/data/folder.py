"""Image folders of any size, streamed from disk (docs/design.md section 8).

An image folder is a directory of images (any format Pillow reads; file names ending in :data:`IMAGE_EXTS`;
names starting with a dot are ignored) with, optionally, a ``metadata.jsonl`` beside them in the Hugging Face
``imagefolder`` convention: one JSON object per line with ``file_name`` (a path relative to the folder) and
further columns. ``label`` (or the column named by ``label_key``) holds integer class labels, ``text`` a caption.
Without a ``metadata.jsonl`` the images are found recursively (sorted by path) and, when every image lies in a
sub-folder, the first-level sub-folders name the classes (sorted); with one, its rows are the data set (in their
order) and other images in the folder are not used.

:class:`ImageFolder` holds only an index (file names as one UTF-8 byte array with offsets, labels as an int64
array, captions likewise packed) and decodes one image per item, so its memory does not grow with the images'
pixels, and worker processes forked by a ``DataLoader`` share the index without copying it. Each image is decoded
with Pillow, turned upright (EXIF orientation), converted (the rule below), resized so that its shorter side is
``size`` (bicubic, anti-aliased) and centre-cropped to ``size x size``; values are scaled to [-1, 1]
(``x / 255 * 2 - 1``, 256 levels).

Mode conversion (every image becomes 8-bit ``L`` for ``channels=1`` or ``RGB`` for ``channels=3``):

- transparency (``RGBA``, ``LA``, ``PA``, ``P`` or ``L`` / ``RGB`` with a transparent colour) is composited
  over a white background;
- 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``; and ``I``, as Pillow opens some 16-bit PNGs / TIFFs,
  clipped to [0, 65535]) is scaled to 8 bits by ``round(v * 255 / 65535)``, so full scale stays full scale (a
  16-bit PNG does not saturate to white, as Pillow's own ``convert("L")`` would make it);
- palette (``P``), bilevel (``1``), ``CMYK``, ``YCbCr``: Pillow's conversion; grey to RGB repeats the channel,
  RGB to grey is Pillow's ITU-R 601-2 luma;
- 32-bit float (``F``) and any mode Pillow cannot convert are bad images (below).

Bad input is a one-line :class:`BadImageError` (a ``ValueError``) naming the file: unreadable, corrupt or truncated
images, unsupported modes and decompression bombs (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels; Pillow's
warning counts as the error). With ``on_bad_image="error"`` (the default) it stops training; with ``"skip"`` a
bad image is replaced, wherever it is drawn, by the next readable image in the folder's order (a fixed rule, so
the order of examples stays a function of seed and step), and a one-line warning names it once. Bad metadata
(not UTF-8, not a JSON object, control characters, a row naming a missing file or a file outside the folder, a
label that is not an integer in ``[0, num_classes)``, an empty caption) is refused while indexing, naming the
line. Labels: JSON integers only (not ``true``, not ``2.5``, not ``NaN``) in ``[0, num_classes)``, the class count
declared (``data.classes``) or inferred as the largest label + 1, which may not exceed the number of images
(:func:`torchdiffusion.data.labels.check_labels`, the rule of every dataset). Captions: a string with at least
one visible character, or the key left out / ``null`` for an uncaptioned image; an empty caption is refused, as it
is most likely a mistake and cannot be told from "no caption".

Order (:func:`step_indices`): the examples of training step ``s`` are a pure function of (seed, s), so a run
resumed after Ctrl-C or ``kill -9`` draws exactly the batches an uninterrupted run draws, whatever the number of
workers. With ``B`` examples per step (``train.batch * train.accum``) and ``N >= B`` images, epoch ``e`` is a
seeded permutation of the ``N`` images cut into ``N // B`` steps (the last ``N mod B`` of it unused in that
epoch), so the examples of one step are distinct: the contiguous shards that ranks take under torchrun
(:func:`torchdiffusion.training.distributed.shard`) never share an example. With ``N < B`` a step is the
concatenation of fresh permutations, cut to ``B``. Horizontal flips (``flip``) are drawn per step from the same
seed.
"""

from __future__ import annotations

import json
import os
import sys
import unicodedata
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from torchdiffusion.data.decode import BadImageError, convert_mode, decode, fit  # noqa: F401 (re-exported)
from torchdiffusion.data.labels import check_labels
from torchdiffusion.data.order import StepBatches, step_flips, step_indices  # noqa: F401 (re-exported)

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
ON_BAD_IMAGE = ("error", "skip")
METADATA = "metadata.jsonl"
TEXT_KEY = "text"



# --------------------------------------------------------------------------------------------------------
# The index
# --------------------------------------------------------------------------------------------------------

class _Strings:
    """Strings appended one at a time to one UTF-8 byte array with offsets: no Python object per string, so that
    indexing a folder of 10^6 images does not pass through 10^6 ``str`` objects."""

    def __init__(self) -> None:
        self.blob, self.off = bytearray(), array("q", [0])

    def add(self, s: str) -> None:
        self.blob += s.encode("utf-8")
        self.off.append(len(self.blob))

    def __len__(self) -> int:
        return len(self.off) - 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(bytes as uint8, ``len + 1`` int64 offsets)."""
        return np.frombuffer(self.blob, dtype=np.uint8).copy(), np.frombuffer(self.off, dtype=np.int64).copy()


def _unpack(blob: np.ndarray, off: np.ndarray, i: int) -> str:
    return blob[off[i]:off[i + 1]].tobytes().decode("utf-8")


def _walk(root: Path) -> list[str]:
    """Image files under ``root`` (relative POSIX paths, sorted; names starting with a dot skipped)."""
    found = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".")]
        rel = Path(d).relative_to(root)
        for f in files:
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTS):
                found.append((rel / f).as_posix())
    found.sort()
    return found


def _has_control(s: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in s)


def check_exclude(exclude) -> list[dict]:
    """``data.exclude``: a list of non-empty objects ``{column: value}`` (a ``metadata.jsonl`` row matches one when
    every column named there holds exactly that value); None means none."""
    exclude = [] if exclude is None else exclude
    if not isinstance(exclude, (list, tuple)) or not all(
            isinstance(e, dict) and e and all(isinstance(k, str) and isinstance(v, (str, int, float, bool))
                                              for k, v in e.items()) for e in exclude):
        raise ValueError('data.exclude must be a list of objects {column: value} (e.g. [{"shape": "triangle", '
                         f'"color": "blue"}}]), each naming at least one column, got {exclude!r}')
    return [dict(e) for e in exclude]


def excluded(row: dict, exclude: list[dict]) -> bool:
    """Whether a ``metadata.jsonl`` row matches one of the ``data.exclude`` patterns (:func:`check_exclude`)."""
    return any(all(k in row and row[k] == v and type(row[k]) is type(v) for k, v in e.items()) for e in exclude)


def _read_metadata(root: Path, label_key: str | None, num_classes: int | None,
                   exclude: list[dict] | None = None
                   ) -> tuple[_Strings, array | None, tuple[_Strings, bytearray] | None, str | None, int]:
    """Rows of ``root/metadata.jsonl``, read a line at a time into packed arrays: (file names, labels or None,
    (captions, which rows have one) or None, the label column used, the number of rows left out by ``exclude``)."""
    path = root / METADATA
    exclude = exclude or []
    n_excluded = 0
    columns: set[str] = set()
    names, texts, has_text = _Strings(), _Strings(), bytearray()
    labels = array("q")
    key = label_key
    seen_text = False
    try:
        f = path.open("rb")
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    with f:
        for n, raw in enumerate(f, 1):
            where = f"{path} line {n}"
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 (byte 0x{raw[e.start]:02x} at position {e.start})") from None
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                why = "a control character inside a string" if "control character" in e.msg else e.msg
                raise ValueError(f"{where}: not a JSON object ({why}, column {e.colno})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object (it holds a {type(row).__name__})")
            if exclude:
                columns.update(row)
                if excluded(row, exclude):
                    n_excluded += 1
                    continue
            name = row.get("file_name")
            if not isinstance(name, str) or not name.strip():
                raise ValueError(f"{where}: needs a 'file_name' (a path relative to {root}), got {name!r}")
            if _has_control(name):
                raise ValueError(f"{where}: file_name {name!r} contains control characters")
            rel = Path(name)
            if rel.is_absolute() or ".." in rel.parts:
                raise ValueError(f"{where}: file_name {name!r} must be a path inside {root}")
            if not (root / rel).is_file():
                raise ValueError(f"{where}: file_name {name!r} names a file that does not exist in {root}")
            names.add(rel.as_posix())
            if key is None and not labels and len(names) == 1 and "label" in row:
                key = "label"
            if key is not None:
                if key not in row:
                    raise ValueError(f"{where}: no label column {key!r} (every row needs one; data.label_key "
                                     "names the column)")
                labels.append(_check_label(row[key], num_classes, f"{where}: label {key!r}"))
            t = row.get(TEXT_KEY)
            if t is not None:
                if not isinstance(t, str):
                    raise ValueError(f"{where}: caption {TEXT_KEY!r} must be a string (or null), got {t!r}")
                if not t.strip():
                    raise ValueError(f"{where}: empty caption; leave {TEXT_KEY!r} out (or null) for an image "
                                     "without a caption")
                if _has_control(t):
                    raise ValueError(f"{where}: caption contains control characters ({t[:40]!r})")
                seen_text = True
            texts.add(t or "")
            has_text.append(t is not None)
    unknown = sorted({k for e in exclude for k in e} - columns)
    if unknown:
        raise ValueError(f"data.exclude names column(s) {', '.join(map(repr, unknown))} that no row of {path} has")
    if not len(names):
        why = f" (data.exclude left out all {n_excluded} rows)" if n_excluded else ""
        raise ValueError(f"{path} lists no images (one JSON object per line with a 'file_name'){why}")
    return (names, (labels if key is not None else None), ((texts, has_text) if seen_text else None), key,
            n_excluded)


def _check_label(v, num_classes: int | None, what: str) -> int:
    allowed = f"[0, {num_classes})" if num_classes else ">= 0"
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"{what} must be a whole number {allowed}, got {v!r}")
    if v < 0 or (num_classes is not None and v >= num_classes):
        where = f"outside the {num_classes} declared classes (data.classes)" if num_classes else "negative"
        raise ValueError(f"{what} is {v}: {where}; labels must be whole numbers {allowed}")
    return v


class ImageFolder(torch.utils.data.Dataset):
    """An image folder indexed, not loaded: ``folder[i]`` decodes image ``i`` (module doc for the layout, the
    conversion rule and bad input).

    ``folder[i]`` is ``(x, y)``: ``x`` float32 ``(channels, size, size)`` in [-1, 1], ``y`` its label (``-1``
    without labels); with ``return_text`` ``(x, y, caption)`` (``""`` for an uncaptioned image: an empty caption
    in the file is refused, so ``""`` can only mean "none"). The attributes of the in-memory
    :class:`~torchdiffusion.data.datasets.Dataset` that describe the data (``shape``, ``levels``, ``value_range``,
    ``num_classes``, ``name``, ``meta``, ``y``) are here too; ``x`` is not (nothing is loaded):
    :func:`torchdiffusion.data.datasets.examples` decodes the first items.
    """

    streamed = True
    levels = 256
    value_range = (-1.0, 1.0)
    density = None
    is_image = True

    def __init__(self, root: str | Path, size: int = 32, channels: int = 3, *, label_key: str | None = None,
                 num_classes: int | None = None, on_bad_image: str = "error", return_text: bool = False,
                 exclude: list[dict] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder not found: {root}")
        if channels not in (1, 3):
            raise ValueError(f"data.channels must be 1 or 3 for an image folder, got {channels!r}")
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"data.on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes < 1):
            raise ValueError(f"data.classes must be a whole number >= 1 (or null: inferred), got {num_classes!r}")
        self.root, self.size, self.channels = root, int(size), int(channels)
        self.on_bad_image, self.return_text = on_bad_image, bool(return_text)
        self.name = root.name
        classes: list[str] = []
        texts = None
        exclude = check_exclude(exclude)
        n_excluded = 0
        if (root / METADATA).is_file():
            names, labels, texts, key, n_excluded = _read_metadata(root, label_key, num_classes, exclude)
            source = f"{METADATA} column {key!r}" if labels is not None else None
        else:
            if exclude:
                raise ValueError(f"data.exclude matches {METADATA} columns, but {root} has no {METADATA}")
            if label_key is not None:
                raise ValueError(f"data.label_key={label_key!r} names a {METADATA} column, but {root} has no "
                                 f"{METADATA}")
            names = _walk(root)
            if not names:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) under {root}")
            top = [n.split("/", 1)[0] if "/" in n else None for n in names]
            labels, source = None, None
            if all(t is not None for t in top):
                classes = sorted(set(top))
                pos = {c: k for k, c in enumerate(classes)}
                labels = [pos[t] for t in top]
                source = "sub-folders"
                if num_classes is not None and len(classes) > num_classes:
                    raise ValueError(f"{root} has {len(classes)} class sub-folders but data.classes="
                                     f"{num_classes}")
            del top
            packed = _Strings()
            for name in names:
                packed.add(name)
            names = packed
        self._names, self._name_off = names.arrays()
        n = len(names)
        del names
        self._labels = (np.asarray(labels, dtype=np.int64) if labels is not None  # (np.asarray of an array('q'):
                        else np.full(n, -1, dtype=np.int64))                       # no Python ints)
        self.labelled = labels is not None
        if self.labelled:
            num_classes = check_labels(torch.from_numpy(self._labels), num_classes, f"image folder {root}")
        self.num_classes = num_classes if self.labelled else None
        if texts is not None:
            self._text_set = np.frombuffer(texts[1], dtype=np.uint8).astype(bool)
            self._texts, self._text_off = texts[0].arrays()
        else:
            self._text_set = self._texts = self._text_off = None
        self._rows = np.arange(n, dtype=np.int64)  # item i -> row of the index (a subset selects rows)
        self.meta = {"classes": classes, "labels": source, "root": str(root), "excluded": n_excluded}
        self._y: Tensor | None = None

    # --- the index --------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    @property
    def y(self) -> Tensor | None:
        """The labels (int64, one per item) or None."""
        if not self.labelled:
            return None
        if self._y is None:
            self._y = torch.from_numpy(self._labels[self._rows])
        return self._y

    def path(self, i: int) -> Path:
        """The file of item ``i``."""
        return self.root / _unpack(self._names, self._name_off, int(self._rows[i]))

    def label(self, i: int) -> int | np.ndarray:
        """The label of item ``i`` (``-1`` without labels; its row of targets after :meth:`with_targets`)."""
        v = self._labels[self._rows[i]]
        return int(v) if v.ndim == 0 else v

    def with_targets(self, targets: np.ndarray) -> ImageFolder:
        """This folder with ``targets`` ``(len(self), L)`` int64 (e.g. the token ids of its captions) as the ``y``
        of its items in place of labels (``y`` is then ``(N, L)``, ``num_classes`` None), sharing the index."""
        targets = np.asarray(targets, dtype=np.int64)
        if targets.ndim != 2 or len(targets) != len(self):
            raise ValueError(f"targets must have shape ({len(self)}, L), got {targets.shape}")
        out = object.__new__(ImageFolder)
        out.__dict__.update(self.__dict__)
        full = np.zeros((len(self._labels), targets.shape[1]), dtype=np.int64)
        full[self._rows] = targets
        out._labels, out._y, out.labelled, out.num_classes = full, None, True, None
        return out

    def caption(self, i: int) -> str | None:
        """The caption of item ``i`` (the ``text`` column of ``metadata.jsonl``), or None."""
        r = int(self._rows[i])
        if self._texts is None or not self._text_set[r]:
            return None
        return _unpack(self._texts, self._text_off, r)

    def subset(self, idx) -> ImageFolder:
        """The items ``idx`` (indices into this folder), in that order, sharing the index."""
        out = object.__new__(ImageFolder)
        out.__dict__.update(self.__dict__)
        out._rows = self._rows[np.asarray(idx, dtype=np.int64)]
        out._y = None
        if len(out._rows) == 0:
            raise ValueError(f"image folder {self.root}: an empty subset")
        return out

    # --- decoding ---------------------------------------------------------------------------------------
    def read(self, i: int) -> tuple[np.ndarray, int, tuple[str, ...]]:
        """``(uint8 (C, size, size), label, skipped)`` of item ``i``; with ``on_bad_image="skip"`` a bad image
        is replaced by the next readable item (``skipped``: the messages of the images passed over), else its
        :class:`BadImageError` is raised."""
        skipped: list[str] = []
        n = len(self)
        for k in range(n):
            j = (int(i) + k) % n
            try:
                return decode(self.path(j), self.size, self.channels), self.label(j), tuple(skipped)
            except BadImageError as e:
                if self.on_bad_image != "skip":
                    raise
                skipped.append(str(e))
        raise BadImageError(f"no readable image in {self.root} ({n} tried; the first: {skipped[0]})")

    def __getitem__(self, i: int):
        a, y, _ = self.read(i)
        x = torch.from_numpy(a).to(torch.float32) / 255 * 2 - 1
        if self.return_text:
            return x, y, self.caption(i) or ""
        return x, y

    def batches(self, batch: int = 256, n: int | None = None, workers: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """The first ``n`` items (all by default) in order, in batches ``(x float32 [-1, 1], y int64)``."""
        count = len(self) if n is None else min(int(n), len(self))
        sampler = [[(i, False) for i in range(s, min(s + batch, count))] for s in range(0, count, batch)]
        yield from _iterate(self, sampler, workers)


# --------------------------------------------------------------------------------------------------------
# Loading through torch.utils.data.DataLoader
# --------------------------------------------------------------------------------------------------------

class _Items(torch.utils.data.Dataset):
    """The loader's view of a folder: item ``(i, flip)`` -> ``(uint8 image, label, skipped)``, or the
    :class:`BadImageError` itself (returned, not raised: a worker's exception would reach the main process wrapped
    in a traceback)."""

    def __init__(self, folder: ImageFolder):
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, item: tuple[int, bool]):
        i, flip = item
        try:
            a, y, skipped = self.folder.read(i)
        except BadImageError as e:
            return e
        if flip:
            a = np.ascontiguousarray(a[:, :, ::-1])
        return torch.from_numpy(a), y, skipped


def _collate(items: list):
    for it in items:
        if isinstance(it, BadImageError):
            return it
    y = torch.as_tensor(np.asarray([it[1] for it in items]), dtype=torch.long)  # labels, or rows of targets
    return (torch.stack([it[0] for it in items]), y,
            sorted({s for it in items for s in it[2]}))


def _iterate(folder: ImageFolder, batch_sampler, workers: int = 0, worker_init: Callable | None = None,
             pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Decode the batches of ``batch_sampler`` (lists of ``(index, flip)``) with ``workers`` processes, in order;
    yields ``(x float32 [-1, 1], y int64)``, warns once per skipped file, raises a :class:`BadImageError`."""
    loader = torch.utils.data.DataLoader(_Items(folder), batch_sampler=batch_sampler, num_workers=int(workers),
                                         collate_fn=_collate, worker_init_fn=worker_init, pin_memory=pin_memory,
                                         generator=torch.Generator().manual_seed(0))  # (not torch's global RNG)
    warned: set[str] = set()
    it = iter(loader)
    try:
        for got in it:
            if isinstance(got, BadImageError):
                raise BadImageError(str(got))
            u8, y, skipped = got
            for s in skipped:
                if s not in warned:
                    warned.add(s)
                    print(f"torchdiffusion: warning: skipped (data.on_bad_image=skip): {s}", file=sys.stderr)
            # in place: one float allocation per batch (temporaries fragment glibc's heap: measured +70 MB RSS in
            # 100 batches with workers; benchmarks/folder_stream.py)
            yield u8.to(torch.float32).div_(255).mul_(2).sub_(1), y
    finally:
        del it  # shuts the workers down


def stream(folder: ImageFolder, *, batch: int, accum: int = 1, seed: int = 0, start: int = 0,
           shard: slice = slice(None), flip: bool = False, workers: int = 0, worker_init: Callable | None = None,
           pin_memory: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """The training batches of steps ``start, start + 1, ...`` (``accum`` micro-batches each; this rank's
    ``shard`` of the global ``batch``), decoded by ``workers`` processes: endless, in order, a pure function of
    (seed, step) (module doc). Close the generator to stop the workers."""
    return _iterate(folder, StepBatches(len(folder), batch, accum, seed, start, shard, flip), workers, worker_init,
                    pin_memory)
