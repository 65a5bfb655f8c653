"""Losses (axis 3 of docs/design.md): plain functions ``loss(model, x0, ...) -> scalar tensor``.

Weighted denoising score matching covers L_simple (DDPM Algorithm 1), the score-SDE weightings
``lambda(t) = sigma^2`` and ``g^2`` (likelihood weighting), SNR / min-SNR weightings and EDM's weighting.
Every weighting is written once, as a weight ``w(t)`` on the eps-error ``||eps - eps_hat||^2``:

``||score - score*||^2 = ||eps - eps_hat||^2 / sigma^2``,  ``||x0 - x0_hat||^2 = ||eps - eps_hat||^2 / SNR``,
``||v - v_hat||^2 = ((alpha^2 + sigma^2)/alpha)^2 ||eps - eps_hat||^2`` (THEORY T-ALG-3, T-SDE-8, B-8).

The error itself is measured in the network's native space (what it predicts), and rescaled, so that no
ill-conditioned conversion enters the gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from torchdiffusion._tensor import sample_projections
from torchdiffusion.parameterization.denoiser import Denoiser
from torchdiffusion.processes import Process, as_time, times_from_ve_sigmas

WEIGHTINGS = ("native", "eps", "x0", "v", "g2", "min_snr", "edm")


def sample_times(process: Process, n: int, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Training times: ``k ~ U{0..T-1}`` for DDPM (Algorithm 1), ``t ~ U(t_min, t_max)`` otherwise."""
    if process.discrete:
        return torch.randint(0, int(process.t_max) + 1, (n,), generator=generator).to(device, torch.float64)
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return (process.t_min + (process.t_max - process.t_min) * u).to(device)


def _native_factor(prediction: str, a: Tensor, s: Tensor) -> Tensor:
    """``F`` with ``||native error||^2 = F ||eps error||^2``."""
    if prediction == "eps":
        return torch.ones_like(a)
    if prediction == "x0":
        return (s / a) ** 2
    if prediction == "v":
        return ((a**2 + s**2) / a) ** 2
    return 1 / s**2  # score


def eps_weight(process: Process, t: Tensor, weighting: str, *, prediction: str = "eps",
               min_snr_gamma: float = 5.0, sigma_data: float = 0.5) -> Tensor:
    """Weight ``w(t)`` on ``||eps - eps_hat||^2`` of each weighting (float64, shape of t).

    ``native``: plain MSE in the network's own prediction space; ``eps``: L_simple; ``x0``: ``1/SNR``;
    ``v``: ``((alpha^2+sigma^2)/alpha)^2``; ``g2``: ``g(t)^2 / sigma^2`` (likelihood weighting,
    ``lambda = g^2`` on the score); ``min_snr``: ``min(SNR, gamma)/SNR`` (Hang et al. 2023, B-14);
    ``edm``: ``(s^2 + sd^2)/sd^2`` with ``s = sigma/alpha`` (``1/c_out^2`` on the x0 error, B-9).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; allowed: {', '.join(WEIGHTINGS)}")
    a, s = process.alpha(t), process.sigma(t)
    if weighting == "native":
        return _native_factor(prediction, a, s)
    if weighting == "eps":
        return torch.ones_like(a)
    if weighting == "x0":
        return (s / a) ** 2
    if weighting == "v":
        return ((a**2 + s**2) / a) ** 2
    if weighting == "g2":
        return process.sde_coefficients(t)[1] ** 2 / s**2
    if weighting == "min_snr":
        snr = (a / s) ** 2
        return snr.clamp(max=min_snr_gamma) / snr
    return ((s / a) ** 2 + sigma_data**2) / sigma_data**2


def dsm_loss(model: Denoiser, x0: Tensor, *, weighting: str = "native", t: Tensor | None = None,
             eps: Tensor | None = None, cond=None, generator: torch.Generator | None = None,
             min_snr_gamma: float = 5.0, reduction: str = "mean") -> Tensor:
    """Weighted denoising score matching ``E_t w(t) ||eps - eps_theta(alpha x0 + sigma eps, t)||^2``.

    With DDPM, ``weighting="eps"`` (or ``"native"`` for an eps-net) is L_simple of Algorithm 1. The squared
    error is averaged over data dimensions. ``reduction="none"`` returns one value per example.
    """
    proc = model.process
    n = x0.shape[0]
    if t is None:
        t = sample_times(proc, n, generator, x0.device)
    t = as_time(t).to(x0.device)
    if t.ndim == 0:
        t = t.expand(n)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    x_t = proc.add_noise(x0, t, eps)
    native = "x0" if model.precond == "edm" else model.prediction
    pred = model.native(x_t, t, cond)
    target = model.as_prediction(x_t, t, x0, eps, native)
    a, s = proc.alpha(t), proc.sigma(t)
    w = eps_weight(proc, t, weighting, prediction=native, min_snr_gamma=min_snr_gamma,
                   sigma_data=model.sigma_data) / _native_factor(native, a, s)
    err = ((pred - target) ** 2).flatten(1).mean(1)
    per = w.to(err.dtype) * err
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
    return per.mean()


def simple_loss(model: Denoiser, x0: Tensor, **kw) -> Tensor:
    """L_simple of DDPM (Algorithm 1): ``E ||eps - eps_theta(x_t, t)||^2`` with uniform ``t``."""
    return dsm_loss(model, x0, weighting="eps", **kw)


# ------------------------------------------------------------------------------------------------------------
# Score matching without the diffusion machinery (003 eqs. 4-6, Hyvarinen 2005, Vincent 2011, Song et al. 2019)
# These take any ``score_fn(x) -> grad log p(x)`` and follow the textbook normalisation: squared norms are
# summed over data dimensions and averaged over the batch.
# ------------------------------------------------------------------------------------------------------------
def _reduce(per: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return per
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; allowed: mean, none")
    return per.mean()


def _sq(v: Tensor) -> Tensor:
    return (v**2).flatten(1).sum(1)


def _with_grad(x: Tensor) -> Tensor:
    return x if x.requires_grad else x.detach().requires_grad_(True)


def exact_score_matching_loss(score_fn, x: Tensor, *, reduction: str = "mean") -> Tensor:
    """Hyvarinen's objective ``E[tr grad_x s(x) + 1/2 ||s(x)||^2]`` (003 eq. 5, T-SM-2).

    Equals ``1/2 E||s - grad log p||^2`` up to the model-independent ``-1/2 E||grad log p||^2``. The Jacobian
    trace is exact: one backward pass per data dimension (``create_graph`` so the loss can be trained).
    """
    x = _with_grad(x)
    with torch.enable_grad():
        s = score_fn(x)
        sf = s.flatten(1)
        tr = torch.zeros(x.shape[0], dtype=s.dtype, device=s.device)
        for i in range(sf.shape[1]):
            (gi,) = torch.autograd.grad(sf[:, i].sum(), x, create_graph=True)
            tr = tr + gi.flatten(1)[:, i]
    return _reduce(tr + 0.5 * _sq(s), reduction)


def sliced_score_matching_loss(score_fn, x: Tensor, *, n_projections: int = 1, dist: str = "gaussian",
                               variance_reduced: bool = False, generator: torch.Generator | None = None,
                               reduction: str = "mean") -> Tensor:
    """Sliced score matching (Song et al. 2019; T-SM-4): ``E_v E_x[v^T (grad_x s) v + 1/2 (v^T s)^2]``.

    ``v^T (grad s) v`` costs one extra backward pass, ``v . grad_x (v . s)``. With ``variance_reduced`` the
    second term is its expectation ``1/2 ||s||^2`` (SSM-VR, valid since ``E[v v^T] = I``). Unbiased for
    :func:`exact_score_matching_loss`; averaged over ``n_projections`` vectors per example.
    """
    if int(n_projections) < 1:
        raise ValueError(f"n_projections must be >= 1, got {n_projections}")
    x = _with_grad(x)
    total = 0.0
    with torch.enable_grad():
        s = score_fn(x)
        for _ in range(int(n_projections)):
            v = sample_projections(x, dist, generator)
            vs = (v * s).flatten(1).sum(1)
            (gv,) = torch.autograd.grad(vs.sum(), x, create_graph=True)
            quad = (v * gv).flatten(1).sum(1)
            total = total + quad + (0.5 * _sq(s) if variance_reduced else 0.5 * vs**2)
    return _reduce(total / int(n_projections), reduction)


def denoising_score_matching_loss(score_fn, x: Tensor, sigma: float | Tensor,
                                  generator: torch.Generator | None = None, *, reduction: str = "mean") -> Tensor:
    """Vincent's denoising score matching ``1/2 E||s(x~) + (x~ - x)/sigma^2||^2``, ``x~ = x + sigma e`` (T-SM-3).

    The target ``-(x~ - x)/sigma^2`` is the score of the Gaussian kernel ``q_sigma(x~ | x)``. The loss equals
    ``1/2 E||s - grad log q_sigma||^2`` plus a model-independent constant, so its minimiser is the score of
    the noised data. ``sigma`` is a scalar or one value per example.
    """
    sig = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    if (sig <= 0).any():
        raise ValueError("sigma must be > 0")
    sig = sig.reshape(-1, *([1] * (x.ndim - 1))) if sig.ndim == 1 else sig
    e = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
    xt = x + sig * e
    return _reduce(0.5 * _sq(score_fn(xt) + e / sig), reduction)


def ncsn_sigmas(sigma_max: float, sigma_min: float, n: int) -> Tensor:
    """NCSN's geometric noise ladder ``sigma_1 = sigma_max > ... > sigma_n = sigma_min`` (constant ratio;
    T-NCSN-1), float64."""
    if not 0 < sigma_min < sigma_max or int(n) < 2:
        raise ValueError(f"need 0 < sigma_min < sigma_max and n >= 2, got {sigma_min}, {sigma_max}, {n}")
    r = torch.linspace(0, 1, int(n), dtype=torch.float64)
    return float(sigma_max) * (float(sigma_min) / float(sigma_max)) ** r


def ncsn_loss(model: Denoiser, x0: Tensor, sigmas: Tensor, *, cond=None, generator: torch.Generator | None = None,
              reduction: str = "mean") -> Tensor:
    """NCSN's multi-noise loss (Song & Ermon 2019, T-NCSN-1):
    ``(1/L) sum_i sigma_i^2 * 1/2 E||s(x~, sigma_i) + (x~ - x)/sigma_i^2||^2 = 1/2 E||eps_hat - eps||^2``.

    ``sigmas`` are VE noise levels ``sigma/alpha`` of the model's process (use a VE/EDM process for NCSN);
    each example draws one level uniformly. This is :func:`dsm_loss` with ``weighting="eps"`` at times of the
    discrete ladder, with the textbook normalisation (1/2, summed over dimensions).
    """
    sig = torch.as_tensor(sigmas, dtype=torch.float64).flatten()
    if len(sig) < 1 or (sig <= 0).any():
        raise ValueError("sigmas must be a non-empty tensor of positive noise levels")
    proc = model.process
    idx = torch.randint(0, len(sig), (x0.shape[0],), generator=generator)
    t = times_from_ve_sigmas(proc, sig[idx]).clamp(proc.t_min, proc.t_max)
    d = x0[0].numel()
    per = 0.5 * d * dsm_loss(model, x0, weighting="eps", t=t.to(x0.device), cond=cond, generator=generator,
                             reduction="none")
    return _reduce(per, reduction)


def noisy_score_matching_loss(model: Denoiser, x0: Tensor, *, method: str = "ssm", weighting: str = "eps",
                              cond=None, generator: torch.Generator | None = None, n_projections: int = 1,
                              dist: str = "gaussian", variance_reduced: bool = True) -> Tensor:
    """Exact (``method="esm"``) or sliced (``"ssm"``) score matching of a time-conditional model on the noised
    marginals: ``E_t lambda(t) J(s(., t); p_t)`` with ``x_t ~ p_t`` drawn by ``process.add_noise``.

    ``lambda(t)`` on the score error is the :func:`eps_weight` of ``weighting`` times ``sigma(t)^2`` (so the
    weighting names mean the same as for :func:`dsm_loss`: ``eps`` is ``lambda = sigma^2``).
    """
    proc = model.process
    t = sample_times(proc, x0.shape[0], generator, x0.device)
    e = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    xt = proc.add_noise(x0, t, e)

    def score_fn(x: Tensor) -> Tensor:
        return model.score(x, t, cond)

    if method == "esm":
        per = exact_score_matching_loss(score_fn, xt, reduction="none")
    elif method == "ssm":
        per = sliced_score_matching_loss(score_fn, xt, n_projections=n_projections, dist=dist,
                                         variance_reduced=variance_reduced, generator=generator, reduction="none")
    else:
        raise ValueError(f"unknown score matching method {method!r}; allowed: esm, ssm")
    native = "x0" if model.precond == "edm" else model.prediction
    lam = eps_weight(proc, t, weighting, prediction=native) * proc.sigma(t) ** 2
    return (lam.to(per.dtype) * per).mean()


def process_ncsn_sigmas(process: Process, n: int) -> Tensor:
    """The NCSN ladder spanning a process: ``n`` geometric VE noise levels ``sigma/alpha`` from ``t_max`` to
    ``t_min`` (the noise levels of the ``logsnr`` grid with ``n`` points, so that annealed Langevin on that
    grid visits exactly the training levels)."""
    hi, lo = (float(process.sigma(as_time(t)) / process.alpha(as_time(t))) for t in (process.t_max, process.t_min))
    return ncsn_sigmas(hi, lo, n)
