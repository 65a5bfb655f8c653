"""Reverse-SDE, predictor-corrector, PF-ODE and annealed-Langevin samplers with exact oracle scores
(THEORY T-SDE-7, T-SDE-10, T-SDE-11, B-14 invariants for these samplers)."""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.samplers import Bound
from torchdiffusion.samplers.sde import corrector, snr_step_size

D = torch.float64
GMM = td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0], [1.5]]), torch.tensor([0.3**2, 0.5**2]))
PROCS = {"vp": td.VP(), "ve": td.VE(sigma_min=0.01, sigma_max=50.0), "subvp": td.SubVP()}
N = 6_000


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def oracle_model(proc, sign: float = 1.0) -> td.Denoiser:
    net = GMM.net(proc, "eps")
    return td.Denoiser(net if sign == 1.0 else (lambda x, t: sign * net(x, t)), proc, prediction="eps")


def nll_gap_in_se(x: torch.Tensor, seed: int = 123) -> float:
    """(mean NLL of x - mean NLL of exact samples) / SE of that difference."""
    ex, _ = GMM.sample(len(x), gen(seed))
    a, b = -GMM.log_prob(x), -GMM.log_prob(ex)
    se = math.sqrt(float(a.var()) / len(a) + float(b.var()) / len(b))
    return (float(a.mean()) - float(b.mean())) / se


_CACHE: dict = {}


def run(proc_name: str, sampler: str, steps: int = 1000, **opts) -> torch.Tensor:
    key = (proc_name, sampler, steps, tuple(sorted(opts.items())))
    if key not in _CACHE:
        proc = PROCS[proc_name]
        g = gen(1)
        x_T = proc.prior_sample((N, 1), g, dtype=D)
        _CACHE[key] = td.sample(oracle_model(proc), x_T, sampler, steps, grid="uniform", generator=g, **opts)
    return _CACHE[key]


# --- T-SDE-7, T-SDE-11: reverse SDE and PC reproduce the mixture -------------------------------------------
@pytest.mark.parametrize("proc_name", ["vp", "ve", "subvp"])
@pytest.mark.parametrize("sampler", ["euler_maruyama", "pc"])
def test_reverse_sde_reproduces_mixture(proc_name, sampler):  # T-SDE-7 (EM), T-SDE-11 (PC)
    x = run(proc_name, sampler)
    assert torch.isfinite(x).all()
    assert abs(nll_gap_in_se(x)) < 3


def test_reverse_diffusion_predictor_reproduces_mixture():  # T-SDE-11 predictor alone
    assert abs(nll_gap_in_se(run("ve", "reverse_diffusion"))) < 3


def test_em_vp_recipe_component_statistics():  # T-SDE-7 recipe
    x = run("vp", "euler_maruyama")[:, 0]
    left = float((x < 0).to(D).mean())
    assert abs(left - 0.30) < 0.02
    for sel, m, s in [(x < 0, -2.0, 0.3), (x > 0, 1.5, 0.5)]:
        assert abs(float(x[sel].mean()) - m) < 0.03
        assert abs(float(x[sel].std()) - s) < 0.03


def test_wrong_sign_of_the_score_fails():  # T-SDE-7 negative control
    proc = PROCS["vp"]
    g = gen(1)
    x_T = proc.prior_sample((2000, 1), g, dtype=D)
    x = td.sample(oracle_model(proc, sign=-1.0), x_T, "euler_maruyama", 200, grid="uniform", generator=g)
    ok = torch.isfinite(x).all() and abs(nll_gap_in_se(x)) < 3
    assert not ok


# --- T-SDE-10: probability-flow ODE -------------------------------------------------------------------------
def affine_transport(proc, x_T, t_T, t, m, v):
    """Exact PF-ODE map for F-G data: z = (x - alpha m)/sqrt(alpha^2 v + sigma^2) is constant."""
    a_T, s_T, a, s = proc.alpha(t_T), proc.sigma(t_T), proc.alpha(t), proc.sigma(t)
    z = (x_T - a_T * m) / torch.sqrt(a_T**2 * v + s_T**2)
    return a * m + torch.sqrt(a**2 * v + s**2) * z


@pytest.mark.parametrize("proc_name", ["vp", "ve"])
def test_rk4_and_adaptive_ode_follow_the_exact_transport(proc_name):  # T-SDE-10
    proc = PROCS[proc_name]
    m, v = 0.3, 0.25
    gm = td.GaussianMixture.gaussian(m, v)
    model = td.Denoiser(gm.net(proc, "eps"), proc, prediction="eps")
    x_T = torch.tensor([[-2.0], [0.5], [3.0]], dtype=D) * proc.prior_std()
    states = []
    out = td.sample(model, x_T, "rk4", 800, generator=None, callback=lambda d: states.append((d["t"], d["x"])))
    ts = td.grids.get(td.grids.default_for(proc), proc, 200)
    t_last = ts[-2]
    ref = affine_transport(proc, x_T, torch.tensor(proc.t_max, dtype=D), t_last, m, v)
    torch.testing.assert_close(states[-2][1], ref, rtol=0, atol=1e-6)
    # final Tweedie step: E[x0 | x_t] = m + alpha v (x - alpha m)/(alpha^2 v + sigma^2) at t_last
    a, s = proc.alpha(t_last), proc.sigma(t_last)
    torch.testing.assert_close(out, m + a * v * (ref - a * m) / (a**2 * v + s**2), rtol=0, atol=1e-6)
    # adaptive dopri5
    bound = Bound(model)
    ts2 = td.grids.get("uniform", proc, 2)
    x_ode = td.samplers.get("ode").fn(bound, x_T, ts2, rtol=1e-7, atol=1e-7)
    ref2 = affine_transport(proc, x_T, ts2[0], ts2[1], m, v)
    a, s = proc.alpha(ts2[1]), proc.sigma(ts2[1])
    ref2 = m + a * v * (ref2 - a * m) / (a**2 * v + s**2)
    assert float(((x_ode - ref2) ** 2).mean().sqrt()) < 1e-4
    assert 10 < bound.nfe < 2000


def test_adaptive_ode_reproduces_mixture():  # T-SDE-10 (F-GMM)
    x = run("vp", "ode", 2, rtol=1e-5, atol=1e-5)[:, 0]
    assert abs(float((x < 0).to(D).mean()) - 0.30) < 0.02
    assert abs(nll_gap_in_se(x[:, None])) < 3
    x4 = run("vp", "rk4", 400)[:, 0]
    assert float(((x4 - x) ** 2).mean().sqrt()) < 1e-3  # two solvers, same deterministic map


# --- T-SDE-11: the corrector ----------------------------------------------------------------------------------
def test_corrector_keeps_the_noised_marginal():  # T-SDE-11
    proc = PROCS["vp"]
    t = torch.tensor(0.3, dtype=D)
    model = Bound(oracle_model(proc))
    x = GMM.sample_t(N, proc, t, gen())
    out = corrector(model, x, t, snr=0.16, n_steps=30, generator=gen(1))
    assert model.nfe == 30
    ex = GMM.sample_t(N, proc, t, gen(2))
    for f in (lambda y: y, lambda y: y**2):
        a, b = f(out), f(ex)
        se = math.sqrt(float(a.var() + b.var()) / N)
        assert abs(float(a.mean() - b.mean())) < 4 * se + 0.01
    # step rule: eps = 2 alpha (r ||z|| / ||s||)^2 with batch-averaged per-example norms
    s, z = torch.randn(4, 3, dtype=D, generator=gen(5)), torch.randn(4, 3, dtype=D, generator=gen(6))
    ref = 2 * 0.9 * (0.16 * z.norm(dim=1).mean() / s.norm(dim=1).mean()) ** 2
    assert snr_step_size(s, z, 0.16, 0.9) == pytest.approx(float(ref), rel=1e-12)


# --- B-14 invariants for these samplers -----------------------------------------------------------------------
class Counting:
    def __init__(self, net):
        self.net, self.calls = net, 0

    def __call__(self, x, t):
        self.calls += 1
        return self.net(x, t)


@pytest.mark.parametrize("sampler,steps,expected", [("euler_maruyama", 10, 10), ("reverse_diffusion", 10, 10),
                                                    ("pc", 10, 9), ("pc", 11, 11), ("rk4", 10, 9),
                                                    ("rk4", 12, 9), ("annealed_langevin", 300, 300)])
def test_nfe_budget(sampler, steps, expected):  # B-14: NFE <= steps
    proc = PROCS["ve"]
    net = Counting(GMM.net(proc, "eps"))
    model = td.Denoiser(net, proc, prediction="eps")
    x_T = proc.prior_sample((5, 1), gen(), dtype=D)
    td.sample(model, x_T, sampler, steps, generator=gen(1))
    assert net.calls == expected <= steps



def test_pc_nfe_is_one_plus_n_corrector_per_grid_point():  # T-SDE-11: NFE = (1 + n_corr) x grid points
    """... except the last point, which only denoises: n points cost (n - 1)(1 + n_corrector) + 1."""
    proc = PROCS["ve"]
    for n_corr, steps, points in ((2, 10, 4), (2, 13, 5), (0, 7, 7), (3, 1, 1)):
        net = Counting(GMM.net(proc, "eps"))
        x_T = proc.prior_sample((5, 1), gen(), dtype=D)
        td.sample(td.Denoiser(net, proc, prediction="eps"), x_T, "pc", steps, generator=gen(1), n_corrector=n_corr)
        assert net.calls == (points - 1) * (1 + n_corr) + 1 <= steps


@pytest.mark.parametrize("sampler", ["euler_maruyama", "reverse_diffusion", "pc", "rk4", "ode",
                                     "annealed_langevin"])
def test_same_seed_same_sample_and_deterministic_ones_ignore_the_generator(sampler):  # B-14
    proc = PROCS["ve"]
    model = oracle_model(proc)
    x_T = proc.prior_sample((6, 1), gen(), dtype=D)
    steps = 200 if sampler == "annealed_langevin" else 12
    a = td.sample(model, x_T, sampler, steps, generator=gen(3))
    b = td.sample(model, x_T, sampler, steps, generator=gen(3))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    if sampler in ("rk4", "ode"):
        g = gen(4)
        before = g.get_state()
        c = td.sample(model, x_T, sampler, steps, generator=g)
        torch.testing.assert_close(a, c, rtol=0, atol=0)
        assert torch.equal(g.get_state(), before)
    else:
        assert not torch.equal(a, td.sample(model, x_T, sampler, steps, generator=gen(4)))


def test_sampler_options_are_checked():
    proc = PROCS["ve"]
    model = oracle_model(proc)
    x_T = proc.prior_sample((2, 1), gen(), dtype=D)
    with pytest.raises(ValueError, match="predictor"):
        td.sample(model, x_T, "pc", 10, predictor="heun")
    with pytest.raises(ValueError, match="allowed"):
        td.sample(model, x_T, "euler_maruyama", 10, snr=0.1)
    with pytest.raises(ValueError, match="levels x n_steps_each"):
        td.sample(model, x_T, "annealed_langevin", 50, n_steps_each=100)
    with pytest.raises(ValueError, match="give eps"):
        td.sample(model, x_T, "annealed_langevin", 50, eps=0.1, snr=0.1)
    with pytest.raises(ValueError, match="n_corrector"):
        td.sample(model, x_T, "pc", 10, n_corrector=1.5)
    with pytest.raises(ValueError, match="n_steps_each"):
        td.sample(model, x_T, "annealed_langevin", 100, n_steps_each=0)


def test_adaptive_ode_solves_to_t_min_whatever_the_grid():
    """The adaptive solve covers the whole trajectory for any grid (a 2-step trailing DDPM grid ends at t = 499);
    ``t_end`` stops it earlier, and a t_end outside the grid is refused."""
    proc = td.DDPM()
    model = oracle_model(proc)
    x_T = torch.randn(200, 1, generator=gen(5), dtype=D)
    a = td.sample(model, x_T, "ode", 2, grid="trailing", rtol=1e-7, atol=1e-7)
    b = td.sample(model, x_T, "ode", 5, grid="uniform", rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    c = td.sample(model, x_T, "ode", 2, grid="trailing", rtol=1e-7, atol=1e-7, t_end=499.0)
    assert float((c - a).abs().max()) > 0.05  # Tweedie from t = 499 is a different (blurred) output
    with pytest.raises(ValueError, match="t_end must be in"):
        td.sample(model, x_T, "ode", 2, t_end=5000.0)
