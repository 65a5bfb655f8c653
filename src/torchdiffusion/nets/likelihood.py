"""Trained parts beside the denoising network for likelihood training (Variational Diffusion Models, Kingma et al.
2021; Flow++, Ho et al. 2019): :class:`LikelihoodNet` holds the network, a learned noise schedule and an optional
:class:`VariationalDequantizer`, so that one module (the one the trainer optimizes, EMA-averages and saves)
carries all of them."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class VariationalDequantizer(nn.Module):
    """``q(u | k)`` on ``[0, 1)^D`` for K-level images: ``u = sigmoid(m + s z)``, ``z ~ N(0, I)``, with ``m`` and
    ``log s`` from a small convolutional net of the levels ``k`` (Ho et al. 2019, section 3.1, with a logit-normal
    flow). ``log q(u | k) = log N(z) - log s - log(u (1 - u))`` per dimension (change of variables). The dequantized
    data are ``y = lo + (k + u) W / K``, and ``-log P(k) <= E_q[-log p(y) + log q(u | k)] + D log(K / W)``
    (THEORY B-1 with a learned ``q``; uniform ``q`` is the special case ``log q = 0``).
    """

    def __init__(self, channels: int = 1, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, hidden, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(hidden, 2 * channels, 3, padding=1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)  # starts at m = 0, s = 1: u = sigmoid(z)

    def forward(self, x: Tensor, levels: int, value_range: tuple[float, float],
                generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Dequantize ``x`` (on the ``levels``-level grid of ``value_range``): ``(y, log q(u | k))`` with the log
        density summed per example (nats)."""
        lo, hi = (float(v) for v in value_range)
        K = int(levels)
        k = torch.round((x - lo) / (hi - lo) * (K - 1)).clamp(0, K - 1)
        feats = self.net(k / (K - 1) * 2 - 1)
        m, log_s = feats.chunk(2, dim=1)
        log_s = log_s.clamp(-7.0, 2.0)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        h = m + log_s.exp() * z
        u = torch.sigmoid(h)
        log_u, log_1mu = F.logsigmoid(h), F.logsigmoid(-h)
        log_q = -0.5 * z**2 - 0.5 * math.log(2 * math.pi) - log_s - log_u - log_1mu
        u = u.clamp(1e-6, 1 - 1e-6)
        return lo + (k + u) * (hi - lo) / K, log_q.flatten(1).sum(1)


class LikelihoodNet(nn.Module):
    """The denoising ``net`` plus the trained parts a likelihood model needs: a noise ``schedule`` (any module,
    e.g. ``processes.MonotoneSchedule``; the process reads it from here) and an optional ``dequantizer``.
    Calls go to ``net`` unchanged: ``net(x, t[, cond], **options)``."""

    def __init__(self, net: nn.Module, schedule: nn.Module | None = None, dequantizer: nn.Module | None = None):
        super().__init__()
        self.net, self.schedule, self.dequantizer = net, schedule, dequantizer

    def forward(self, x: Tensor, t: Tensor, cond: Tensor | None = None, **options) -> Tensor:
        return self.net(x, t, **options) if cond is None else self.net(x, t, cond, **options)
