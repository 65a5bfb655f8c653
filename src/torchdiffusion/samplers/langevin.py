"""Annealed Langevin dynamics as a ``td.sample`` sampler (NCSN; Song & Ermon 2019, Alg. 1; THEORY T-NCSN-2).

The noise levels are the grid's positive times ``ts[:-1]`` (for VE-type processes, where ``alpha = 1``, the
level is ``sigma(t)``; the ``logsnr`` grid makes them geometric as in NCSN). At level ``i`` the sampler runs
Langevin steps ``x <- x + (alpha_i/2) score + sqrt(alpha_i) z`` (the update of :mod:`torchdiffusion.samplers.dynamics`)
targeting the noised marginal ``p_{t_i}``, with the step sizes of :func:`annealed_langevin`.

``steps`` is spent exactly: ``levels x n_steps_each = steps`` network calls (:func:`level_plan`). Give either
option, or both (then their product must equal ``steps``); by default both grow like ``sqrt(steps)`` and the
relative step shrinks like ``1 / n_steps_each`` (:func:`annealed_langevin`), so the Langevin bias of every
level vanishes as ``steps`` grows and the sampler converges. With ``final_denoise`` (default) the last call is
spent on the Tweedie step ``x + sigma_L^2 score`` instead of a last Langevin move.
"""

from __future__ import annotations

import math

from torch import Tensor

from torchdiffusion._tensor import check_count
from torchdiffusion.samplers.common import coeffs, emit, noise_like
from torchdiffusion.samplers.dynamics import annealed_step_sizes, langevin_step
from torchdiffusion.samplers.registry import register
from torchdiffusion.samplers.sde import snr_step_size


def level_plan(steps: int, levels: int | None = None, n_steps_each: int | None = None) -> tuple[int, int]:
    """``(levels, n_steps_each)`` with ``levels * n_steps_each == steps``.

    With one of them given the other is ``steps`` divided by it (an error unless it divides ``steps``); with
    neither, ``n_steps_each`` is the divisor of ``steps`` nearest ``sqrt(steps)`` (at least 1)."""
    steps = check_count(steps, "annealed_langevin: steps")
    if levels is not None:
        levels = check_count(levels, "annealed_langevin: levels")
    if n_steps_each is not None:
        n_steps_each = check_count(n_steps_each, "annealed_langevin: n_steps_each")
    if levels is None and n_steps_each is None:
        divs = [d for d in range(1, steps + 1) if steps % d == 0]
        n_steps_each = min(divs, key=lambda d: (abs(math.log(d) - 0.5 * math.log(steps)), d))
    if levels is None:
        levels = steps // n_steps_each
    if n_steps_each is None:
        n_steps_each = steps // levels
    if levels * n_steps_each != steps:
        raise ValueError(f"annealed_langevin spends levels x n_steps_each = steps network calls; "
                         f"{levels} x {n_steps_each} != {steps} (give steps divisible by the one you set)")
    return levels, n_steps_each


def _levels(steps: int, levels: int | None = None, n_steps_each: int | None = None, **_) -> int:
    return level_plan(steps, levels, n_steps_each)[0]


def _prepare(steps: int | None, n_levels: int, options: dict) -> dict:
    """Fill ``n_steps_each`` from the budget: ``steps / levels`` (a tensor grid alone needs it given)."""
    if options.get("n_steps_each") is None:
        if steps is None:
            raise ValueError("annealed_langevin with a tensor grid needs steps or n_steps_each")
        return {**options, "n_steps_each": level_plan(steps, n_levels, None)[1]}
    return options


@register("annealed_langevin", intervals=_levels, stochastic=True, prepare=_prepare,
          emits=lambda n, options: n * int(options["n_steps_each"]))
def annealed_langevin(model, x: Tensor, ts: Tensor, *, generator=None, callback=None,
                      levels: int | None = None, n_steps_each: int | None = None, eps: float | None = None,
                      snr: float | None = None, final_denoise: bool = True) -> Tensor:
    """Annealed Langevin dynamics over the grid's noise levels (Song & Ermon 2019, Alg. 1; T-NCSN-2).

    ``len(ts) - 1`` levels of ``n_steps_each`` steps (:func:`level_plan`; ``td.sample`` builds the grid from
    ``levels``). Step sizes:

    - ``eps`` given: Song & Ermon's rule ``alpha_i = eps sigma_i^2 / sigma_L^2`` (Alg. 1 exactly);
    - otherwise the signal-to-noise rule of Song et al. (2021, Alg. 4) per step, ``c = 2 (snr ||z|| / ||s||)^2``,
      which scales with the local variance of ``p_{t_i}`` (data- or noise-dominated alike). Its default
      ``snr = sqrt(h / 2)`` with ``h = min(0.2, 2 (ln(sigma_1 / sigma_L) / L + 1) / n_steps_each)`` gives each
      level enough contraction to follow the shrinking noise (``h n`` e-folds per level) while ``h``, and with it
      the Langevin bias, falls like ``1 / n_steps_each`` as ``steps`` grows.
    """
    n_levels = len(ts) - 1
    if levels is not None and int(levels) != n_levels:
        raise ValueError(f"annealed_langevin: levels={levels} but the grid has {n_levels} noise levels")
    if n_steps_each is None:
        raise ValueError("annealed_langevin: n_steps_each is required when called directly (td.sample sets it)")
    n_each = check_count(n_steps_each, "annealed_langevin: n_steps_each")
    for name, v in (("eps", eps), ("snr", snr)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"annealed_langevin: {name} must be a finite number > 0, got {v!r}")
    if eps is not None and snr is not None:
        raise ValueError("annealed_langevin: give eps (Song & Ermon step rule) or snr (SNR rule), not both")
    proc = model.process
    lv = ts[:-1]
    sig = [coeffs(proc, t)[1] for t in lv]
    alphas = annealed_step_sizes(sig, eps).tolist() if eps is not None else None
    if snr is None:
        h = min(0.2, 2 * (math.log(sig[0] / sig[-1]) / n_levels + 1) / n_each)
        snr = math.sqrt(h / 2)
    last = n_levels - 1
    for i, (t, s_i) in enumerate(zip(lv, sig)):
        for k in range(n_each):
            x0, eps_hat = model.predict(x, t)
            if final_denoise and i == last and k == n_each - 1:
                x = x0  # Tweedie: x + sigma_L^2 score (over alpha)
            else:
                score, z = -eps_hat / s_i, noise_like(x, generator)
                c = alphas[i] / 2 if alphas is not None else snr_step_size(score, z, snr)
                x = langevin_step(x, score, c, z)
            emit(callback, i, t, x, x0, k=k)
    return x
