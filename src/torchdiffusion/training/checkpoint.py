"""Run folders: atomic, checksummed writes of safetensors and JSON; never pickle.

A run folder holds ``config.json``, ``model.safetensors``, ``ema.safetensors`` and ``train_state.safetensors``
(model, EMA, optimizer state, RNG states and the step, in one file so that a resume is always consistent).
Every file is written by :func:`torchdiffusion._files.atomic_write` (temp file, fsync, rename). A safetensors
file carries, in its metadata, the SHA-256 of its tensors (names, dtypes, shapes and bytes); loading checks it,
so bytes damaged behind an intact header are an error, not silently wrong weights, and loaded floating-point
tensors must be finite.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from torchdiffusion._files import FileError, cause, read_bytes, read_json, write_bytes, write_json

CHECKSUM_KEY = "tensors_sha256"
RUN_FILES = ("model.safetensors", "ema.safetensors", "train_state.safetensors")  # a folder with any holds a model


def model_files(folder: str | Path) -> list[str]:
    """The :data:`RUN_FILES` present in ``folder``: non-empty means it holds a model (never overwritten
    without ``force``)."""
    return [n for n in RUN_FILES if (Path(folder) / n).exists()]


def clear_run(folder: str | Path, *, config: bool = True) -> None:
    """Delete a run's files from ``folder`` (a run overwritten with ``force``): weights, training state, log,
    loss.png, the trainer's preview grids and TensorBoard events, and ``config.json`` with ``config``; other files
    stay."""
    folder = Path(folder)
    try:
        for name in (*RUN_FILES, "log.csv", "loss.png", "tokenizer.json", *(("config.json",) if config else ())):
            if (folder / name).exists():
                (folder / name).unlink()
        for p in (folder / "samples").glob("step_*.png"):
            p.unlink()
        shutil.rmtree(folder / "tensorboard", ignore_errors=True)
    except OSError as e:
        raise FileError(f"cannot clear the old run in {folder}: {cause(e)}") from None


def save_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temp file, fsync, rename); NaN or infinite numbers are refused. A run folder's own
    writer: the guard against outputs naming run files (``_files.refuse_run_file``) does not apply."""
    write_json(path, obj, run_file=True)


def load_json(path: str | Path) -> dict:
    """A JSON object from ``path`` (one-line errors for a missing, damaged or non-object file)."""
    return read_json(path)


def tensors_checksum(tensors: dict[str, Tensor]) -> str:
    """SHA-256 over the tensors in name order: each name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def save_tensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically; ``metadata`` is stored as one JSON string beside the checksum of
    the tensors (:func:`tensors_checksum`)."""
    t = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata or {}), CHECKSUM_KEY: tensors_checksum(t)}
    write_bytes(path, st_save(t, metadata=meta), run_file=True)


def _header_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of a safetensors file: an 8-byte little-endian header length, then JSON."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


def load_tensors(path: str | Path, *, check_finite: bool = True) -> tuple[dict[str, Tensor], dict]:
    """Read a safetensors file: (tensors, metadata). Missing, unreadable or damaged files (bad header, bytes
    that do not match the stored checksum) and, with ``check_finite``, NaN or infinite values are one-line
    errors naming the file."""
    path = Path(path)
    data = read_bytes(path, "checkpoint file")
    try:
        tensors = st_load(data)
        stored = _header_metadata(data)
        meta = json.loads(stored.get("json", "{}"))
    except (SafetensorError, struct.error, json.JSONDecodeError, UnicodeDecodeError, RuntimeError,
            ValueError) as e:
        raise FileError(f"corrupt checkpoint {path}: {str(e).strip().splitlines()[0][:200]}") from None
    if CHECKSUM_KEY in stored and tensors_checksum(tensors) != stored[CHECKSUM_KEY]:
        raise FileError(f"corrupt checkpoint {path}: its tensor bytes do not match the checksum in its header "
                        "(the file was damaged after it was written); restore it from a copy or retrain")
    if check_finite:
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                bad = int((~torch.isfinite(t)).sum())
                raise FileError(f"checkpoint {path} holds {bad} NaN/Inf value(s) in tensor {name!r}; the weights "
                                "are unusable (the run diverged or the file was edited)")
    return tensors, meta


def require(tensors: dict[str, Tensor], name: str, path: str | Path) -> Tensor:
    """``tensors[name]``, or a one-line error saying that the checkpoint lacks it."""
    if name not in tensors:
        raise FileError(f"corrupt checkpoint {path}: it lacks tensor {name!r} (not written by this trainer, or "
                        "damaged)")
    return tensors[name]


def optimizer_to_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict]:
    """Flatten an optimizer state dict into tensors + JSON (for safetensors)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"opt.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(opt: torch.optim.Optimizer, tensors: dict[str, Tensor], meta: dict) -> None:
    """Restore an optimizer from :func:`optimizer_to_tensors`' output."""
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
