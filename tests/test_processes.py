"""Forward processes: DDPM schedule and posterior, continuous SDEs against closed forms and their ODEs."""

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.processes import make_betas

F64 = torch.float64


def se_mean(x):
    return x.std() / math.sqrt(len(x))


# --- DDPM (T-FWD-*) -----------------------------------------------------------------------------------------

def test_linear_schedule_defaults_and_monotone():  # T-FWD-1, T-FWD-3
    p = td.DDPM()
    assert p.T == 1000
    assert p.betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert p.betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert (p.betas[1:] > p.betas[:-1]).all()
    assert p.alphas_cumprod[-1].item() == pytest.approx(4.036e-5, rel=1e-3)
    assert p.alpha(999).item() == pytest.approx(6.35e-3, rel=1e-3)


def test_one_forward_step_moments():  # T-FWD-1: q(x_t | x_{t-1}) = N(sqrt(1-b) x, b)
    p = td.DDPM()
    g = torch.Generator().manual_seed(0)
    k, x_prev, n = 400, 0.7, 200_000
    b = p.betas[k]
    x = torch.sqrt(1 - b) * x_prev + torch.sqrt(b) * torch.randn(n, generator=g, dtype=F64)
    assert abs(x.mean() - math.sqrt(1 - b) * x_prev) < 4 * se_mean(x)
    assert abs(x.var() - b) < 4 * b * math.sqrt(2 / n)


def test_abar_recursion_and_add_noise():  # T-FWD-2 (a), (c)
    p = td.DDPM()
    ab, ab_prev = p.alphas_cumprod, p.alphas_cumprod_prev
    assert torch.allclose(1 - ab, p.alphas * (1 - ab_prev) + p.betas, atol=1e-12, rtol=0)
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.tensor([0, 1, 10, 500, 999])
    xt = p.add_noise(x0, t, eps)
    ref = ab[t].sqrt()[:, None] * x0 + (1 - ab[t]).sqrt()[:, None] * eps
    assert torch.equal(xt, ref)


def test_simulated_chain_matches_closed_form():  # T-FWD-2 (b)
    p = td.DDPM()
    g = torch.Generator().manual_seed(2)
    n, x0 = 100_000, 1.5
    x = torch.full((n,), x0, dtype=F64)
    checks = {1: None, 10: None, 500: None, 1000: None}
    for t in range(1, 1001):
        b = p.betas[t - 1]
        x = torch.sqrt(1 - b) * x + torch.sqrt(b) * torch.randn(n, generator=g, dtype=F64)
        if t in checks:
            ab = p.alphas_cumprod[t - 1]
            v = 1 - ab
            assert abs(x.mean() - ab.sqrt() * x0) < 4 * math.sqrt(v / n), t
            assert abs(x.var() - v) < 4 * v * math.sqrt(2 / n), t


def test_index_convention_hand_table():  # T-FWD-4
    p = td.DDPM(betas=torch.tensor([0.1, 0.2, 0.3], dtype=F64))
    assert torch.allclose(p.alphas_cumprod, torch.tensor([0.9, 0.72, 0.504], dtype=F64), atol=1e-15)
    assert torch.allclose(p.alphas_cumprod_prev, torch.tensor([1.0, 0.9, 0.72], dtype=F64), atol=1e-15)
    assert p.posterior_variance[0] == 0
    x0, xt = torch.tensor([[0.3]], dtype=F64), torch.tensor([[-1.1]], dtype=F64)
    mean, var = p.posterior(xt, x0, 0)
    assert torch.allclose(mean, x0, atol=1e-15) and var.item() == 0
    # k = 2 (paper t = 3): beta-tilde = beta (1 - abar_prev) / (1 - abar)
    assert p.posterior_variance[2].item() == pytest.approx(0.3 * 0.28 / 0.496, rel=1e-14)


def test_posterior_equals_gaussian_conditioning():  # T-VLB-4 (a)
    p = td.DDPM()
    x0, xt = torch.tensor([[0.4]], dtype=F64), torch.tensor([[-0.8]], dtype=F64)
    for k in (1, 5, 300, 999):
        a_t, ab, ab_prev = p.alphas[k], p.alphas_cumprod[k], p.alphas_cumprod_prev[k]
        cov = a_t.sqrt() * (1 - ab_prev)  # Cov(x_{t-1}, x_t | x0)
        mean = ab_prev.sqrt() * x0 + cov / (1 - ab) * (xt - ab.sqrt() * x0)
        var = (1 - ab_prev) - cov**2 / (1 - ab)
        m, v = p.posterior(xt, x0, k)
        assert torch.allclose(m, mean, atol=1e-12, rtol=0)
        assert v.item() == pytest.approx(var.item(), abs=1e-12)
        # DDPM eq. 7 coefficients
        c0 = ab_prev.sqrt() * p.betas[k] / (1 - ab)
        cx = a_t.sqrt() * (1 - ab_prev) / (1 - ab)
        assert torch.allclose(m, c0 * x0 + cx * xt, atol=1e-12, rtol=0)


def test_posterior_regression_by_monte_carlo():  # T-VLB-4 (b)
    p = td.DDPM()
    g = torch.Generator().manual_seed(3)
    k, x0, n = 200, 0.5, 200_000
    ab_prev = p.alphas_cumprod_prev[k]
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * torch.randn(n, generator=g, dtype=F64)
    b = p.betas[k]
    xt = (1 - b).sqrt() * x_prev + b.sqrt() * torch.randn(n, generator=g, dtype=F64)
    A = torch.stack([xt, torch.ones_like(xt)], 1)
    coef = torch.linalg.lstsq(A, x_prev[:, None]).solution.flatten()
    resid = x_prev - A @ coef
    c_x, c_0, var = p.posterior_coefficients(k, k - 1)
    se_slope = resid.std() / (xt.std() * math.sqrt(n))
    assert abs(coef[0] - c_x) < 4 * se_slope
    assert abs(resid.var() - var) < 4 * var * math.sqrt(2 / n)


def test_named_schedules():  # B-7
    T = 1000
    cos = make_betas("cosine", T)
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    ab = torch.cumprod(1 - cos, 0)
    for t in (1, 10, 500, 900):
        assert ab[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-9)
    assert cos.max().item() <= 0.999
    sl = make_betas("scaled_linear", T)
    assert torch.allclose(sl, torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=F64) ** 2)
    z = td.DDPM("linear", rescale_zero_snr=True)
    assert z.alphas_cumprod[-1].item() == pytest.approx(0.0, abs=1e-20)
    assert z.alphas_cumprod[0].item() == pytest.approx(td.DDPM().alphas_cumprod[0].item(), rel=1e-12)
    with pytest.raises(ValueError, match="allowed"):
        make_betas("quadratic", 10)


def test_from_alphas_cumprod_roundtrip():
    p = td.DDPM("scaled_linear")
    q = td.DDPM(alphas_cumprod=p.alphas_cumprod)
    assert torch.allclose(p.betas, q.betas, atol=1e-14)


def test_fractional_time_interpolates_log_snr():
    p = td.DDPM()
    l = p.log_snr(torch.tensor([10.0, 10.25, 11.0]))
    assert l[1].item() == pytest.approx(0.75 * l[0].item() + 0.25 * l[2].item(), rel=1e-14)
    t = torch.tensor([0.0, 3.3, 517.9, 999.0], dtype=F64)
    assert torch.allclose(p.t_from_log_snr(p.log_snr(t)), t, atol=1e-9)
    assert p.alpha(-1).item() == 1 and p.sigma(-1).item() == 0


def test_time_out_of_range_is_an_error():
    with pytest.raises(ValueError, match="outside the process range"):
        td.DDPM().alpha(1000)
    with pytest.raises(ValueError, match="outside the process range"):
        td.VP().add_noise(torch.zeros(2, 1), torch.tensor([0.5, 1.5]), torch.zeros(2, 1))


def test_sde_limit_of_ddpm():  # T-FWD-5
    vp, p = td.VP(), td.DDPM()
    assert vp.alpha(1.0).item() ** 2 == pytest.approx(math.exp(-0.5 * (0.1 + 20)), rel=1e-12)
    assert vp.alpha(1.0).item() ** 2 == pytest.approx(4.32e-5, rel=2e-3)
    N = 1000
    beta_i = vp.beta(torch.linspace(0, 1, N, dtype=F64)) / N  # beta_i = beta(t_i) dt with t_i = (i-1)/(N-1)
    assert torch.allclose(beta_i, p.betas, atol=1e-15, rtol=0)
    t = torch.arange(1, N + 1, dtype=F64) / N
    gap = (torch.log(p.alphas_cumprod) - 2 * torch.log(vp.alpha(t))).abs().max()
    assert gap <= 0.07


# --- continuous processes (T-SDE-4/5/6) ------------------------------------------------------------------

PROCS = [td.VP(), td.SubVP(), td.VE(), td.EDM(), td.DDPM()]


@pytest.mark.parametrize("proc", PROCS, ids=lambda p: p.name)
def test_mean_and_variance_odes_match_closed_forms(proc):
    """Integrate m' = f m and V' = 2 f V + g^2 (T-SDE-1/2) with RK4 from the clean time; compare with
    alpha(t) and sigma(t)^2."""
    t0 = proc.t_zero if not proc.discrete else 0.0
    m = torch.tensor(1.0 if not proc.discrete else float(proc.alpha(0)), dtype=F64)
    V = torch.tensor(0.0 if not proc.discrete else float(proc.sigma(0)) ** 2, dtype=F64)
    t1 = proc.t_max
    n = 3996 if proc.discrete else 4000  # DDPM: steps of 1/4 so that the log-SNR kinks fall on step ends
    h = (t1 - t0) / n

    def rhs(t, m, V):
        f, g = proc.sde_coefficients(torch.tensor(t, dtype=F64))
        return f * m, 2 * f * V + g**2

    checks = {4 * int(n * q / 4) for q in (0.1, 0.5, 1.0)}
    for i in range(n):
        t = t0 + i * h
        k1 = rhs(t, m, V)
        k2 = rhs(t + h / 2, m + h / 2 * k1[0], V + h / 2 * k1[1])
        k3 = rhs(t + h / 2, m + h / 2 * k2[0], V + h / 2 * k2[1])
        # DDPM's log-SNR has kinks at integers: evaluate the last stage just inside the step's segment
        k4 = rhs(t + h - (1e-9 if proc.discrete else 0.0), m + h * k3[0], V + h * k3[1])
        m = m + h / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0])
        V = V + h / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1])
        if i + 1 in checks:
            tt = torch.tensor(t0 + (i + 1) * h, dtype=F64)
            assert m.item() == pytest.approx(proc.alpha(tt).item(), rel=2e-5, abs=1e-9), (proc.name, tt)
            assert V.item() == pytest.approx(proc.sigma(tt).item() ** 2, rel=2e-5, abs=1e-9), (proc.name, tt)


@pytest.mark.parametrize("proc", PROCS[:4], ids=lambda p: p.name)
def test_closed_form_sde_equals_generic(proc):
    t = torch.linspace(proc.t_min, proc.t_max, 7, dtype=F64)
    f, g = proc.sde_coefficients(t)
    f2, g2 = td.Process.sde_coefficients(proc, t)
    assert torch.allclose(f, f2, rtol=1e-9, atol=1e-12)
    assert torch.allclose(g, g2, rtol=1e-9, atol=1e-12)


def test_vp_subvp_ve_closed_forms():
    t = torch.linspace(0.01, 1, 50, dtype=F64)
    vp, sub, ve = td.VP(), td.SubVP(), td.VE()
    B = 0.1 * t + 0.5 * t**2 * 19.9
    assert torch.allclose(vp.alpha(t), torch.exp(-B / 2), rtol=1e-12)
    assert torch.allclose(vp.alpha(t) ** 2 + vp.sigma(t) ** 2, torch.ones_like(t), atol=1e-12)
    assert torch.allclose(sub.sigma(t), 1 - torch.exp(-B), rtol=1e-12)
    assert (sub.sigma(t) ** 2 <= vp.sigma(t) ** 2).all()  # V_subVP = (1 - e^-B)^2 <= 1 - e^-B
    s = 0.01 * (5000.0) ** t
    assert torch.allclose(ve.sigma(t) ** 2, s**2 - 0.01**2, rtol=1e-10)
    # g^2 = d sigma^2 / dt by finite differences (T-SDE-5)
    h = 1e-6
    fd = (ve.sigma(t + h) ** 2 - ve.sigma(t - h) ** 2) / (2 * h)
    assert torch.allclose(ve.sde_coefficients(t)[1] ** 2, fd, rtol=1e-6)


@pytest.mark.parametrize("proc", PROCS, ids=lambda p: p.name)
def test_log_snr_inverse(proc):
    t = torch.linspace(proc.t_min, proc.t_max, 9, dtype=F64)
    assert torch.allclose(proc.t_from_log_snr(proc.log_snr(t)), t, rtol=1e-7, atol=1e-9)
    assert (proc.log_snr(t)[1:] < proc.log_snr(t)[:-1]).all()


def test_process_config_roundtrip():
    for p in PROCS + [td.DDPM("cosine", T=50), td.DDPM(betas=torch.linspace(0.01, 0.2, 5))]:
        q = td.process_from_config(p.config())
        t = torch.linspace(p.t_min, p.t_max, 5, dtype=F64)
        if p.discrete:
            t = t.round()
        assert torch.allclose(p.alpha(t), q.alpha(t)) and torch.allclose(p.sigma(t), q.sigma(t))
    with pytest.raises(ValueError, match="unknown process"):
        td.process_from_config({"name": "bogus"})
