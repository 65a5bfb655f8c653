"""Score-matching losses: explicit (Hyvarinen), sliced, denoising, NCSN (THEORY T-SM-1..5, T-NCSN-1)."""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.losses.score import (
    denoising_score_matching_loss,
    dsm_loss,
    exact_score_matching_loss,
    ncsn_loss,
    ncsn_sigmas,
    sample_projections,
    sliced_score_matching_loss,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within(est: torch.Tensor, truth: float, k: float = 4.0) -> bool:
    """Mean of per-sample values within k standard errors of ``truth``."""
    return abs(float(est.mean()) - truth) <= k * float(est.std()) / math.sqrt(len(est))


class TanhMLP(torch.nn.Module):
    def __init__(self, d: int, h: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, d)).double()

    def forward(self, x):
        return self.net(x)


# --- T-SM-1, T-SM-2 -------------------------------------------------------------------------------------------
def test_hyvarinen_identity_with_tanh_mlp():  # T-SM-2 (a)
    mu = torch.tensor([0.5, -1.0], dtype=D)
    S = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=D)
    gm = td.GaussianMixture(torch.ones(1), mu[None], S[None])
    x, _ = gm.sample(50_000, gen())
    s_theta = TanhMLP(2)
    esm = exact_score_matching_loss(s_theta, x, reduction="none")
    half_j = 0.5 * ((s_theta(x) - gm.score(x)) ** 2).sum(1)
    diff = (half_j - esm).detach()
    assert within(diff, 0.5 * float(torch.linalg.inv(S).trace()))
    assert not within(diff, 0.0)


def test_exact_trace_equals_finite_differences():  # T-SM-2 (b)
    s_theta = TanhMLP(3, seed=1)
    x = torch.randn(4, 3, dtype=D, generator=gen())
    esm = exact_score_matching_loss(s_theta, x, reduction="none")
    s = s_theta(x).detach()
    h = 1e-5
    tr = torch.zeros(4, dtype=D)
    for i in range(3):
        e = torch.zeros(3, dtype=D)
        e[i] = h
        tr += ((s_theta(x + e) - s_theta(x - e))[:, i] / (2 * h)).detach()
    torch.testing.assert_close(esm.detach(), tr + 0.5 * (s**2).sum(1), rtol=1e-5, atol=1e-8)


def test_score_matching_on_gaussian_family_gives_the_mle():  # T-SM-1, T-SM-2 (c)
    gm = td.GaussianMixture(torch.ones(1), torch.tensor([[1.0, -2.0]]),
                            torch.tensor([[[2.0, 0.8], [0.8, 1.0]]], dtype=D))
    x, _ = gm.sample(2000, gen())
    mu = torch.zeros(2, dtype=D, requires_grad=True)
    L = torch.eye(2, dtype=D).requires_grad_(True)  # P = L L^T

    def loss():
        P = L @ L.T
        return exact_score_matching_loss(lambda y: -(y - mu) @ P, x)

    opt = torch.optim.LBFGS([mu, L], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        val = loss()
        val.backward()
        return val

    opt.step(closure)
    S_biased = torch.cov(x.T, correction=0)
    torch.testing.assert_close(mu.detach(), x.mean(0), rtol=0, atol=1e-4)
    torch.testing.assert_close((L @ L.T).detach(), torch.linalg.inv(S_biased), rtol=0, atol=1e-4)
    P_true = torch.linalg.inv(torch.tensor([[2.0, 0.8], [0.8, 1.0]], dtype=D))
    assert torch.allclose(-(x - gm.means[0]) @ P_true, gm.score(x), atol=1e-12)


def test_explicit_score_matching_over_gaussian_family():  # T-SM-1
    """Data N(m, v), model s = -(x - mu)/tau: J_ESM = v (1/v - 1/tau)^2 + ((mu - m)/tau)^2, zero only at the
    true parameters; the Hyvarinen loss equals J/2 minus the model-independent E||grad log p||^2 / 2 = 1/(2v)."""
    m, v = 0.4, 0.7
    x = m + math.sqrt(v) * torch.randn(200_000, 1, dtype=D, generator=gen())
    best = None
    for mu in (0.0, 0.4, 0.8):
        for tau in (0.5, 0.7, 1.0):
            closed = v * (1 / v - 1 / tau) ** 2 + ((mu - m) / tau) ** 2
            j = (((x - m) / v - (x - mu) / tau) ** 2)[:, 0]
            assert abs(float(j.mean()) - closed) < 4 * float(j.std()) / math.sqrt(len(j)) + 1e-12
            hyv = exact_score_matching_loss(lambda y, mu=mu, tau=tau: -(y - mu) / tau, x, reduction="none")
            assert within((0.5 * j - hyv).detach(), 1 / (2 * v))
            best = min(best or (closed, mu, tau), (closed, mu, tau))
    assert best == (0.0, 0.4, 0.7)


# --- T-SM-3: denoising score matching -----------------------------------------------------------------------
@pytest.mark.parametrize("model", ["linear", "mlp", "zero"])
def test_dsm_minus_esm_is_model_independent(model):  # T-SM-3 (a)
    m, v, sigma, d, N = 0.7, 0.5, 0.4, 2, 200_000
    gm = td.GaussianMixture.gaussian(m, v, dim=d)
    proc = td.EDM(sigma_min=0.01, sigma_max=10.0)  # x~ = x + sigma e: oracle score of q_sigma at t = sigma
    x, _ = gm.sample(N, gen())
    s_theta = {"linear": lambda y: -0.8 * y + 0.3, "mlp": TanhMLP(d, seed=3), "zero": lambda y: 0 * y}[model]
    g = gen(5)
    state = g.get_state()
    dsm = denoising_score_matching_loss(s_theta, x, sigma, g, reduction="none").detach()
    e = torch.randn(x.shape, generator=torch.Generator().set_state(state), dtype=D)
    xt = x + sigma * e
    q_score = gm.score(xt, proc, torch.full((N,), sigma, dtype=D))
    j_esm = ((s_theta(xt) - q_score) ** 2).sum(1).detach()
    # J_DSM - J_ESM = d (1/sigma^2 - 1/(v + sigma^2)) with J = E||.||^2 (the loss carries a factor 1/2)
    assert within(2 * dsm - j_esm, d * (1 / sigma**2 - 1 / (v + sigma**2)))
    # and against Hyvarinen's objective on the noisy samples the constant is d / (2 sigma^2)
    esm = exact_score_matching_loss(s_theta, xt[:20_000], reduction="none").detach()
    assert within(dsm[:20_000] - esm, d / (2 * sigma**2))


def test_dsm_least_squares_optimum():  # T-SM-3 (b)
    m, v, sigma, N = 0.7, 0.5, 0.4, 400_000
    x = m + math.sqrt(v) * torch.randn(N, 1, dtype=D, generator=gen())
    e = torch.randn(N, 1, dtype=D, generator=gen(1))
    xt = x + sigma * e
    A = torch.cat([xt, torch.ones_like(xt)], 1)
    a, b = torch.linalg.lstsq(A, -e / sigma).solution[:, 0].tolist()
    assert abs(a + 1 / (v + sigma**2)) < 0.01 and abs(b - m / (v + sigma**2)) < 0.01
    # the DSM loss is minimal there: moving (a, b) raises it
    g = gen(2)
    st = g.get_state()

    def L(a_, b_):
        return float(denoising_score_matching_loss(lambda y: a_ * y + b_, x, sigma, torch.Generator().set_state(st)))

    best = L(a, b)
    assert all(L(a + da, b + db) > best for da, db in [(0.05, 0), (-0.05, 0), (0, 0.05), (0, -0.05)])


# --- T-SM-4: sliced score matching and Hutchinson ----------------------------------------------------------------
def test_hutchinson_mean_and_variance():  # T-SM-4 (a), (b)
    torch.manual_seed(0)
    d, N = 5, 400_000
    A = torch.randn(d, d, dtype=D, generator=gen(1))
    As = (A + A.T) / 2
    for dist, var in [("gaussian", 2 * (As**2).sum()), ("rademacher", 2 * ((As**2).sum() - (A.diag() ** 2).sum()))]:
        v = sample_projections(torch.zeros(N, d, dtype=D), dist, gen(2))
        if dist == "rademacher":
            assert set(v.unique().tolist()) == {-1.0, 1.0}
        q = torch.einsum("ni,ij,nj->n", v, A, v)
        assert within(q, float(A.trace()))
        se_var = float(((q - q.mean()) ** 2).std()) / math.sqrt(N)
        assert abs(float(q.var()) - float(var)) < 4 * se_var
    with pytest.raises(ValueError, match="allowed"):
        sample_projections(torch.zeros(2, 2), "uniform")


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
@pytest.mark.parametrize("vr", [False, True])
def test_sliced_score_matching_is_unbiased(dist, vr):  # T-SM-4 (c)
    s_theta = TanhMLP(3, seed=2)
    x = torch.randn(40_000, 3, dtype=D, generator=gen())
    exact = exact_score_matching_loss(s_theta, x, reduction="none").detach()
    ssm = sliced_score_matching_loss(s_theta, x, dist=dist, variance_reduced=vr, generator=gen(1),
                                     reduction="none").detach()
    assert within(ssm - exact, 0.0)
    # averaging projections reduces the variance
    ssm4 = sliced_score_matching_loss(s_theta, x[:10_000], n_projections=4, dist=dist, variance_reduced=vr,
                                      generator=gen(2), reduction="none").detach()
    assert (ssm4 - exact[:10_000]).var() < (ssm[:10_000] - exact[:10_000]).var()
    # gradients flow to the parameters
    sliced_score_matching_loss(s_theta, x[:64], dist=dist, generator=gen(3)).backward()
    assert s_theta.net[0].weight.grad.abs().sum() > 0


# --- T-SM-5: noise-prediction loss and its constant -----------------------------------------------------------
@pytest.mark.parametrize("which", [0, 1])
def test_eps_loss_is_fisher_divergence_plus_constant(which):  # T-SM-5
    m, v, sigma, N = -0.3, 0.6, 0.8, 200_000
    gm = td.GaussianMixture.gaussian(m, v)
    proc = td.EDM(sigma_min=0.01, sigma_max=10.0)
    nets = [lambda y, t: 0.2 * y - 0.1, lambda y, t: torch.tanh(y)]
    model = td.Denoiser(nets[which], proc, prediction="eps")
    x, _ = gm.sample(N, gen())
    e = torch.randn(N, 1, dtype=D, generator=gen(1))
    t = torch.full((N,), sigma, dtype=D)
    lhs = dsm_loss(model, x, weighting="eps", t=t, eps=e, reduction="none")
    y = x + sigma * e
    rhs = ((nets[which](y, t) + sigma * gm.score(y, proc, t)) ** 2)[:, 0]
    assert within(lhs - rhs, v / (v + sigma**2))


# --- T-NCSN-1 -------------------------------------------------------------------------------------------------
def test_ncsn_ladder_and_loss_identity():  # T-NCSN-1
    sig = ncsn_sigmas(5.0, 0.01, 10)
    ratio = sig[1:] / sig[:-1]
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-12, atol=0)
    assert float(sig[0]) == pytest.approx(5.0) and float(sig[-1]) == pytest.approx(0.01)
    # lambda(sigma) 1/2 ||s + (x~ - x)/sigma^2||^2 = 1/2 ||sigma s + e||^2 on random tensors
    s, e, x = (torch.randn(8, 3, dtype=D, generator=gen(i)) for i in range(3))
    for sg in (0.01, 0.3, 5.0):
        xt = x + sg * e
        torch.testing.assert_close(sg**2 * 0.5 * ((s + (xt - x) / sg**2) ** 2).sum(1),
                                   0.5 * ((sg * s + e) ** 2).sum(1), rtol=1e-12, atol=1e-12)
    # ncsn_loss equals the explicit NCSN formula on the same draws (score net, EDM process: t = sigma)
    proc = td.EDM(sigma_min=0.01, sigma_max=5.0)
    net = TanhMLP(3, seed=4)
    model = td.Denoiser(lambda y, t: net(y) * (1 + t[:, None]), proc, prediction="score")
    x0 = torch.randn(64, 3, dtype=D, generator=gen(7))
    g = gen(9)
    st = g.get_state()
    loss = ncsn_loss(model, x0, sig, generator=g, reduction="none")
    g2 = torch.Generator().set_state(st)
    idx = torch.randint(0, len(sig), (64,), generator=g2)
    eps = torch.randn(x0.shape, generator=g2, dtype=D)
    sg = sig[idx][:, None]
    xt = x0 + sg * eps
    s_hat = net(xt) * (1 + sg)
    ref = sg[:, 0] ** 2 * 0.5 * ((s_hat + (xt - x0) / sg**2) ** 2).sum(1)
    torch.testing.assert_close(loss, ref, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError):
        ncsn_sigmas(0.01, 5.0, 10)
