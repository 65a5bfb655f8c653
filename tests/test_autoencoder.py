"""Autoencoders and the VAE (THEORY T-AE-1..5, T-BAY-4, T-VLB-5): closed-form KL against Monte Carlo, the ELBO
of a linear-Gaussian VAE on probabilistic-PCA data against the exact log-likelihood, reparameterization
gradients, shapes and errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from torchdiffusion.likelihood import discretized_gaussian_log_likelihood, gaussian_kl, gaussian_log_density
from torchdiffusion.losses.autoencoder import (
    ae_loss,
    dae_loss,
    decoder_log_likelihood,
    elbo,
    elbo_samples,
    kl_standard_normal,
    reparameterize,
    vae_loss,
)
from torchdiffusion.nets.autoencoder import Autoencoder
from torchdiffusion.runs import config
from torchdiffusion.runs.losses import get_loss

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _se_ok(samples: torch.Tensor, target: torch.Tensor, k: float = 4.0) -> bool:
    """Mean of ``samples`` (first dim) equals ``target`` within ``k`` standard errors (elementwise)."""
    m, se = samples.mean(0), samples.std(0) / math.sqrt(samples.shape[0])
    return bool(((m - target).abs() <= k * se + 1e-12).all())


# --- T-AE-2 / T-VLB-5: closed-form KL ------------------------------------------------------------------------
def test_kl_standard_normal_matches_torch_and_monte_carlo():
    g = torch.Generator().manual_seed(0)
    mean, logvar = torch.randn(6, 3, generator=g, dtype=D), torch.randn(6, 3, generator=g, dtype=D) * 0.7
    kl = kl_standard_normal(mean, logvar)
    ref = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(-1)
    torch.testing.assert_close(kl, ref, rtol=0, atol=1e-10)
    z = reparameterize(mean, logvar, n_samples=40000, generator=g)  # (L, B, r)
    log_ratio = (gaussian_log_density(z, mean, torch.exp(logvar)) - gaussian_log_density(z, torch.zeros_like(z),
                                                                                           1.0)).sum(-1)
    assert _se_ok(log_ratio, kl)
    assert not _se_ok(log_ratio, kl * 1.05)  # the MC check can fail: a 5% error is detected
    # 2 KL = |mu|^2 + |sigma|^2 - r - sum log sigma^2 (the notes' form, with sigma a standard deviation)
    torch.testing.assert_close(2 * kl, (mean**2).sum(-1) + torch.exp(logvar).sum(-1) - 3 - logvar.sum(-1))


def test_general_diagonal_kl_matches_monte_carlo():
    g = torch.Generator().manual_seed(1)
    m1, m2 = torch.randn(5, generator=g, dtype=D), torch.randn(5, generator=g, dtype=D)
    v1, v2 = torch.rand(5, generator=g, dtype=D) + 0.3, torch.rand(5, generator=g, dtype=D) + 0.3
    kl = gaussian_kl(m1, v1, m2, v2)
    x = m1 + v1.sqrt() * torch.randn(40000, 5, generator=g, dtype=D)
    assert _se_ok(gaussian_log_density(x, m1, v1) - gaussian_log_density(x, m2, v2), kl)
    torch.testing.assert_close(kl, kl_divergence(Normal(m1, v1.sqrt()), Normal(m2, v2.sqrt())), rtol=0, atol=1e-12)


# --- T-AE-3: decoder log-likelihoods ---------------------------------------------------------------------------
def test_gaussian_decoder_log_likelihood_is_normal_log_prob():
    g = torch.Generator().manual_seed(2)
    x, mean, logvar = (torch.randn(4, 1, 3, 3, generator=g, dtype=D) for _ in range(3))
    ll = decoder_log_likelihood(x, mean, logvar)
    torch.testing.assert_close(ll, Normal(mean, torch.exp(0.5 * logvar)).log_prob(x).sum((1, 2, 3)),
                               rtol=0, atol=1e-10)
    ll_disc = decoder_log_likelihood(x.clamp(-1, 1), mean, logvar, likelihood="discretized", levels=17)
    ref = discretized_gaussian_log_likelihood(x.clamp(-1, 1), mean, log_std=0.5 * logvar, levels=17).sum((1, 2, 3))
    torch.testing.assert_close(ll_disc, ref)
    assert (ll_disc <= 0).all()
    with pytest.raises(ValueError, match="levels"):
        decoder_log_likelihood(x, mean, logvar, likelihood="discretized")
    with pytest.raises(ValueError, match="allowed"):
        decoder_log_likelihood(x, mean, logvar, likelihood="laplace")


# --- T-AE-4 / T-BAY-4: linear-Gaussian VAE on probabilistic-PCA data ------------------------------------------
def _ppca(seed: int = 0, d: int = 5, r: int = 2, sigma: float = 0.5):
    """x = W z + mu + sigma e with orthogonal columns of W (so the exact posterior is diagonal)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, r, generator=g, dtype=D))
    s = torch.tensor([2.0, 0.8], dtype=D)[:r]
    W, mu = Q * s, torch.randn(d, generator=g, dtype=D)
    x = (torch.randn(12, r, generator=g, dtype=D) @ W.T + mu + sigma * torch.randn(12, d, generator=g, dtype=D))
    log_p = MultivariateNormal(mu, W @ W.T + sigma**2 * torch.eye(d, dtype=D)).log_prob(x)
    M = W.T @ W + sigma**2 * torch.eye(r, dtype=D)  # diagonal here
    post_mean = (x - mu) @ W @ torch.linalg.inv(M).T  # M^-1 W^T (x - mu)
    post_var = (sigma**2 / torch.diagonal(M)).expand_as(post_mean)  # sigma^2 M^-1
    decode = lambda z: (z @ W.T + mu, 2 * math.log(sigma))  # noqa: E731
    return x, log_p, post_mean, post_var, decode, g


def test_elbo_equals_log_likelihood_at_the_exact_posterior():
    x, log_p, m, v, decode, g = _ppca()
    # with the Monte-Carlo KL each draw is log p(x, z) - log q(z|x) = log p(x) exactly at the true posterior
    per_draw = elbo_samples(x, m, v.log(), decode, n_samples=64, kl="mc", generator=g)
    torch.testing.assert_close(per_draw, log_p.expand_as(per_draw), rtol=0, atol=1e-9)
    # with the closed-form KL the estimate is unbiased for log p(x)
    assert _se_ok(elbo_samples(x, m, v.log(), decode, n_samples=20000, generator=g), log_p)


def test_elbo_is_below_log_likelihood_for_other_encoders():
    x, log_p, m, v, decode, g = _ppca(seed=3)
    for shift, scale in ((0.3, 1.0), (0.0, 2.5), (-0.5, 0.4)):
        qm, qv = m + shift, v * scale
        gap = gaussian_kl(qm, qv, m, v).sum(-1)  # log p - ELBO = KL(q || posterior)
        est = elbo_samples(x, qm, qv.log(), decode, n_samples=20000, generator=g)
        assert _se_ok(est, log_p - gap)
        se = est.std(0) / math.sqrt(est.shape[0])
        assert (est.mean(0) + 4 * se < log_p).all()  # strictly below, for every x
    torch.testing.assert_close(elbo(x, m, v.log(), decode, n_samples=8, kl="mc", generator=g), log_p,
                               rtol=0, atol=1e-9)


def test_beta_weights_only_the_kl():
    x, _, m, v, decode, _ = _ppca()
    e1 = elbo(x, m, v.log(), decode, beta=1.0, generator=torch.Generator().manual_seed(5))
    e3 = elbo(x, m, v.log(), decode, beta=3.0, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(e1 - e3, 2 * kl_standard_normal(m, v.log()))


# --- reparameterization ---------------------------------------------------------------------------------------
def test_reparameterization_gradient_is_unbiased():
    g = torch.Generator().manual_seed(4)
    mean = torch.tensor([0.7, -1.2], dtype=D, requires_grad=True)
    logvar = torch.tensor([0.3, -0.8], dtype=D, requires_grad=True)
    n = 40000
    (reparameterize(mean, logvar, n_samples=n, generator=g) ** 2).sum(-1).mean().backward()
    # d/dmean E[z^2] = 2 mean, d/dlogvar E[z^2] = exp(logvar); per-draw SDs 2 s and 2 s^2 |e^2 - 1| / 2 ~ s^2 sqrt 2
    s = torch.exp(0.5 * logvar.detach())
    assert ((mean.grad - 2 * mean.detach()).abs() < 4 * 2 * s / math.sqrt(n)).all()
    assert ((logvar.grad - s**2).abs() < 4 * s**2 * math.sqrt(2) / math.sqrt(n)).all()


def test_vae_loss_gradients_finite_and_nonzero():
    torch.manual_seed(0)
    net = Autoencoder(1, 8, channels=8, channel_mult=(1, 2), latent_channels=2, kind="vae")
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    loss = vae_loss(net, x, generator=torch.Generator().manual_seed(0))
    loss.backward()
    for name, p in net.named_parameters():
        if name.startswith(("to_vec", "from_vec")):
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(p.grad.abs().sum() > 0 for n, p in net.encoder.named_parameters() if n.endswith("weight"))


# --- nets: shapes and errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,latent", [
    (dict(in_channels=3, image_size=12, channel_mult=(1, 2, 2), latent_channels=3, kind="vae",
          decoder_var="learned", num_res_blocks=2), (3, 3, 3)),
    (dict(in_channels=1, image_size=8, channel_mult=(1,), latent_channels=5, kind="ae"), (5, 8, 8)),
    (dict(in_channels=2, image_size=8, channel_mult=(1, 2), latent_dim=3, kind="vae"), (3,)),
])
def test_autoencoder_shapes(kw, latent):
    net = Autoencoder(channels=8, **kw)
    x = torch.randn(3, kw["in_channels"], kw["image_size"], kw["image_size"])
    mean, logvar = net.encode(x)
    assert net.latent_shape == latent and mean.shape == (3, *latent)
    assert (logvar is None) == (kw["kind"] == "ae")
    dm, dlv = net.decode(mean)
    assert dm.shape == x.shape and net(x).shape == x.shape
    assert (dlv is not None) == (kw.get("decoder_var") == "learned")
    assert net.decoder_logvar(dm, dlv).shape == x.shape


def test_autoencoder_errors():
    with pytest.raises(ValueError, match="divisible"):
        Autoencoder(1, 10, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="kind"):
        Autoencoder(1, 8, kind="gan")
    with pytest.raises(ValueError, match="decoder_var"):
        Autoencoder(1, 8, decoder_var="free")
    net = Autoencoder(1, 8, channels=8, channel_mult=(1, 2))
    with pytest.raises(ValueError, match="expected images"):
        net.encode(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="expected latents"):
        net.decode(torch.zeros(2, 4, 3, 3))
    with pytest.raises(ValueError, match="model.net=vae"):
        vae_loss(Autoencoder(1, 8, channels=8, channel_mult=(1, 2), kind="ae"), torch.zeros(2, 1, 8, 8))


def test_plain_and_denoising_losses():
    torch.manual_seed(0)
    net = Autoencoder(1, 8, channels=8, channel_mult=(1, 2), kind="ae")
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    assert ae_loss(net, x) >= 0
    torch.testing.assert_close(dae_loss(net, x, 0.0), ae_loss(net, x))  # sigma -> 0 is the plain AE (T-AE-5)
    assert dae_loss(net, x, 0.5, generator=torch.Generator().manual_seed(0)) != ae_loss(net, x)
    with pytest.raises(ValueError, match=">= 0"):
        dae_loss(net, x, -1.0)


def test_autoencoder_losses_need_an_autoencoder_net():
    from torchdiffusion.runs.build import build_model

    cfg = config.resolve("digits")
    model = build_model(cfg, (1, 8, 8), 10)
    for name in ("ae", "dae", "vae"):
        with pytest.raises(ValueError, match="model.net=autoencoder or vae"):
            get_loss(name)(model, torch.zeros(2, 1, 8, 8), cond=None, generator=None, cfg=cfg["loss"])


def test_presets_build():
    from torchdiffusion.runs.build import build_model

    for name, shape in (("ae_digits", (1, 16, 16)), ("dae_digits", (1, 16, 16)), ("vae_digits", (1, 16, 16)),
                        ("vae2d_digits", (1, 8, 8)), ("vae_images", (3, 32, 32))):
        net = build_model(config.resolve(name), shape)
        assert isinstance(net, Autoencoder)
    assert build_model(config.resolve("vae2d_digits"), (1, 8, 8)).latent_shape == (2,)
    assert build_model(config.resolve("vae_digits"), (1, 16, 16)).latent_shape == (4, 4, 4)


class _LinearAE(torch.nn.Module):
    """``D(E(x)) = B (A x)``: a linear autoencoder with the Autoencoder's encode/decode interface."""

    def __init__(self, d: int, r: int):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.A = torch.nn.Parameter(torch.randn(r, d, generator=g, dtype=D) * 0.3)
        self.B = torch.nn.Parameter(torch.randn(d, r, generator=g, dtype=D) * 0.3)

    def encode(self, x):
        return x @ self.A.T, None

    def decode(self, z):
        return z @ self.B.T, None


def test_linear_autoencoder_reaches_pca():
    """T-AE-1: the optimal linear autoencoder projects onto the top-r eigenvectors of E[X X^T]; the minimum of
    E|X - D(E(X))|^2 is the sum of the trailing eigenvalues, and DE is a symmetric idempotent of rank r."""
    g = torch.Generator().manual_seed(6)
    Q, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=D))
    x = torch.randn(2000, 5, generator=g, dtype=D) * torch.tensor([2.0, 1.5, 1.0, 0.6, 0.3], dtype=D) @ Q.T
    evals = torch.linalg.eigvalsh(x.T @ x / len(x))  # ascending
    net = _LinearAE(5, 2)
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = ae_loss(net, x)
        loss.backward()
        return loss
    opt.step(closure)
    assert abs(float(ae_loss(net, x).detach()) * 5 - float(evals[:3].sum())) < 1e-6  # ae_loss is per dimension
    P = (net.B @ net.A).detach()
    torch.testing.assert_close(P, P.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(P @ P, P, atol=1e-5, rtol=0)
    assert int(torch.linalg.matrix_rank(P, atol=1e-6)) == 2


def test_linear_denoising_autoencoder_is_the_posterior_mean():
    """T-AE-5: for x ~ N(m, v) and y = x + sigma e, the best affine D(E(y)) is the posterior mean
    m + v (y - m) / (v + sigma^2) (Tweedie / Wiener); the DAE loss's empirical minimizer matches it."""
    m, v, sigma = 0.3, 0.25, 0.4
    x = m + math.sqrt(v) * torch.randn(50000, 1, generator=torch.Generator().manual_seed(7), dtype=D)

    class Affine(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = (torch.nn.Parameter(torch.zeros((), dtype=D)) for _ in range(2))

        def encode(self, y):
            return self.a * y + self.b, None

        def decode(self, z):
            return z, None

    net = Affine()
    opt = torch.optim.LBFGS(net.parameters(), lr=1, max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = dae_loss(net, x, sigma, generator=torch.Generator().manual_seed(8))  # the same noise every call
        loss.backward()
        return loss
    opt.step(closure)
    gain = v / (v + sigma**2)
    assert abs(net.a.item() - gain) < 0.01 and abs(net.b.item() - m * (1 - gain)) < 0.01


def test_vae_trains_on_an_image_folder_with_periodic_grids(tmp_path):
    """The image-folder preset trains through the ordinary trainer; ``train.sample_every`` writes prior samples
    for an autoencoder run (instead of running a diffusion sampler)."""
    import numpy as np
    from PIL import Image

    from torchdiffusion.runs.train import train

    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(tmp_path / f"im{i}.png")
    cfg = config.resolve("vae_images", [f"data.name={tmp_path}", "data.size=8", "model.channels=8",
                                        "model.channel_mult=[1,2]", "train.steps=2", "train.batch=4",
                                        "train.sample_every=2", "train.ckpt_every=0", "data.holdout=0"])
    res = train(cfg, tmp_path / "run", progress=False)
    assert res["step"] == 2 and (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert (tmp_path / "run" / "reconstructions.png").is_file()
