"""SDE theory checks (THEORY T-SDE-1..6 by Euler-Maruyama, T-SDE-8, T-SDE-9, T-SDE-12, B-10)."""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.losses.score import dsm_loss, sample_times
from torchdiffusion.samplers.dynamics import simulate_sde

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def se_var(x: torch.Tensor) -> float:
    return float(((x - x.mean()) ** 2).std()) / math.sqrt(len(x))


# --- T-SDE-1..3: the linear SDE -------------------------------------------------------------------------------
def _a(t):
    return -(1 + t)


def _b(t):
    return math.sin(2 * t)


def _g(t):
    return 0.5 + t


def _quad(f, t, n=4000):
    """Trapezoid rule of f on [0, t] (f vectorised over a float64 grid)."""
    u = torch.linspace(0, t, n + 1, dtype=D)
    y = f(u)
    return float(((y[1:] + y[:-1]) / 2).sum() * (t / n))


def closed_form(x0: float, t: float = 1.0):
    """e(t) = e^{A}(x0 + int e^{-A} b), V(t) = e^{2A} int e^{-2A} g^2 with A(t) = -(t + t^2/2) (T-SDE-1/2)."""
    A = lambda u: -(u + u**2 / 2)  # noqa: E731
    At = A(torch.tensor(t, dtype=D))
    e = math.exp(At) * (x0 + _quad(lambda u: torch.exp(-A(u)) * torch.sin(2 * u), t))
    V = math.exp(2 * At) * _quad(lambda u: torch.exp(-2 * A(u)) * (0.5 + u) ** 2, t)
    V_wrong = _quad(lambda u: torch.exp(-2 * A(u)) * (0.5 + u) ** 2, t)  # (13) without e^{2A}
    return e, V, math.exp(2 * At), V_wrong


def test_linear_sde_moments_by_euler_maruyama():  # T-SDE-1, T-SDE-2, T-SDE-3
    from scipy import stats

    N, h = 50_000, 1e-3
    drift = lambda x, t: _a(t) * x + _b(t)  # noqa: E731
    # conditional law for two starting points: mean e(t), the same variance V(t), Gaussian
    Vs = []
    for x0 in (1.0, -2.0):
        out = simulate_sde(drift, _g, torch.full((N, 1), x0, dtype=D), 0.0, 1.0, 1000, generator=gen(int(x0 + 5)))
        e, V, _, V_wrong = closed_form(x0)
        assert abs(float(out.mean()) - e) < 4 * math.sqrt(V / N) + 2 * h
        assert abs(float(out.var()) - V) < 4 * se_var(out) + 2 * h
        assert abs(float(out.var()) - V_wrong) > 0.5  # dropping e^{2A} fails
        z = ((out[:, 0] - out.mean()) / out.std()).numpy()
        assert stats.kstest(z, "norm").pvalue > 1e-3
        Vs.append(float(out.var()))
    assert abs(Vs[0] - Vs[1]) < 4 * math.sqrt(2) * se_var(out)
    # total law with X0 ~ N(1, 0.25): Var X_t = V + e^{2A} Var X0 (law of total variance, eq. 14)
    x0 = 1 + 0.5 * torch.randn(N, 1, dtype=D, generator=gen(9))
    out = simulate_sde(drift, _g, x0, 0.0, 1.0, 1000, generator=gen(10))
    e, V, e2A, _ = closed_form(1.0)
    assert abs(float(out.mean()) - e) < 4 * math.sqrt((V + e2A * 0.25) / N) + 2 * h
    assert abs(float(out.var()) - (V + e2A * 0.25)) < 4 * se_var(out) + 2 * h


@pytest.mark.parametrize("proc", [td.VP(), td.SubVP(), td.VE(sigma_min=0.01, sigma_max=5.0)], ids=str)
def test_process_sde_moments_by_euler_maruyama(proc):  # T-SDE-4, T-SDE-5, T-SDE-6 (EM moments)
    N, n, t1 = 50_000, 500, 0.5
    x0 = 1.5

    def drift(x, t):
        return float(proc.sde_coefficients(torch.tensor(t, dtype=D))[0]) * x

    def diff(t):
        return float(proc.sde_coefficients(torch.tensor(t, dtype=D))[1])

    out = simulate_sde(drift, diff, torch.full((N, 1), x0, dtype=D), 0.0, t1, n, generator=gen())
    a, s = float(proc.alpha(t1)), float(proc.sigma(t1))
    tol = 4 * s / math.sqrt(N) + 0.01 * abs(a * x0)
    assert abs(float(out.mean()) - a * x0) < tol
    assert abs(float(out.var()) - s**2) < 4 * se_var(out) + 0.01 * s**2


def test_subvp_variance_below_vp():  # T-SDE-6 inequality
    t = torch.linspace(1e-3, 1, 200, dtype=D)
    assert (td.SubVP().sigma(t) <= td.VP().sigma(t)).all()


# --- B-10: Fokker-Planck ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("proc", [td.VP(), td.SubVP(), td.VE(sigma_min=0.01, sigma_max=5.0)], ids=str)
def test_fokker_planck_residual(proc):  # B-10
    gm = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0], [1.2]]), torch.tensor([0.2, 0.1]))
    x = torch.linspace(-3, 3, 61, dtype=D)[:, None]
    ht, hx = 1e-4, 1e-3
    for t in (0.2, 0.5, 0.8):
        def p(xx, tt):
            return gm.log_prob(xx, proc, torch.full((len(xx),), tt, dtype=D)).exp()

        dp_dt = (p(x, t + ht) - p(x, t - ht)) / (2 * ht)
        f, g = (float(c) for c in proc.sde_coefficients(torch.tensor(t, dtype=D)))
        d_flux = (f * (x + hx)[:, 0] * p(x + hx, t) - f * (x - hx)[:, 0] * p(x - hx, t)) / (2 * hx)
        d2p = (p(x + hx, t) - 2 * p(x, t) + p(x - hx, t)) / hx**2
        rhs = -d_flux + 0.5 * g**2 * d2p
        rel = float((dp_dt - rhs).abs().max() / dp_dt.abs().max())
        assert rel < 1e-4, (t, rel)
        # an inconsistent diffusion (g off by 10%) is caught
        bad = -d_flux + 0.5 * (1.1 * g) ** 2 * d2p
        assert float((dp_dt - bad).abs().max() / dp_dt.abs().max()) > 1e-2


# --- T-SDE-8: weighted DSM -----------------------------------------------------------------------------------------
def test_weighted_dsm_identity_and_continuous_times():  # T-SDE-8
    proc = td.VP()
    V = torch.rand(10, dtype=D, generator=gen()) + 0.01
    s_theta, xi = torch.randn(10, 3, dtype=D, generator=gen(1)), torch.randn(10, 3, dtype=D, generator=gen(2))
    lam = torch.rand(10, dtype=D, generator=gen(3))
    cond_score = -xi / V.sqrt()[:, None]
    xi_theta = -V.sqrt()[:, None] * s_theta
    lhs = lam * ((s_theta - cond_score) ** 2).sum(1)
    torch.testing.assert_close(lhs, lam / V * ((xi_theta - xi) ** 2).sum(1), rtol=1e-12, atol=1e-12)
    t = sample_times(proc, 100_000, gen(4))
    assert t.dtype == D and float(t.min()) >= proc.t_min and float(t.max()) <= proc.t_max
    assert (t != t.round()).float().mean() > 0.99  # continuous
    assert abs(float(t.mean()) - (proc.t_min + proc.t_max) / 2) < 4 * 0.2887 / math.sqrt(len(t))


@pytest.mark.parametrize("which", [0, 1])
def test_dsm_minus_esm_constant_with_oracle(which):  # T-SDE-8 (via the oracle, as T-SM-3)
    proc, t, d, N = td.VP(), 0.4, 2, 100_000
    m, v = 0.5, 0.3
    gm = td.GaussianMixture.gaussian(m, v, dim=d)
    nets = [lambda x, tt: -0.5 * x, lambda x, tt: torch.tanh(x) - 1]
    model = td.Denoiser(nets[which], proc, prediction="score")
    x0, _ = gm.sample(N, gen())
    eps = torch.randn(N, d, dtype=D, generator=gen(1))
    tt = torch.full((N,), t, dtype=D)
    dsm = d * dsm_loss(model, x0, weighting="native", t=tt, eps=eps, reduction="none")  # ||s - cond score||^2
    xt = proc.add_noise(x0, tt, eps)
    esm = ((nets[which](xt, tt) - gm.score(xt, proc, tt)) ** 2).sum(1)
    a, s = float(proc.alpha(t)), float(proc.sigma(t))
    const = d / s**2 - d / (a**2 * v + s**2)  # E||cond score||^2 - E||score||^2
    diff = dsm - esm
    assert abs(float(diff.mean()) - const) < 4 * float(diff.std()) / math.sqrt(N)


def test_posterior_average_of_conditional_scores_is_the_score():  # T-SDE-8, eq. (30) corrected
    gm = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-1.0, 0.0], [1.0, 0.5]]),
                            torch.tensor([0.2, 0.1]))
    proc, t = td.VP(), torch.tensor(0.3, dtype=D)
    x = gm.sample_t(50, proc, t, gen())
    a, s = proc.alpha(t), proc.sigma(t)
    # E_{x0 ~ p(x0 | x_t)}[ -(x_t - a x0)/s^2 ] = -(x_t - a E[x0|x_t])/s^2
    post = -(x - a * gm.x0(x, proc, t)) / s**2
    torch.testing.assert_close(post, gm.score(x, proc, t), rtol=1e-9, atol=1e-9)
    # the prior-weighted average (x0 ~ p_data, independent of x_t) is not the score
    prior = -(x - a * (gm.weights[:, None] * gm.means).sum(0)) / s**2
    assert (prior - gm.score(x, proc, t)).abs().max() > 0.1


# --- T-SDE-9: tower property --------------------------------------------------------------------------------------
def test_tower_property_lemma():  # T-SDE-9
    m, v, N = 0.6, 0.4, 200_000
    proc, t = td.VP(), torch.tensor(0.25, dtype=D)
    gm = td.GaussianMixture.gaussian(m, v)
    x0, _ = gm.sample(N, gen())
    xt = proc.add_noise(x0, t, torch.randn(N, 1, dtype=D, generator=gen(1)))
    # x0' ~ p(x0 | x_t): Gaussian with the oracle's posterior mean and covariance
    mean, var = gm.x0(xt, proc, t), gm.posterior_cov(xt, proc, t)[:, 0, 0]
    x0p = mean + var.sqrt()[:, None] * torch.randn(N, 1, dtype=D, generator=gen(2))
    truth = float(proc.alpha(t)) * (v + m**2)
    for f in ((xt * x0)[:, 0], (xt * x0p)[:, 0]):
        assert abs(float(f.mean()) - truth) < 4 * float(f.std()) / math.sqrt(N)


# --- T-SDE-12: conditional score ----------------------------------------------------------------------------------
def test_conditional_score_is_score_plus_classifier_gradient():  # T-SDE-12
    gm = td.GaussianMixture(torch.tensor([0.2, 0.5, 0.3]), torch.tensor([[-1.0, 0.0], [1.0, 0.5], [0.0, -1.0]]),
                            torch.tensor([0.2, 0.1, 0.3]), labels=torch.tensor([0, 1, 1]))
    proc, t = td.VE(sigma_min=0.01, sigma_max=5.0), torch.tensor(0.4, dtype=D)
    x = gm.sample_t(20, proc, t, gen()).requires_grad_(True)
    for y in (0, 1):
        logr = gm.class_log_prob(x, proc, t)[:, y]
        (grad_logr,) = torch.autograd.grad(logr.sum(), x)
        lhs = gm.score(x.detach(), proc, t, y=torch.full((20,), y))
        torch.testing.assert_close(lhs, gm.score(x.detach(), proc, t) + grad_logr, rtol=1e-9, atol=1e-9)
