"""Learned vs exact score of a 2-D model at one noise level (used by the ``scorefield`` command and the studio).

The exact score is a density's noised score ``grad log p_t`` at the same time ``t`` (for the toys, the oracle's
Gaussian mixture of :func:`torchdiffusion.data.datasets.toy_density`). The density-weighted relative error
``sum p ||s_theta - s||^2 / sum p ||s||^2`` over a grid is the Fisher divergence of T-SM-1, relative to the
Fisher information.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from torchdiffusion.processes import times_from_ve_sigmas

ScoreFn = Callable[[Tensor], Tensor]


def score_field(model, density, sigma: float, lim: float = 2.5,
                n: int = 41) -> tuple[float, ScoreFn, ScoreFn | None, ScoreFn | None, float | None]:
    """``(t, learned(x), exact(x), log_density(x), relative_error)`` at VE noise level ``sigma`` for a 2-D
    model and a density (``exact`` and the error are ``None`` for densities without a score; ``exact`` and
    ``log_density`` are ``None`` when ``density`` is ``None``)."""
    proc = model.process
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    t = times_from_ve_sigmas(proc, torch.tensor([float(sigma)], dtype=torch.float64))[0]
    t = t.clamp(proc.t_min, proc.t_max)
    dtype = next(model.net.parameters()).dtype if hasattr(model.net, "parameters") else torch.float32

    def learned(x: Tensor) -> Tensor:
        with torch.no_grad():
            return model.score(x.to(dtype), t).double()

    if density is None:
        return float(t), learned, None, None, None
    exact = (lambda x: density.score(x, proc, t)) if hasattr(density, "score") else None
    if hasattr(density, "score"):
        def log_density(x: Tensor) -> Tensor:
            return density.log_prob(x, proc, t)
    else:
        log_density = density.log_prob
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    X, Y = torch.meshgrid(g, g, indexing="xy")
    pts = torch.stack([X.flatten(), Y.flatten()], 1)
    err = None
    if exact is not None:
        w = log_density(pts).exp()
        s, s_hat = exact(pts), learned(pts)
        err = float((w * ((s_hat - s) ** 2).sum(1)).sum() / (w * (s**2).sum(1)).sum())
    return float(t), learned, exact, log_density, err
