"""Parameterization (axis 2 of docs/design.md): one wrapper turns any network into eps, x0, score and v.

With ``x = alpha x0 + sigma eps`` the conversions are (THEORY T-PAR-1, T-PAR-5, T-PAR-9):

- eps-prediction:   ``x0 = (x - sigma eps) / alpha``
- x0-prediction:    ``eps = (x - alpha x0) / sigma``
- v-prediction:     ``v = alpha eps - sigma x0``; ``x0 = (alpha x - sigma v)/(alpha^2+sigma^2)``,
  ``eps = (sigma x + alpha v)/(alpha^2+sigma^2)`` (valid for VE and sub-VP too)
- score-prediction: ``eps = -sigma score``, ``x0 = (x + sigma^2 score)/alpha`` (Tweedie)

EDM preconditioning (Karras et al. 2022, B-9) is written once here, for any process, in the VE coordinates
``y = x / alpha``, ``s = sigma / alpha``: ``x0 = c_skip y + c_out F(c_in y, c_noise)`` with
``c_skip = sd^2/(s^2+sd^2)``, ``c_out = s sd/sqrt(s^2+sd^2)``, ``c_in = 1/sqrt(s^2+sd^2)``, ``c_noise = ln(s)/4``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn

from torchdiffusion.processes import Process, as_time, expand_like

PREDICTIONS = ("eps", "x0", "v", "score")
"""What a network may predict (``Denoiser(..., prediction=...)``): the noise ``eps``, the clean data ``x0``, the
velocity ``v = alpha eps - sigma x0``, or the ``score`` of the noised marginal; the Denoiser converts any one into
all four (THEORY T-PAR-10)."""
PRECONDITIONINGS = ("none", "edm")


def _accepts_cond(net: Callable) -> bool:
    fn = net.forward if isinstance(net, nn.Module) else net
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return True
    if any(p.kind == p.VAR_POSITIONAL for p in params.values()):
        return True
    return len(params) >= 3


def prediction_from(x0: Tensor, eps: Tensor, alpha: Tensor, sigma: Tensor, prediction: str) -> Tensor:
    """What a net of type ``prediction`` outputs, from ``(x0, eps)`` at ``x = alpha x0 + sigma eps``:
    ``eps``, ``x0``, ``v = alpha eps - sigma x0`` (T-PAR-9) or ``score = -eps / sigma`` (T-PAR-5)."""
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return alpha * eps - sigma * x0
    if prediction == "score":
        return -eps / sigma
    raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


def unwrap(net: Callable) -> Callable:
    """The network inside its wrappers: DDP's and the training wrappers' ``.module``, torch.compile's
    ``._orig_mod``, in any nesting."""
    while True:
        inner = getattr(net, "module", None)
        if inner is None:
            inner = getattr(net, "_orig_mod", None)
        if inner is None:
            return net
        net = inner


def process_for_net(process: Process, net: Callable) -> Process:
    """``process`` reading the learned schedule held by ``net`` (``net.schedule``, looked up through its wrappers,
    :func:`unwrap`) when it has one; otherwise ``process`` itself."""
    rebind = getattr(process, "with_schedule", None)
    schedule = getattr(unwrap(net), "schedule", None)
    if rebind is None or schedule is None or schedule is getattr(process, "schedule", None):
        return process
    return rebind(schedule)


class Denoiser(nn.Module):
    """``Denoiser(net, process, prediction="eps")``: the model a sampler asks, for any prediction type.

    ``net(x, t)`` or ``net(x, t, cond)`` receives the process time ``t`` (DDPM: the integer timestep), or,
    with ``precond="edm"``, ``c_noise``. ``predict(x, t, cond)`` returns ``(x0, eps)`` from one network call;
    ``eps``, ``x0``, ``score``, ``v`` and the DDPM reverse mean ``mean`` derive from it.
    """

    def __init__(self, net: Callable, process: Process, prediction: str = "eps", precond: str = "none",
                 sigma_data: float = 0.5):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        if precond not in PRECONDITIONINGS:
            raise ValueError(f"unknown preconditioning {precond!r}; allowed: {', '.join(PRECONDITIONINGS)}")
        if precond == "edm" and prediction != "x0":
            raise ValueError("precond='edm' parameterizes x0 through F; use prediction='x0'")
        if not callable(net):
            raise TypeError(f"net must be callable as net(x, t[, cond]), got {type(net).__name__}")
        self.net = net
        self.process = process
        self.prediction = prediction
        self.precond = precond
        self.sigma_data = float(sigma_data)
        self._cond_ok = _accepts_cond(net)

    def with_net(self, net: Callable) -> Denoiser:
        """The same parameterization around another network (an EMA copy, a DDP or compiled wrapper). A process
        with a learned schedule (``with_schedule``) reads the schedule of that network (``net.schedule``)."""
        return Denoiser(net, process_for_net(self.process, net), self.prediction, self.precond, self.sigma_data)

    def _call_net(self, x: Tensor, t: Tensor, cond) -> Tensor:
        if cond is None:
            return self.net(x, t)
        if not self._cond_ok:
            raise ValueError("cond was given but the network takes no condition (net(x, t))")
        return self.net(x, t, cond)

    def _times(self, x: Tensor, t) -> Tensor:
        tt = self.process.check_time(t).to(x.device)
        if tt.ndim == 0:
            tt = tt.expand(x.shape[0])
        if tt.shape != (x.shape[0],):
            raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},), got {tuple(tt.shape)}")
        return tt

    def edm_coefficients(self, s: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` at VE-noise level ``s = sigma/alpha`` (B-9)."""
        sd2 = self.sigma_data**2
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data / torch.sqrt(s**2 + sd2)
        c_in = 1 / torch.sqrt(s**2 + sd2)
        return c_skip, c_out, c_in, 0.25 * torch.log(s)

    def predict(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        """``(x0_hat, eps_hat)`` at ``(x, t)`` from a single network evaluation."""
        if not isinstance(x, Tensor):
            raise TypeError("x must be a tensor")
        tt = self._times(x, t)
        a, s = expand_like(self.process.alpha(tt), x), expand_like(self.process.sigma(tt), x)
        if self.precond == "edm":
            ve = (self.process.sigma(tt) / self.process.alpha(tt))
            c_skip, c_out, c_in, c_noise = (expand_like(c, x) if i < 3 else c.to(x.device, torch.float32)
                                            for i, c in enumerate(self.edm_coefficients(ve)))
            y = x / a
            F = self._call_net(c_in * y, c_noise, cond)
            x0 = c_skip * y + c_out * F
            return x0, (x - a * x0) / s
        out = self._call_net(x, tt if self.process.discrete else tt.to(x.dtype), cond)
        if out.shape != x.shape:
            raise ValueError(f"network output shape {tuple(out.shape)} differs from input shape {tuple(x.shape)}")
        return self.convert(x, a, s, out, self.prediction)

    @staticmethod
    def convert(x: Tensor, a: Tensor, s: Tensor, out: Tensor, prediction: str) -> tuple[Tensor, Tensor]:
        """``(x0, eps)`` from a raw prediction of the given type (the seed conversions, module doc)."""
        if prediction == "eps":
            if (a == 0).any():
                raise ValueError("eps-prediction cannot give x0 where alpha(t) = 0 (zero terminal SNR); "
                                 "use prediction='v' or 'x0'")
            return (x - s * out) / a, out
        if prediction == "x0":
            return out, (x - a * out) / s
        if prediction == "v":
            n = a**2 + s**2
            return (a * x - s * out) / n, (s * x + a * out) / n
        if prediction == "score":
            return (x + s**2 * out) / a, -s * out
        raise ValueError(f"unknown prediction {prediction!r}; allowed: {', '.join(PREDICTIONS)}")

    def forward(self, x: Tensor, t, cond=None) -> Tensor:
        """The network's native prediction (what the loss compares against)."""
        return self.native(x, t, cond)

    def native(self, x: Tensor, t, cond=None) -> Tensor:
        x0, eps = self.predict(x, t, cond)
        return self.as_prediction(x, t, x0, eps, "x0" if self.precond == "edm" else self.prediction)

    def as_prediction(self, x: Tensor, t, x0: Tensor, eps: Tensor, prediction: str) -> Tensor:
        tt = self._times(x, t)
        return prediction_from(x0, eps, expand_like(self.process.alpha(tt), x), expand_like(self.process.sigma(tt), x),
                               prediction)

    def eps(self, x: Tensor, t, cond=None) -> Tensor:
        """``E[eps | x_t]``."""
        return self.predict(x, t, cond)[1]

    def x0(self, x: Tensor, t, cond=None) -> Tensor:
        """``E[x0 | x_t]`` (Tweedie)."""
        return self.predict(x, t, cond)[0]

    def score(self, x: Tensor, t, cond=None) -> Tensor:
        """``grad log p_t(x) = -eps / sigma`` (T-PAR-5)."""
        return self.as_prediction(x, t, *self.predict(x, t, cond), "score")

    def v(self, x: Tensor, t, cond=None) -> Tensor:
        """``v = alpha eps - sigma x0`` (T-PAR-9)."""
        return self.as_prediction(x, t, *self.predict(x, t, cond), "v")

    def mean(self, x: Tensor, t, s=None, cond=None) -> Tensor:
        """Reverse mean ``mu_theta(x_t) = E_q[x_s | x_t, x0 = x0_hat]``, by default ``s = t - 1`` for DDPM.

        For DDPM this is ``(x_t - beta_t eps / sqrt(1 - abar_t)) / sqrt(alpha_t)`` (T-PAR-2 = T-PAR-3).
        """
        tt = self._times(x, t)
        if s is None:
            if not self.process.discrete:
                raise ValueError("mean(x, t) needs the earlier time s for a continuous process")
            s = tt - 1
        x0, _ = self.predict(x, tt, cond)
        c_x, c_0, _ = self.process.posterior_coefficients(tt, as_time(s))
        return expand_like(c_x, x) * x + expand_like(c_0, x) * x0
