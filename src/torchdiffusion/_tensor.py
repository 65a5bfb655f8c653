"""L0: small helpers shared across layers (random draws, argument checks)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

PROJECTIONS = ("gaussian", "rademacher")


def check_count(value, name: str, minimum: int = 1) -> int:
    """``value`` if it is a whole number (not a bool or a float) ``>= minimum``, else a one-line ``ValueError``
    naming ``name``: the one check for counts (steps, batch sizes, levels, config counts)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")
    return value


def check_number(value, name: str, minimum: float | None = None, *, allow_inf: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool, not a string) ``>= minimum``, else a
    one-line ``ValueError`` naming ``name`` (guidance scales, sampler options, config numbers). With
    ``allow_inf`` an infinity passes (an option whose limit is meaningful); NaN never does."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)
    ok = ok and (allow_inf or math.isfinite(value))
    if not ok or (minimum is not None and value < minimum):
        low = "" if minimum is None else f" >= {minimum:g}"
        kind = "a number (not NaN)" if allow_inf else "a finite number"
        raise ValueError(f"{name} must be {kind}{low}, got {value!r}")
    return float(value)


def check_finite_values(values: dict, what: str) -> dict:
    """``values`` if every float in it is finite, else a one-line ``ValueError`` naming the keys (a likelihood,
    a metric: a NaN result is an error, never a number printed or stored)."""
    bad = [k for k, v in values.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what} came out non-finite ({', '.join(f'{k}={values[k]}' for k in bad)}); nothing "
                         "was written; check the run's weights and the options")
    return values


def check_finite(x: Tensor, what: str) -> Tensor:
    """``x`` if every value is finite, else a one-line ``ValueError``: ``what`` held NaN/Inf in so many entries
    (and rows). The guard that turns a silent NaN result into an error."""
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = int(bad.reshape(len(x), -1).any(1).sum()) if x.ndim > 1 else int(bad.sum())
        raise ValueError(f"{what} has {int(bad.sum())} NaN/Inf value(s) in {rows} of {len(x)} row(s); "
                         "nothing was written")
    return x


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` (CUDA when available, else CPU) or a device that this torch build and machine have; ``cuda`` on a
    CPU build or a missing GPU index is a one-line error, not an assertion deep inside torch."""
    if isinstance(name, torch.device):
        dev = name
    elif name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError):
            raise ValueError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "built with CUDA but sees no GPU"
            raise ValueError(f"device {str(dev)!r} requested but this torch ({torch.__version__}) is {build}; "
                             "use device auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(dev)!r} requested but only {torch.cuda.device_count()} GPU(s) exist")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' requested but this machine has no Metal GPU; use device auto or cpu")
    elif dev.type not in ("cpu", "mps", "meta"):
        raise ValueError(f"unknown device {str(dev)!r}; use auto, cpu, cuda or cuda:N")
    return dev


def sample_projections(like: Tensor, dist: str = "gaussian", generator: torch.Generator | None = None) -> Tensor:
    """Random projection vectors shaped like ``like`` with ``E[v v^T] = I``: standard normal or Rademacher
    (+-1) entries (T-SM-4). Drawn only from ``generator``."""
    if dist not in PROJECTIONS:
        raise ValueError(f"unknown projection distribution {dist!r}; allowed: {', '.join(PROJECTIONS)}")
    if dist == "gaussian":
        v = torch.randn(like.shape, generator=generator, dtype=like.dtype)
    else:
        v = torch.randint(0, 2, like.shape, generator=generator).to(like.dtype) * 2 - 1
    return v.to(like.device)


class SampleGenerators:
    """One ``torch.Generator`` per sample of a batch: noise for row ``i`` comes from generator ``i`` only, so a
    sample's randomness does not depend on which batch it is drawn in (the Pipeline's batch-size invariance).
    Samplers accept it wherever they accept a generator (:func:`torchdiffusion.samplers.common.noise_like`)."""

    def __init__(self, seeds: list[int] | None = None, *, generators: list[torch.Generator] | None = None):
        """One generator per seed, or the given ``generators`` themselves (one per sample, used as they are)."""
        self.generators = list(generators) if generators is not None else \
            [torch.Generator().manual_seed(int(s)) for s in seeds or []]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
              device: torch.device | str | None = None) -> Tensor:
        """Standard normal noise of ``shape`` (first dimension = number of samples), row ``i`` from generator ``i``."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} samples requested from {len(self.generators)} generators")
        rows = [torch.randn(tuple(shape[1:]), generator=g, dtype=dtype) for g in self.generators]
        return torch.stack(rows).to(device) if rows else torch.zeros(shape, dtype=dtype, device=device)
