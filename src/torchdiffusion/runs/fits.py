"""Fitted grids kept in the run folder (issue 33): ``RUN/fits/SAMPLER-STEPS.json``.

A fit (:func:`torchdiffusion.samplers.grids.optimize`) is made once for one sampler and step count and written
here, atomically, with what it was fitted to and what it cost:

- ``times`` (the grid), ``sampler``, ``steps``, ``options`` (the sampler options chosen with it);
- ``weights_sha256``: the checksum of the network's tensors (:func:`~torchdiffusion.training.checkpoint.
  tensors_checksum`, the one stored in the checkpoint's metadata), so that a changed model invalidates the fit;
- ``cost_nfe`` (network calls, reference solve included), ``run_nfe`` (calls of one sampling run),
  ``cost_runs = cost_nfe / run_nfe``, ``reference_nfe``;
- ``val_rms`` (the validation RMS against the pilot's converged ODE end state, states the search never saw),
  ``fixed``/``fixed_val_rms`` (the best fixed grid there), ``decision`` (``fitted`` or ``fixed``: the fit is kept
  only when it beats that fixed grid significantly, else the fixed grid is stored) and the pilot's size and seed.

:func:`lookup` finds the fit for a sampler and step count and checks it against the model; the Pipeline uses it
whenever the caller names no grid (docs/design.md section 5).
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch
from torch import Tensor

from torchdiffusion._files import read_json, write_json
from torchdiffusion.samplers import grids
from torchdiffusion.samplers.registry import get as get_sampler
from torchdiffusion.training.checkpoint import tensors_checksum

FITS_DIR = "fits"
FORMAT = 1
# sampler options a fit chooses by default (every combination is tried on the pilot; validation decides)
AUTO_CHOICES: dict[str, dict[str, list]] = {
    "unipc": {"order": [2, 3], "final_step": ["denoise", "extrapolate"]},
}


def weights_hash(model) -> str:
    """SHA-256 of the network's tensors (the checksum a checkpoint stores in its metadata)."""
    net = getattr(model, "net", None)
    if net is None or not hasattr(net, "state_dict"):
        raise ValueError("a stored fit needs a model whose .net has a state_dict (an nn.Module) to tie it to its "
                         "weights")
    return tensors_checksum(net.state_dict())


def fit_path(run: str | Path, sampler: str, steps: int) -> Path:
    """``RUN/fits/SAMPLER-STEPS.json``."""
    if not re.fullmatch(r"[a-z0-9_]+", str(sampler)):
        raise ValueError(f"bad sampler name {sampler!r}")
    return Path(run) / FITS_DIR / f"{sampler}-{int(steps)}.json"


def save_fit(run: str | Path, grid: Tensor, info: dict, *, weights: str, pilot_seed: int,
             choices: dict | None = None) -> tuple[Path, dict]:
    """Write the fit ``(grid, info)`` of :func:`grids.optimize` (``return_info=True``) for the model with weight
    hash ``weights``; returns the file and the record written."""
    sampler, steps = info["sampler"], int(info["steps"])

    def num(v) -> float | None:
        return None if v is None or not math.isfinite(float(v)) else float(v)
    record = {
        "format": FORMAT, "sampler": sampler, "steps": steps, "options": dict(info["options"]),
        "times": [float(t) for t in grid], "weights_sha256": weights,
        "decision": info.get("decision", "fitted"), "fixed": info.get("fixed", info.get("start")),
        "val_rms": num(info["val"]), "fixed_val_rms": num(info.get("fixed_val", info.get("start_val"))),
        "fitted_val_rms": num(info.get("fitted_val", info["val"])), "gain": num(info.get("gain")),
        "gain_se": num(info.get("gain_se")),
        "cost_nfe": int(info["cost_nfe"]), "run_nfe": int(info["run_nfe"]), "cost_runs": float(info["cost_runs"]),
        "reference_nfe": int(info["reference_nfe"]), "search_runs": float(info["search_runs"]),
        "n_pilot": int(info["n_pilot"]), "n_val": int(info["n_val"]), "pilot_seed": int(pilot_seed),
        "method": info.get("method"), "choices": choices or {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                                                          time.gmtime()),
    }
    return write_json(fit_path(run, sampler, steps), record), record


def read_fit(path: str | Path) -> dict:
    """A fit record, checked (one-line errors naming the file)."""
    rec = read_json(path, "fit file")
    for key, kind in (("sampler", str), ("steps", int), ("times", list), ("options", dict),
                      ("weights_sha256", str)):
        if not isinstance(rec.get(key), kind):
            raise ValueError(f"fit file {path}: missing or bad {key!r}; refit with `torchdiffusion fit`")
    try:
        grids.grid_of(rec)
    except (ValueError, TypeError) as e:
        raise ValueError(f"fit file {path}: {e}") from None
    return rec


def lookup(run: str | Path | None, model, sampler: str, steps: int,
           options: dict | None = None) -> tuple[Tensor | None, dict, str | None]:
    """The stored fit for ``sampler`` at ``steps`` NFE: ``(grid, options, note)``.

    ``grid`` is None (and ``options`` empty) when there is no fit, when it was fitted to other weights than
    ``model``'s, or when the caller's ``options`` contradict the options it was fitted with; ``note`` then says
    why (None when there is simply no file). With a grid, ``options`` are the fit's, to sample with (the caller's
    go on top), and ``note`` says which file is used."""
    if run is None:
        return None, {}, None
    path = fit_path(run, sampler, steps)
    if not path.is_file():
        return None, {}, None
    rec = read_fit(path)
    have = weights_hash(model)
    if rec["weights_sha256"] != have:
        return None, {}, (f"not using the fitted grid {path}: it was fitted to other weights (sha256 "
                          f"{rec['weights_sha256'][:12]}, this model {have[:12]}); refit with `torchdiffusion fit`")
    clash = {k: v for k, v in (options or {}).items() if k in rec["options"] and rec["options"][k] != v}
    if clash:
        return None, {}, (f"not using the fitted grid {path}: it was fitted with "
                          + ", ".join(f"{k}={rec['options'][k]!r}" for k in clash) + ", asked "
                          + ", ".join(f"{k}={v!r}" for k, v in clash.items()))
    opts = ", ".join(f"{k}={v}" for k, v in rec["options"].items())
    what = "fitted grid" if rec.get("decision", "fitted") == "fitted" else \
        f"stored grid ({rec.get('fixed')}: the fit's gain was not significant)"
    val = rec.get("val_rms")
    return grids.grid_of(rec), dict(rec["options"]), (
        f"using {what} from {path}" + (f" ({opts})" if opts else "")
        + (f", validation RMS {val:.3g}" if isinstance(val, float) else ""))


def default_choices(sampler: str) -> dict:
    """The sampler options a fit chooses among by default (:data:`AUTO_CHOICES`; none for most samplers)."""
    get_sampler(sampler)
    return {k: list(v) for k, v in AUTO_CHOICES.get(sampler, {}).items()}


def pilot_labels(n: int, num_classes: int | None) -> Tensor | None:
    """Class labels of a pilot batch for a class-conditional model: every class in turn (stratified)."""
    return None if not num_classes else torch.arange(n) % int(num_classes)
