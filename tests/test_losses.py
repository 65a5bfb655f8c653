"""Training losses (losses.py): L_simple at the exact optimum (T-ALG-1, T-PAR-7), the time sampler of Algorithm 1,
the weighting identities between eps-, x0-, v- and score-space errors (T-ALG-3, T-PAR-9, B-8, B-9, min-SNR),
gradients, and errors.

Every expected value is computed here independently of ``dsm_loss``/``eps_weight``: the targets and the
conversions are written out from the formulas, ``g^2`` comes from finite differences of ``alpha`` and ``sigma``,
and Monte Carlo comparisons are made within 4 standard errors.
"""

from __future__ import annotations

import math

import pytest
import torch

import torchdiffusion as td
from torchdiffusion.data.datasets import toy_density
from torchdiffusion.losses.score import WEIGHTINGS, dsm_loss, eps_weight, sample_times, simple_loss
from torchdiffusion.runs.losses import LOSSES

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _net(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """An arbitrary smooth 'network' (not an optimum of anything)."""
    tt = t.to(x.dtype)[:, None] / (1.0 + t.to(x.dtype).abs().max())
    return torch.tanh(0.7 * x + 0.3) * (1 + tt) - 0.2 * x.flip(1) * tt


PROCESSES = {"ddpm": td.DDPM(), "vp": td.VP(), "subvp": td.SubVP(), "ve": td.VE(sigma_max=20.0)}


def _times(proc, n: int) -> torch.Tensor:
    if proc.discrete:
        return torch.linspace(0, proc.t_max, n, dtype=D).round()
    return torch.linspace(proc.t_min + 1e-3, proc.t_max, n, dtype=D)


def _g2_fd(proc, t: torch.Tensor) -> torch.Tensor:
    """``g^2 = d sigma^2/dt - 2 sigma^2 d log alpha/dt`` of the linear SDE with marginals (alpha, sigma), by
    finite differences (one-sided for DDPM: its log-SNR is linear on each segment [k, k+1])."""
    h = 1e-6 if proc.discrete else 1e-5
    if proc.discrete:  # the segment starting at t (the last one ends at T-1: backward there)
        last = t >= proc.t_max
        lo, hi = torch.where(last, t - h, t), torch.where(last, t, t + h)
    else:
        lo, hi = t - h, t + h
    dv = (proc.sigma(hi) ** 2 - proc.sigma(lo) ** 2) / (hi - lo)
    dla = (torch.log(proc.alpha(hi)) - torch.log(proc.alpha(lo))) / (hi - lo)
    return dv - 2 * proc.sigma(t) ** 2 * dla


# --- T-ALG-1 (a): the time sampler --------------------------------------------------------------------------
def test_ddpm_times_are_uniform_over_all_timesteps():  # T-ALG-1 (a)
    proc = td.DDPM(T=200)
    n = 100_000
    t = sample_times(proc, n, gen(0))
    assert t.dtype == D and t.shape == (n,) and torch.equal(t, t.round())
    counts = torch.bincount(t.long(), minlength=proc.T)
    assert len(counts) == proc.T  # nothing outside 0..T-1
    assert counts[0] > 0 and counts[-1] > 0  # both ends
    e = n / proc.T
    chi2 = float(((counts - e) ** 2 / e).sum())
    df = proc.T - 1
    assert abs(chi2 - df) < 5 * math.sqrt(2 * df), chi2
    # the same generator state gives the same times; no global RNG involved
    torch.manual_seed(123)
    assert torch.equal(sample_times(proc, 50, gen(7)), sample_times(proc, 50, gen(7)))


# --- T-ALG-1 (c), T-PAR-7: L_simple at the exact eps ----------------------------------------------------------
def test_simple_loss_of_exact_eps_is_the_irreducible_value_gaussian():  # T-PAR-7, T-ALG-1 (c)
    """For x0 ~ N(m, v) (1-D), E[(eps - E[eps|x_t])^2] = a^2 v / (a^2 v + s^2) at each t (T-PAR-7); with
    t ~ U{0..T-1} the loss is the average of that over the T steps."""
    m, v, n = 0.3, 0.25, 150_000
    proc = td.DDPM()
    gm = td.GaussianMixture.gaussian(m, v, dim=1)
    model = td.Denoiser(gm.net(proc, "eps"), proc, "eps")
    x0, _ = gm.sample(n, gen(1))
    per = simple_loss(model, x0, generator=gen(2), reduction="none")
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=D), 0)
    exact = float((abar * v / (abar * v + 1 - abar)).mean())
    se = float(per.std()) / math.sqrt(n)
    assert abs(float(per.mean()) - exact) < 4 * se, (float(per.mean()), exact, se)
    # at one fixed t (where the value is far from both 0 and 1)
    k = 700
    per_k = simple_loss(model, x0[:50_000], t=torch.tensor(float(k), dtype=D), generator=gen(3),
                        reduction="none")
    exact_k = float(abar[k] * v / (abar[k] * v + 1 - abar[k]))
    assert abs(float(per_k.mean()) - exact_k) < 4 * float(per_k.std()) / math.sqrt(len(per_k))


def test_simple_loss_exact_minimum_and_excess_of_a_perturbed_net_mixture():  # T-ALG-1 (c)
    """Ring mixture (2-D): at the exact eps* = E[eps|x_t], L_simple = 1 - E||eps*(x_t)||^2 / d (orthogonality of
    eps - eps* to functions of x_t), estimated on independent draws; eps* + delta costs exactly E||delta||^2 / d
    more (the cross term has mean 0)."""
    proc, dens, n, d = td.DDPM(), toy_density("ring"), 100_000, 2
    exact_net = dens.net(proc, "eps")
    model = td.Denoiser(exact_net, proc, "eps")
    x0, _ = dens.sample(n, gen(1))
    t = sample_times(proc, n, gen(2))
    eps = torch.randn(n, d, dtype=D, generator=gen(3))
    loss_opt = dsm_loss(model, x0, t=t, eps=eps, reduction="none")
    # the minimum value from independent draws of x_t
    x0b, _ = dens.sample(n, gen(4))
    tb = sample_times(proc, n, gen(5))
    xtb = proc.add_noise(x0b, tb, torch.randn(n, d, dtype=D, generator=gen(6)))
    floor = 1 - (exact_net(xtb, tb) ** 2).sum(1) / d
    se = math.sqrt(float(loss_opt.var()) / n + float(floor.var()) / n)
    assert abs(float(loss_opt.mean() - floor.mean())) < 4 * se, (float(loss_opt.mean()), float(floor.mean()), se)

    def delta(x, tt):
        return 0.3 * torch.sin(2 * x) * (1 - tt.to(x.dtype)[:, None] / 2000)

    perturbed = td.Denoiser(lambda x, tt: exact_net(x, tt) + delta(x, tt), proc, "eps")
    loss_p = dsm_loss(perturbed, x0, t=t, eps=eps, reduction="none")
    xt = proc.add_noise(x0, t, eps)
    predicted = (delta(xt, t) ** 2).sum(1) / d
    excess = loss_p - loss_opt
    assert float(excess.mean()) > 10 * float(excess.std()) / math.sqrt(n)  # strictly worse
    resid = excess - predicted  # = 2 delta . (eps* - eps) / d, mean 0
    assert abs(float(resid.mean())) < 4 * float(resid.std()) / math.sqrt(n)
    assert float(predicted.mean()) > 0.01


# --- T-ALG-1 (b): a per-t affine model trained with L_simple reaches eps* -------------------------------------------
class _PerTAffine(torch.nn.Module):
    def __init__(self, T: int):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(T, dtype=D))
        self.b = torch.nn.Parameter(torch.zeros(T, dtype=D))

    def forward(self, x, t):
        k = t.long()
        return self.a[k][:, None] * x + self.b[k][:, None]


def _fit_affine(proc, mutate: str | None = None, steps: int = 400, batch: int = 8192):
    m, v = 0.5, 0.3
    gm = td.GaussianMixture.gaussian(m, v, dim=1)
    net = _PerTAffine(proc.T)
    model = td.Denoiser(net, proc, "eps")
    if mutate == "abar_prev":  # a wrong forward process: x_t built with abar_{t-1}
        model.process = td.DDPM(alphas_cumprod=torch.cat([torch.ones(1, dtype=D), proc.alphas_cumprod[:-1]]))
    elif mutate == "x0_input":  # the network sees x0 instead of x_t
        model.process = td.DDPM(alphas_cumprod=proc.alphas_cumprod)
        model.process.add_noise = lambda x0, t, e: x0
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    g = gen(0)
    for i in range(steps):
        opt.param_groups[0]["lr"] = 0.05 * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * i / steps)))
        x0, _ = gm.sample(batch, g)
        loss = simple_loss(model, x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    abar = proc.alphas_cumprod
    a_star = (1 - abar).sqrt() / (abar * v + 1 - abar)
    b_star = -a_star * abar.sqrt() * m
    # RMS error of eps_theta - eps* under p_t, per t, in units of eps (unit variance)
    mean_t, var_t = abar.sqrt() * m, abar * v + 1 - abar
    da, db = net.a.detach() - a_star, net.b.detach() - b_star
    return torch.sqrt(da**2 * (var_t + mean_t**2) + 2 * da * db * mean_t + db**2)


def test_per_t_affine_model_trained_with_l_simple_reaches_the_exact_eps():  # T-ALG-1 (b)
    """eps*(x) = sqrt(1-abar)(x - sqrt(abar) m)/(abar v + 1 - abar) for N(m, v) data; 10-step cosine DDPM. The
    same fit with a wrong forward process (abar_{t-1}) or with x0 fed to the net misses by far more than 2%."""
    proc = td.DDPM(betas="cosine", T=10)
    err = _fit_affine(proc)
    assert float(err.max()) < 0.02, err
    for mutate in ("abar_prev", "x0_input"):
        assert float(_fit_affine(proc, mutate, 150, 2048).max()) > 0.05, mutate


# --- T-ALG-3 and the weighting identities ----------------------------------------------------------------------
def _spaces(proc, pred: str, x0, eps, t):
    """Independent conversions: the model's (eps_hat, x0_hat) from a raw net output of type ``pred`` and the
    native target, written out from x_t = a x0 + s eps, v = a eps - s x0, score = -eps/s (T-PAR-5, T-PAR-9)."""
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    xt = a * x0 + s * eps
    f = _net(xt, t)
    if pred == "eps":
        eps_hat = f
    elif pred == "x0":
        eps_hat = (xt - a * f) / s
    elif pred == "v":
        eps_hat = (s * xt + a * f) / (a**2 + s**2)
    else:
        eps_hat = -s * f
    x0_hat = (xt - s * eps_hat) / a
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0, "score": -eps / s}[pred]
    errs = {"native": ((f - target) ** 2).mean(1),
            "eps": ((eps_hat - eps) ** 2).mean(1),
            "x0": ((x0_hat - x0) ** 2).mean(1),
            "v": (((a * eps_hat - s * x0_hat) - (a * eps - s * x0)) ** 2).mean(1),
            "score": ((-eps_hat / s + eps / s) ** 2).mean(1)}
    return errs, a[:, 0], s[:, 0]


@pytest.mark.parametrize("name", list(PROCESSES))
@pytest.mark.parametrize("pred", ["eps", "x0", "v", "score"])
def test_every_weighting_is_its_stated_error(name, pred):  # T-ALG-3, T-PAR-9, B-8, B-9, min-SNR
    """dsm_loss(weighting=w) per example equals the error in the space w names, computed independently:
    eps: ||eps_hat-eps||^2 (L_simple); x0: ||x0_hat-x0||^2; v: ||v_hat-v||^2; g2: g^2 ||s_hat-s||^2 (likelihood
    weighting, g^2 by finite differences); min_snr: min(SNR, gamma) ||x0_hat-x0||^2 (Hang et al. 2023); edm:
    (s^2+sd^2)/(s sd)^2 ||x0_hat-x0||^2 with s = sigma/alpha (Karras et al. 2022, 1/c_out^2); native: the MSE
    of the raw output against its own target."""
    proc = PROCESSES[name]
    n = 64
    t = _times(proc, n)
    x0 = torch.randn(n, 3, dtype=D, generator=gen(1))
    eps = torch.randn(n, 3, dtype=D, generator=gen(2))
    errs, a, s = _spaces(proc, pred, x0, eps, t)
    model = td.Denoiser(_net, proc, pred, sigma_data=0.7)
    snr = (a / s) ** 2
    gamma = 2.0
    assert (snr > gamma).any() and (snr < gamma).any()  # min-SNR clips somewhere and not everywhere
    ve = s / a
    expected = {"native": errs["native"], "eps": errs["eps"], "x0": errs["x0"], "v": errs["v"],
                "g2": _g2_fd(proc, t) * errs["score"], "min_snr": snr.clamp(max=gamma) * errs["x0"],
                "edm": (ve**2 + 0.7**2) / (ve * 0.7) ** 2 * errs["x0"]}
    assert set(expected) == set(WEIGHTINGS)
    for w in WEIGHTINGS:
        got = dsm_loss(model, x0, weighting=w, t=t, eps=eps, min_snr_gamma=gamma, reduction="none")
        rtol = 1e-4 if w == "g2" else 1e-9
        torch.testing.assert_close(got, expected[w], rtol=rtol, atol=1e-12, msg=f"{name}/{pred}/{w}")
    # T-ALG-3: L_simple is DSM with lambda = sigma^2 on the (conditional) score error, whatever the net predicts
    torch.testing.assert_close(errs["eps"], s**2 * errs["score"], rtol=1e-10, atol=1e-12)
    mean = dsm_loss(model, x0, weighting="eps", t=t, eps=eps)
    torch.testing.assert_close(mean, errs["eps"].mean(), rtol=1e-10, atol=0)


def test_weighting_factors_in_closed_form():  # T-PAR-9 (the alpha^2 + sigma^2 trap), B-8, min-SNR
    """eps_weight against the closed forms on a VP (alpha^2+sigma^2 = 1), sub-VP and VE (alpha = 1) grid."""
    for name, proc in PROCESSES.items():
        t = _times(proc, 50)
        a, s = proc.alpha(t), proc.sigma(t)
        torch.testing.assert_close(eps_weight(proc, t, "x0"), s**2 / a**2, rtol=1e-12, atol=0)
        torch.testing.assert_close(eps_weight(proc, t, "v"), ((a**2 + s**2) / a) ** 2, rtol=1e-12, atol=0)
        if name in ("vp", "ddpm"):
            torch.testing.assert_close(eps_weight(proc, t, "v"), 1 / a**2, rtol=1e-10, atol=0)
        if name == "ve":
            torch.testing.assert_close(eps_weight(proc, t, "v"), (1 + s**2) ** 2, rtol=1e-12, atol=0)
        for gamma in (1.0, 5.0):
            snr = a**2 / s**2
            w = eps_weight(proc, t, "min_snr", min_snr_gamma=gamma)
            torch.testing.assert_close(w, torch.where(snr > gamma, gamma / snr, torch.ones_like(snr)), rtol=1e-12,
                                       atol=0)
            assert float(w.max()) <= 1 + 1e-12
        # B-8: g^2/sigma^2 = -d log SNR / dt
        if not proc.discrete:
            h = 1e-5
            dl = (proc.log_snr(t + h) - proc.log_snr(t - h)) / (2 * h)
            torch.testing.assert_close(eps_weight(proc, t, "g2"), -dl, rtol=1e-4, atol=0)
        for pred, factor in (("eps", 1 + 0 * a), ("x0", s**2 / a**2), ("v", ((a**2 + s**2) / a) ** 2),
                             ("score", 1 / s**2)):
            torch.testing.assert_close(eps_weight(proc, t, "native", prediction=pred), factor, rtol=1e-12, atol=0)
    # VP's g^2 is beta(t) = beta_min + t (beta_max - beta_min)
    vp, t = td.VP(), torch.tensor([0.1, 0.5, 0.9], dtype=D)
    torch.testing.assert_close(eps_weight(vp, t, "g2") * vp.sigma(t) ** 2, 0.1 + t * 19.9, rtol=1e-12, atol=0)


def test_edm_precond_loss_is_weighted_x0_error():  # B-9
    """With precond='edm' the native space is x0 and weighting 'edm' is lambda = 1/c_out^2 on the x0 error, so
    lambda ||x0_hat - x0||^2 = ||F - F_target||^2 (unit-variance training target)."""
    proc, sd = td.EDM(), 0.5
    model = td.Denoiser(_net, proc, "x0", precond="edm", sigma_data=sd)
    n = 32
    sig = torch.exp(torch.linspace(math.log(0.01), math.log(50.0), n, dtype=D))
    x0 = torch.randn(n, 2, dtype=D, generator=gen(1))
    eps = torch.randn(n, 2, dtype=D, generator=gen(2))
    got = dsm_loss(model, x0, weighting="edm", t=sig, eps=eps, reduction="none")
    c_skip = sd**2 / (sig**2 + sd**2)
    c_out = sig * sd / torch.sqrt(sig**2 + sd**2)
    c_in = 1 / torch.sqrt(sig**2 + sd**2)
    y = x0 + sig[:, None] * eps
    F = _net(c_in[:, None] * y, (0.25 * torch.log(sig)).float())  # c_noise is passed in float32
    target = (x0 - c_skip[:, None] * y) / c_out[:, None]
    torch.testing.assert_close(got, ((F - target) ** 2).mean(1), rtol=1e-9, atol=1e-12)


# --- gradients, registry, errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred", ["eps", "x0", "v"])
def test_gradients_equal_those_of_the_closed_form_loss(pred):
    """The gradient through dsm_loss equals the gradient of the independent closed form (so the rescaling between
    spaces is a per-t constant, not something that alters the optimisation), and reaches every parameter."""
    torch.manual_seed(0)
    proc = td.VP()
    net = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2)).double()

    def f(x, t):
        return net(torch.cat([x, t[:, None].to(x.dtype)], 1))

    model = td.Denoiser(f, proc, pred)
    n = 128
    t = _times(proc, n)
    x0 = torch.randn(n, 2, dtype=D, generator=gen(1))
    eps = torch.randn(n, 2, dtype=D, generator=gen(2))
    a, s = proc.alpha(t)[:, None], proc.sigma(t)[:, None]
    xt = a * x0 + s * eps
    for w in ("native", "eps", "x0", "v", "g2", "min_snr"):
        net.zero_grad()
        dsm_loss(model, x0, weighting=w, t=t, eps=eps).backward()
        g1 = [p.grad.clone() for p in net.parameters()]
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in g1), w
        net.zero_grad()
        out = f(xt, t)
        x0_hat, eps_hat = td.Denoiser.convert(xt, a, s, out, pred)
        errs = {"eps": ((eps_hat - eps) ** 2).mean(1), "x0": ((x0_hat - x0) ** 2).mean(1),
                "v": ((a * eps_hat - s * x0_hat - (a * eps - s * x0)) ** 2).mean(1)}
        ref = {**errs, "native": errs[pred],
               "g2": (0.1 + 19.9 * t) / s[:, 0] ** 2 * ((eps_hat - eps) ** 2).mean(1),
               "min_snr": ((a / s) ** 2).clamp(max=5.0)[:, 0] * ((x0_hat - x0) ** 2).mean(1)}[w]
        ref.mean().backward()
        for p, g in zip(net.parameters(), g1):
            torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12, msg=f"{pred}/{w}")


def test_trainer_dsm_loss_passes_weighting_and_gamma():
    proc = td.DDPM()
    model = td.Denoiser(_net, proc, "eps")
    x0 = torch.randn(256, 2, dtype=D, generator=gen(1))
    for cfg in ({"weighting": "min_snr", "min_snr_gamma": 0.5}, {"weighting": "x0"}, {}):
        got = LOSSES["dsm"](model, x0, cond=None, generator=gen(3), cfg=cfg)
        ref = dsm_loss(model, x0, weighting=cfg.get("weighting", "native"), generator=gen(3),
                       min_snr_gamma=cfg.get("min_snr_gamma", 5.0))
        assert torch.equal(got, ref)
    a = LOSSES["dsm"](model, x0, cond=None, generator=gen(3), cfg={"weighting": "min_snr", "min_snr_gamma": 0.5})
    b = LOSSES["dsm"](model, x0, cond=None, generator=gen(3), cfg={"weighting": "min_snr", "min_snr_gamma": 50.0})
    assert not torch.equal(a, b)  # gamma is used
    # simple_loss is L_simple: the eps weighting; for an eps-net that is also the native MSE
    torch.testing.assert_close(simple_loss(model, x0, generator=gen(4)), dsm_loss(model, x0, generator=gen(4)),
                               rtol=0, atol=0)
    # randomness comes only from the generator
    torch.manual_seed(0)
    l1 = simple_loss(model, x0, generator=gen(5))
    torch.manual_seed(1)
    assert torch.equal(l1, simple_loss(model, x0, generator=gen(5)))


def test_loss_errors():
    proc = td.DDPM()
    model = td.Denoiser(_net, proc, "eps")
    x0 = torch.randn(8, 2, dtype=D)
    with pytest.raises(ValueError, match="unknown loss weighting 'snr'.*allowed: native, eps, x0, v, g2, min_snr"):
        dsm_loss(model, x0, weighting="snr")
    with pytest.raises(ValueError, match="unknown loss weighting"):
        eps_weight(proc, torch.zeros(1, dtype=D), "likelihood")
    with pytest.raises(ValueError, match="unknown reduction 'sum'; allowed: mean, none"):
        dsm_loss(model, x0, reduction="sum")
    with pytest.raises(ValueError):  # t outside the process range
        dsm_loss(model, x0, t=torch.full((8,), 1000.0, dtype=D))
