"""Langevin dynamics, energy models and annealed Langevin (THEORY T-EBM-1..6, T-NCSN-2)."""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.nets.energy import EnergyNet, EnergyScoreNet, energy_score_net
from torchdiffusion.samplers.dynamics import (
    annealed_step_sizes,
    langevin,
    langevin_step,
    simulate_sde,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def se_var(x: torch.Tensor) -> float:
    """Standard error of the sample variance (from the fourth central moment)."""
    c = (x - x.mean()) ** 2
    return float(c.std() / math.sqrt(len(x)))


# --- T-EBM-1: energy -> score ---------------------------------------------------------------------------
class Quadratic(torch.nn.Module):
    def __init__(self, P: torch.Tensor, const: float = 0.0):
        super().__init__()
        self.P, self.const = P, const

    def forward(self, x, t=None):
        return 0.5 * torch.einsum("bi,ij,bj->b", x, self.P, x) + self.const


def test_energy_score_is_minus_grad_and_ignores_constants():  # T-EBM-1
    P = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=D)
    x = torch.randn(7, 2, dtype=D, generator=gen())
    s = EnergyScoreNet(Quadratic(P))(x)
    torch.testing.assert_close(s, -x @ P, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(EnergyScoreNet(Quadratic(P, const=123.0))(x), s, rtol=0, atol=0)
    # "eps" output is +grad E
    torch.testing.assert_close(EnergyScoreNet(Quadratic(P), output="eps")(x), x @ P, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="allowed"):
        EnergyScoreNet(Quadratic(P), output="energy")


def test_energy_net_score_matches_autograd_and_trains_under_grad():  # T-EBM-1
    torch.manual_seed(0)
    e = EnergyNet(dim=2, hidden=16, depth=2, time_scale=10.0).double()
    net = EnergyScoreNet(e)
    x = torch.randn(5, 2, dtype=D, generator=gen(1))
    t = torch.rand(5, dtype=D, generator=gen(2))
    xr = x.clone().requires_grad_(True)
    ref = -torch.autograd.grad(e(xr, t).sum(), xr)[0]
    with torch.no_grad():  # samplers run without gradients: the net enables them locally
        s0 = net(x, t)
    assert not s0.requires_grad
    torch.testing.assert_close(s0, ref, rtol=1e-12, atol=1e-12)
    # with gradients on, the score is differentiable in the parameters (denoising score matching trains E)
    loss = (net(x, t) ** 2).sum()
    loss.backward()
    assert float(e.inp.weight.grad.abs().sum()) > 0 and float(e.time.mlp[0].weight.grad.abs().sum()) > 0
    assert e.out[1].bias.grad is None  # a constant shift of E does not change the score
    # and in x (exact / sliced score matching differentiate the score again)
    xg = x.clone().requires_grad_(True)
    (jac_row,) = torch.autograd.grad(net(xg, t)[:, 0].sum(), xg)
    assert torch.isfinite(jac_row).all() and jac_row.abs().sum() > 0


def test_energy_net_in_denoiser_and_factory():  # T-EBM-1 via Denoiser(prediction="score")
    proc = td.VE(sigma_min=0.01, sigma_max=5.0)
    net = energy_score_net(dim=2, hidden=16, depth=1, prediction="score")
    model = td.Denoiser(net, proc, prediction="score")
    x = torch.randn(4, 2, generator=gen())
    with torch.no_grad():
        x0, eps = model.predict(x, torch.tensor(0.5, dtype=D))
        assert x0.shape == x.shape and torch.isfinite(eps).all()
        out = td.sample(model, x * 5, "euler_maruyama", 5, generator=gen(1))
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="model.dim"):
        energy_score_net(hidden=8)
    with pytest.raises(ValueError, match="prediction"):
        energy_score_net(dim=2, prediction="x0")


# --- T-EBM-6: Gaussian facts ---------------------------------------------------------------------------------
def test_gaussian_density_gradient_has_a_minus_sign():  # T-EBM-6
    mu = torch.tensor([0.3, -1.0], dtype=D)
    S = torch.tensor([[1.0, 0.4], [0.4, 0.5]], dtype=D)
    gm = td.GaussianMixture(torch.ones(1), mu[None], S[None])
    x = torch.randn(6, 2, dtype=D, generator=gen()).requires_grad_(True)
    logN = gm.log_prob(x)
    ref = torch.distributions.MultivariateNormal(mu, S).log_prob(x)
    torch.testing.assert_close(logN, ref, rtol=1e-10, atol=1e-10)
    gradN = torch.autograd.grad(logN.exp().sum(), x)[0]
    formula = -logN.exp()[:, None] * torch.linalg.solve(S, (x - mu).T).T
    torch.testing.assert_close(gradN, formula.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gm.score(x.detach()), (formula / logN.exp()[:, None]).detach(), rtol=1e-10, atol=1e-12)


# --- T-EBM-2 / T-EBM-3: the step and its bias ------------------------------------------------------------------
def test_langevin_step_convention_and_annealed_mapping():  # T-EBM-2
    x = torch.randn(5, 3, dtype=D, generator=gen())
    s, z = torch.randn_like(x), torch.randn_like(x)
    torch.testing.assert_close(langevin_step(x, s, 0.3, z), x + 0.3 * s + math.sqrt(0.6) * z)
    # 003's x + eps/2 s + sqrt(eps) z is the same step with c = eps/2: annealed Langevin with one level, one step
    eps, sig = 0.02, 0.5
    # data N(0, 1 - sig^2) noised by EDM at sigma = sig: the score is exactly -y
    model = td.Denoiser(td.GaussianMixture.gaussian(0.0, 1 - sig**2, dim=3).net(td.EDM(), "eps"), td.EDM())
    out = td.sample(model, x, "annealed_langevin", grid=torch.tensor([sig, 0.0], dtype=D), n_steps_each=1, eps=eps,
                    generator=gen(3), final_denoise=False)
    z = torch.randn(x.shape, generator=gen(3), dtype=D)
    torch.testing.assert_close(out, x + (eps / 2) * (-x) + math.sqrt(eps) * z, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(annealed_step_sizes([2.0, 1.0, 0.5], 0.1), torch.tensor([1.6, 0.4, 0.1], dtype=D))


def test_ula_stationary_variance_bias():  # T-EBM-3
    v, c, N = 2.0, 0.1, 200_000
    exact = v / (1 - c / (2 * v))
    assert abs(exact - 2.0513) < 1e-4
    x = math.sqrt(v) * torch.randn(N, 1, dtype=D, generator=gen())
    out = langevin(lambda y: -y / v, x, step_size=c, n_steps=300, generator=gen(1))
    var, se = float(out.var()), se_var(out)
    assert abs(var - exact) < 4 * se
    assert abs(var - v) > 4 * se  # the bias is real
    # noise sqrt(c) instead of sqrt(2c) would give about v/2: the recursion x' = (1-c/v)x + sqrt(c) xi
    r = 1 - c / v
    assert abs(c / (1 - r**2) - v / 2) < 0.06


def test_ula_two_dim_gaussian_stationary_covariance_and_mala():  # T-EBM-3 (matrix form), MALA
    mu = torch.tensor([1.0, -0.5], dtype=D)
    S = torch.tensor([[1.0, 0.6], [0.6, 2.0]], dtype=D)
    P = torch.linalg.inv(S)
    c, N = 0.2, 30_000
    gm = td.GaussianMixture(torch.ones(1), mu[None], S[None])
    x0, _ = gm.sample(N, gen())
    out = langevin(gm.score, x0, step_size=c, n_steps=100, generator=gen(1))
    # ULA stationary covariance solves S' = (I - cP) S' (I - cP) + 2c I: in P's eigenbasis 1/(p (1 - c p / 2))
    lam, U = torch.linalg.eigh(P)
    S_ula = U @ torch.diag(1 / (lam * (1 - c * lam / 2))) @ U.T
    cov = torch.cov(out.T)
    for i, j in [(0, 0), (1, 1), (0, 1)]:
        prod = (out[:, i] - out[:, i].mean()) * (out[:, j] - out[:, j].mean())
        se = float(prod.std()) / math.sqrt(N)
        assert abs(float(cov[i, j] - S_ula[i, j])) < 4 * se
    assert abs(float(cov[1, 1] - S[1, 1])) > 4 * se_var(out[:, 1])
    assert (out.mean(0) - mu).abs().max() < 4 * float(S.diag().max().sqrt()) / math.sqrt(N)
    # MALA removes the bias
    rates = []
    out = langevin(gm.score, x0, step_size=c, n_steps=100, generator=gen(2), metropolis=True,
                   log_prob=gm.log_prob, callback=lambda d: rates.append(d["accept"]))
    assert abs(float(out[:, 1].var()) - 2.0) < 4 * se_var(out[:, 1])
    assert 0.5 < sum(rates) / len(rates) < 1.0
    with pytest.raises(ValueError, match="log_prob"):
        langevin(gm.score, x0, step_size=c, n_steps=1, metropolis=True)
    with pytest.raises(ValueError, match="step_size"):
        langevin(gm.score, x0, step_size=-1.0, n_steps=1)


def test_two_mode_mixture_is_stationary_from_the_target():  # T-EBM-4 (invariance), well-separated modes
    gm = td.GaussianMixture(torch.tensor([0.2, 0.8]), torch.tensor([[-5.0], [5.0]]), torch.tensor([1.0, 1.0]))
    N, c = 40_000, 0.01
    x0, _ = gm.sample(N, gen())
    out = langevin(gm.score, x0, step_size=c, n_steps=200, generator=gen(1))
    left = float((out < 0).to(D).mean())
    assert abs(left - 0.2) < 4 * math.sqrt(0.16 / N)
    right = out[out > 0]
    # within-mode ULA bias: variance 1 / (1 - c/2)
    assert abs(float(right.var()) - 1 / (1 - c / 2)) < 4 * se_var(right) + 1e-3
    assert abs(float(right.mean()) - 5.0) < 4 / math.sqrt(len(right))


def test_stein_identity_for_langevin_generator():  # T-EBM-4 (a): E_p[grad log p . grad f + lap f] = 0
    gm = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.5], [1.5, -0.5]]),
                            torch.tensor([[0.3, 0.6], [0.5, 0.2]]))
    x, _ = gm.sample(200_000, gen())
    s = gm.score(x)
    a = torch.tensor([0.7, -1.3], dtype=D)
    u = x @ a
    terms = {"sin": (s @ a) * torch.cos(u) - (a @ a) * torch.sin(u),
             "norm2": (s * 2 * x).sum(1) + 2 * 2}
    for k, v in terms.items():
        assert abs(float(v.mean())) < 4 * float(v.std()) / math.sqrt(len(v)), k
    # the wrong sign of the score breaks it
    bad = (-s * 2 * x).sum(1) + 4
    assert abs(float(bad.mean())) > 4 * float(bad.std()) / math.sqrt(len(bad))


def test_ou_convergence_law():  # T-EBM-4 (b)
    v, m0, v0, c, N = 0.5, 2.0, 0.1, 2e-3, 50_000
    x = m0 + math.sqrt(v0) * torch.randn(N, 1, dtype=D, generator=gen())
    out = langevin(lambda y: -y / v, x, step_size=c, n_steps=500, generator=gen(1))
    t = 1.0
    mean, var = m0 * math.exp(-t / v), v + (v0 - v) * math.exp(-2 * t / v)
    assert abs(float(out.mean()) - mean) < 4 * math.sqrt(var / N) + 2 * c
    assert abs(float(out.var()) - var) < 4 * se_var(out) + 2 * c


@pytest.mark.parametrize("g", [0.5, math.sqrt(2.0), 3.0])
def test_zero_flux_drift_keeps_the_mixture(g):  # T-EBM-5
    gm = td.GaussianMixture(torch.tensor([0.4, 0.6]), torch.tensor([[-1.0], [1.0]]), torch.tensor([0.2, 0.3]))
    N, h = 40_000, 2e-3 / g**2
    x0, _ = gm.sample(N, gen())
    out = simulate_sde(lambda y, t: 0.5 * g**2 * gm.score(y), lambda t: g, x0, 0.0, 100 * h, 100,
                       generator=gen(1))
    # the same chain as Langevin with c = h g^2 / 2
    out2 = langevin(gm.score, x0, step_size=h * g**2 / 2, n_steps=100, generator=gen(1))
    torch.testing.assert_close(out, out2, rtol=1e-10, atol=1e-10)
    ex, _ = gm.sample(N, gen(2))
    assert abs(float(out.mean() - ex.mean())) < 4 * math.sqrt(2 * float(ex.var()) / N)
    assert abs(float(out.var() - ex.var())) < 4 * math.sqrt(se_var(out) ** 2 + se_var(ex) ** 2) + 2e-3


def test_nonreversible_drift_also_keeps_gaussian():  # T-EBM-5 (zero flux is sufficient, not necessary)
    J = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=D)
    N, h = 50_000, 2e-3
    x0 = torch.randn(N, 2, dtype=D, generator=gen())
    out = simulate_sde(lambda y, t: -y + y @ J.T, lambda t: math.sqrt(2.0), x0, 0.0, 0.5, 250, generator=gen(1))
    cov = torch.cov(out.T)
    assert (cov - torch.eye(2, dtype=D)).abs().max() < 4 * math.sqrt(2 / N) + 2 * h
    # while the drift alone (no noise) would shrink nothing but rotate: a dropped sqrt(2) breaks invariance
    out_bad = simulate_sde(lambda y, t: -y + y @ J.T, lambda t: 1.0, x0, 0.0, 0.5, 250, generator=gen(1))
    assert float(torch.cov(out_bad.T)[0, 0]) < 1 - 10 * math.sqrt(2 / N)


# --- T-NCSN-2: annealed Langevin vs plain Langevin ----------------------------------------------------------
def test_annealed_langevin_recovers_mixture_weights():  # T-NCSN-2
    gm = td.GaussianMixture(torch.tensor([0.2, 0.8]), torch.tensor([[-5.0], [5.0]]), torch.tensor([1.0, 1.0]))
    proc = td.EDM(sigma_min=0.5, sigma_max=30.0)  # t = sigma: gm.score(x, proc, sigma) is the noised score
    N = 10_000
    x = 16 * torch.rand(N, 1, dtype=D, generator=gen()) - 8

    model = td.Denoiser(gm.net(proc, "eps"), proc)

    plain = langevin(gm.score, x, step_size=0.05, n_steps=1000, generator=gen(1))
    frac_plain = float((plain < 0).to(D).mean())
    grid = torch.cat([torch.logspace(math.log10(20.0), 0.0, 10, dtype=D), torch.zeros(1, dtype=D)])
    ann = td.sample(model, x, "annealed_langevin", grid=grid, eps=0.1, n_steps_each=100, generator=gen(2),
                    final_denoise=False)
    frac = float((ann < 0).to(D).mean())
    assert abs(frac_plain - 0.2) > 0.15  # stuck near the uniform start's 50/50 split
    from_mode = langevin(gm.score, 5 + torch.randn(N, 1, dtype=D, generator=gen(4)), step_size=0.05, n_steps=1000,
                         generator=gen(5))
    assert float((from_mode < 0).to(D).mean()) < 0.01  # started in one mode, it never finds the other
    assert abs(frac - 0.2) < 0.04  # THEORY's recipe gives ~0.22: mode weights freeze while sigma ~ 3-4


def test_annealed_langevin_longer_schedule_within_standard_errors():  # T-NCSN-2, 3000 NFE (about 5 s)
    gm = td.GaussianMixture(torch.tensor([0.2, 0.8]), torch.tensor([[-5.0], [5.0]]), torch.tensor([1.0, 1.0]))
    proc = td.EDM(sigma_min=0.5, sigma_max=30.0)
    N = 20_000
    x = 16 * torch.rand(N, 1, dtype=D, generator=gen()) - 8
    grid = torch.cat([torch.logspace(math.log10(20.0), 0.0, 10, dtype=D), torch.zeros(1, dtype=D)])
    ann = td.sample(td.Denoiser(gm.net(proc, "eps"), proc), x, "annealed_langevin", grid=grid, eps=0.5,
                    n_steps_each=300, generator=gen(2), final_denoise=False)
    assert abs(float((ann < 0).to(D).mean()) - 0.2) < 3 * math.sqrt(0.16 / N)  # measured: 0.4 SE
