"""DDPM ancestral, DDIM and Permenter-Yuan samplers with the exact oracle (T-ALG-2, T-DDIM-1..3, B-3, B-14)."""

import math

import pytest
import torch
from torchdiffeq import odeint

import torchdiffusion as td
from torchdiffusion.samplers.ddpm import py24_levels

F64 = torch.float64


def mixture_1d():
    return td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([0.09, 0.25]))


def exact_pf_ode(oracle, x_T, proc):
    """Reference: the PF-ODE in VE coordinates dy/ds = eps(y, s) (process-independent, T-DDIM-1), from
    s_T = sigma/alpha at t_max down to s = 1e-5, then the exact Tweedie step; dopri5 at 1e-10 in float64."""
    edm = td.EDM(sigma_min=1e-6, sigma_max=1e4)
    tT = torch.tensor(proc.t_max, dtype=F64)
    s_T = float(proc.sigma(tT) / proc.alpha(tT))
    y = x_T / proc.alpha(tT)
    u = torch.tensor([math.log(s_T), math.log(1e-5)], dtype=F64)  # integrate in u = log s: dy/du = s eps
    yT = odeint(lambda u, y: u.exp() * oracle.eps(y, edm, u.exp()), y, u, rtol=1e-10, atol=1e-10,
                method="dopri5")[-1]
    return oracle.x0(yT, edm, 1e-5)


def test_ddim_converges_to_pf_ode():  # issue: DDIM at 1000 steps within 2e-3 RMS; error falls with steps
    oracle, proc = mixture_1d(), td.DDPM()
    g = torch.Generator().manual_seed(0)
    x_T = proc.prior_sample((400, 1), generator=g, dtype=F64)
    ref = exact_pf_ode(oracle, x_T, proc)
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    errs = []
    for steps in (10, 100, 1000):
        x = td.sample(model, x_T, "ddim", steps=steps, grid="trailing")
        errs.append(((x - ref) ** 2).mean().sqrt().item())
    assert errs[2] < 2e-3
    assert errs[0] > errs[1] > errs[2]


def nll_gap(oracle, x, n_exact, seed):
    """Mean NLL of samples minus that of exact samples, and the standard error of that difference."""
    x_ex, _ = oracle.sample(n_exact, torch.Generator().manual_seed(seed))
    a, b = -oracle.log_prob(x), -oracle.log_prob(x_ex)
    return (a.mean() - b.mean()).item(), math.sqrt(a.var() / len(a) + b.var() / len(b))


@pytest.mark.parametrize("sampler,opts", [("ddpm", {}), ("ddpm", {"variance": "large"}), ("py24", {"mu": 0.5})])
def test_ancestral_reproduces_mixture(sampler, opts):
    oracle, proc = mixture_1d(), td.DDPM()
    g = torch.Generator().manual_seed(1)
    n = 20_000
    x_T = proc.prior_sample((n, 1), generator=g, dtype=F64)
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    x = td.sample(model, x_T, sampler, steps=1000, grid="uniform", generator=g, **opts)
    gap, se = nll_gap(oracle, x, n, 2)
    assert abs(gap) < 3 * se, (gap, se)
    frac = (x < 0).double().mean().item()
    assert abs(frac - 0.3) < 4 * math.sqrt(0.21 / n)


def affine_recursion(proc, m, v, variance):
    """Law of Algorithm 2's output with the F-G oracle: each step is x' = A x + B + sigma z (T-ALG-2)."""
    M, V = 0.0, 1.0
    for k in range(proc.T - 1, -1, -1):
        ab, a_t, b = proc.alphas_cumprod[k], proc.alphas[k], proc.betas[k]
        # eps*(x) = sqrt(1-ab) (x - sqrt(ab) m) / (ab v + 1 - ab)
        c = (1 - ab).sqrt() / (ab * v + 1 - ab)
        A = (1 - b * c / (1 - ab).sqrt()) / a_t.sqrt()
        B = (b * c * ab.sqrt() * m / (1 - ab).sqrt()) / a_t.sqrt()
        var = 0.0 if k == 0 else float(proc.posterior_variance[k] if variance == "small" else b)
        M, V = float(A * M + B), float(A**2 * V + var)
    return M, V


@pytest.mark.parametrize("variance,expected_var", [("small", 0.2461), ("large", 0.2508)])
def test_algorithm2_affine_oracle(variance, expected_var):  # T-ALG-2
    m, v = 0.3, 0.25
    proc = td.DDPM()
    mu, var = affine_recursion(proc, m, v, variance)
    assert mu == pytest.approx(0.29999, abs=1e-5)
    assert var == pytest.approx(expected_var, abs=1e-4)
    oracle = td.GaussianMixture.gaussian(m, v)
    g = torch.Generator().manual_seed(3)
    n = 100_000
    x_T = torch.randn(n, 1, generator=g, dtype=F64)
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    x = td.sample(model, x_T, "ddpm", steps=1000, grid="uniform", generator=g, variance=variance)[:, 0]
    assert abs(x.mean().item() - mu) < 4 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 4 * var * math.sqrt(2 / n)


def test_ddim_matches_song_formula_and_point_mass():  # T-DDIM-1 (a), (b); B-5 F-PT exactness
    proc = td.DDPM()
    point = td.GaussianMixture(torch.ones(1), torch.tensor([[0.7, -0.2]]), torch.zeros(1))
    model = td.Denoiser(point.net(proc, "eps"), proc)
    x_T = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    for steps in (1, 3, 17):
        x = td.sample(model, x_T, "ddim", steps=steps, grid="leading")
        assert torch.allclose(x, torch.tensor([[0.7, -0.2]], dtype=F64).expand(5, 2), atol=1e-10)
    # one explicit step of Song et al.'s formula
    oracle = mixture_1d()
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    xt = torch.randn(7, 1, generator=torch.Generator().manual_seed(5), dtype=F64)
    ts = torch.tensor([600.0, 300.0, -1.0], dtype=F64)
    out = []
    td.sample(model, xt, "ddim", steps=2, grid=ts, callback=lambda d: out.append(d["x"]))
    eps = model.eps(xt, 600)
    ab_t, ab_s = proc.alphas_cumprod[600], proc.alphas_cumprod[300]
    x0 = (xt - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
    assert torch.allclose(out[0], ab_s.sqrt() * x0 + (1 - ab_s).sqrt() * eps, atol=1e-12)


def test_ddim_first_order_on_gaussian():  # T-DDIM-1 (c)
    m, v = 0.3, 0.25
    oracle = td.GaussianMixture.gaussian(m, v)
    edm = td.EDM(sigma_min=0.01, sigma_max=10)
    model = td.Denoiser(oracle.net(edm, "eps"), edm)
    y_T = m + math.sqrt(v + 100) * torch.tensor([[-2.0], [0.5], [3.0]], dtype=F64)
    exact = m + math.sqrt(v) * (y_T - m) / math.sqrt(v + 100)
    errs = []
    for n in (20, 40, 80):
        s = torch.cat([torch.exp(torch.linspace(math.log(10), math.log(0.01), n, dtype=F64)), torch.zeros(1)])
        x = td.sample(model, y_T, "ddim", steps=n, grid=s)
        errs.append((x - exact).abs().max().item())
    r1, r2 = errs[0] / errs[1], errs[1] / errs[2]
    assert 1.8 < r1 < 2.05 and 1.85 < r2 < 2.05 and r2 > r1 - 0.02


def test_py24_special_cases():  # T-DDIM-2 (a), (b), (c)
    oracle, proc = mixture_1d(), td.DDPM()
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    x_T = torch.randn(50, 1, generator=torch.Generator().manual_seed(6), dtype=F64)
    a = td.sample(model, x_T, "py24", steps=20, mu=0.0)
    b = td.sample(model, x_T, "ddim", steps=20)
    assert torch.allclose(a, b, atol=1e-12)
    # mu = 1/2 with shared noise is Algorithm 2 with beta-tilde
    c = td.sample(model, x_T, "py24", steps=1000, grid="uniform", mu=0.5, generator=torch.Generator().manual_seed(7))
    d = td.sample(model, x_T, "ddpm", steps=1000, grid="uniform", generator=torch.Generator().manual_seed(7))
    assert torch.allclose(c, d, atol=1e-10)
    # general mu equals DDIM with eta_DDIM = sqrt((1 - r^(2mu/(1-mu))) / (1 - r^2))
    s_t, s_s, mu = 2.0, 1.3, 0.25
    s_prime, eta = py24_levels(s_t, s_s, mu)
    assert s_prime <= s_s <= s_t
    assert math.hypot(s_prime, eta) == pytest.approx(s_s, rel=1e-12)
    r = s_s / s_t
    eta_ddim = math.sqrt((1 - r ** (2 * mu / (1 - mu))) / (1 - r**2))
    assert eta_ddim == pytest.approx(0.6575, abs=1e-4)
    post_std = s_s * math.sqrt(1 - r**2)  # posterior std in VE coordinates
    assert eta == pytest.approx(eta_ddim * post_std, rel=1e-12)


def test_py24_acceleration_regression():  # T-DDIM-3
    m, v = 0.3, 0.25
    oracle = td.GaussianMixture.gaussian(m, v)
    edm = td.EDM(sigma_min=0.01, sigma_max=10)
    model = td.Denoiser(oracle.net(edm, "eps"), edm)
    y_T = m + math.sqrt(v + 100) * torch.tensor([[-2.0], [0.5], [3.0]], dtype=F64)
    # 10 steps on the 11-point geometric grid 10 -> 0.01; the sampler stops at sigma = 0.01, where the exact
    # PF-ODE solution of Gaussian data is m + sqrt(v + 0.01^2) (y_T - m) / sqrt(v + 100)
    exact = m + math.sqrt(v + 1e-4) * (y_T - m) / math.sqrt(v + 100)
    # (a grid must end at the clean time: the state after the 10th step, at sigma = 0.01, comes from the callback)
    grid = torch.exp(torch.linspace(math.log(10), math.log(0.01), 11, dtype=F64))
    grid = torch.cat([grid, torch.zeros(1, dtype=F64)])
    errs = {}
    for gamma in (1.0, 2.0):
        states = {}
        td.sample(model, y_T, "py24", grid=grid, mu=0.0, gamma=gamma,
                  callback=lambda d, states=states: states.__setitem__(d["i"], d["x"]))
        errs[gamma] = (states[9] - exact).abs().max().item()
    assert errs[1.0] == pytest.approx(0.2373, abs=2e-4)
    assert errs[2.0] == pytest.approx(0.1347, abs=2e-4)


def test_ddim_eta1_is_ancestral_and_subgrid():  # B-3
    oracle, proc = mixture_1d(), td.DDPM()
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    x_T = torch.randn(30, 1, generator=torch.Generator().manual_seed(8), dtype=F64)
    for grid, steps in (("uniform", 1000), ("trailing", 25)):
        a = td.sample(model, x_T, "ddim", steps=steps, grid=grid, eta=1.0, generator=torch.Generator().manual_seed(9))
        b = td.sample(model, x_T, "ddpm", steps=steps, grid=grid, generator=torch.Generator().manual_seed(9))
        assert torch.allclose(a, b, atol=1e-10)


def test_sampler_invariants():  # B-14
    oracle, proc = mixture_1d(), td.DDPM()
    model = td.Denoiser(oracle.net(proc, "eps"), proc)
    x_T = torch.randn(10, 1, generator=torch.Generator().manual_seed(10), dtype=F64)
    g = torch.Generator().manual_seed(11)
    state = g.get_state()
    td.sample(model, x_T, "ddim", steps=12, generator=g)
    assert torch.equal(state, g.get_state())  # deterministic samplers do not consume the generator
    for name in ("ddpm", "ddim", "py24"):
        a = td.sample(model, x_T, name, steps=12, generator=torch.Generator().manual_seed(1))
        b = td.sample(model, x_T, name, steps=12, generator=torch.Generator().manual_seed(1))
        assert torch.equal(a, b)
        calls = []
        td.sample(model, x_T, name, steps=12, callback=calls.append, generator=g)
        assert len(calls) == 12 and all("x0" in c and "x" in c for c in calls)
    for gname in ("uniform", "leading", "trailing"):
        ts = td.grids.get(gname, proc, 10)
        assert len(ts) == 11 and (ts[1:] < ts[:-1]).all() and ts[-1] == proc.t_zero


def test_grids_match_diffusers_spacings():
    p = td.DDPM()
    assert td.grids.get("trailing", p, 10)[:-1].tolist() == list(range(999, 0, -100))
    assert td.grids.get("leading", p, 10)[:-1].tolist() == list(range(900, -1, -100))
    assert td.grids.get("uniform", p, 10)[:-1].tolist() == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]


def test_sample_input_errors():
    proc = td.DDPM()
    model = td.Denoiser(mixture_1d().net(proc, "eps"), proc)
    x = torch.zeros(3, 1, dtype=F64)
    with pytest.raises(ValueError, match="unknown sampler"):
        td.sample(model, x, "bogus")
    with pytest.raises(ValueError, match="steps must be"):
        td.sample(model, x, "ddim", steps=0)
    with pytest.raises(ValueError, match="unknown grid"):
        td.sample(model, x, "ddim", steps=5, grid="bogus")
    with pytest.raises(ValueError, match="has no option"):
        td.sample(model, x, "ddim", steps=5, mu=0.3)
    with pytest.raises(ValueError, match="NaN"):
        td.sample(model, torch.full((2, 1), float("nan")), "ddim", steps=5)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "py24"])
def test_clip_x0_and_thresholding(name):
    # a poor eps net (eps = 3 x) on the cosine schedule: its x0 predictions leave [-1, 1]
    proc = td.DDPM(betas="cosine")
    model = td.Denoiser(lambda x, t, c=None: 3 * x, proc)
    x_T = torch.randn(64, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    seen = []

    def cb(d):
        seen.append(d["x0"])

    out = td.sample(model, x_T, name, 10, generator=torch.Generator().manual_seed(1), clip_x0=1.0, callback=cb)
    assert all(x0.abs().max() <= 1.0 + 1e-12 for x0 in seen)
    assert out.abs().max() <= 1.0 + 1e-9  # the last step returns the clipped x0 exactly
    unclipped = td.sample(model, x_T, name, 10, generator=torch.Generator().manual_seed(1))
    assert unclipped.abs().max() > 1.5 or name == "ddpm"
    # dynamic thresholding: every x0 has its percentile-p magnitude mapped to at most 1
    seen.clear()
    td.sample(model, x_T, name, 10, generator=torch.Generator().manual_seed(1), thresholding=0.9, callback=cb)
    assert all(x0.abs().max() <= 1.0 + 1e-12 for x0 in seen)
    # a model whose predictions stay inside [-1, 1] is unchanged by clipping
    oracle = td.GaussianMixture.gaussian(0.0, 0.04)
    good = td.Denoiser(oracle.net(proc, "eps"), proc)
    a = td.sample(good, x_T[:, :1], name, 10, generator=torch.Generator().manual_seed(2))
    b = td.sample(good, x_T[:, :1], name, 10, generator=torch.Generator().manual_seed(2), clip_x0=5.0)
    assert torch.allclose(a, b, atol=1e-12)
