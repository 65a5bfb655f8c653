"""Guidance as model wrappers usable with every sampler: classifier-free guidance (and, later, classifier
guidance and multi-view denoising). A wrapper has ``.process`` and ``.predict(x, t, cond) -> (x0, eps)``."""

from __future__ import annotations

import torch
from torch import Tensor


class CFG:
    """Classifier-free guidance (Ho & Salimans 2022, THEORY T-CFG-1):
    ``eps_g = (1 + w) eps(x, c) - w eps(x, null)``, and the same combination of the x0 predictions.

    ``w = 0`` is the plain conditional model; the notes' ``gamma`` (000) and ``lambda`` (004) equal ``1 + w``.
    Both predictions come from one batched network call.
    """

    def __init__(self, model, w: float):
        self.model, self.w, self.process = model, float(w), model.process

    def predict(self, x: Tensor, t, cond=None) -> tuple[Tensor, Tensor]:
        if cond is None:
            raise ValueError("classifier-free guidance needs a class condition")
        n = x.shape[0]
        c = torch.as_tensor(cond, device=x.device).long()
        c = c.expand(n) if c.ndim == 0 else c
        tt = torch.as_tensor(t)
        tt = tt.expand(n) if tt.ndim == 0 else tt
        x0, eps = self.model.predict(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([c, torch.full_like(c, -1)]))
        w = self.w
        return (1 + w) * x0[:n] - w * x0[n:], (1 + w) * eps[:n] - w * eps[n:]
