"""Parameterizations: every prediction type reproduces the others (T-PAR-1..10), EDM preconditioning (B-9)."""

import math

import pytest
import torch

import torchdiffusion as td

F64 = torch.float64
PROCS = [td.DDPM(), td.DDPM("cosine"), td.VP(), td.SubVP(), td.VE(), td.EDM()]


def gm():
    return td.GaussianMixture(torch.tensor([0.3, 0.7]), torch.tensor([[-2.0, 0.5], [1.5, -1.0]], dtype=F64),
                              torch.tensor([[0.09, 0.2], [0.25, 0.1]], dtype=F64))


def times(proc):
    t = torch.tensor([proc.t_min, 0.5 * (proc.t_min + proc.t_max), proc.t_max], dtype=F64)
    return t.round() if proc.discrete else t


@pytest.mark.parametrize("proc", PROCS, ids=lambda p: p.name + ("_cos" if getattr(p, "_kind", "") == "cosine" else ""))
@pytest.mark.parametrize("pred", td.PREDICTIONS)
def test_equivalence_harness(proc, pred):  # T-PAR-10
    oracle = gm()
    ref = td.Denoiser(oracle.net(proc, "eps"), proc, "eps")
    model = td.Denoiser(oracle.net(proc, pred), proc, pred)
    x = torch.randn(16, 2, generator=torch.Generator().manual_seed(0), dtype=F64) * 2
    for t in times(proc):
        for f in ("eps", "x0", "score", "v"):
            a, b = getattr(model, f)(x, t), getattr(ref, f)(x, t)
            assert torch.isfinite(a).all()
            # conversions divide by alpha or sigma (up to squared): round-off grows like 1/alpha^2 + 1/sigma^2
            cond = float(1 / proc.alpha(t) ** 2 + 1 / proc.sigma(t) ** 2)
            tol = 1e-13 * (1 + b.abs().max().item()) * cond
            assert torch.allclose(a, b, rtol=1e-9, atol=tol), (f, float(t))


def test_ddpm_mean_three_forms():  # T-PAR-1, T-PAR-2, T-PAR-3, T-PAR-6
    p = td.DDPM()
    oracle = gm()
    model = td.Denoiser(oracle.net(p, "eps"), p)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    for k in (1, 10, 500, 999):
        eps = model.eps(x, k)
        a_t, ab, ab_prev, b = p.alphas[k], p.alphas_cumprod[k], p.alphas_cumprod_prev[k], p.betas[k]
        mu_eps = (x - b * eps / (1 - ab).sqrt()) / a_t.sqrt()  # Algorithm 2 line 4
        x0 = (x - (1 - ab).sqrt() * eps) / ab.sqrt()  # T-PAR-1
        mu_x0 = (a_t.sqrt() * (1 - ab_prev) * x + ab_prev.sqrt() * b * x0) / (1 - ab)  # T-PAR-3
        score = -eps / (1 - ab).sqrt()
        mu_score = (x + b * score) / a_t.sqrt()  # T-PAR-6
        mu = model.mean(x, k)
        for other in (mu_eps, mu_x0, mu_score):
            assert torch.allclose(mu, other, rtol=1e-12, atol=1e-12)
        # T-PAR-3: x0-loss weight equals 1/2 (SNR_{t-1} - SNR_t) with sigma_q^2 = beta-tilde
        bt = p.posterior_variance[k]
        w = ab_prev * b**2 / (2 * bt * (1 - ab) ** 2)
        assert w.item() == pytest.approx(0.5 * (ab_prev / (1 - ab_prev) - ab / (1 - ab)).item(), rel=1e-10)


@pytest.mark.parametrize("proc", [td.VP(), td.SubVP(), td.VE()], ids=lambda p: p.name)
def test_v_prediction_roundtrip(proc):  # T-PAR-9
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    t = torch.tensor(0.37, dtype=F64)
    a, s = proc.alpha(t), proc.sigma(t)
    x = a * x0 + s * eps
    v = a * eps - s * x0
    x0h, epsh = td.Denoiser.convert(x, a, s, v, "v")
    assert torch.allclose(x0h, x0, atol=1e-12) and torch.allclose(epsh, eps, atol=1e-12)
    if proc.name != "vp":  # the familiar a x - s v assumes a^2 + s^2 = 1
        assert not torch.allclose(a * x - s * v, x0, atol=1e-3)


def test_ve_coordinates():  # T-PAR-8
    p = td.DDPM()
    oracle = gm()
    k = 300
    ab = p.alphas_cumprod[k]
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    y, s = x / ab.sqrt(), ((1 - ab) / ab).sqrt()
    edm = td.EDM(sigma_min=1e-3, sigma_max=100)
    eps_vp, x0_vp = oracle.eps_x0(x, p, k)
    eps_ve, x0_ve = oracle.eps_x0(y, edm, s)
    assert torch.allclose(eps_vp, eps_ve, atol=1e-12)  # eps unchanged
    assert torch.allclose(x0_vp, y - s * eps_ve, atol=1e-12)  # x0 = y - s eps
    sc_y = oracle.score(y, edm, s)
    assert torch.allclose(sc_y, ab.sqrt() * oracle.score(x, p, k), atol=1e-12)  # grad_y log p_Y = sqrt(abar) grad_x


def test_edm_preconditioning_unit_variance():  # B-9
    sd = 0.5
    edm = td.EDM()
    model = td.Denoiser(lambda x, c: torch.zeros_like(x), edm, "x0", precond="edm", sigma_data=sd)
    g = torch.Generator().manual_seed(4)
    n = 100_000
    for sigma in (0.01, 0.5, 5.0, 60.0):
        s = torch.tensor(sigma, dtype=F64)
        c_skip, c_out, c_in, c_noise = model.edm_coefficients(s)
        assert c_skip.item() == pytest.approx(sd**2 / (sigma**2 + sd**2))
        assert c_out.item() == pytest.approx(sigma * sd / math.sqrt(sigma**2 + sd**2))
        assert c_noise.item() == pytest.approx(0.25 * math.log(sigma))
        x0 = sd * torch.randn(n, generator=g, dtype=F64)
        y = x0 + sigma * torch.randn(n, generator=g, dtype=F64)
        inp = c_in * y
        target = (x0 - c_skip * y) / c_out
        for v in (inp.var(), target.var()):
            assert abs(v.item() - 1) < 4 * math.sqrt(2 / n)


def test_edm_precond_exact_with_oracle_f():
    """An inner net that returns the exact F makes the preconditioned Denoiser exact."""
    oracle = gm()
    edm = td.EDM()
    ref = td.Denoiser(oracle.net(edm, "x0"), edm, "x0")
    holder = {}

    def inner(x_in, c_noise):
        s = torch.exp(4 * c_noise.to(F64))
        c_skip, c_out, c_in, _ = holder["m"].edm_coefficients(s)
        y = x_in / c_in[:, None]
        return (oracle.x0(y, edm, s) - c_skip[:, None] * y) / c_out[:, None]

    model = td.Denoiser(inner, edm, "x0", precond="edm")
    holder["m"] = model
    x = torch.randn(4, 2, generator=torch.Generator().manual_seed(5), dtype=F64) * 3
    assert torch.allclose(model.x0(x, 2.0), ref.x0(x, 2.0), atol=1e-6)


def test_zero_terminal_snr_eps_prediction_is_refused():  # B-7
    p = td.DDPM(rescale_zero_snr=True)
    model = td.Denoiser(lambda x, t: torch.zeros_like(x), p, "eps")
    with pytest.raises(ValueError, match="zero terminal SNR"):
        model.x0(torch.zeros(2, 2), 999)
    vmodel = td.Denoiser(lambda x, t: torch.ones_like(x), p, "v")
    assert torch.isfinite(vmodel.x0(torch.zeros(2, 2), 999)).all()


def test_denoiser_errors():
    p = td.DDPM()
    with pytest.raises(ValueError, match="unknown prediction"):
        td.Denoiser(lambda x, t: x, p, "noise")
    with pytest.raises(ValueError, match="takes no condition"):
        td.Denoiser(lambda x, t: x, p).eps(torch.zeros(2, 2), 5, cond=torch.zeros(2))
    with pytest.raises(ValueError, match="outside the process range"):
        td.Denoiser(lambda x, t: x, p).eps(torch.zeros(2, 2), 1000)
    with pytest.raises(ValueError, match="output shape"):
        td.Denoiser(lambda x, t: x[:, :1], p).eps(torch.zeros(2, 2), 5)
