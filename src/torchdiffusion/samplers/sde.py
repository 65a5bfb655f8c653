"""Reverse-SDE samplers of score SDEs (Song et al. 2021; THEORY T-SDE-7, T-SDE-11).

The reverse of ``dx = f(t) x dt + g(t) dW`` is ``dx = [f x - g^2 grad log p_t(x)] dt + g dW_bar`` (Anderson
1982, 002 Theorem 3), walked backwards from ``t_max``. The score comes from one network call,
``grad log p_t = -eps_hat / sigma(t)``.

How the samplers reach noise 0: the grid ``ts`` ends with ``process.t_zero`` where ``sigma = 0`` and the score
is undefined. Every sampler here walks the positive times ``ts[0] > ... > ts[-2]`` with its own update, and
its last move, from ``ts[-2]`` to ``t_zero``, returns the Tweedie denoiser ``x0_hat = E[x0 | x_{ts[-2]}]`` of
that step's network call (the ``noise_removal`` / ``denoise`` step of score_sde). So a grid with ``n``
evaluation points costs ``n`` network calls for ``euler_maruyama`` and ``reverse_diffusion``.
"""

from __future__ import annotations

import math

from torch import Tensor

from torchdiffusion._tensor import check_count
from torchdiffusion.samplers.common import coeffs, emit, noise_like
from torchdiffusion.samplers.dynamics import langevin_step
from torchdiffusion.samplers.registry import register


def score_x0(model, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """``(grad log p_t(x), x0_hat)`` from one network call (``score = -eps / sigma``, T-PAR-5)."""
    x0, eps = model.predict(x, t)
    return -eps / coeffs(model.process, t)[1], x0


def em_reverse_step(model, x: Tensor, t: Tensor, s: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor]:
    """Euler-Maruyama step of the reverse SDE from ``t`` to ``s < t`` (002 eq. 28, T-SDE-7):
    ``x_s = x_t + h [g^2 score - f x_t] + sqrt(h) g z`` with ``h = t - s``. Returns ``(x_s, x0_hat)``;
    ``z=None`` drops the noise."""
    score, x0 = score_x0(model, x, t)
    f, g = (float(c) for c in model.process.sde_coefficients(t))
    h = float(t - s)
    out = x + h * (g**2 * score - f * x)
    if z is not None:
        out = out + math.sqrt(h) * g * z
    return out, x0


def reverse_diffusion_step(model, x: Tensor, t: Tensor, s: Tensor, z: Tensor | None) -> tuple[Tensor, Tensor]:
    """Song et al.'s reverse-diffusion predictor from ``t`` to ``s``: ``x_s = x_t - f_i + G_i^2 score + G_i z``
    with the forward step discretized as ``x_t = a x_s + G z`` (``a = alpha_t / alpha_s``,
    ``G^2 = sigma_t^2 - a^2 sigma_s^2``; ``f_i = (a - 1) x_t``). For VE this is ``G^2 = sigma_t^2 - sigma_s^2``
    and for VP ``a = sqrt(1 - beta_i)``, ``G^2 = beta_i``, as in score_sde. Returns ``(x_s, x0_hat)``."""
    score, x0 = score_x0(model, x, t)
    a, var = (float(c) for c in model.process.transition(t, s))
    out = x - (a - 1) * x + var * score
    if z is not None:
        out = out + math.sqrt(var) * z
    return out, x0


PREDICTORS = {"reverse_diffusion": reverse_diffusion_step, "euler_maruyama": em_reverse_step}


@register("euler_maruyama", stochastic=True)
def euler_maruyama(model, x: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
    """Euler-Maruyama on the reverse SDE (002 eq. 28, THEORY T-SDE-7); last step returns Tweedie's x0_hat.

    ``x_{t-h} = x_t + h [g(t)^2 score(x_t, t) - f(t) x_t] + sqrt(h) g(t) xi`` between positive grid times;
    from the last positive time the sampler returns ``x0_hat`` (module doc). NFE = number of grid points.
    """
    return _walk(model, x, ts, em_reverse_step, generator, callback)


@register("reverse_diffusion", stochastic=True)
def reverse_diffusion(model, x: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
    """Reverse-diffusion predictor (Song et al. 2021, ancestral-like): ``x - f_i + G_i^2 score + G_i z``.

    Discretizes the forward process between grid points exactly (``process.transition``); the last step
    returns Tweedie's x0_hat (module doc). NFE = number of grid points.
    """
    return _walk(model, x, ts, reverse_diffusion_step, generator, callback)


def _walk(model, x: Tensor, ts: Tensor, step, generator, callback, correct=None) -> Tensor:
    """Walk the positive grid times with ``step`` (after ``correct(x, t, s)`` when given); the last move returns
    Tweedie's x0_hat (module doc)."""
    n = len(ts) - 1
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        if i == n - 1:  # to t_zero: Tweedie
            _, x = score_x0(model, x, t)
            emit(callback, i, t, x, x)
            break
        if correct is not None:
            x = correct(x, t, s)
        x, x0 = step(model, x, t, s, noise_like(x, generator))
        emit(callback, i, t, x, x0)
    return x


def snr_step_size(score: Tensor, z: Tensor, snr: float, alpha: float = 1.0) -> float:
    """Song et al.'s corrector step ``eps = 2 alpha (r ||z|| / ||s||)^2`` (Alg. 4-5, THEORY T-SDE-11).

    Norms are per example (over all non-batch dimensions) and averaged over the batch, as in score_sde, so
    the whole batch takes one step size. In the library's Langevin convention the step is ``c = eps``
    (score_sde's update is ``x + eps s + sqrt(2 eps) z``)."""
    s_norm = score.reshape(score.shape[0], -1).norm(dim=1).mean()
    z_norm = z.reshape(z.shape[0], -1).norm(dim=1).mean()
    return float(2 * alpha * (snr * z_norm / s_norm.clamp_min(1e-30)) ** 2)


def corrector(model, x: Tensor, t: Tensor, *, snr: float = 0.16, n_steps: int = 1, alpha: float = 1.0,
              generator=None) -> Tensor:
    """``n_steps`` Langevin corrector steps at fixed time ``t`` targeting ``p_t`` (T-SDE-11):
    ``x <- x + eps score + sqrt(2 eps) z`` with ``eps`` from :func:`snr_step_size`. NFE = ``n_steps``."""
    for _ in range(int(n_steps)):
        score, _ = score_x0(model, x, t)
        z = noise_like(x, generator)
        x = langevin_step(x, score, snr_step_size(score, z, snr, alpha), z)
    return x


def pc_intervals(steps: int, n_corrector: int = 1, **_) -> int:
    """Grid points for a budget of ``steps`` NFE: ``n`` points cost ``(n - 1)(1 + n_corrector) + 1`` (no
    corrector before the final denoising call), so ``n = (steps + n_corrector) // (1 + n_corrector)``."""
    nc = check_count(n_corrector, "pc: n_corrector", 0)
    return (steps + nc) // (1 + nc)


@register("pc", intervals=pc_intervals, stochastic=True)
def pc(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, predictor: str = "reverse_diffusion",
       snr: float = 0.16, n_corrector: int = 1) -> Tensor:
    """Predictor-corrector sampling (Song et al. 2021, Alg. 2-3; THEORY T-SDE-11).

    At every positive grid time: ``n_corrector`` Langevin corrector steps with the SNR rule
    ``eps = 2 alpha_i (snr ||z|| / ||score||)^2`` (``alpha_i = (alpha_t / alpha_s)^2``: 1 for VE,
    ``1 - beta_i`` for VP), then one predictor step (``reverse_diffusion`` or ``euler_maruyama``) to the next
    time; from the last positive time the sampler returns Tweedie's x0_hat (no corrector there). NFE =
    ``(n - 1)(1 + n_corrector) + 1`` for ``n`` grid points, so ``steps`` buys :func:`pc_intervals` of them.
    """
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; allowed: {', '.join(PREDICTORS)}")
    n_corrector = check_count(n_corrector, "pc: n_corrector", 0)
    if not (isinstance(snr, (int, float)) and math.isfinite(snr) and snr > 0):
        raise ValueError(f"pc: snr must be a finite number > 0, got {snr!r}")
    proc = model.process

    def correct(x: Tensor, t: Tensor, s: Tensor) -> Tensor:
        alpha = float(proc.transition(t, s)[0]) ** 2
        return corrector(model, x, t, snr=snr, n_steps=n_corrector, alpha=alpha, generator=generator)

    return _walk(model, x, ts, PREDICTORS[predictor], generator, callback, correct)
