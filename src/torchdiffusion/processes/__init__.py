"""Forward noising processes: ``x_t = alpha(t) * x0 + sigma(t) * eps`` (axis 1 of docs/design.md).

Every process gives ``alpha(t)``, ``sigma(t)``, ``log_snr(t)`` and its inverse, the training range
``[t_min, t_max]``, the time ``t_zero`` at which the state is clean (``sigma == 0``), ``add_noise``,
the SDE ``(drift, diffusion)``, and the prior at ``t_max``.

Time conventions (docs/design.md section 2):
- ``DDPM``: the training timestep ``k = 0 .. T-1`` (paper step ``t = k + 1``, THEORY T-FWD-4); ``k = -1`` is
  the clean state (``alpha_bar = 1``). Fractional ``k`` interpolates log-SNR linearly.
- ``VP``, ``SubVP``, ``VE``: ``t`` in ``[0, 1]``; ``t = 0`` is clean. Rates follow Song et al. (2021):
  ``beta(t)`` is a *rate* and ``B(t) = int_0^t beta`` its integral (THEORY T-FWD-5).
- ``EDM``: ``t = sigma``.

The package is split along its seams: ``base.py`` (the interface), ``ddpm.py``, ``continuous.py``, ``learned.py``.
"""

from __future__ import annotations

from .base import Process, TimeLike, as_time, expand_like, times_from_ve_sigmas
from .continuous import EDM, VE, VP, SubVP
from .ddpm import DDPM, make_betas, rescale_zero_terminal_snr
from .learned import LearnedVP, MonotoneSchedule

__all__ = ["DDPM", "EDM", "PROCESSES", "VE", "VP", "LearnedVP", "MonotoneSchedule", "Process", "SubVP", "TimeLike",
           "as_time", "expand_like", "make_betas", "process_from_config", "rescale_zero_terminal_snr",
           "times_from_ve_sigmas"]

PROCESSES: dict[str, type[Process]] = {"ddpm": DDPM, "vp": VP, "subvp": SubVP, "ve": VE, "edm": EDM,
                                       "learned": LearnedVP}


def process_from_config(cfg: dict | str) -> Process:
    """Build a process from ``{"name": ..., **kwargs}`` (or just a name)."""
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    cfg = dict(cfg)
    name = str(cfg.pop("name", "")).lower()
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; allowed: {', '.join(PROCESSES)}")
    try:
        return PROCESSES[name](**cfg)
    except TypeError as e:
        raise ValueError(f"bad arguments for process {name!r}: {e}") from None
