"""Probability-flow ODE solvers: fixed-step RK4 and adaptive ``torchdiffeq`` (THEORY T-SDE-10).

The PF-ODE ``dx/dt = f(t) x - 1/2 g(t)^2 grad log p_t(x)`` (Song et al. 2021, section 4.3) has the same
marginals as the forward SDE; its drift is :func:`torchdiffusion.parameterization.flow.pf_ode_drift`. Both solvers
integrate from ``ts[0]`` to the last positive grid time ``ts[-2]``, then return the Tweedie denoiser
``x0_hat`` at that time (the drift is singular at noise 0, so no solver step ends there). Euler, Heun and
DPM-Solver live in ``samplers/solvers.py``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchdiffusion.parameterization.flow import adaptive_options, pf_ode_drift
from torchdiffusion.samplers.common import emit
from torchdiffusion.samplers.registry import register


def rk4_intervals(steps: int, **_) -> int:
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


def _any_steps(steps: int, **_) -> int:
    return max(int(steps), 2)


MAX_STEPS = 10_000  # adaptive steps of one solve (a 2-D toy needs ~50 at 1e-5; a digit U-Net a few hundred)


def tolerance_floor(dtype: torch.dtype) -> float:
    """The smallest ``rtol`` / ``atol`` the ode sampler accepts for states of ``dtype``: 8 machine epsilons
    (9.5e-7 for float32, 1.8e-15 for float64); below it the solver's error estimate is rounding noise and the
    step size shrinks until it underflows (or runs for hours)."""
    return 8 * torch.finfo(dtype).eps


@register("ode", intervals=_any_steps, emits=lambda n, options: 2)
def ode(model, x: Tensor, ts: Tensor, *, generator=None, callback=None, method: str = "dopri5",
        rtol: float = 1e-5, atol: float = 1e-5, t_end: float | None = None) -> Tensor:
    """Adaptive PF-ODE solve with ``torchdiffeq.odeint`` (default ``dopri5``) from ``ts[0]`` down to ``t_end``,
    then Tweedie's x0_hat there (T-SDE-10).

    ``t_end`` defaults to the process's smallest time ``t_min`` whatever the grid, so the solve always covers
    the whole trajectory (a ``trailing`` DDPM grid of 2 steps would otherwise stop at t = 499); give ``t_end``
    to stop earlier. The number of network calls is chosen by the solver from ``rtol``/``atol``, so ``steps``
    does **not** bound it (it only builds the grid, whose interior points are not visited). The calls made are
    counted in ``model.nfe`` like any sampler's. ``callback`` is called twice: after the solve (``x0=None``) and
    after the denoising step.
    """
    from torchdiffeq import odeint

    lo = tolerance_floor(x.dtype)
    for name, v in (("rtol", rtol), ("atol", atol)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= 1:
            raise ValueError(f"ode sampler: {name} must be a number in [{lo:.2g}, 1] for {str(x.dtype)[6:]} samples "
                             f"(a smaller tolerance is below the numbers' own precision), got {v!r}")
    proc = model.process
    end = torch.as_tensor(proc.t_min if t_end is None else float(t_end), dtype=torch.float64)
    if not (float(ts[-1]) < float(end) <= float(ts[0])):
        raise ValueError(f"t_end must be in ({float(ts[-1])}, {float(ts[0])}], got {float(end)}")
    t_span = torch.stack([ts[0].to(torch.float64), end])

    def func(t: Tensor, y: Tensor) -> Tensor:
        return pf_ode_drift(model, y, t.to(torch.float64))[0].to(y.dtype)

    if ts[0] > end:
        opts = adaptive_options(float(t_span[0]), float(t_span[1]), method)
        if opts:  # a bound on the work: tolerances the state's precision cannot meet end here, not in a hang
            opts["max_num_steps"] = MAX_STEPS
        try:
            x = odeint(func, x, t_span.to(x.device), rtol=rtol, atol=atol, method=method, options=opts or None)[-1]
        except ValueError as e:
            raise ValueError(f"ode sampler: {e}") from None
        except AssertionError as e:  # torchdiffeq's step limit, step-size underflow and non-finite states
            why = str(e).splitlines()[0][:80]
            raise ValueError(f"ode sampler: the {method} solve failed ({why}) at rtol={rtol:g}, "
                             f"atol={atol:g}; loosen the tolerances (e.g. 1e-5) or use a fixed-step method") from None
        emit(callback, 0, ts[0], x, None)
    x, _ = model.predict(x, end)
    emit(callback, 1, end, x, x)
    return x
