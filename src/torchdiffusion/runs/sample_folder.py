"""``sample RUN --n N --out DIR/``: numbered PNGs, batched, resumable, sharded across torchrun ranks (issue 19).

Sample ``i`` always gets the ``i``-th of the ``n`` per-sample seeds drawn from ``--seed``
(:func:`~torchdiffusion.runs.pipeline.sample_seeds`), so a sample does not depend on the batch it is drawn in,
on which samples already exist, or on the number of processes: rank ``r`` of ``w`` draws the missing indices
``i`` with ``i % w == r`` and writes ``DIR/{i:06d}.png`` (uint8, :func:`~torchdiffusion.evaluation.images.write_png`,
atomically), so an interrupted run resumes by skipping the files already written, and one process writes the same
images as many.

The folder records what its samples are (:data:`SETTINGS`: the weights' checksum, sampler, steps, grid, seed,
class, guidance, options; not ``n``, which a rerun may raise to add samples): a rerun with other settings is refused
unless ``force`` (which deletes the old numbered PNGs first), so two sample sets are never mixed; a folder of numbered
PNGs without that record (the user's own images?) is refused the same way. Temp files of dead writers are removed,
and a PNG that is empty or cut short (no ``IEND`` chunk at its end) does not count as done: it is drawn again.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from torchdiffusion._files import FileError, read_json, remove_stale_temps, write_json
from torchdiffusion.evaluation.images import numbered_pngs, png_name, to_uint8_chw, write_png
from torchdiffusion.runs.pipeline import Pipeline, sample_seeds

SETTINGS = "sample_settings.json"  # the record of a folder's settings
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC; last in every complete PNG


def complete_png(path: Path) -> bool:
    """``path`` starts with the PNG signature and ends with the ``IEND`` chunk (a write cut short does not)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            f.seek(0, os.SEEK_END)
            if f.tell() < len(PNG_SIGNATURE) + len(PNG_END):
                return False
            f.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and f.read() == PNG_END
    except OSError:
        return False


def done_samples(out: str | Path) -> dict[int, Path]:
    """The numbered PNGs in ``out`` that are complete (:func:`complete_png`)."""
    return {i: p for i, p in numbered_pngs(out).items() if complete_png(p)}


def prepare_folder(out: str | Path, settings: dict, *, force: bool = False, write: bool = True) -> None:
    """Make ``out`` ready for samples of ``settings`` (module doc): refuse a folder that holds samples of other
    settings (naming the first that differs) or numbered PNGs without a record, unless ``force``, which deletes
    those PNGs; remove dead writers' temp files; record ``settings``. ``write=False`` (ranks other than 0) only
    checks."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileError(f"cannot write samples to {out}/: it is a file")
    record = out / SETTINGS
    old = read_json(record, "sample settings") if record.is_file() else None
    pngs = numbered_pngs(out)
    stale = False
    if old is None and pngs:
        if not force:
            raise FileError(f"{out} holds {len(pngs)} numbered PNGs but no {SETTINGS}: they are not samples of this "
                            "command (or of an older version); use another folder, or --force to delete them")
        stale = True
    elif old is not None and old != settings:
        key = next(k for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k))
        if not force:
            raise FileError(f"{out} holds samples of other settings ({key}: {old.get(key)!r} there, "
                            f"{settings.get(key)!r} now); use another folder, or --force to delete them")
        stale = True
    if not write:
        return
    remove_stale_temps(out)
    if stale:
        for p in pngs.values():
            try:
                p.unlink()
            except FileNotFoundError:
                pass
            except OSError as e:
                raise FileError(f"cannot delete the old sample {p}: {e.strerror or e}") from None
    write_json(record, settings)


def is_folder_output(out: str | Path) -> bool:
    """``--out`` names a folder of PNGs: it ends with ``/`` or is an existing folder."""
    return str(out).endswith(("/", os.sep)) or Path(out).is_dir()


def rank_and_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` of a torchrun launch, ``(0, 1)`` otherwise."""
    try:
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ValueError("RANK and WORLD_SIZE must be integers (set by torchrun)") from None
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} must lie in 0..WORLD_SIZE-1 = {world - 1}")
    return rank, world


def sample_to_folder(pipe: Pipeline, model, n: int, out: str | Path, *, seed: int = 0, cond: Tensor | None = None,
                     batch_size: int | None = None, rank: int = 0, world: int = 1,
                     on_batch: Callable[[int], None] | None = None, **generate_kw) -> list[Path]:
    """Write this rank's missing samples of ``0 .. n-1`` to ``out`` (module doc); returns the files written.

    ``model`` is ``pipe.model`` or a guidance wrapper around it, ``cond`` its ``n`` labels (or None);
    ``generate_kw`` go to :meth:`Pipeline.generate` (sampler, steps, grid, callback, sampler options).
    Images are the data's own range mapped to uint8 (``run.value_range``, decoded first for latent runs).
    """
    out = Path(out)
    info = pipe.config["run"]
    shape = info["latent"]["image_shape"] if info.get("latent") else info["data_shape"]
    if len(shape) != 3 or shape[0] not in (1, 3):
        raise ValueError(f"a folder of PNGs needs grey or RGB images; this run's samples have shape {tuple(shape)}")
    vr = tuple((info["latent"] if info.get("latent") else info).get("value_range", (-1, 1)))
    seeds = sample_seeds(n, torch.Generator().manual_seed(seed))
    done = done_samples(out)
    todo = [i for i in range(n) if i % world == rank and i not in done]
    step = batch_size or len(todo) or 1
    written = []
    for lo in range(0, len(todo), step):
        idx = todo[lo: lo + step]
        c = None if cond is None else cond[idx]
        x = pipe.generate(model, len(idx), cond=c, seeds=[seeds[i] for i in idx], **generate_kw)
        for i, img in zip(idx, to_uint8_chw(x, vr)):
            written.append(write_png(img, out / png_name(i)))
        if on_batch is not None:
            on_batch(len(idx))
    return written
