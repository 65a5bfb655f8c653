"""Annealed Langevin dynamics as a ``td.sample`` sampler (NCSN; Song & Ermon 2019, Alg. 1; THEORY T-NCSN-2).

The noise levels are the grid's positive times ``ts[:-1]`` (for VE-type processes, where ``alpha = 1``, the
level is ``sigma(t)``; the ``logsnr`` grid makes them geometric as in NCSN). At each level the sampler runs
``n_steps_each`` Langevin steps ``x <- x + (alpha_i/2) score + sqrt(alpha_i) z`` with
``alpha_i = eps sigma_i^2 / sigma_L^2`` (the update of :mod:`torchdiffusion.langevin`).

``steps`` counts network calls: total NFE = levels x ``n_steps_each``, so ``steps`` buys
``steps // 100`` levels with the default ``n_steps_each = 100`` (with another ``n_steps_each`` the sampler
makes ``(steps // 100) * n_steps_each`` calls). With ``final_denoise`` (default) the last call is spent on
the Tweedie step ``x + sigma_L^2 score`` instead of a last Langevin move, so the NFE stays exactly that.
"""

from __future__ import annotations

from torch import Tensor

from ..langevin import annealed_step_sizes, langevin_step
from . import register
from .common import coeffs, emit, noise_like

DEFAULT_STEPS_EACH = 100


def _levels(steps: int) -> int:
    return steps // DEFAULT_STEPS_EACH


@register("annealed_langevin", intervals=_levels, stochastic=True)
def annealed_langevin(model, x: Tensor, ts: Tensor, *, generator=None, callback=None,
                      n_steps_each: int = DEFAULT_STEPS_EACH, eps: float | None = None,
                      final_denoise: bool = True) -> Tensor:
    """Annealed Langevin dynamics over the grid's noise levels (Song & Ermon 2019, Alg. 1; T-NCSN-2).

    ``eps`` is Song & Ermon's step parameter (``alpha_i = eps sigma_i^2 / sigma_L^2``). The default
    ``eps = 0.2 sigma_L^2`` is their 2e-5 for ``sigma_L = 0.01``, rescaled to the grid's last level, so that
    every level takes steps of ``0.2 sigma_i^2`` whatever the grid. NFE = levels x ``n_steps_each``
    (module doc).
    """
    if int(n_steps_each) < 1:
        raise ValueError(f"n_steps_each must be >= 1, got {n_steps_each}")
    proc = model.process
    levels = ts[:-1]
    sig = [coeffs(proc, t)[1] for t in levels]
    eps = 0.2 * sig[-1] ** 2 if eps is None else eps
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    alphas = annealed_step_sizes(sig, eps).tolist()
    last = len(levels) - 1
    for i, (t, s_i, a_i) in enumerate(zip(levels, sig, alphas)):
        for k in range(int(n_steps_each)):
            x0, eps_hat = model.predict(x, t)
            if final_denoise and i == last and k == int(n_steps_each) - 1:
                x = x0  # Tweedie: x + sigma_L^2 score (over alpha)
            else:
                x = langevin_step(x, -eps_hat / s_i, a_i / 2, noise_like(x, generator))
            emit(callback, i, t, x, x0, k=k)
    return x
