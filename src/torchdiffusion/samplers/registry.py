"""The sampler registry: ``register(name, intervals=..., stochastic=..., prepare=...)``, ``names()``, ``get()``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its function and how many grid intervals ``steps`` evaluations buy."""

    fn: Callable[..., Tensor]
    intervals: Callable[..., int]
    stochastic: bool
    doc: str
    prepare: Callable[[int | None, int, dict], dict] | None = None
    emits: Callable[[int, dict], int] | None = None  # callback reports per run (default: one per interval)


_SAMPLERS: dict[str, SamplerSpec] = {}


def _one_per_step(steps: int, **_) -> int:
    return steps


def register(name: str, *, intervals: Callable[..., int] = _one_per_step, stochastic: bool = False,
             prepare: Callable[[int | None, int, dict], dict] | None = None,
             emits: Callable[[int, dict], int] | None = None) -> Callable:
    """Decorator registering a sampler function under ``name``.

    ``intervals(steps, **options)`` converts a budget of network evaluations into the number of grid
    intervals the sampler walks (1:1 for first-order samplers; it may read the sampler's options).
    ``prepare(steps, intervals, options)`` returns the options completed from the budget (``steps`` is None
    when a tensor grid alone fixed the intervals). ``emits(intervals, options)`` is how many times the sampler
    reports to its ``callback`` (the progress bar's total; default one report per interval).
    """
    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        _SAMPLERS[name] = SamplerSpec(fn, intervals, stochastic, (fn.__doc__ or "").strip().split("\n")[0],
                                      prepare, emits)
        return fn
    return deco


def names() -> list[str]:
    """Every sampler name that ``td.sample`` accepts."""
    return sorted(_SAMPLERS)


def get(name: str) -> SamplerSpec:
    """The registered sampler ``name`` (clear error listing the allowed names otherwise)."""
    if name not in _SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(names())}")
    return _SAMPLERS[name]
