"""Latent diffusion (THEORY T-LDM-1/2): scaled latents of a frozen autoencoder run, the conditioning encoder
tau(y) with cross-attention, CFG in latent space, automatic decoding by ``torchdiffusion sample``, errors."""

from __future__ import annotations

import json

import pytest
import torch

from torchdiffusion.cli.main import main
from torchdiffusion.nets.conditioning import ClassTokenEncoder, CrossAttentionUNet
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs import config, latent
from torchdiffusion.runs.build import build_model, load_run
from torchdiffusion.runs.train import train
from torchdiffusion.samplers import sample

TINY_AE = ["data.size=8", "model.channels=8", "model.channel_mult=[1,2]", "train.steps=4", "train.batch=16",
           "train.ckpt_every=0", "train.log_every=2"]
TINY_LATENT = ["model.channels=8", "model.channel_mult=[1,2]", "model.attn_resolutions=[4,2]", "train.steps=3",
               "train.batch=16", "train.ckpt_every=0", "train.log_every=1"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _xattn_net(**kw):
    torch.manual_seed(0)
    net = CrossAttentionUNet(10, tokens=3, in_channels=4, image_size=4, channels=8, channel_mult=(1, 2),
                             num_res_blocks=1, attn_resolutions=(4, 2), groups=8, **kw)
    for m in net.modules():  # the zero-initialised output layers would hide the conditioning
        if hasattr(m, "proj_out") or m is net.unet.conv_out:
            for p in (m.proj_out if hasattr(m, "proj_out") else m).parameters():
                torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_class_token_encoder():
    tau = ClassTokenEncoder(10, 16, tokens=3)
    c = tau(torch.tensor([0, 3, -1]), 3)
    assert c.shape == (3, 3, 16)
    torch.testing.assert_close(tau(None, 3), tau(torch.tensor([-1, -1, -1]), 3))  # None = the null class
    torch.testing.assert_close(tau(torch.tensor([-1]), 1), tau(torch.tensor([10]), 1))
    with pytest.raises(ValueError, match="class labels"):
        tau(torch.tensor([11]), 1)
    with pytest.raises(ValueError, match="integers"):
        tau(torch.tensor([0.5]), 1)


def test_cross_attention_unet_conditions_and_works_with_cfg_and_samplers():
    net = _xattn_net()
    x, t = torch.randn(4, 4, 4, 4), torch.tensor([10, 200, 500, 900])
    with torch.no_grad():
        a, b = net(x, t, torch.tensor([1, 1, 1, 1])), net(x, t, torch.tensor([2, 2, 2, 2]))
    assert a.shape == x.shape and not torch.allclose(a, b)  # the class reaches the output through tau and attention
    cfg = config.resolve("latent")
    from torchdiffusion.parameterization.denoiser import Denoiser
    from torchdiffusion.runs.build import build_process

    model = Denoiser(net, build_process(cfg["process"]), prediction="v")
    g = torch.Generator().manual_seed(0)
    for name in ("ddim", "dpmpp_2m", "heun"):
        with torch.no_grad():
            z = sample(CFG(model, 1.5), torch.randn(3, 4, 4, 4, generator=g), name, 4, cond=torch.tensor([0, 5, 9]),
                       generator=g)
        assert z.shape == (3, 4, 4, 4) and torch.isfinite(z).all()


def test_scale_factor_gives_unit_variance():
    z = torch.randn(500, 4, 2, 2) * 3.7 + 0.2
    c = latent.scale_factor(z)
    torch.testing.assert_close(float((c * z).std()), 1.0)
    with pytest.raises(ValueError, match="zero variance"):
        latent.scale_factor(torch.ones(5, 3))


def test_latent_config_errors(tmp_path):
    cfg = config.resolve("latent", ["train.steps=1"])
    with pytest.raises(ValueError, match="data.autoencoder"):
        train(cfg, tmp_path / "a", progress=False)
    cfg = config.resolve("latent", ["train.steps=1", f"data.autoencoder={tmp_path / 'missing'}"])
    with pytest.raises(ValueError, match="autoencoder run not found"):
        train(cfg, tmp_path / "b", progress=False)


def test_end_to_end_vae_then_latent_diffusion(tmp_path, capsys):
    ae_run, lat_run = tmp_path / "vae", tmp_path / "latent"
    train(config.resolve("vae_digits", TINY_AE), ae_run, progress=False)
    train(config.resolve("latent", [*TINY_LATENT, f"data.autoencoder={ae_run}", "train.sample_every=3",
                                    "sample.n=4", "sample.steps=2"]), lat_run, progress=False)
    assert (lat_run / "samples" / "step_0000003.png").is_file()  # periodic grids are decoded images
    saved = json.loads((lat_run / "config.json").read_text())
    info, holdout = saved["run"], saved["data"]["holdout"]
    lat = info["latent"]
    assert info["data_shape"] == [4, 4, 4] and lat["image_shape"] == [1, 8, 8] and info["num_classes"] == 10
    # the stored scale makes the training split's latents unit-variance; it is applied once each way (T-LDM-1)
    net, _ = latent.load_autoencoder(ae_run)
    ds = latent.load_latents(ae_run, holdout=holdout)
    from torchdiffusion.data.datasets import digits, split_dataset

    z = latent.encode(net, digits(8).x)
    train_z = split_dataset(ds, holdout)[0].x
    assert abs(float(train_z.std()) - 1.0) < 1e-5
    torch.testing.assert_close(ds.x, z * lat["scale"])
    imgs, vr = latent.to_images(ds.x[:5], info)
    torch.testing.assert_close(imgs, net.decode(z[:5])[0].clamp(*vr))
    # sampling in latent space (with CFG) decodes automatically
    out = tmp_path / "s.png"
    assert main(["sample", str(lat_run), "--n", "4", "--steps", "3", "--class", "7", "--guidance", "1.0",
                 "--out", str(out)]) == 0
    assert out.is_file()
    npz = tmp_path / "s.npz"
    assert main(["sample", str(lat_run), "--n", "3", "--steps", "2", "--class", "4", "--out", str(npz)]) == 0
    import numpy as np

    assert np.load(npz)["x"].shape == (3, 1, 8, 8)
    # the latent model works with the library's API as any model
    model, _ = load_run(lat_run)
    assert model.predict(torch.randn(2, 4, 4, 4), 500, torch.tensor([1, -1]))[0].shape == (2, 4, 4, 4)
    # an autoencoder run: VAE prior samples and reconstructions
    assert main(["sample", str(ae_run), "--n", "8"]) == 0
    assert (ae_run / "samples.png").is_file() and (ae_run / "reconstructions.png").is_file()
    # a run that is not an autoencoder cannot serve as one
    cfg = config.resolve("latent", [*TINY_LATENT, f"data.autoencoder={lat_run}"])
    with pytest.raises(ValueError, match="not an autoencoder run"):
        train(cfg, tmp_path / "bad", progress=False)
    capsys.readouterr()
    assert main(["train", "latent", "--out", str(tmp_path / "bad2"), "--quiet"]) == 2
    assert "data.autoencoder" in capsys.readouterr().err


def test_plain_autoencoder_run_and_model_builds(tmp_path):
    run = tmp_path / "ae"
    train(config.resolve("dae_digits", TINY_AE), run, progress=False)
    paths = latent.sample_autoencoder_run(run, n=4)
    assert [p.name for p in paths] == ["reconstructions.png"]  # no prior for a plain autoencoder
    m = build_model(config.resolve("latent"), (4, 4, 4), 10)
    assert isinstance(m.net, CrossAttentionUNet)
    with pytest.raises(ValueError, match="labelled"):
        build_model(config.resolve("latent"), (4, 4, 4), None)
