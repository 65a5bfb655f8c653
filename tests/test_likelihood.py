"""Likelihoods: variational bound (T-VLB-*, T-FWD-3, T-PAR-3/6/7, B-1, B-6, B-8, B-12, T-BAY-2) and the
probability-flow ODE likelihood (B-2), checked against the exact Gaussian(-mixture) oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import torchdiffusion as td
import torchdiffusion.likelihood as L
import torchdiffusion.losses.vlb as LV
from torchdiffusion._tensor import sample_projections
from torchdiffusion.data.datasets import split_dataset, toy_density
from torchdiffusion.losses.score import eps_weight
from torchdiffusion.parameterization.flow import pf_ode_drift

F64 = torch.float64


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def within(est: torch.Tensor, truth, k: float = 4.0) -> None:
    """``|mean(est) - truth| <= k SE`` for iid draws ``est``."""
    est = est.double().flatten()
    se = float(est.std() / math.sqrt(len(est)))
    m = float(est.mean())
    assert abs(m - float(truth)) <= k * se, f"mean {m:.6g} vs {float(truth):.6g}, SE {se:.3g}"


def oracle_model(gm: td.GaussianMixture, proc, prediction: str = "eps") -> td.Denoiser:
    return td.Denoiser(gm.net(proc, prediction), proc, prediction)


def small_ddpm(T: int = 50) -> td.DDPM:
    return td.DDPM(betas=torch.linspace(1e-3, 0.3, T, dtype=F64))


def quad_terms(model, x0: float, times, variance, n: int = 6, levels=None) -> torch.Tensor:
    """Every ``L_i`` for a 1-D ``x0`` with the expectation over ``x_{t_{i+1}} | x0`` by Gauss-Hermite
    (exact here: with affine Gaussian-oracle models every term is quadratic in x_t)."""
    proc = model.process
    z, w = np.polynomial.hermite_e.hermegauss(n)
    z, w = torch.tensor(z), torch.tensor(w) / math.sqrt(2 * math.pi)
    N = len(times) - 1
    i = torch.arange(N).repeat_interleave(n)
    t = times[i + 1]
    xt = (proc.alpha(t) * x0 + proc.sigma(t) * z.repeat(N))[:, None]
    val = L.vlb_term(model, torch.full((N * n, 1), float(x0), dtype=F64), i, times=times, variance=variance,
                     x_t=xt, levels=levels)
    return (val.reshape(N, n) * w).sum(1)


# ------------------------------------------------------------------------------------------------------------
# Gaussian building blocks
# ------------------------------------------------------------------------------------------------------------


def test_gaussian_kl_against_torch_and_monte_carlo():  # T-VLB-5
    g = gen(1)
    mu1, mu2 = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    v1, v2 = torch.rand(5, 3, generator=g, dtype=F64) + 0.1, torch.rand(5, 3, generator=g, dtype=F64) + 0.1
    ref = torch.distributions.kl_divergence(torch.distributions.Normal(mu1, v1.sqrt()),
                                            torch.distributions.Normal(mu2, v2.sqrt()))
    torch.testing.assert_close(L.gaussian_kl(mu1, v1, mu2, v2), ref, rtol=1e-12, atol=1e-14)
    A, B = torch.randn(5, 3, 3, generator=g, dtype=F64), torch.randn(5, 3, 3, generator=g, dtype=F64)
    S1, S2 = A @ A.mT + 0.1 * torch.eye(3, dtype=F64), B @ B.mT + 0.1 * torch.eye(3, dtype=F64)
    ref = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(mu1, S1),
                                            torch.distributions.MultivariateNormal(mu2, S2))
    torch.testing.assert_close(L.gaussian_kl_full(mu1, S1, mu2, S2), ref, rtol=1e-10, atol=1e-12)
    # diagonal = full with diagonal matrices; KL(p||p) = 0; asymmetry
    torch.testing.assert_close(L.gaussian_kl(mu1, v1, mu2, v2).sum(1),
                               L.gaussian_kl_full(mu1, torch.diag_embed(v1), mu2, torch.diag_embed(v2)))
    assert L.gaussian_kl_full(mu1, S1, mu1, S1).abs().max() < 1e-12
    assert (L.gaussian_kl_full(mu1, S1, mu2, S2) - L.gaussian_kl_full(mu2, S2, mu1, S1)).abs().max() > 1e-2
    # Monte Carlo log-ratio
    x = 0.3 + 0.7 * torch.randn(200_000, generator=g, dtype=F64)
    lr = L.gaussian_log_density(x, 0.3, 0.49) - L.gaussian_log_density(x, -0.2, 1.5)
    within(lr, L.gaussian_kl(0.3, 0.49, -0.2, 1.5))


@pytest.mark.parametrize("levels", [256, 17])
def test_discretized_decoder_bins_sum_to_one(levels):  # B-1
    grid = torch.linspace(-1, 1, levels, dtype=F64)
    means = torch.tensor([-1.3, -0.2, 0.0, 0.41, 0.999, 3.0], dtype=F64)[:, None]
    stds = torch.tensor([1e-3, 0.01, 0.1, 1.0, 5.0, 0.3], dtype=F64)[:, None]
    x = grid[None].expand(len(means), levels)
    lp = L.discretized_gaussian_log_likelihood(x, means.expand_as(x), stds.expand_as(x), levels=levels)
    assert (torch.logsumexp(lp, 1).exp() - 1).abs().max() < 1e-12
    # same through log_std; sigma -> 0 at a bin centre gives probability -> 1
    lp2 = L.discretized_gaussian_log_likelihood(x, means.expand_as(x), log_std=stds.log().expand_as(x), levels=levels)
    torch.testing.assert_close(lp, lp2)
    c = grid[levels // 3].reshape(1)
    assert abs(float(L.discretized_gaussian_log_likelihood(c, c, torch.tensor([1e-6]), levels=levels))) < 1e-12
    # DDPM eq. 13: the bin is x +- 1/255 for 8-bit data, by direct CDF differences where they are accurate
    if levels == 256:
        xv, m, s = grid[100], torch.tensor(-0.2, dtype=F64), torch.tensor(0.1, dtype=F64)
        n = torch.distributions.Normal(m, s)
        ref = torch.log(n.cdf(xv + 1 / 255) - n.cdf(xv - 1 / 255))
        torch.testing.assert_close(L.discretized_gaussian_log_likelihood(xv, m, s), ref, rtol=1e-9, atol=0)


def _log_bin_mass_by_quadrature(a: float, b: float) -> float:
    """``log int_a^b phi(u) du`` in log space by Gauss-Legendre (independent of log_ndtr)."""
    z, w = np.polynomial.legendre.leggauss(60)
    u = 0.5 * (b - a) * z + 0.5 * (b + a)
    logphi = -0.5 * u**2 - 0.5 * math.log(2 * math.pi)
    top = logphi.max()
    return float(top + math.log(0.5 * (b - a) * np.sum(w * np.exp(logphi - top))))


@pytest.mark.parametrize("k_sd", [10.0, 40.0, -25.0])
def test_decoder_far_tail_is_finite(k_sd):  # T-BAY-2 (decoder part)
    std = 0.002
    x = torch.tensor([-1 + 2 * 128 / 255], dtype=F64)  # a level of the 8-bit grid: its bin is x +- 1/255
    mean = x - k_sd * std
    lp = float(L.discretized_gaussian_log_likelihood(x, mean, torch.tensor([std], dtype=F64)))
    a, b = (float(x) - 1 / 255 - float(mean)) / std, (float(x) + 1 / 255 - float(mean)) / std
    assert math.isfinite(lp)
    assert abs(lp - _log_bin_mass_by_quadrature(a, b)) < 1e-8 * abs(lp)
    naive = torch.distributions.Normal(mean, std)
    if abs(k_sd) >= 40:  # the naive difference of CDFs underflows: log(0) = -inf
        assert not torch.isfinite(torch.log(naive.cdf(x + 1 / 255) - naive.cdf(x - 1 / 255))).all()


def test_uniform_density_scores_8_bits_per_dim():  # B-1
    D = 12
    nll = torch.tensor(D * math.log(2.0), dtype=F64)  # -log of the uniform density 2^-D on [-1, 1)^D
    assert float(L.nll_to_bpd(nll, D, levels=256, value_range=(-1, 1))) == 8.0
    assert L.dequantization_offset(256, (-1, 1)) == 7.0
    assert L.dequantization_offset(256, (0, 1)) == 8.0
    assert float(L.nll_to_bpd(torch.tensor(0.0), D, levels=256, value_range=(0, 1))) == 8.0  # uniform on [0,1)
    assert L.dequantization_offset(17, (-1, 1)) == pytest.approx(math.log2(8.5), abs=1e-15)
    # dequantized values stay in their own bin of [lo, hi)
    k = torch.arange(17, dtype=F64).repeat(200)
    y = L.dequantize(-1 + k * 2 / 16, 17, (-1, 1), gen(2))
    assert torch.equal(torch.floor((y + 1) * 17 / 2), k)
    assert y.min() >= -1 and y.max() < 1
    with pytest.raises(ValueError, match="levels"):
        L.dequantization_offset(1)


# ------------------------------------------------------------------------------------------------------------
# Schedules, variances and weights
# ------------------------------------------------------------------------------------------------------------


def test_prior_term_default_schedule():  # T-FWD-3
    proc = td.DDPM()
    abar_T = float(proc.alphas_cumprod[-1])
    assert abar_T == pytest.approx(4.036e-5, rel=1e-3)
    assert math.sqrt(abar_T) == pytest.approx(6.35e-3, rel=1e-3)
    lT = float(L.prior_kl(proc, torch.ones(1, 1, dtype=F64)))
    assert lT == pytest.approx(2.02e-5, abs=5e-8)  # THEORY's value, given to 3 digits
    assert lT == pytest.approx(0.5 * (abar_T * (1 - 1) - math.log(1 - abar_T)), rel=1e-10)  # x0 = 1 closed form
    # F-G data: KL(q(x_T) || N(0,1)) = 1/2 [abar (v-1) + abar m^2 - log(1 + abar (v-1))]
    m, v = 0.7, 2.5
    closed = 0.5 * (abar_T * (v - 1) + abar_T * m**2 - math.log(1 + abar_T * (v - 1)))
    a = math.sqrt(abar_T)
    assert float(L.gaussian_kl(a * m, abar_T * v + 1 - abar_T, 0.0, 1.0)) == pytest.approx(closed, rel=1e-9)


def test_reverse_variances_conventions():  # T-FWD-4, B-12
    proc = td.DDPM(betas=torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    times = L.vlb_times(proc)
    assert times.tolist() == [-1.0, 0.0, 1.0, 2.0]
    bt = proc.posterior_variance  # beta-tilde per code step, 0 at k = 0
    assert float(bt[0]) == 0.0
    small, large = L.reverse_variances(proc, times, "small"), L.reverse_variances(proc, times, "large")
    torch.testing.assert_close(small, torch.stack([bt[1], bt[1], bt[2]]), rtol=1e-12, atol=0)
    torch.testing.assert_close(large, torch.stack([bt[1], proc.betas[1], proc.betas[2]]), rtol=1e-12, atol=0)
    log_small, log_large = L.reverse_log_variance_bounds(proc, times)
    torch.testing.assert_close(log_large.exp(), proc.betas, rtol=1e-12, atol=0)
    u = torch.tensor([0.0, 1.0])[:, None]
    lv = L.learned_log_variance(u, log_small[None], log_large[None])
    torch.testing.assert_close(lv[0], log_small)  # u = 0: beta-tilde (clipped)
    torch.testing.assert_close(lv[1], log_large)  # u = 1: beta
    half = L.learned_log_variance(torch.tensor(0.5), log_small, log_large).exp()
    torch.testing.assert_close(half, (small * proc.betas).sqrt(), rtol=1e-12, atol=0)  # geometric mean


def test_gaussian_reverse_variance_limits():  # B-6
    proc = td.DDPM()
    times = L.vlb_times(proc)
    torch.testing.assert_close(L.gaussian_reverse_variances(proc, times, 1.0), proc.betas, rtol=1e-12, atol=0)
    tiny = L.gaussian_reverse_variances(proc, times, 1e-14)
    torch.testing.assert_close(tiny[1:], proc.posterior_variance[1:], rtol=1e-9, atol=0)
    # DDPM form (1/v_{t-1} + alpha_t/beta_t)^-1 with v_{t-1} = abar_{t-1} v + 1 - abar_{t-1}
    v = 0.3
    vprev = proc.alphas_cumprod_prev * v + 1 - proc.alphas_cumprod_prev
    torch.testing.assert_close(L.gaussian_reverse_variances(proc, times, v), 1 / (1 / vprev + proc.alphas / proc.betas),
                               rtol=1e-10, atol=0)


def test_mean_matching_weights():  # T-PAR-3, T-PAR-6, T-PAR-7
    proc = td.DDPM()
    k = torch.arange(1, 1000, dtype=F64)
    w = L.mean_matching_weights(proc, k, k - 1)
    ab, abp, b, a = proc.alphas_cumprod[1:], proc.alphas_cumprod_prev[1:], proc.betas[1:], proc.alphas[1:]
    bt = proc.posterior_variance[1:]
    torch.testing.assert_close(w["x0"], 0.5 * (abp / (1 - abp) - ab / (1 - ab)), rtol=1e-10, atol=0)
    torch.testing.assert_close(w["x0"], abp * b**2 / (2 * bt * (1 - ab) ** 2), rtol=1e-10, atol=0)
    torch.testing.assert_close(w["eps"], b**2 / (2 * bt * a * (1 - ab)), rtol=1e-10, atol=0)
    torch.testing.assert_close(w["score"], (1 - a) ** 2 / (2 * bt * a), rtol=1e-10, atol=0)
    # on random draws: ||mu~ - mu_theta||^2 / (2 beta-tilde) = w_eps ||eps - eps_hat||^2 = w_score ||s - s_hat||^2
    g = gen(3)
    x0, eps, eps_hat = (torch.randn(64, 3, generator=g, dtype=F64) for _ in range(3))
    t = torch.randint(1, 1000, (64,), generator=g).double()
    xt = proc.add_noise(x0, t, eps)
    model = td.Denoiser(lambda x, tt: eps_hat, proc, "eps")
    mu_q, _ = proc.posterior(xt, x0, t)
    lhs = ((mu_q - model.mean(xt, t)) ** 2).sum(1) / (2 * proc.posterior_variance[t.long()])
    wt = L.mean_matching_weights(proc, t, t - 1)
    torch.testing.assert_close(lhs, wt["eps"] * ((eps - eps_hat) ** 2).sum(1), rtol=1e-10, atol=1e-12)
    sig = proc.sigma(t)[:, None]
    torch.testing.assert_close(lhs, wt["score"] * ((eps_hat / sig - eps / sig) ** 2).sum(1), rtol=1e-10, atol=1e-12)
    # T-PAR-6: mu = (x_t + (1 - alpha_t) s) / sqrt(alpha_t) with s = -eps_hat / sigma
    a_t = proc.alphas[t.long()][:, None]
    torch.testing.assert_close(model.mean(xt, t), (xt + (1 - a_t) * (-eps_hat / sig)) / a_t.sqrt(),
                               rtol=1e-12, atol=1e-12)


def test_kl_term_is_mse_plus_constant():  # T-VLB-6
    g = gen(4)
    d, bt, s2 = 5, 0.013, 0.02
    mu_q, mu_p = torch.randn(7, d, generator=g, dtype=F64), torch.randn(7, d, generator=g, dtype=F64)
    kl = L.gaussian_kl(mu_q, bt, mu_p, s2).sum(1)
    C = d / 2 * (math.log(s2 / bt) + bt / s2 - 1)
    torch.testing.assert_close(kl - ((mu_q - mu_p) ** 2).sum(1) / (2 * s2), torch.full((7,), C, dtype=F64),
                               rtol=1e-10, atol=1e-12)


def test_continuous_vlb_weight_and_discrete_limit():  # B-8
    vp = td.VP()
    t = torch.linspace(0.01, 1.0, 50, dtype=F64)
    w = L.continuous_vlb_weight(vp, t)
    h = 1e-6
    fd = -0.5 * (vp.log_snr(t + h) - vp.log_snr(t - h)) / (2 * h)
    torch.testing.assert_close(w, fd, rtol=1e-6, atol=0)
    torch.testing.assert_close(w, 0.5 * eps_weight(vp, t, "g2"), rtol=1e-10, atol=0)
    # sum_i 1/2 (SNR_s - SNR_t) mmse(t) -> 1/2 int mmse dSNR = 1/2 log(1 + v SNR) difference, error O(1/N)
    v = 0.5
    gm = td.GaussianMixture.gaussian(0.2, v)
    snr = lambda tt: torch.exp(vp.log_snr(tt))  # noqa: E731
    exact = 0.5 * (math.log1p(v * float(snr(torch.tensor(0.01)))) - math.log1p(v * float(snr(torch.tensor(1.0)))))
    errs = []
    for N in (100, 1000, 10000):
        ts = torch.linspace(0.01, 1.0, N + 1, dtype=F64)
        mmse = gm.posterior_cov(torch.zeros(N, 1, dtype=F64), vp, ts[1:])[:, 0, 0]
        errs.append(float((L.mean_matching_weights(vp, ts[1:], ts[:-1])["x0"] * mmse).sum()) - exact)
    assert errs[0] > 0 and 8 < errs[0] / errs[1] < 14 and 9 < errs[1] / errs[2] < 11, errs


# ------------------------------------------------------------------------------------------------------------
# The bound with exact Gaussian models
# ------------------------------------------------------------------------------------------------------------


def test_reverse_log_prob_is_a_sum_of_gaussians():  # T-VLB-1
    proc = td.DDPM(betas=torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=F64))
    model = oracle_model(td.GaussianMixture.gaussian(0.4, 0.3, dim=2), proc)
    times = L.vlb_times(proc)
    g = gen(5)
    xs = [torch.randn(6, 2, generator=g, dtype=F64) for _ in range(len(times))]
    got = L.reverse_log_prob(model, xs, times, variance="small")
    N = torch.distributions.Normal
    ref = N(0.0, 1.0).log_prob(xs[-1]).sum(1)
    for k in range(5):  # x_{k-1} | x_k, code step k (xs[k + 1] is the state at time k)
        var = proc.posterior_variance[max(k, 1)]
        ref += N(model.mean(xs[k + 1], k), var.sqrt()).log_prob(xs[k]).sum(1)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x0", [0.3, -1.2, 2.0])
def test_bound_is_exact_with_true_reverse_kernels(x0):  # T-VLB-2, T-VLB-3 (b)
    m, v = 0.3, 0.25
    proc = small_ddpm()
    gm = td.GaussianMixture.gaussian(m, v)
    model = oracle_model(gm, proc)
    times = L.vlb_times(proc)
    terms = quad_terms(model, x0, times, L.gaussian_reverse_variances(proc, times, v))
    aT, sT = proc.alpha(proc.t_max), proc.sigma(proc.t_max)
    kl_to_true_prior = L.gaussian_kl(aT * x0, sT**2, aT * m, aT**2 * v + sT**2)  # p(x_T) = q(x_T)
    nll = -gm.log_prob(torch.tensor([[x0]], dtype=F64))
    assert abs(float(terms.sum() + kl_to_true_prior - nll)) < 1e-10


def test_bound_at_T1000_upper_bounds_and_is_close():  # T-VLB-2 with DDPM's schedule, B-6
    proc = td.DDPM()
    times = L.vlb_times(proc)
    for v in (0.25, 1.0):
        gm = td.GaussianMixture.gaussian(0.0, v)
        model = oracle_model(gm, proc)
        nll = float(-gm.log_prob(torch.tensor([[0.5]], dtype=F64)))
        prior = float(L.prior_kl(proc, torch.tensor([[0.5]], dtype=F64)))
        gap = {}
        for name, var in (("small", "small"), ("large", "large"),
                          ("true", L.gaussian_reverse_variances(proc, times, v))):
            gap[name] = float(quad_terms(model, 0.5, times, var, n=4).sum()) + prior - nll
        assert abs(gap["true"]) < 1e-8  # exact up to KL(q(x_T|x0) || N(0,1)) - KL(q(x_T|x0) || q(x_T)) = O(abar_T)
        assert 0 < gap["large"] < 0.12 and 0 < gap["small"] < 0.6  # upper bounds, close (nats per dimension)
        assert gap["large"] < gap["small"]


def test_vlb_public_api_matches_quadrature():  # T-VLB-3 with one x_t draw per term, MC over examples
    m, v = 0.3, 0.25
    proc = small_ddpm()
    gm = td.GaussianMixture.gaussian(m, v)
    model = oracle_model(gm, proc)
    times = L.vlb_times(proc)
    exact = float(quad_terms(model, 0.7, times, "large").sum() + L.prior_kl(proc, torch.tensor([[0.7]], dtype=F64)))
    x0 = torch.full((2000, 1), 0.7, dtype=F64)
    full = L.vlb(model, x0, variance="large", generator=gen(6))
    within(full.nll, exact)
    assert full.per_step.shape == (2000, 50) and full.nfe == 50
    torch.testing.assert_close(full.nll, full.terms["L_T"] + full.terms["L_0"] + full.terms["L_1:N"])
    est = L.vlb(model, x0, variance="large", n_t=2, generator=gen(7))  # sampled t: unbiased
    within(est.nll, exact)
    assert est.nfe == 3
    # bits/dim
    torch.testing.assert_close(full.bpd, full.nll / math.log(2))


def test_each_kl_term_matches_monte_carlo():  # T-VLB-3/4/5
    proc = small_ddpm()
    gm = td.GaussianMixture.gaussian(torch.tensor([0.3, -0.5]), torch.tensor([0.25, 1.0]), dim=2)
    wrong = td.Denoiser(lambda x, t: gm.net(proc, "eps")(x, t) + 0.3, proc, "eps")
    times = L.vlb_times(proc)
    g = gen(8)
    x0 = torch.tensor([[0.5, -1.0]], dtype=F64)
    for i in (1, 10, 49):
        t, s = times[i + 1], times[i]
        xt = proc.add_noise(x0, t, torch.randn(1, 2, generator=g, dtype=F64))
        kl = float(L.vlb_term(wrong, x0, i, times=times, variance="small", x_t=xt))
        mu_q, var_q = proc.posterior(xt, x0, t)
        xs = mu_q + var_q.sqrt() * torch.randn(100_000, 2, generator=g, dtype=F64)
        mean_p = wrong.mean(xt, t, s)
        var_p = L.reverse_variances(proc, times, "small")[i]
        lr = (L.gaussian_log_density(xs, mu_q, var_q) - L.gaussian_log_density(xs, mean_p, var_p)).sum(1)
        within(lr, kl)


def test_trajectory_weights_unbiased_and_bound():  # T-VLB-2 (MC part), T-VLB-3 (a)
    m, v = 0.3, 0.25
    proc = small_ddpm()
    gm = td.GaussianMixture.gaussian(m, v)
    times = L.vlb_times(proc)
    x0 = torch.full((5_000, 1), 0.6, dtype=F64)
    xs = L.forward_trajectory(proc, x0, times, gen(9))
    logq = L.forward_log_prob(proc, xs, times)
    # true kernels and p(x_T) = q(x_T): constant weights equal to p(x0)
    tv = L.gaussian_reverse_variances(proc, times, v)
    exact_model = oracle_model(gm, proc)
    lw = L.reverse_log_prob(exact_model, xs, times, variance=tv,
                            prior_logp=lambda z: gm.log_prob(z, proc, proc.t_max)) - logq
    assert (lw - gm.log_prob(x0[:1])).abs().max() < 1e-9
    # a deliberately wrong (still linear-Gaussian) model with the standard prior
    wrong = td.Denoiser(lambda x, t: gm.net(proc, "eps")(x, t) + 0.05, proc, "eps")
    lw = L.reverse_log_prob(wrong, xs, times, variance="small") - logq
    # its marginal p(x0) by the affine recursion of the reverse chain from N(0, 1)
    var = L.reverse_variances(proc, times, "small")
    mu, s2 = 0.0, 1.0
    for i in reversed(range(len(times) - 1)):
        pts = torch.tensor([[0.0], [1.0]], dtype=F64)
        mean = L.reverse_kernel(wrong, pts, torch.tensor(i), times, "small")[0][:, 0]
        a, b = float(mean[1] - mean[0]), float(mean[0])
        mu, s2 = a * mu + b, a * a * s2 + float(var[i])
    logp = float(L.gaussian_log_density(torch.tensor(0.6, dtype=F64), mu, s2))
    within(torch.exp(lw - logp), 1.0)  # importance weights are unbiased for p(x0)
    se = float(lw.std() / math.sqrt(len(lw)))
    assert float(lw.mean()) < logp - 4 * se  # Jensen: the ELBO is strictly below
    termwise = quad_terms(wrong, 0.6, times, "small").sum() + L.prior_kl(proc, x0[:1])
    within(-lw, float(termwise))


@pytest.mark.parametrize("beta,expected,rel", [(0.5, 0.128, 0.05), (0.1, 0.023, 0.05), (0.01, 6e-5, 0.15)])
def test_true_reverse_kernel_is_only_approximately_gaussian(beta, expected, rel):  # T-VLB-7
    proc = td.DDPM(alphas_cumprod=torch.tensor([0.8, 0.8 * (1 - beta)], dtype=F64))
    data = td.oracle.two_point(1.0)
    u = torch.linspace(-4, 4, 40001, dtype=F64)[:, None]
    a, var = proc.transition(1, 0)
    logk = data.log_prob(u, proc, 0) + L.gaussian_log_density(torch.tensor(0.0, dtype=F64), a * u[:, 0], var)
    du = float(u[1] - u[0])
    logp = torch.log_softmax(logk, 0) - math.log(du)  # q(x_{t-1} | x_t = 0) on the grid
    p = logp.exp()
    mean = (p * u[:, 0]).sum() * du
    v = (p * (u[:, 0] - mean) ** 2).sum() * du
    integrand = torch.where(p > 0, p * (logp - L.gaussian_log_density(u[:, 0], mean, v)), 0.0)
    kl = float(integrand.sum() * du)
    assert kl == pytest.approx(expected, rel=rel)


def test_discretized_decoder_term_in_the_bound():  # B-1 inside L_0
    proc = small_ddpm()
    model = oracle_model(td.GaussianMixture.gaussian(0.0, 0.3, dim=3), proc)
    times = L.vlb_times(proc)
    x0 = torch.round((torch.rand(8, 3, generator=gen(10), dtype=F64) * 2 - 1) * 127.5) / 127.5
    xt = proc.add_noise(x0, 0, torch.randn(8, 3, generator=gen(11), dtype=F64))
    got = L.vlb_term(model, x0, 0, times=times, levels=256, x_t=xt)
    sd = proc.posterior_variance[1].sqrt()  # beta-tilde_2 at the decoder step
    ref = -L.discretized_gaussian_log_likelihood(x0, model.x0(xt, 0), sd.expand(8, 3)).sum(1)
    torch.testing.assert_close(got, ref)
    res = L.bits_per_dim(model, x0, method="vlb", levels=256, n_t=3, generator=gen(12))
    assert res.per_step.shape == (8, 50) and torch.isfinite(res.bpd).all()


# ------------------------------------------------------------------------------------------------------------
# Learned variance and training losses (B-12)
# ------------------------------------------------------------------------------------------------------------


class TwoHead(nn.Module):
    """Separate mean and variance heads: outputs (eps, v in [-1, 1]) along dim 1."""

    def __init__(self, d: int):
        super().__init__()
        self.mean, self.var = nn.Linear(d + 1, d).double(), nn.Linear(d + 1, d).double()

    def forward(self, x, t):
        h = torch.cat([x, (torch.as_tensor(t, dtype=x.dtype).expand(len(x)) / 100)[:, None]], 1)
        return torch.cat([self.mean(h), torch.tanh(self.var(h))], 1)


def test_learned_variance_kernel_and_hybrid_stop_gradient():  # B-12
    torch.manual_seed(0)
    proc = td.DDPM(betas=torch.linspace(1e-3, 0.2, 100, dtype=F64))
    net = TwoHead(2)
    model = td.Denoiser(net, proc, "eps")
    times = L.vlb_times(proc)
    x0 = torch.randn(32, 2, generator=gen(13), dtype=F64)
    xt = torch.randn(32, 2, generator=gen(14), dtype=F64)
    log_small, log_large = L.reverse_log_variance_bounds(proc, times)
    with torch.no_grad():  # v = -1 (u = 0) gives beta-tilde, v = 1 (u = 1) gives beta
        for val, ref in ((-1.0, log_small), (1.0, log_large)):
            net.var.weight.zero_()
            net.var.bias.fill_(math.atanh(val * (1 - 1e-15)))
            _, lv, _ = L.reverse_kernel(model, xt, torch.tensor(7), times, "learned")
            torch.testing.assert_close(lv, ref[7].expand(32, 2).to(F64), rtol=1e-9, atol=1e-9)
    torch.nn.init.normal_(net.var.weight, std=0.1)
    # the L_vlb part reaches only the variance head
    net.zero_grad()
    LV.vlb_loss(model, x0, variance="learned", generator=gen(15), detach_mean=True).backward()
    assert net.mean.weight.grad is None or net.mean.weight.grad.abs().max() == 0
    assert net.var.weight.grad.abs().max() > 0
    # hybrid: the mean head's gradient is that of L_simple alone
    net.zero_grad()
    LV.hybrid_loss(model, x0, lambda_vlb=0.001, generator=gen(16)).backward()
    g_hybrid = net.mean.weight.grad.clone()
    assert net.var.weight.grad.abs().max() > 0
    net.zero_grad()
    g = gen(16)
    i = torch.randint(0, 100, (32,), generator=g)
    e = torch.randn(x0.shape, generator=g, dtype=F64)
    eps_hat = net(proc.add_noise(x0, times[i + 1], e), times[i + 1])[:, :2]
    ((eps_hat - e) ** 2).mean(1).mean().backward()
    torch.testing.assert_close(g_hybrid, net.mean.weight.grad)


def test_training_losses_registered():
    from torchdiffusion.runs.losses import LOSSES

    proc = small_ddpm()
    net = nn.Sequential(nn.Linear(2, 2)).double()
    model = td.Denoiser(lambda x, t: net(x), proc, "eps")
    x0 = torch.randn(16, 2, generator=gen(17), dtype=F64)
    loss = LOSSES["vlb"](model, x0, cond=None, generator=gen(18), cfg={})
    loss.backward()
    assert torch.isfinite(loss) and net[0].weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="twice the data channels"):
        LOSSES["hybrid"](model, x0, cond=None, generator=gen(19), cfg={"lambda_vlb": 0.001})


@pytest.mark.parametrize("proc", [td.VP(), small_ddpm()], ids=["vp", "ddpm"])
def test_importance_sampled_likelihood_weighting(proc):  # B-8: lambda = g^2 with t ~ w(t)
    from torchdiffusion.losses.score import dsm_loss
    from torchdiffusion.runs.losses import LOSSES

    gm = td.GaussianMixture.gaussian(torch.tensor([0.3, -0.5]), torch.tensor([0.25, 1.0]), dim=2)
    model = td.Denoiser(lambda x, t: 1.1 * gm.net(proc, "eps")(x, t), proc, "eps")  # imperfect model
    g = gen(30)
    x0 = gm.sample(40_000, g)[0]
    plain = dsm_loss(model, x0, weighting="g2", generator=g, reduction="none")
    t, r = LV.importance_times(proc, 40_000, "g2", generator=g)
    assert t.min() >= proc.t_min and t.max() <= proc.t_max
    isw = r * dsm_loss(model, x0, weighting="eps", t=t, generator=g, reduction="none")
    se = math.sqrt(plain.var() / len(plain) + isw.var() / len(isw))
    assert abs(float(plain.mean() - isw.mean())) < 4 * se  # same expectation
    assert isw.var() < 0.5 * plain.var()  # lower variance
    assert float(r.max() / r.min()) < 1.05  # nearly constant importance factor
    loss = LOSSES["dsm_is"](model, x0[:64], cond=None, generator=g, cfg={"weighting": "g2"})
    assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------------------
# ODE likelihood (B-2)
# ------------------------------------------------------------------------------------------------------------


def mixture_8d() -> td.GaussianMixture:
    g = gen(20)
    means = torch.randn(4, 8, generator=g, dtype=F64)
    A = 0.3 * torch.randn(4, 8, 8, generator=g, dtype=F64)
    covs = A @ A.mT + 0.05 * torch.eye(8, dtype=F64)
    return td.GaussianMixture(torch.tensor([0.1, 0.2, 0.3, 0.4]), means, covs)


@pytest.mark.parametrize("which", ["gmm2d", "mix8d"])
def test_ode_likelihood_matches_oracle(which):
    gm = toy_density("gmm") if which == "gmm2d" else mixture_8d()
    proc = td.VP()
    x = gm.sample(12, gen(21))[0]
    res = L.ode_log_likelihood(oracle_model(gm, proc), x, divergence="exact", t_eps=1e-5)
    true = gm.log_prob(x, proc, 1e-5)
    assert ((res.logp - true).abs() / gm.dim).max() < 0.01
    assert 20 < res.nfe < 400


def test_ode_likelihood_gaussian_is_exact_to_solver_tolerance():  # B-2 recipe
    proc = td.VP()
    gm = td.GaussianMixture.gaussian(torch.tensor([0.5, -1.0]), torch.tensor([0.3, 2.0]), dim=2)
    x = gm.sample(16, gen(22))[0]
    res = L.ode_log_likelihood(oracle_model(gm, proc), x, divergence="exact", t_eps=1e-3, rtol=1e-6, atol=1e-6,
                               prior_logp=lambda z: gm.log_prob(z, proc, proc.t_max))
    assert (res.logp - gm.log_prob(x, proc, 1e-3)).abs().max() < 1e-4


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_hutchinson_divergence_is_unbiased(noise):  # B-2 / T-SM-4
    gm = mixture_8d()
    proc = td.VP()
    model = oracle_model(gm, proc)
    x = gm.sample_t(1, proc, 0.3, gen(23))
    t = torch.tensor(0.3, dtype=F64)

    def drift(z):
        return pf_ode_drift(model, z, t)[0]

    J = torch.autograd.functional.jacobian(lambda z: drift(z[None])[0], x[0])
    xx = x.expand(20_000, 8).clone().requires_grad_(True)
    exact = L.jacobian_trace(drift(xx), xx)
    assert torch.allclose(exact, torch.trace(J).expand(20_000))
    v = sample_projections(xx, noise, gen(24))
    est = L.jacobian_trace(drift(xx), xx, v)
    within(est, float(torch.trace(J)))
    sym = 0.5 * (J + J.T)
    var = 2 * (sym**2).sum() - (2 * (torch.diagonal(J) ** 2).sum() if noise == "rademacher" else 0)
    assert float(est.var()) == pytest.approx(float(var), rel=0.05)  # Hutchinson variance (T-SM-4)


def test_ode_hutchinson_end_to_end_unbiased():
    gm = mixture_8d()
    proc = td.VP()
    model = oracle_model(gm, proc)
    x = gm.sample(1, gen(25))[0].expand(64, 8).clone()
    exact = L.ode_log_likelihood(model, x[:1], divergence="exact", rtol=1e-4, atol=1e-4).logp
    est = L.ode_log_likelihood(model, x, divergence="hutchinson", noise="rademacher", rtol=1e-4, atol=1e-4,
                               generator=gen(26)).logp
    within(est, float(exact))


def test_bits_per_dim_ode_dequantized():  # B-1 with B-2
    proc = td.VP()
    gm = td.GaussianMixture.gaussian(0.0, 0.25, dim=2)
    levels = 17
    x = torch.round((gm.sample(32, gen(27))[0].clamp(-1, 1) + 1) * 8) / 8 - 1  # on the digits' grid
    res = L.bits_per_dim(oracle_model(gm, proc), x, method="ode", levels=levels, generator=gen(28),
                         divergence="exact", t_eps=1e-5)
    y = L.dequantize(x, levels, (-1, 1), gen(28))  # the same dequantization draw
    true = -gm.log_prob(y, proc, 1e-5)
    assert (res.terms["-log p_y"] - true).abs().max() < 0.02
    torch.testing.assert_close(res.bpd, true / (2 * math.log(2)) + math.log2(8.5), atol=0.02, rtol=0)
    torch.testing.assert_close(res.bpd, res.terms["-log p_y"] / (2 * math.log(2)) + math.log2(8.5))
    mean, se = res.mean_se()
    assert se > 0 and math.isfinite(mean)


def test_truncated_chain_and_time_at_sigma():
    for proc in (td.DDPM(), td.VP(), td.SubVP(), td.VE(), td.EDM()):
        t = L.time_at_sigma(proc, 0.05)
        assert float(proc.sigma(torch.tensor(t, dtype=F64))) == pytest.approx(0.05, rel=1e-6)
        full = L.vlb_times(proc, None if proc.discrete else 200)
        tr = L.truncate_times(proc, full, 0.05)
        assert tr[0] == proc.t_zero and (proc.sigma(tr[1:]) >= 0.05).all()
        assert float(proc.sigma(full[len(full) - len(tr)])) < 0.05  # the step just below was dropped
    # the shorter chain is still an upper bound, exact with true kernels: Gaussian data, quadrature
    proc = small_ddpm()
    gm = td.GaussianMixture.gaussian(0.3, 0.25)
    times = L.truncate_times(proc, L.vlb_times(proc), 0.3)
    terms = quad_terms(oracle_model(gm, proc), 0.7, times, L.gaussian_reverse_variances(proc, times, 0.25))
    aT, sT = proc.alpha(proc.t_max), proc.sigma(proc.t_max)
    total = terms.sum() + L.gaussian_kl(aT * 0.7, sT**2, aT * 0.3, aT**2 * 0.25 + sT**2)
    assert abs(float(total + gm.log_prob(torch.tensor([[0.7]], dtype=F64)))) < 1e-10


def test_user_errors():
    proc = small_ddpm()
    model = oracle_model(td.GaussianMixture.gaussian(0.0, 1.0), proc)
    x = torch.zeros(2, 1, dtype=F64)
    with pytest.raises(ValueError, match="divergence"):
        L.ode_log_likelihood(model, x, divergence="nope")
    with pytest.raises(ValueError, match="variance"):
        L.vlb(model, x, variance="medium")
    with pytest.raises(ValueError, match="method"):
        L.bits_per_dim(model, x, method="elbo")
    with pytest.raises(ValueError, match="std"):
        L.discretized_gaussian_log_likelihood(x, x)
    with pytest.raises(ValueError, match="t_zero"):
        L.vlb(model, x, times=torch.tensor([0.0, 1.0, 2.0]))


# ------------------------------------------------------------------------------------------------------------
# Held-out split and CLI
# ------------------------------------------------------------------------------------------------------------


def test_holdout_split_and_trainer_uses_train_part(tmp_path):
    from torchdiffusion.data.datasets import load
    from torchdiffusion.runs import config
    from torchdiffusion.runs.train import build_trainer
    ds = load("gmm", n=100)
    tr, te = split_dataset(ds, 0.2)
    assert len(tr) == 80 and len(te) == 20
    rows = {tuple(r) for r in torch.cat([tr.x, te.x]).tolist()}
    assert rows == {tuple(r) for r in ds.x.tolist()}
    assert not {tuple(r) for r in tr.x.tolist()} & {tuple(r) for r in te.x.tolist()}
    tr2, te2 = split_dataset(ds, 0.2)
    assert torch.equal(te.x, te2.x)
    assert split_dataset(ds, 0.0)[1] is None
    cfg = config.resolve("gmm", ["data.n=100", "data.holdout=0.2", "model.hidden=16", "model.depth=1"])
    trainer = build_trainer(cfg, tmp_path / "run", progress=False)
    assert len(trainer.data) == 80 and torch.equal(trainer.data.x, tr.x)


def test_cli_likelihood(tmp_path, capsys):
    from torchdiffusion.cli.main import main

    run = tmp_path / "run"
    sets = ["data.n=200", "model.hidden=16", "model.depth=1", "train.steps=2", "train.batch=16",
            "process.T=20"]
    assert main(["train", "gmm", "--out", str(run), "--quiet", *sum([["--set", s] for s in sets], [])]) == 0
    capsys.readouterr()
    assert main(["likelihood", str(run), "--n-t", "2", "--batch", "8"]) == 0
    out = capsys.readouterr().out
    assert "20 examples" in out and "bits/dim" in out and "L_0 (decoder)" in out and "L_10..L_19" in out
    js = tmp_path / "r.json"
    assert main(["likelihood", str(run), "--method", "ode", "--n", "4", "--rtol", "1e-3", "--atol", "1e-3",
                 "--data", "train", "--json", str(js)]) == 0
    assert "method ode" in capsys.readouterr().out
    assert main(["likelihood", str(run), "--method", "ode", "--n", "4", "--x0-in-range"]) == 2
    assert "exceed their value range" in capsys.readouterr().err  # the gmm data are not within [-1, 1]
    assert main(["likelihood", str(run), "--n-t", "2", "--min-sigma", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "L_1..L_" in out and "L_10..L_19" not in out  # fewer steps: the chain decodes at sigma >= 0.3
    import json

    assert math.isfinite(json.loads(js.read_text())["bpd"])
    run0 = tmp_path / "run0"
    assert main(["train", "gmm", "--out", str(run0), "--quiet", "--set", "data.holdout=0",
                 *sum([["--set", s] for s in sets], [])]) == 0
    assert main(["likelihood", str(run0)]) == 2
    assert "holds no data out" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------
# A diverging solve is an error, never a number (issue 13)
# ------------------------------------------------------------------------------------------------------------


def runaway_model(proc, v: float = 0.1, k: float = 4.0, marked=lambda x: x[:, :1] > 2.0, nan: bool = False):
    """The exact eps of N(0, v I) data, except for the examples with a marked first coordinate: there
    ``eps_hat = k x`` (an eps-net extrapolating with slope k > 1, so ``dx/dt = beta/2 (k/sigma - 1) x`` runs
    away and the mark is kept), or NaN."""

    def net(x, t):
        a, s = proc.alpha(t)[:, None].to(x), proc.sigma(t)[:, None].to(x)
        eps = s * x / (a**2 * v + s**2)
        bad = marked(x)
        return torch.where(bad, torch.full_like(x, math.nan) if nan else k * x, eps)

    return td.Denoiser(net, proc, "eps")


def runaway_batch() -> torch.Tensor:
    x = 0.3 * torch.randn(6, 3, generator=gen(40), dtype=F64)
    x[[1, 4], 0] = 3.0
    return x


def test_ode_likelihood_divergence_names_the_examples():
    proc = td.VP()
    x = runaway_batch()
    with pytest.raises(ValueError, match=r"diverged for examples \[1 \(\S+\), 4 \(\S+\)\] of 6") as e:
        L.ode_log_likelihood(runaway_model(proc), x, divergence="exact", rtol=1e-4, atol=1e-4)
    assert "x0_range" in str(e.value)
    with pytest.raises(ValueError, match=r"diverged for examples \[1 \(\S+\), 4 \(\S+\)\] of 6"):
        L.bits_per_dim(runaway_model(proc), x, method="ode", divergence="exact", rtol=1e-4, atol=1e-4)
    # the well-behaved examples alone are fine
    ok = L.ode_log_likelihood(runaway_model(proc), x[[0, 2, 3, 5]], divergence="exact", rtol=1e-4, atol=1e-4)
    assert torch.isfinite(ok.logp).all()


def test_ode_likelihood_non_finite_drift_names_the_examples():
    proc = td.VP()
    with pytest.raises(ValueError, match=r"ODE likelihood solve failed .*in a batch of 6.*: \[1 \(nan\), 4 \(nan\)\]$"):
        L.ode_log_likelihood(runaway_model(proc, nan=True), runaway_batch(), divergence="exact", rtol=1e-4,
                             atol=1e-4, max_steps=200)


def test_ode_likelihood_step_limit_is_an_error():
    proc = td.VP()
    model = oracle_model(td.GaussianMixture.gaussian(0.0, 0.3, dim=2), proc)
    x = 0.3 * torch.randn(4, 2, generator=gen(41), dtype=F64)
    with pytest.raises(ValueError, match=r"max_num_steps exceeded.*max_num_steps = 3.*of 4"):
        L.ode_log_likelihood(model, x, divergence="exact", max_steps=3)
    assert torch.isfinite(L.ode_log_likelihood(model, x, divergence="exact", rtol=1e-4, atol=1e-4).logp).all()


def test_ode_likelihood_x0_range():
    proc = td.VP()
    # x0_hat of the exact Gaussian model never leaves [-1, 1] along the flow of in-range data: nothing changes
    x = (0.3 * torch.randn(5, 2, generator=gen(42), dtype=F64)).clamp(-0.9, 0.9)
    model = oracle_model(td.GaussianMixture.gaussian(0.0, 0.3, dim=2), proc)
    free = L.ode_log_likelihood(model, x, divergence="exact", rtol=1e-7, atol=1e-7)
    kept = L.ode_log_likelihood(model, x, divergence="exact", rtol=1e-7, atol=1e-7, x0_range=(-1, 1))
    torch.testing.assert_close(kept.logp, free.logp, rtol=0, atol=1e-6)
    # an eps-net extrapolating x0_hat out of the range runs away; with x0_hat kept in it, x / sigma moves by at
    # most alpha/sigma at t_eps per coordinate (docstring), and the solve stays bounded
    xr = (0.3 * torch.randn(6, 3, generator=gen(43), dtype=F64)).clamp(-0.7, 0.7)
    xr[[1, 4], 0] = 0.9
    runaway = runaway_model(proc, marked=lambda x: x[:, :1] > 0.8)
    with pytest.raises(ValueError, match=r"diverged for examples \[.*1 .*4 .*\] of 6"):
        L.ode_log_likelihood(runaway, xr, divergence="exact", rtol=1e-4, atol=1e-4, t_eps=0.3)
    res = L.ode_log_likelihood(runaway, xr, divergence="exact", rtol=1e-4, atol=1e-4, t_eps=0.3, x0_range=(-1, 1))
    assert torch.isfinite(res.logp).all()
    with pytest.raises(ValueError, match="x0_range"):
        L.ode_log_likelihood(model, x, x0_range=(1, -1))


def test_prior_norm_bound():
    r = L.prior_norm_bound()
    assert abs((r - 1 - math.log(r)) / 2 - 12 * math.log(10)) < 1e-9 and 60 < r < 61
    # the Chernoff bound holds: chi2_D tail at r D (exact, D = 2: exp(-r D / 2)) is below 1e-12^D
    assert math.exp(-r) <= 1e-24
