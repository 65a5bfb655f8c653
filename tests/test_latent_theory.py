"""T-LDM-1 with exact models: latent diffusion through a linear invertible autoencoder reproduces the pixel-space
distribution, and the scale factor is applied exactly once in each direction (``latent.load_latents`` encodes
and scales, ``latent.to_images`` unscales and decodes)."""

import math

import numpy as np
import torch
from torch import nn

import torchdiffusion as td
from torchdiffusion.runs import latent

F64 = torch.float64


class LinearAE(nn.Module):
    """``E(x) = A x``, ``D(z) = A^-1 z``: an exact invertible linear autoencoder on vectors."""

    def __init__(self, A: torch.Tensor):
        super().__init__()
        self.A, self.Ainv = A, torch.linalg.inv(A)

    def encode(self, x):
        return x.to(self.A.dtype) @ self.A.T, None

    def decode(self, z):
        return z.to(self.A.dtype) @ self.Ainv.T, None


def _setup(tmp_path, monkeypatch, A, x):
    path = tmp_path / "data.npz"
    np.savez(path, x=x.numpy())
    cfg = {"data": {"name": str(path)}}
    net = LinearAE(A)
    monkeypatch.setattr(latent, "load_autoencoder", lambda run, ema=True: (net, cfg))
    monkeypatch.setattr(latent, "weights_sha256", lambda run: "fake")  # no weights file behind the fake run
    ds = latent.load_latents("fake-run", holdout=0.0)
    return net, ds, {"latent": ds.meta["latent"]}


def test_identity_autoencoder_is_pixel_space(tmp_path, monkeypatch):
    x = (0.3 * torch.randn(500, 4, generator=torch.Generator().manual_seed(0), dtype=F64)).clamp(-0.99, 0.99)
    _, ds, info = _setup(tmp_path, monkeypatch, torch.eye(4, dtype=F64), x)
    c = ds.meta["latent"]["scale"]
    assert abs(c * float(x.std()) - 1) < 1e-6  # the scale makes the latents unit-variance (float32 std)
    torch.testing.assert_close(ds.x, x * c, rtol=1e-6, atol=1e-7)  # encoded and scaled once (float32 data)
    back, _ = latent.to_images(ds.x, info)
    torch.testing.assert_close(back, x, rtol=1e-6, atol=1e-6)  # unscaled and decoded once (float32 decode)


def test_latent_oracle_sampling_decodes_to_the_pixel_distribution(tmp_path, monkeypatch):
    # F-G data N(m, S) in 4-D, a random invertible A; latents z = c A x are Gaussian N(c A m, c^2 A S A^T)
    g = torch.Generator().manual_seed(1)
    m = torch.tensor([0.2, -0.1, 0.05, 0.0], dtype=F64)
    L = 0.1 * torch.randn(4, 4, generator=g, dtype=F64) + 0.1 * torch.eye(4, dtype=F64)
    S = L @ L.T + 0.002 * torch.eye(4, dtype=F64)
    x = m + torch.randn(4000, 4, generator=g, dtype=F64) @ torch.linalg.cholesky(S).T
    A = torch.randn(4, 4, generator=g, dtype=F64) + 2 * torch.eye(4, dtype=F64)
    _, ds, info = _setup(tmp_path, monkeypatch, A, x)
    c = ds.meta["latent"]["scale"]
    assert abs(float(ds.x.std()) - 1) < 1e-6
    proc = td.DDPM()
    n = 20000
    latent_oracle = td.GaussianMixture(torch.ones(1), (c * A @ m)[None], (c**2 * A @ S @ A.T)[None])
    model = td.Denoiser(latent_oracle.net(proc, "eps"), proc)
    z_T = torch.randn(n, 4, generator=torch.Generator().manual_seed(2), dtype=F64)
    z = td.sample(model, z_T, "ode", steps=2, rtol=1e-7, atol=1e-7)  # the exact PF-ODE transport
    out, _ = latent.to_images(z, info)
    # decoded samples have the pixel-space mean and covariance (4 standard errors)
    mean_se = torch.sqrt(torch.diag(S) / n)
    assert torch.all((out.mean(0) - m).abs() < 4 * mean_se)
    cov = torch.cov(out.T)
    cov_se = torch.sqrt((torch.diag(S)[:, None] * torch.diag(S)[None, :] + S**2) / n)
    assert torch.all((cov - S).abs() < 4 * cov_se + 1e-4)
    # decoding without the unscaling (the factor forgotten on the way back) is detectably wrong
    wrong = latent.decode(LinearAE(A), z)
    ratio = torch.diag(torch.cov(wrong.T)) / torch.diag(S)
    assert abs(math.log(c)) > 0.2 and torch.allclose(ratio, torch.full_like(ratio, c**2), rtol=0.05)
