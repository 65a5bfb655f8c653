"""Energy-based models: a scalar energy network and the score it defines (THEORY T-EBM-1).

``p(x) = exp(-E(x)) / Z``  gives  ``grad_x log p(x) = -grad_x E(x)``: the normaliser ``Z`` never enters the
score, so an energy network can be trained and sampled with every score-based loss and sampler of the library.
:class:`EnergyScoreNet` turns ``E(x[, t])`` into ``-grad_x E`` by autograd; it keeps the graph when gradients
are enabled (so denoising, sliced or exact score matching train the energy), and switches gradients on
locally under ``torch.no_grad`` (so samplers, which run without gradients, can use it).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdiffusion.nets.embeddings import TimeEmbedding, sinusoidal_embedding
from torchdiffusion.nets.mlp import class_index


class EnergyNet(nn.Module):
    """Scalar energy ``E(x[, t][, cond])`` for vector data ``(B, dim)`` -> ``(B,)``.

    A residual MLP with smooth (SiLU) activations, so that ``-grad_x E`` is smooth and its Jacobian is
    defined; the time embedding is added in every block as in :class:`~torchdiffusion.nets.MLP`.
    ``time_scale`` multiplies ``t`` before the sinusoidal features (1000 for ``t`` in [0, 1]);
    ``time_dependent=False`` gives a plain EBM ``E(x)`` (``t`` is ignored). ``quadratic`` adds
    ``quadratic * ||x||^2 / 2`` so that ``exp(-E)`` is normalisable whatever the network does.
    """

    def __init__(self, dim: int = 2, hidden: int = 128, depth: int = 3, time_scale: float = 1.0,
                 emb_dim: int = 64, time_dependent: bool = True, num_classes: int | None = None,
                 quadratic: float = 0.0):
        super().__init__()
        if int(dim) < 1 or int(hidden) < 1 or int(depth) < 0:
            raise ValueError(f"EnergyNet needs dim >= 1, hidden >= 1, depth >= 0; got {dim}, {hidden}, {depth}")
        self.dim, self.num_classes, self.quadratic = int(dim), num_classes, float(quadratic)
        self.inp = nn.Linear(self.dim, hidden)
        self.time = TimeEmbedding(emb_dim, hidden, time_scale) if time_dependent else None
        self.class_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"l1": nn.Linear(hidden, hidden), "emb": nn.Linear(hidden, hidden),
                           "l2": nn.Linear(hidden, hidden)}) for _ in range(int(depth)))
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, x: Tensor, t: Tensor | float | None = None, cond: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"EnergyNet expects x of shape (B, {self.dim}), got {tuple(x.shape)}")
        h = self.inp(x.to(self.inp.weight.dtype))
        emb = None
        if self.time is not None:
            if t is None:
                raise ValueError("this EnergyNet is time-dependent: call it as energy(x, t)")
            tt = torch.as_tensor(t, device=x.device)
            tt = (tt.expand(x.shape[0]) if tt.ndim == 0 else tt) * self.time.time_scale
            # the embedding's features in the weights' dtype, so that a float64 energy works end to end
            emb = self.time.mlp(sinusoidal_embedding(tt, self.time.dim).to(self.inp.weight.dtype))
        if self.class_embed is not None:
            c = self.class_embed(class_index(cond, x.shape[0], self.num_classes, x.device))
            emb = c if emb is None else emb + c
        elif cond is not None:
            raise ValueError("cond was given but this EnergyNet has no classes (num_classes=None)")
        for b in self.blocks:
            r = b["l1"](nn.functional.silu(h))
            if emb is not None:
                r = r + b["emb"](emb)
            h = h + b["l2"](nn.functional.silu(r))
        e = self.out(h)[:, 0].to(x.dtype)
        if self.quadratic:
            e = e + 0.5 * self.quadratic * (x**2).sum(1)
        return e


class EnergyScoreNet(nn.Module):
    """``forward(x, t[, cond]) = -grad_x E(x, t[, cond])`` (T-EBM-1): a score network made from an energy.

    Use it as ``Denoiser(EnergyScoreNet(energy), process, prediction="score")``. With
    ``output="eps"`` it returns ``+grad_x E`` instead, for ``prediction="eps"``: then
    ``score = -eps/sigma = -grad_x (E / sigma(t))``, i.e. the model's energy is ``E(x, t) / sigma(t)``
    (NCSNv2's ``1/sigma`` output scaling, which keeps the network's output of unit size at every noise level).

    Under ``torch.no_grad`` the gradient is taken with gradients enabled locally and the result is detached;
    otherwise it is taken with ``create_graph=True`` so that a loss on the score reaches the energy's
    parameters (and, for exact or sliced score matching, can be differentiated again in ``x``).
    """

    OUTPUTS = ("score", "eps")

    def __init__(self, energy: nn.Module, output: str = "score"):
        super().__init__()
        if output not in self.OUTPUTS:
            raise ValueError(f"unknown output {output!r}; allowed: {', '.join(self.OUTPUTS)}")
        self.energy, self.output = energy, output

    def forward(self, x: Tensor, t: Tensor | float | None = None, cond: Tensor | None = None) -> Tensor:
        training_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            xg = x if (training_graph and x.requires_grad) else x.detach().requires_grad_(True)
            e = self.energy(xg, t) if cond is None else self.energy(xg, t, cond)
            (grad,) = torch.autograd.grad(e.sum(), xg, create_graph=training_graph)
        out = -grad if self.output == "score" else grad
        return out if training_graph else out.detach()


def energy_score_net(dim: int | None = None, hidden: int = 128, depth: int = 3, emb_dim: int = 64,
                     time_scale: float | None = None, num_classes: int | None = None, prediction: str = "score",
                     quadratic: float = 0.0, **_ignored) -> EnergyScoreNet:
    """Config factory registered as ``NETS["energy"]``: an :class:`EnergyNet` wrapped to output what the
    model section's ``prediction`` asks (``score``: ``-grad E``; ``eps``: ``+grad E``, energy ``E/sigma``).

    ``dim`` is the data dimension (the ``model.dim`` config key); ``time_scale=None`` means 1000 (``t`` in
    [0, 1]). Other model-section keys are accepted and ignored.
    """
    if dim is None:
        raise ValueError("net 'energy' needs the data dimension: set model.dim (e.g. --set model.dim=2)")
    if prediction not in EnergyScoreNet.OUTPUTS:
        raise ValueError(f"net 'energy' predicts a score; use model.prediction=score or eps, got {prediction!r}")
    energy = EnergyNet(int(dim), int(hidden), int(depth), 1000.0 if time_scale is None else float(time_scale),
                       int(emb_dim), num_classes=num_classes, quadratic=float(quadratic))
    return EnergyScoreNet(energy, output=prediction)
