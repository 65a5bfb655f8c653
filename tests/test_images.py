"""Image diffusion end to end: the digits/images presets, exact resume of a U-Net run, EMA and classifier-free
guidance formulas (T-CFG-1, T-CFG-2), conditioning, data errors, TensorBoard option, time embedding (T-NET-2)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import torchdiffusion as td
from torchdiffusion.data.datasets import Dataset, load_image_folder
from torchdiffusion.nets.embeddings import sinusoidal_embedding
from torchdiffusion.parameterization.guidance import CFG
from torchdiffusion.runs import config as config_mod
from torchdiffusion.runs.build import build_model, load_run
from torchdiffusion.runs.train import build_trainer, drop_labels, train
from torchdiffusion.training.checkpoint import load_tensors
from torchdiffusion.training.trainer import ema_decay, ema_update

TINY = ["model.channels=8", "model.num_res_blocks=1", "train.batch=16", "train.ckpt_every=0", "train.log_every=2",
        "train.threads=0", "train.warmup=2", "train.device=cpu"]


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _digits_cfg(*sets: str) -> dict:
    return config_mod.resolve("digits", [*TINY, *sets])


# --- presets -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset,shape", [("digits", (1, 8, 8)), ("digits16", (1, 16, 16)), ("images", (3, 32, 32))])
def test_presets_build_a_unet(preset: str, shape: tuple) -> None:
    cfg = config_mod.resolve(preset)
    assert cfg["model"]["net"] == "unet"
    ncls = 10 if cfg["data"]["conditional"] else None
    model = build_model(cfg, shape, ncls)
    x = torch.randn(2, *shape)
    with torch.no_grad():
        out = model.native(x, torch.tensor([3.0, 700.0]), None if ncls is None else torch.tensor([1, -1]))
    assert out.shape == x.shape
    if preset.startswith("digits"):
        assert cfg["data"]["conditional"] and cfg["data"]["name"] == "digits"
        assert cfg["data"]["size"] == shape[-1]
        assert model.net.null_class == 10


def test_param_count_independent_of_T() -> None:
    """T-NET-1: one parameter set serves every t; its size does not depend on the number of steps T."""
    sizes = {sum(p.numel() for p in build_model(config_mod.resolve("digits", [f"process.T={T}"]), (1, 8, 8),
                                                10).parameters()) for T in (100, 1000, 4000)}
    assert len(sizes) == 1


# --- trainer: exact resume, EMA, conditioning --------------------------------------------------------------
def test_unet_resume_is_bit_exact(tmp_path: Path) -> None:
    cfg = _digits_cfg("train.steps=4")
    train(cfg, tmp_path / "straight", progress=False)
    train(cfg, tmp_path / "resumed", progress=False, stop_after=2)
    assert load_tensors(tmp_path / "resumed" / "train_state.safetensors")[1]["step"] == 2
    train(cfg, tmp_path / "resumed", progress=False)
    a, meta_a = load_tensors(tmp_path / "straight" / "train_state.safetensors")
    b, meta_b = load_tensors(tmp_path / "resumed" / "train_state.safetensors")
    assert meta_a == meta_b and meta_a["step"] == 4
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    init = build_trainer(cfg, tmp_path / "fresh", progress=False).net.state_dict()
    assert any(not torch.equal(a[f"net.{k}"], v) for k, v in init.items())  # training moved the weights
    log = (tmp_path / "resumed" / "log.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in log[1:]] == ["2", "4"]


def test_ema_decay_and_update_by_hand(tmp_path: Path) -> None:
    assert ema_decay(0, 0.999, True) == pytest.approx(1 / 10)
    assert ema_decay(5, 0.999, True) == pytest.approx(6 / 15)
    assert ema_decay(10**6, 0.999, True) == 0.999
    assert ema_decay(0, 0.999, False) == 0.999
    # one trainer step: ema_1 = d ema_0 + (1 - d) net_1 with d = min(0.7, 1/10) at step 0, and then d = 0.7 for
    # the large steps without warm-up
    tr = build_trainer(_digits_cfg("train.ema=0.7", "train.steps=3"), tmp_path / "r", progress=False)
    ema0 = [p.clone() for p in tr.ema.parameters()]
    assert all(torch.equal(e, p) for e, p in zip(ema0, tr.net.parameters()))  # EMA starts at the weights
    tr.train_step()
    for e0, e1, p in zip(ema0, tr.ema.parameters(), tr.net.parameters()):
        torch.testing.assert_close(e1, 0.1 * e0 + 0.9 * p.detach(), rtol=1e-6, atol=1e-7)
    a = torch.nn.Linear(3, 2)
    b = torch.nn.Linear(3, 2)
    a0 = [p.clone() for p in a.parameters()]
    ema_update(a, b, 0.75)
    for p0, p1, q in zip(a0, a.parameters(), b.parameters()):
        torch.testing.assert_close(p1, 0.75 * p0 + 0.25 * q, rtol=1e-6, atol=1e-7)


def test_conditioning_is_used_by_the_trained_model(tmp_path: Path) -> None:
    tr = build_trainer(_digits_cfg("train.steps=3", "train.lr=1e-2", "train.batch=96"), tmp_path / "r", progress=False)
    emb0 = tr.net.class_embed.weight.detach().clone()
    tr.run()
    moved = (tr.net.class_embed.weight.detach() - emb0).abs().amax(1)
    assert (moved[:10] > 0).all()  # every digit's embedding row received gradient (the first step has none:
    # the output layer starts at zero)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = tr.model.eps(x, 500, torch.zeros(4, dtype=torch.long))
        b = tr.model.eps(x, 500, torch.full((4,), 7))
    assert (a - b).abs().amax() > 1e-4
    # an unconditional run builds a net without class embedding
    tr_u = build_trainer(_digits_cfg("data.conditional=false", "train.steps=1"), tmp_path / "u", progress=False)
    assert tr_u.net.class_embed is None


# --- classifier-free guidance (T-CFG-1, T-CFG-2) --------------------------------------------------------
def test_cfg_formula_by_hand() -> None:
    calls = []

    def net(x, t, cond):
        calls.append(len(x))
        c = torch.as_tensor(cond).to(x.dtype)
        return x * (c + 2)[:, None]  # eps = (c + 2) x; the null label -1 gives eps = x

    proc = td.DDPM()
    model = td.Denoiser(net, proc, prediction="eps")
    x = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 4])
    t = 400
    a, s = float(proc.alpha(torch.tensor(t))), float(proc.sigma(torch.tensor(t)))
    for w in (0.0, 0.5, 3.0):
        calls.clear()
        x0_g, eps_g = CFG(model, w).predict(x, t, y)
        assert calls == [6]  # conditional and null predictions in one batched call
        eps_c, eps_u = x * (y + 2).double()[:, None], x
        want = (1 + w) * eps_c - w * eps_u
        torch.testing.assert_close(eps_g, want, rtol=0, atol=1e-12)
        torch.testing.assert_close(x0_g, (x - s * want) / a, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="class condition"):
        CFG(model, 1.0).predict(x, t, None)


def _labelled_mixture() -> td.GaussianMixture:
    means = torch.tensor([[-2.0, 0.0], [-1.0, 1.5], [1.5, -1.0], [2.0, 1.0]])
    return td.GaussianMixture(torch.tensor([0.2, 0.3, 0.1, 0.4]), means, torch.tensor([0.3, 0.2, 0.5, 0.25]),
                              labels=torch.tensor([0, 0, 1, 1]))


def test_cfg_with_oracle_limits_score_space_and_classifier_guidance() -> None:
    """T-CFG-1: w = 0 is the conditional model and w = -1 (gamma = 0) the unconditional one, exactly; the eps
    combination equals the score combination; CFG(gamma = 1 + w) equals classifier guidance with the Bayes
    classifier: s(x) + gamma grad log p(y | x_t)."""
    gm = _labelled_mixture()
    proc = td.DDPM()
    model = td.Denoiser(gm.net(proc, "eps"), proc, prediction="eps")
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1.5
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    t = 300
    sigma = float(proc.sigma(torch.tensor(t)))
    eps_c, eps_u = gm.eps(x, proc, t, y), gm.eps(x, proc, t)
    torch.testing.assert_close(CFG(model, 0.0).predict(x, t, y)[1], eps_c, rtol=0, atol=1e-12)
    torch.testing.assert_close(CFG(model, -1.0).predict(x, t, y)[1], eps_u, rtol=0, atol=1e-12)
    xg = x.clone().requires_grad_(True)
    logp_y = gm.class_log_prob(xg, proc, t).gather(1, y[:, None]).sum()
    grad_cls = torch.autograd.grad(logp_y, xg)[0]
    for w in (0.5, 2.0, 4.0):
        eps_g = CFG(model, w).predict(x, t, y)[1]
        score_g = (1 + w) * gm.score(x, proc, t, y) - w * gm.score(x, proc, t)
        torch.testing.assert_close(-eps_g / sigma, score_g, rtol=0, atol=1e-10)
        cg = gm.score(x, proc, t) + (1 + w) * grad_cls
        torch.testing.assert_close(score_g, cg, rtol=0, atol=1e-10)


def test_unconditional_eps_is_posterior_mixture_of_conditionals() -> None:
    """T-CFG-2 (oracle): eps_uncond(x_t) = sum_y p(y | x_t) eps(x_t, y)."""
    gm = _labelled_mixture()
    proc = td.DDPM()
    x = torch.randn(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) * 2
    for t in (50, 400, 900):
        p_y = gm.class_log_prob(x, proc, t).exp()
        mix = sum(p_y[:, [k]] * gm.eps(x, proc, t, torch.full((8,), k)) for k in range(2))
        torch.testing.assert_close(gm.eps(x, proc, t), mix, rtol=0, atol=1e-10)
        assert (p_y.amin(1) < 0.99).any()  # the classes overlap: a nontrivial mixture


def test_label_dropout_rate_and_null_token(tmp_path: Path) -> None:
    """T-CFG-2: the label is replaced by the null token with probability p_uncond (binomial, 4 SE), and the
    null token is a row of its own that no real label uses."""
    p = 0.2
    tr = build_trainer(_digits_cfg(f"loss.p_uncond={p}", "train.batch=512"), tmp_path / "r", progress=False)
    g = torch.Generator().manual_seed(0)
    ys = torch.cat([drop_labels(tr._batch()[1], p, g) for _ in range(20)])
    n = len(ys)
    rate = float((ys == -1).float().mean())
    assert abs(rate - p) <= 4 * math.sqrt(p * (1 - p) / n)
    kept = ys[ys != -1]
    assert kept.min() >= 0 and kept.max() <= 9
    net = tr.net
    assert net.null_class == 10 == tr.data.num_classes
    assert net.class_embed.num_embeddings == 11
    assert int(tr.data.y.max()) < net.null_class
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 10.0])
    with torch.no_grad():
        torch.testing.assert_close(net(x, t, torch.tensor([-1, -1])), net(x, t, None), rtol=0, atol=0)
    p0 = build_trainer(_digits_cfg("loss.p_uncond=0"), tmp_path / "r0", progress=False)
    assert (drop_labels(p0._batch()[1], 0.0, g) >= 0).all()


# --- data errors ------------------------------------------------------------------------------------------
def _png(path: Path, size=(12, 10), seed: int = 0) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_bad_image_folders_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not found"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        load_image_folder(tmp_path / "empty")
    _png(tmp_path / "bad" / "ok.png")
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(ValueError, match="corrupt or unreadable image .*broken.png"):
        load_image_folder(tmp_path / "bad")
    with pytest.raises(ValueError, match="empty"):
        Dataset(torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="no images"):
        build_trainer(config_mod.resolve("images", [*TINY, f"data.name={tmp_path / 'empty'}"]), tmp_path / "r")
    _png(tmp_path / "flat" / "a.png")
    with pytest.raises(ValueError, match="no labels"):
        build_trainer(config_mod.resolve("images", [*TINY, f"data.name={tmp_path / 'flat'}", "data.conditional=true",
                                              "data.holdout=0"]), tmp_path / "r2")


def test_images_preset_trains_on_a_class_folder(tmp_path: Path) -> None:
    for i in range(3):
        _png(tmp_path / "imgs" / "cats" / f"{i}.png", seed=i)
        _png(tmp_path / "imgs" / "dogs" / f"{i}.jpg", size=(20, 16), seed=10 + i)
    cfg = config_mod.resolve("images", [*TINY, f"data.name={tmp_path / 'imgs'}", "data.size=16", "data.holdout=0",
                                        "data.conditional=true", "train.steps=1", "model.attn_resolutions=[8]"])
    res = train(cfg, tmp_path / "run", progress=False)
    assert res["step"] == 1
    info = load_tensors(tmp_path / "run" / "model.safetensors")[0]
    assert info["class_embed.weight"].shape[0] == 3  # 2 classes + null
    model, saved = load_run(tmp_path / "run")
    assert saved["run"]["data_shape"] == [3, 16, 16]
    assert saved["run"]["num_classes"] == 2


def test_tensorboard_missing_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ValueError, match="tensorboard"):
        build_trainer(_digits_cfg("train.tensorboard=true"), tmp_path / "r", progress=False)


def test_tensorboard_scalars_written_by_rank0(tmp_path: Path, monkeypatch) -> None:
    """With train.tensorboard=true the logged rows also go to a SummaryWriter (a stand-in here, so that the test
    does not need the tensorboard package), opened with purge_step on resume."""
    import types

    writers = []

    class FakeWriter:
        def __init__(self, logdir, purge_step=None):
            self.logdir, self.purge_step, self.scalars, self.closed = logdir, purge_step, [], False
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, float(value), step))

        def close(self):
            self.closed = True

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    cfg = _digits_cfg("train.tensorboard=true", "train.steps=4")
    train(cfg, tmp_path / "r", progress=False, stop_after=2)
    train(cfg, tmp_path / "r", progress=False)
    assert [w.purge_step for w in writers] == [None, 2]
    assert all(w.closed and w.logdir == str(tmp_path / "r" / "tensorboard") for w in writers)
    assert [(tag, step) for tag, _, step in writers[1].scalars if tag == "train/loss"] == [("train/loss", 4)]
    assert {tag for tag, _, _ in writers[0].scalars} == {"train/loss", "train/lr", "train/grad_norm", "train/seconds",
                                                      "train/val_loss"}
    csv_loss = float((tmp_path / "r" / "log.csv").read_text().splitlines()[-1].split(",")[1])
    assert writers[1].scalars[0][1] == pytest.approx(csv_loss)


# --- T-NET-2: sinusoidal time embedding --------------------------------------------------------------------
def test_sinusoidal_embedding_properties() -> None:
    d, h = 32, 16
    t = torch.arange(1000, dtype=torch.float32)
    pe = sinusoidal_embedding(t, d).double()
    torch.testing.assert_close(pe.square().sum(1), torch.full((1000,), d / 2, dtype=torch.float64), rtol=0,
                               atol=1e-5)  # |PE(t)|^2 = d/2
    torch.testing.assert_close(pe[0], torch.cat([torch.zeros(h), torch.ones(h)]).double(), rtol=0, atol=0)
    # pinned convention: sines first, w_i = 10000^(-i/(h-1)) (first frequency 1, last 1e-4)
    w = 10000.0 ** (-torch.arange(h, dtype=torch.float64) / (h - 1))
    torch.testing.assert_close(pe[7], torch.cat([torch.sin(7 * w), torch.cos(7 * w)]), rtol=0, atol=1e-6)
    # PE(t + k) = R(k) PE(t): a block rotation by the angles k w_i
    k, ts = 5.0, torch.tensor([0.0, 3.0, 40.0])
    s, c = sinusoidal_embedding(ts, d).double().split(h, 1)
    shifted = sinusoidal_embedding(ts + k, d).double()
    rot = torch.cat([s * torch.cos(k * w) + c * torch.sin(k * w), c * torch.cos(k * w) - s * torch.sin(k * w)], 1)
    torch.testing.assert_close(shifted, rot, rtol=0, atol=1e-5)
    # all T timesteps are distinct
    dist = torch.cdist(pe, pe) + torch.eye(1000, dtype=torch.float64) * 1e9
    assert dist.min() > 1e-3


# --- demo ---------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_quick(tmp_path: Path) -> None:
    from torchdiffusion.runs.demo import run_demo

    lines = list(run_demo(tmp_path, quick=True))
    assert any("digits" in ln for ln in lines)
    assert (tmp_path / "digits" / "digits_grid.png").is_file()
    assert (tmp_path / "digits" / "digits_reverse.gif").is_file()
