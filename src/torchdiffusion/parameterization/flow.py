"""The probability-flow ODE drift and a model with its condition fixed (what samplers and likelihoods see)."""

from __future__ import annotations

import torch
from torch import Tensor


class Bound:
    """A model with its condition fixed, and an evaluation counter: what a sampler sees."""

    def __init__(self, model, cond=None):
        self.model, self.cond, self.process, self.nfe = model, cond, model.process, 0

    def predict(self, x: Tensor, t) -> tuple[Tensor, Tensor]:
        self.nfe += 1
        if self.cond is None:
            return self.model.predict(x, t)
        return self.model.predict(x, t, self.cond)


def pf_ode_drift(model, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Probability-flow ODE ``dx/dt = f(t) x - 1/2 g(t)^2 score`` (Song et al. 2021, THEORY T-SDE-10), with
    ``score = -eps / sigma``. Returns ``(dx/dt, x0_hat, eps_hat)`` from one network call."""
    proc = model.process
    x0, eps = model.predict(x, t)
    f, g = proc.sde_coefficients(t)
    sig = float(proc.sigma(t))
    return float(f) * x + 0.5 * float(g) ** 2 / sig * eps, x0, eps


ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")


def adaptive_options(t0: float, t1: float, method: str) -> dict:
    """torchdiffeq options for a PF-ODE solve from ``t0`` to ``t1`` (empty for fixed-step methods): ``step_t``
    lands on ``t1`` instead of stepping past it (where the drift may be undefined) and interpolating back, and
    ``first_step`` (1 % of the span) replaces torchdiffeq's initial-step guess, which probes the drift at
    ``t0 + h0`` with an unbounded ``h0`` (t = -48617 on DDPM), outside the process's time range."""
    if method not in ADAPTIVE_METHODS:
        return {}
    return {"step_t": torch.tensor([float(t1)], dtype=torch.float64), "first_step": 0.01 * abs(float(t1) - float(t0))}
