"""The exact Gaussian-mixture oracle against autograd, closed forms and Monte Carlo (T-BAY-3, T-PAR-4/5,
T-SDE-8, T-SDE-12, B-11)."""

import math

import pytest
import torch

import torchdiffusion as td

F64 = torch.float64


def gmm2d():
    means = torch.tensor([[-1.0, 0.5], [1.2, -0.3], [0.2, 1.4]], dtype=F64)
    covs = torch.tensor([[[0.3, 0.1], [0.1, 0.2]], [[0.1, -0.05], [-0.05, 0.4]], [[0.05, 0.0], [0.0, 0.05]]],
                        dtype=F64)
    return td.GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs, labels=torch.tensor([0, 1, 1]))


def grad_log_p(gm, x, proc, t, y=None):
    x = x.clone().requires_grad_(True)
    lp = gm.log_prob(x, proc, t, y).sum()
    return torch.autograd.grad(lp, x)[0]


@pytest.mark.parametrize("proc", [td.DDPM(), td.VP(), td.SubVP(), td.VE(), td.EDM()], ids=lambda p: p.name)
def test_score_is_gradient_of_log_density(proc):
    gm = gmm2d()
    g = torch.Generator().manual_seed(0)
    t = torch.tensor(0.3 * (proc.t_max - proc.t_min) + proc.t_min, dtype=F64)
    if proc.discrete:
        t = t.round()
    x = gm.sample_t(64, proc, t, generator=g)
    assert torch.allclose(gm.score(x, proc, t), grad_log_p(gm, x, proc, t), rtol=1e-9, atol=1e-10)


def test_tweedie_gaussian_prior_closed_form():  # T-BAY-3 (a): y = x + s e, x ~ N(m, tau^2)
    m, tau2 = 0.7, 0.5
    gm = td.GaussianMixture.gaussian(m, tau2)
    edm = td.EDM()
    s = 0.8
    y = torch.linspace(-3, 3, 11, dtype=F64)[:, None]
    expected = (tau2 * y + s**2 * m) / (tau2 + s**2)
    assert torch.allclose(gm.x0(y, edm, s), expected, atol=1e-14)
    # Tweedie with the score: y + s^2 grad log p
    assert torch.allclose(y + s**2 * gm.score(y, edm, s), expected, atol=1e-14)
    # using sigma instead of sigma^2 fails
    assert not torch.allclose(y + s * gm.score(y, edm, s), expected, atol=1e-3)


@pytest.mark.parametrize("proc", [td.DDPM(), td.VP(), td.VE()], ids=lambda p: p.name)
def test_tweedie_mixture_posterior_mean(proc):  # T-BAY-3 (b), T-PAR-4, T-PAR-5
    gm = gmm2d()
    g = torch.Generator().manual_seed(1)
    t = torch.tensor(proc.t_max * 0.2 if not proc.discrete else 200.0, dtype=F64)
    x = gm.sample_t(50, proc, t, generator=g)
    a, s = proc.alpha(t), proc.sigma(t)
    score = grad_log_p(gm, x, proc, t)
    x0 = (x + s**2 * score) / a  # E[x0 | x_t] by Tweedie (T-PAR-4)
    eps, post_mean = gm.eps_x0(x, proc, t)
    assert torch.allclose(x0, post_mean, rtol=1e-9, atol=1e-10)
    # marginal score = -E[eps | x_t] / sigma (T-PAR-5)
    assert torch.allclose(-s * score, (x - a * post_mean) / s, rtol=1e-9, atol=1e-10)
    assert torch.allclose(eps, -s * score, rtol=1e-9, atol=1e-10)


def test_tweedie_is_the_mmse_estimator():  # T-BAY-3 (c)
    gm = gmm2d()
    edm = td.EDM()
    g = torch.Generator().manual_seed(2)
    n, s = 40_000, 0.6
    x0, _ = gm.sample(n, g)
    y = x0 + s * torch.randn(x0.shape, generator=g, dtype=F64)
    tw = gm.x0(y, edm, s)
    e_tw = ((tw - x0) ** 2).sum(1)
    for other in (y, 0.9 * tw):
        diff = ((other - x0) ** 2).sum(1) - e_tw
        assert diff.mean() > 4 * diff.std() / math.sqrt(n)


def test_posterior_covariance_second_order_tweedie():  # B-11
    gm = gmm2d()
    vp = td.VP()
    t = torch.tensor(0.25, dtype=F64)
    x = gm.sample_t(5, vp, t, generator=torch.Generator().manual_seed(3))
    a, s = vp.alpha(t), vp.sigma(t)
    cov = gm.posterior_cov(x, vp, t)
    for i in range(len(x)):
        H = torch.autograd.functional.hessian(lambda z: gm.log_prob(z[None], vp, t).sum(), x[i])
        expected = (s**2 / a**2) * (torch.eye(2, dtype=F64) + s**2 * H)
        assert torch.allclose(cov[i], expected, rtol=1e-8, atol=1e-10)


def test_class_conditional_score_is_bayes():  # T-SDE-12: grad log p(x|y) = grad log p(y|x) + grad log p(x)
    gm = gmm2d()
    vp = td.VP()
    t = torch.tensor(0.4, dtype=F64)
    x = gm.sample_t(20, vp, t, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    for y in (0, 1):
        logr = gm.class_log_prob(x, vp, t)[:, y].sum()
        grad_r = torch.autograd.grad(logr, x)[0]
        cond = gm.score(x.detach(), vp, t, y=torch.full((20,), y))
        assert torch.allclose(cond, gm.score(x.detach(), vp, t) + grad_r, rtol=1e-9, atol=1e-10)
    # class-conditional density integrates the restricted mixture: p(x|y=1) = (0.3 N1 + 0.2 N2) / 0.5
    lp1 = gm.log_prob(x.detach(), vp, t, y=torch.ones(20, dtype=torch.long))
    comp = td.GaussianMixture(torch.tensor([0.3, 0.2]), gm.means[1:], gmm2d().means.new_tensor(
        [[[0.1, -0.05], [-0.05, 0.4]], [[0.05, 0.0], [0.0, 0.05]]]))
    assert torch.allclose(lp1, comp.log_prob(x.detach(), vp, t), atol=1e-12)


def test_posterior_weighted_conditional_scores():  # T-SDE-8 (30): the average is under the posterior
    data = torch.tensor([[-1.0], [0.5], [2.0]], dtype=F64)
    gm = td.GaussianMixture.dataset(data)  # ideal memorising denoiser
    vp = td.VP()
    t = torch.tensor(0.3, dtype=F64)
    a, s = vp.alpha(t), vp.sigma(t)
    x = torch.linspace(-2, 2, 9, dtype=F64)[:, None]
    cond_scores = -(x[:, None, :] - a * data[None]) / s**2  # grad log q(x_t | x0_i)
    post = gm.responsibilities(x, vp, t)[..., None]
    assert torch.allclose((post * cond_scores).sum(1), gm.score(x, vp, t), rtol=1e-9, atol=1e-12)
    prior_avg = cond_scores.mean(1)
    assert not torch.allclose(prior_avg, gm.score(x, vp, t), atol=1e-3)


def test_exact_noised_samples_and_normalisation():
    gm = gmm2d()
    vp = td.VP()
    t = torch.tensor(0.5, dtype=F64)
    n = 100_000
    x = gm.sample_t(n, vp, t, generator=torch.Generator().manual_seed(5))
    a = vp.alpha(t)
    mean = a * (gm.weights[:, None] * gm.means).sum(0)
    assert ((x.mean(0) - mean).abs() < 4 * x.std(0) / math.sqrt(n)).all()
    # 1-D density integrates to one
    g1 = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([0.09, 0.25]))
    grid = torch.linspace(-12, 12, 24001, dtype=F64)[:, None]
    total = torch.trapezoid(g1.log_prob(grid, vp, t).exp(), grid[:, 0])
    assert total.item() == pytest.approx(1.0, abs=1e-9)


def test_full_and_diagonal_covariances_agree():
    means = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=F64)
    diag = torch.tensor([[0.2, 0.5], [0.3, 0.1]], dtype=F64)
    a = td.GaussianMixture(torch.tensor([0.4, 0.6]), means, diag)
    b = td.GaussianMixture(torch.tensor([0.4, 0.6]), means, torch.diag_embed(diag))
    x = torch.randn(10, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    ve = td.VE()
    for f in ("score", "x0", "eps"):
        assert torch.allclose(getattr(a, f)(x, ve, 0.3), getattr(b, f)(x, ve, 0.3), atol=1e-12)


def test_bad_oracle_input():
    with pytest.raises(ValueError, match="weights"):
        td.GaussianMixture(torch.tensor([-1.0, 1.0]), torch.zeros(2, 1), torch.ones(2))
    with pytest.raises(ValueError, match="dimension"):
        gmm2d().score(torch.zeros(3, 5, dtype=F64), td.VP(), 0.5)
