"""Run folders: atomic writes of safetensors and JSON, never pickle.

A run folder holds ``config.json``, ``model.safetensors``, ``ema.safetensors`` and ``train_state.safetensors``
(model, EMA, optimizer state, RNG states and the step, in one file so that a resume is always consistent).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_json(obj: dict, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    def w(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
    _atomic(Path(path), w)


def load_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"corrupt JSON in {path}: {e}") from None


def save_tensors(tensors: dict[str, Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """Write a safetensors file atomically; ``metadata`` is stored as one JSON string."""
    t = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    meta = {"json": json.dumps(metadata or {})}
    _atomic(Path(path), lambda tmp: save_file(t, tmp, metadata=meta))


def load_tensors(path: str | Path) -> tuple[dict[str, Tensor], dict]:
    """Read a safetensors file: (tensors, metadata). Missing or corrupt files raise ValueError."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"missing checkpoint file: {path}")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("json", "{}"))
    except (SafetensorError, OSError, json.JSONDecodeError, RuntimeError) as e:
        raise ValueError(f"corrupt checkpoint {path}: {e}") from None
    return tensors, meta


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
    state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("opt."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta.get("scalars", {}).items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
