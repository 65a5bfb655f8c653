"""Issue 17: the learned-schedule process, the continuous-time bound (VDM), dequantization accounting, Fourier
features, `levels` in .npz files and the likelihood_digits preset."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion import likelihood as L
from torchdiffusion.losses import continuous_vlb_loss
from torchdiffusion.processes import LearnedVP, Process, process_from_config

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bent_schedule(seed: int = 0) -> LearnedVP:
    """A learned-schedule process with its parameters moved away from the (linear) initialization."""
    proc = LearnedVP(-8.0, 5.0, schedule_hidden=8)
    g = gen(seed)
    with torch.no_grad():
        for p in proc.schedule.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 2.0)
        proc.schedule.c.add_(4.0)  # a clearly non-linear shape
    return proc


# ------------------------------------------------------------------------------------------------------------
# The learned-schedule process is a valid process
# ------------------------------------------------------------------------------------------------------------


def test_learned_schedule_is_monotone_for_any_parameters():  # B-8 (learned schedule)
    t = torch.linspace(0, 1, 2001, dtype=F64)
    for seed in range(5):
        proc = bent_schedule(seed)
        with torch.no_grad():
            lam, dlam = proc.log_snr(t), proc.log_snr_derivative(t)
        assert (dlam < 0).all() and (lam[1:] < lam[:-1]).all()
        g0, g1 = (float(v.detach()) for v in proc.schedule.endpoints())
        assert float(lam[0]) == pytest.approx(-g0, abs=1e-9) and float(lam[-1]) == pytest.approx(-g1, abs=1e-9)


def test_learned_schedule_matches_the_process_identities():  # B-8, T-SDE-1
    proc = bent_schedule(1)
    t = torch.linspace(0, 1, 101, dtype=F64)
    with torch.no_grad():
        a, s = proc.alpha(t), proc.sigma(t)
        torch.testing.assert_close(a**2 + s**2, torch.ones_like(t))
        torch.testing.assert_close(proc.log_snr(t), torch.log(a**2 / s**2))
        f, g = proc.sde_coefficients(t)
    f_gen, g_gen = Process.sde_coefficients(proc, t)  # autograd of log alpha and sigma^2 (T-SDE-1/2)
    torch.testing.assert_close(f, f_gen)
    torch.testing.assert_close(g, g_gen)
    torch.testing.assert_close(proc.log_snr_derivative(t).detach(), Process.log_snr_derivative(proc, t))
    with torch.no_grad():
        lam = proc.log_snr(t[5:-5])
    torch.testing.assert_close(proc.t_from_log_snr(lam), t[5:-5], atol=1e-9, rtol=0)
    assert float(proc.sigma(-1.0)) == 0 and float(proc.alpha(-1.0)) == 1
    with pytest.raises(ValueError, match="undefined"):
        proc.alpha(-0.5)
    assert isinstance(process_from_config(proc.config()), LearnedVP)


def test_learned_schedule_stays_monotone_while_trained():  # B-8
    proc = LearnedVP(-8.0, 5.0, schedule_hidden=8)
    opt = torch.optim.Adam(proc.schedule.parameters(), lr=0.3)
    t = torch.rand(64, generator=gen(0), dtype=F64)
    grid = torch.linspace(0, 1, 501, dtype=F64)
    for _ in range(50):  # push the schedule hard in an arbitrary direction
        opt.zero_grad()
        (proc.log_snr(t) ** 2 * torch.sin(9 * t)).sum().backward()
        opt.step()
        with torch.no_grad():
            d = proc.log_snr_derivative(grid)
            assert (d < 0).all() and torch.isfinite(d).all()


# ------------------------------------------------------------------------------------------------------------
# The continuous-time bound
# ------------------------------------------------------------------------------------------------------------


def mixture() -> td.GaussianMixture:
    means = torch.tensor([[-0.6, 0.2], [0.5, -0.4], [0.1, 0.7]], dtype=F64)
    return td.GaussianMixture(torch.tensor([0.3, 0.5, 0.2]), means, 0.05)


@pytest.mark.parametrize("make", [lambda: td.VP(), lambda: bent_schedule(2), lambda: td.VE(0.01, 20.0)],
                         ids=["vp", "learned", "ve"])
def test_continuous_bound_is_the_limit_of_the_discrete_bound(make):  # B-8
    """The discrete bound's KL terms (posterior variance; every x_t from one eps) summed over a grid of N steps on
    [t_min, t_max] converge to L_diffusion = -1/2 int lambda'(t) ||eps - eps_hat||^2 dt at rate 1/N (a Riemann sum
    of the same integrand: L_i = 1/2 (SNR_s - SNR_t) ||x0 - x0_hat||^2); prior terms are the same function."""
    proc = make()
    gm = mixture()
    model = td.Denoiser(gm.net(proc, "eps"), proc)
    B = 4
    x0 = gm.sample(B, generator=gen(3))[0]
    eps = torch.randn(x0.shape, generator=gen(4), dtype=F64)
    lo = math.log(proc.t_min if proc.t_min > 0 else 1e-9)
    hi = math.log(proc.t_max)

    def grid(n: int) -> torch.Tensor:  # log-spaced in t (the weight is ~1/t near t_min for VP); starts at t_min
        t = torch.exp(torch.linspace(lo, hi, n, dtype=F64))
        t[0], t[-1] = proc.t_min, proc.t_max
        return t

    with torch.no_grad():
        # L_diffusion by composite Simpson in u = log t on 4000 intervals, all times in one batch
        M = 4000
        u = torch.linspace(lo, hi, M + 1, dtype=F64)
        tq = torch.exp(u).clamp(proc.t_min, proc.t_max)
        T = tq.repeat_interleave(B)
        X, E = x0.repeat(M + 1, 1), eps.repeat(M + 1, 1)
        e_hat = model.eps(proc.add_noise(X, T, E), T)
        f = (-0.5 * proc.log_snr_derivative(T) * ((E - e_hat) ** 2).sum(1) * T).reshape(M + 1, B)
        wts = torch.ones(M + 1, dtype=F64)
        wts[1:-1:2], wts[2:-1:2] = 4, 2
        cont = (wts[:, None] * f).sum(0) * (u[1] - u[0]) / 3
        errs = []
        for N in (100, 400, 1600):
            times = torch.cat([torch.tensor([proc.t_zero], dtype=F64), grid(N)])
            i = torch.arange(1, N).repeat_interleave(B)
            X, E = x0.repeat(N - 1, 1), eps.repeat(N - 1, 1)
            xt = proc.add_noise(X, times[i + 1], E)
            disc = L.vlb_term(model, X, i, times=times, variance="small", x_t=xt).reshape(N - 1, B).sum(0)
            errs.append(float(((disc - cont).abs() / cont).max()))
    assert all(3 < a / b < 5 for a, b in zip(errs, errs[1:])), errs  # error ~ 1/N
    assert errs[2] < 0.02, errs
    tT = torch.tensor(proc.t_max, dtype=F64)
    torch.testing.assert_close(L.prior_term(model, x0).detach(), L.prior_kl(proc, x0))
    assert float(proc.sigma(tT)) > 0


def test_bound_estimator_is_unbiased_and_antithetic_lowers_its_variance():  # B-8
    proc = td.VP()
    gm = mixture()
    model = td.Denoiser(gm.net(proc, "eps"), proc)
    x0 = gm.sample(1, generator=gen(5))[0].expand(4000, 2).contiguous()
    res = {}
    for kind in L.TIME_SAMPLERS:
        nll, terms = L.continuous_bound(model, x0, n_t=1, time_sampler=kind, generator=gen(6))
        res[kind] = terms["L_diffusion"]
    m = {k: float(v.mean()) for k, v in res.items()}
    se = float(res["uniform"].std()) / math.sqrt(4000)
    assert abs(m["antithetic"] - m["uniform"]) < 4 * se and abs(m["stratified"] - m["uniform"]) < 4 * se
    # pairs (u, 1-u) average to one value each: their spread is smaller than that of independent draws
    pair = 0.5 * (res["antithetic"][:2000] + res["antithetic"][2000:])
    indep = 0.5 * (res["uniform"][:2000] + res["uniform"][2000:])
    assert float(pair.var()) < float(indep.var())


def test_bound_is_above_the_exact_nll_and_the_decoder_is_discretized():  # B-8, B-1
    proc = td.VP()
    gm = td.GaussianMixture.gaussian(0.0, 0.25, dim=3)
    model = td.Denoiser(gm.net(proc, "eps"), proc)
    x = gm.sample(2000, generator=gen(7))[0]
    nll, terms = L.continuous_bound(model, x, n_t=4, time_sampler="stratified", generator=gen(8))
    exact = -gm.log_prob(x)
    gap = (nll - exact).double()
    se = float(gap.std()) / math.sqrt(len(gap))
    assert -3 * se < float(gap.mean()) < 0.05 + 3 * se, (float(gap.mean()), se)  # tight for the exact model
    k = torch.round((torch.rand(64, 3, generator=gen(9), dtype=F64) * 2 - 1) * 8) / 8  # 17 levels
    _, t2 = L.continuous_bound(model, k, levels=17, dequantize="none", generator=gen(10))
    assert (t2["L_recon"] >= 0).all() and (t2["dequantization"] == 0).all()


def test_variance_gradient_reaches_the_shape_and_the_bound_gradient_the_endpoints():  # B-8
    """The schedule's shape gets the gradient of mean(L_diffusion^2) (times D^2, per dimension), the endpoints
    that of the bound."""
    torch.manual_seed(0)
    proc = bent_schedule(3)
    net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    model = td.Denoiser(lambda x, t: net(x), proc)
    x = mixture().sample(32, generator=gen(11))[0].float()
    sched = proc.schedule
    loss = continuous_vlb_loss(model, x, time_sampler="stratified", generator=gen(12))
    loss.backward()
    got = {n: p.grad.clone() for n, p in sched.named_parameters()}
    sched.zero_grad()
    sched.grad_scale.scale = None
    nll, terms = L.continuous_bound(model, x, n_t=1, time_sampler="stratified", generator=gen(12))
    shape_names = ("a", "w", "b", "c")
    ((terms["L_diffusion"] / 2) ** 2).mean().backward()
    for n in shape_names:
        torch.testing.assert_close(got[n].double(), dict(sched.named_parameters())[n].grad.double(),
                                   rtol=1e-4, atol=1e-9)
    sched.zero_grad()
    nll, _ = L.continuous_bound(model, x, n_t=1, time_sampler="stratified", generator=gen(12))
    (nll / 2).mean().backward()
    for n in ("gamma_0", "delta"):
        torch.testing.assert_close(got[n].double(), dict(sched.named_parameters())[n].grad.double(), rtol=1e-4,
                                   atol=1e-9)
        assert got[n].abs() > 0


# ------------------------------------------------------------------------------------------------------------
# Dequantization accounting
# ------------------------------------------------------------------------------------------------------------


def test_dequantization_accounting_is_exact_on_a_known_discrete_distribution():  # B-1
    """P(k) on K = 5 levels in D = 3 dims; its histogram density p(y) = P(k(y)) (K/W)^D on the dequantization bins
    gives -log p(y) + D log(K/W) = -log P(k) for every u (the bound is tight), in bits/dim exactly."""
    K, D, lo, hi = 5, 3, -1.0, 1.0
    P = torch.rand((K,) * D, generator=gen(13), dtype=F64) + 0.1
    P = P / P.sum()
    codes = torch.randint(0, K, (500, D), generator=gen(14))
    x = lo + codes.to(F64) * (hi - lo) / (K - 1)  # the K-level grid values
    y = L.dequantize(x, K, (lo, hi), gen(15))
    bins = torch.floor((y - lo) / (hi - lo) * K).long()
    assert torch.equal(bins, codes)  # each value stays in its own bin
    log_p_y = torch.log(P[bins[:, 0], bins[:, 1], bins[:, 2]]) + D * math.log(K / (hi - lo))
    nll = -log_p_y + D * math.log(2) * L.dequantization_offset(K, (lo, hi))
    exact = -torch.log(P[codes[:, 0], codes[:, 1], codes[:, 2]])
    torch.testing.assert_close(nll, exact)
    torch.testing.assert_close(L.nll_to_bpd(-log_p_y, D, K, (lo, hi)), exact / (D * math.log(2)))
    # uniform q: log q = 0, so the dequantization term is the offset alone
    model = td.Denoiser(lambda x, t: x, td.VP())
    _, extra = L.dequantize_for(model, x, K, (lo, hi), "uniform", gen(15))
    torch.testing.assert_close(extra, torch.full((500,), D * math.log(K / (hi - lo)), dtype=F64))


def test_variational_dequantizer_stays_in_the_bins_and_its_log_density_is_right():  # B-1
    deq = td.nets.VariationalDequantizer(1, hidden=4)
    with torch.no_grad():
        deq.net[-1].bias.copy_(torch.tensor([0.3, -0.5]))
    x = torch.round(torch.rand(6, 1, 4, 4, generator=gen(16)) * 16) / 8 - 1
    y, log_q = deq(x, 17, (-1.0, 1.0), gen(17))
    k = torch.round((x + 1) * 8)
    assert torch.equal(torch.floor((y + 1) / 2 * 17), k)
    # logit-normal with m = 0.3, s = exp(-0.5): log q(u) = log N(logit u; m, s^2) - log(u (1 - u))
    u = (y + 1) / 2 * 17 - k
    h = torch.log(u) - torch.log1p(-u)
    s = math.exp(-0.5)
    ref = (-0.5 * ((h - 0.3) / s) ** 2 - 0.5 * math.log(2 * math.pi) - math.log(s) - torch.log(u * (1 - u)))
    torch.testing.assert_close(log_q, ref.flatten(1).sum(1), rtol=1e-3, atol=1e-3)


def test_bits_per_dim_uses_the_continuous_bound_for_continuous_processes():  # B-1, B-8
    proc = bent_schedule(4)
    gm = td.GaussianMixture.gaussian(0.0, 0.3, dim=4)
    model = td.Denoiser(gm.net(proc, "eps"), proc)
    x = torch.round(gm.sample(16, generator=gen(18))[0].clamp(-1, 1) * 8) / 8
    r = L.bits_per_dim(model, x, method="vlb", levels=17, generator=gen(19), n_t=4)
    assert r.method == "vlb-continuous" and torch.isfinite(r.bpd).all()
    assert set(r.terms) == {"L_prior", "L_recon", "L_diffusion", "dequantization"}
    r2 = L.bits_per_dim(model, x, method="ode", levels=17, generator=gen(19), divergence="exact")
    assert torch.isfinite(r2.bpd).all()
    with pytest.raises(ValueError, match="dequantized"):
        L.bits_per_dim(model, x, method="ode", levels=17, dequantize="none")


# ------------------------------------------------------------------------------------------------------------
# Fourier features, .npz levels, the preset
# ------------------------------------------------------------------------------------------------------------


def test_unet_fourier_features():
    from torchdiffusion.nets.unet import fourier_input

    x = torch.rand(2, 1, 8, 8) * 2 - 1
    f = fourier_input(x, (3, 4))
    assert f.shape == (2, 5, 8, 8)
    torch.testing.assert_close(f[:, 3], torch.sin(16 * math.pi * x[:, 0]))
    net = td.nets.UNet(1, image_size=8, channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                       groups=8, fourier_features=(3, 4, 5))
    assert net(x, torch.zeros(2)).shape == x.shape


def test_npz_levels(tmp_path):
    from torchdiffusion.data.datasets import load_npz

    codes = np.random.default_rng(0).integers(0, 17, size=(5, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "a.npz", x=codes, levels=np.array(17))
    ds = load_npz(tmp_path / "a.npz")
    assert ds.levels == 17 and ds.shape == (1, 8, 8)
    torch.testing.assert_close(ds.x[:, 0], torch.tensor(codes, dtype=torch.float32) / 16 * 2 - 1)
    np.savez(tmp_path / "b.npz", x=ds.x.numpy(), levels=np.array(17))
    assert load_npz(tmp_path / "b.npz").levels == 17
    np.savez(tmp_path / "c.npz", x=ds.x.numpy() + 0.01, levels=np.array(17))
    with pytest.raises(ValueError, match="grid"):
        load_npz(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", x=codes, levels=np.array([17, 3]))
    with pytest.raises(ValueError, match="scalar whole number"):
        load_npz(tmp_path / "d.npz")
    np.savez(tmp_path / "e.npz", x=codes, levels=np.array(4))
    with pytest.raises(ValueError, match="codes 0..3"):
        load_npz(tmp_path / "e.npz")


def test_likelihood_preset_trains_saves_and_loads(tmp_path):
    """A few steps of likelihood_digits (small net): the schedule lives in the trained module (and its EMA), the
    loaded run reads its own schedule, and both likelihoods are finite."""
    from torchdiffusion.data.datasets import load
    from torchdiffusion.runs import config
    from torchdiffusion.runs.build import load_run
    from torchdiffusion.runs.train import build_trainer, ema_model

    d = load("digits")
    ds = td.data.datasets.Dataset(d.x[:64], None, levels=17, name="digits")
    cfg = config.resolve("likelihood_digits", ["train.steps=3", "train.batch=16", "model.channels=8",
                                               "train.ckpt_every=0", "train.device=cpu", "model.dequantizer=true",
                                               "loss.dequantize=variational"])
    tr = build_trainer(cfg, tmp_path / "run", dataset=ds, progress=False, resume=False)
    before = tr.net.schedule.gamma_0.item()
    tr.run()
    assert tr.net.schedule.gamma_0.item() != before
    ema = ema_model(tr)
    assert ema.process.schedule is ema.net.schedule is not tr.net.schedule
    model, _ = load_run(tmp_path / "run")
    assert model.process.schedule is model.net.schedule
    torch.testing.assert_close(model.net.schedule.gamma_0, ema.net.schedule.gamma_0)
    x = d.x[1200:1204]
    r = L.bits_per_dim(model, x, method="vlb", levels=17, generator=gen(0), n_t=2)
    assert torch.isfinite(r.bpd).all() and (r.terms["dequantization"] != 64 * math.log(8.5)).all()
    r = L.bits_per_dim(model, x, method="ode", levels=17, generator=gen(0), rtol=1e-3, atol=1e-3)
    assert torch.isfinite(r.bpd).all()
    from torchdiffusion.cli.main import main

    assert main(["likelihood", str(tmp_path / "run"), "--method", "vlb", "--n", "4", "--n-t", "2",
                 "--json", str(tmp_path / "l.json")]) == 0  # the continuous-time bound with the run's dequantizer
    out = __import__("json").loads((tmp_path / "l.json").read_text())
    assert out["method"] == "vlb" and "L_diffusion" in out["breakdown"] and math.isfinite(out["bpd"])


def test_schedule_cache_follows_updates_and_copies():
    """Without gradients the schedule's coefficients are cached; an in-place update, a copy (EMA) and a loaded state
    dict each see their own parameters."""
    import copy

    proc = bent_schedule(5)
    t = torch.linspace(0, 1, 7, dtype=F64)
    with torch.no_grad():
        before = proc.log_snr(t).clone()
        ema = copy.deepcopy(proc.schedule)
        proc.schedule.gamma_0.add_(1.0)
        after = proc.log_snr(t)
        assert not torch.allclose(before, after)
        torch.testing.assert_close(proc.with_schedule(ema).log_snr(t), before)
        ema.load_state_dict(proc.schedule.state_dict())
        torch.testing.assert_close(proc.with_schedule(ema).log_snr(t), after)
    with torch.enable_grad():  # with gradients: no cache, a graph to the parameters
        assert proc.log_snr(t).requires_grad
