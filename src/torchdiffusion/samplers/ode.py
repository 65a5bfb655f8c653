"""Probability-flow ODE solvers: fixed-step RK4 and adaptive ``torchdiffeq`` (THEORY T-SDE-10).

The PF-ODE ``dx/dt = f(t) x - 1/2 g(t)^2 grad log p_t(x)`` (Song et al. 2021, section 4.3) has the same
marginals as the forward SDE; its drift is :func:`torchdiffusion.samplers.common.pf_ode_drift`. Both solvers
integrate from ``ts[0]`` to the last positive grid time ``ts[-2]``, then return the Tweedie denoiser
``x0_hat`` at that time (the drift is singular at noise 0, so no solver step ends there). Euler, Heun and
DPM-Solver live in ``samplers/solvers.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import register
from .common import emit, pf_ode_drift


def rk4_intervals(steps: int) -> int:
    """Grid points for ``steps`` NFE: ``n`` points cost ``4 (n - 1) + 1`` calls, so ``n = (steps + 3) // 4``."""
    return (steps + 3) // 4


@register("rk4", intervals=rk4_intervals)
def rk4(model, x: Tensor, ts: Tensor, *, generator=None, callback=None) -> Tensor:
    """Classical 4th-order Runge-Kutta on the PF-ODE over the grid, then Tweedie's x0_hat (T-SDE-10).

    Four network calls per interval between positive grid times, one for the final denoising step: a grid
    of ``n`` points costs ``4 n - 3`` NFE (``steps`` buys ``(steps + 3) // 4`` points).
    """
    n = len(ts) - 1
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        if i == n - 1:
            x, _ = model.predict(x, t)
            emit(callback, i, t, x, x)
            break
        h = float(s - t)
        k1, x0, _ = pf_ode_drift(model, x, t)
        k2, _, _ = pf_ode_drift(model, x + 0.5 * h * k1, t + 0.5 * h)
        k3, _, _ = pf_ode_drift(model, x + 0.5 * h * k2, t + 0.5 * h)
        k4, _, _ = pf_ode_drift(model, x + h * k3, s)
        x = x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        emit(callback, i, t, x, x0)
    return x


ADAPTIVE = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def _any_steps(steps: int) -> int:
    return max(int(steps), 2)


@register("ode", intervals=_any_steps)
def ode(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, method: str = "dopri5",
        rtol: float = 1e-5, atol: float = 1e-5) -> Tensor:
    """Adaptive PF-ODE solve with ``torchdiffeq.odeint`` (default ``dopri5``) from ``ts[0]`` to ``ts[-2]``,
    then Tweedie's x0_hat (T-SDE-10).

    The number of network calls is chosen by the solver from ``rtol``/``atol``, so ``steps`` does **not**
    bound it: ``steps`` only sets the grid (at least 2 points), whose last positive time is where the solve
    stops and whose points are where ``callback`` is called (``x0`` is ``None`` there: no prediction is made
    at intermediate times). The calls made are counted in ``model.nfe`` like any sampler's.
    """
    from torchdiffeq import odeint

    if not (rtol > 0 and atol > 0):
        raise ValueError(f"rtol and atol must be > 0, got {rtol}, {atol}")
    t_eval = ts[:-1]

    def func(t: Tensor, y: Tensor) -> Tensor:
        return pf_ode_drift(model, y, t.to(torch.float64))[0].to(y.dtype)

    if len(t_eval) > 1:
        try:
            # step_t makes adaptive solvers land on the grid times instead of stepping past the last one
            # (where the drift may be undefined) and interpolating back
            opts = {"step_t": t_eval} if method in ADAPTIVE else None
            path = odeint(func, x, t_eval.to(x.device), rtol=rtol, atol=atol, method=method, options=opts)
        except ValueError as e:
            raise ValueError(f"ode sampler: {e}") from None
        for i in range(1, len(t_eval)):
            emit(callback, i - 1, t_eval[i - 1], path[i], None)
        x = path[-1]
    x, _ = model.predict(x, t_eval[-1])
    emit(callback, len(t_eval) - 1, t_eval[-1], x, x)
    return x
