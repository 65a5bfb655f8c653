"""The fast path (issue 31; nets/fast.py): the ``auto`` rule, the config switches, activation checkpointing, the
trainer's channels-last wrapper, and the Pipeline's compile-once sampling (compilations counted)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchdiffusion as td
from torchdiffusion.nets import fast
from torchdiffusion.nets.mlp import MLP
from torchdiffusion.nets.unet import ResBlock, UNet
from torchdiffusion.runs import config as C
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.runs.train import build_trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TINY_UNET = dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=4)


def _unet(size: int = 8, **kw) -> UNet:
    torch.manual_seed(0)
    return UNet(in_channels=1, image_size=size, **{**TINY_UNET, **kw})


# --- the auto rule -------------------------------------------------------------------------------------------------
WINS_AT_32 = {key: fast.AutoRule(32, 100) for key in fast.AUTO_RULES}


def test_auto_rule_picks_only_convolutional_nets_at_the_measured_size_and_call_count() -> None:
    unet, mlp = _unet(), MLP(dim=2, hidden=16, depth=2, emb_dim=8)
    for option in fast.OPTIONS:
        for use in fast.USES:
            def picks(net, shape, calls, option=option, use=use):
                return fast.auto_picks(option, use, net, shape, calls, rules=WINS_AT_32)
            assert picks(unet, (3, 32, 32), 100) and picks(unet, (3, 64, 64), 10**6)
            assert not picks(unet, (3, 32, 32), 99)  # too few calls to repay the one-time cost
            assert not picks(unet, (1, 8, 8), 10**6)  # 8x8 digits: never
            assert not picks(unet, (3, 16, 32), 10**6)  # the smaller side counts
            assert not picks(mlp, (2,), 10**6)  # small MLPs on vectors: never
            assert not picks(nn.Sequential(nn.Linear(3, 3)), (3, 32, 32), 10**6)  # no convolution: never
            never = {**WINS_AT_32, (option, use): fast.AutoRule(None)}
            assert not fast.auto_picks(option, use, unet, (3, 64, 64), 10**6, rules=never)


def test_the_shipped_auto_rule_never_picks_for_mlps_or_8x8_digits() -> None:
    for option in fast.OPTIONS:
        for use in fast.USES:
            for calls in (1, 10**9):
                assert not fast.auto_picks(option, use, MLP(dim=2, hidden=16, depth=2, emb_dim=8), (2,), calls)
                assert not fast.auto_picks(option, use, _unet(), (1, 8, 8), calls)


def test_flags_refuse_anything_but_true_false_auto() -> None:
    assert fast.check_flag("auto", "k") == "auto" and fast.check_flag(False, "k") is False
    for bad in ("yes", 1, None, "Auto"):
        with pytest.raises(ValueError, match='^k must be true, false or "auto", got'):
            fast.check_flag(bad, "k")
    with pytest.raises(ValueError, match="no auto rule for option 'fused'"):
        fast.auto_picks("fused", "train", _unet(), (1, 8, 8), 1)
    cfg = C.resolve("ring")
    assert cfg["train"]["compile"] == "auto" and cfg["sample"]["channels_last"] == "auto"
    assert C.resolve("ring", ["train.compile=false"])["train"]["compile"] is False
    for key in C.AUTO_FLAGS:
        with pytest.raises(ValueError, match=f'^{key} must be true, false or "auto", got \'maybe\'$'):
            C.resolve("ring", [f"{key}=maybe"])


# --- activation checkpointing ----------------------------------------------------------------------------------------
def test_checkpointing_gives_the_same_gradients_and_recomputes_the_stages() -> None:
    torch.manual_seed(1)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([3.0, 500.0, 900.0])
    grads, calls = [], []
    for ckpt in (False, True):
        net = _unet(dropout=0.1, checkpointing=ckpt).train()
        with torch.no_grad():  # wake the zero-initialised layers so that every parameter gets a gradient
            for p in net.parameters():
                if p.dim() > 1 and not p.any():
                    p.normal_(0, 0.05)
        count = [0]
        for m in net.modules():
            if isinstance(m, ResBlock):
                m.register_forward_pre_hook(lambda *_, count=count: count.__setitem__(0, count[0] + 1))
        torch.manual_seed(7)  # the same dropout masks (checkpoint replays the RNG state)
        out = net(x, t)
        out.square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
        calls.append(count[0])
    blocks = sum(isinstance(m, ResBlock) for m in _unet().modules())
    assert calls == [blocks, 2 * blocks]  # checkpointed: every residual block starts again in the backward pass
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_model_checkpointing_config() -> None:
    from torchdiffusion.runs.build import build_model

    cfg = C.resolve("digits", ["model.checkpointing=true"])
    net = build_model(cfg, (1, 8, 8), 10).net
    assert isinstance(net, UNet) and net.checkpointing
    assert not build_model(C.resolve("digits"), (1, 8, 8), 10).net.checkpointing
    with pytest.raises(ValueError, match="^model.checkpointing=true needs a U-Net .* model.net='mlp' has none$"):
        build_model(C.resolve("ring", ["model.checkpointing=true"]), (2,), None)


def test_a_run_resumes_with_checkpointing_switched(tmp_path) -> None:
    sets = ["train.steps=2", "train.batch=4", "data.n=32", "model.channels=8", "train.device=cpu", "train.ckpt_every=0",
            "train.sample_every=0"]
    build_trainer(C.resolve("digits", sets), tmp_path / "r", progress=False).run(stop_after=1)
    tr = build_trainer(C.resolve("digits", [*sets, "model.checkpointing=true"]), tmp_path / "r", progress=False)
    assert tr.step == 1 and tr.net.checkpointing
    tr.close()


# --- the trainer -----------------------------------------------------------------------------------------------------
def test_trainer_auto_picks_nothing_for_a_toy_and_channels_last_trains_the_same(tmp_path) -> None:
    tr = build_trainer(C.resolve("ring", ["train.steps=2", "model.hidden=16", "data.n=200", "train.device=cpu"]),
                       tmp_path / "toy", progress=False)
    assert tr.fast_path == {"channels_last": False, "compile": False} and tr.fwd_net is tr.net
    tr.close()
    base = ["train.steps=3", "train.batch=8", "data.n=64", "model.channels=8", "train.device=cpu", "train.ckpt_every=0",
            "train.sample_every=0", "train.compile=false"]
    losses = {}
    for cl in (False, True):
        tr = build_trainer(C.resolve("digits", [*base, f"train.channels_last={str(cl).lower()}"]),
                           tmp_path / f"cl{cl}", progress=False)
        assert tr.fast_path["channels_last"] is cl and isinstance(tr.fwd_net, fast.ChannelsLast) is cl
        losses[cl] = [tr.train_step()[0] for _ in range(3)]
        tr.close()
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# --- sampling: compile once per model and shape ---------------------------------------------------------------------
def _pipeline(**kw) -> Pipeline:
    net = _unet().eval()
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.05)
    model = td.Denoiser(net, td.DDPM(T=1000), prediction="eps")
    cfg = {"run": {"data_shape": [1, 8, 8], "num_classes": None, "value_range": [-1.0, 1.0]},
           "sample": {"sampler": "ddim", "steps": 4, "threads": 1}}
    return Pipeline(model, cfg, **kw)


def test_pipeline_compiles_once_per_model_and_shape_never_per_step(monkeypatch) -> None:
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    monkeypatch.setattr(fast, "BACKEND", counter)
    pipe, eager = _pipeline(compile=True, channels_last=True), _pipeline(compile=False, channels_last=False)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    x = pipe(n=3, steps=2, generator=g(), progress=False)
    assert pipe.fast == {"compile": True, "channels_last": True}
    first = counter.frame_count
    assert first >= 1
    x6 = pipe(n=3, steps=6, generator=g(), progress=False)  # 6 more network calls, same shape
    assert counter.frame_count == first  # nothing recompiled per step or per call
    torch.testing.assert_close(x, eager(n=3, steps=2, generator=g(), progress=False))
    torch.testing.assert_close(x6, eager(n=3, steps=6, generator=g(), progress=False))
    assert eager.fast == {"compile": False, "channels_last": False}
    pipe(n=5, steps=3, generator=g(), progress=False)  # a new batch size: compiled once more, then reused
    second = counter.frame_count
    assert second > first
    pipe(n=5, steps=5, generator=g(), progress=False)
    assert counter.frame_count == second
    auto = _pipeline()  # "auto" on 8x8: neither
    auto(n=2, steps=2, generator=g(), progress=False)
    assert auto.fast == {"compile": False, "channels_last": False}
    with pytest.raises(ValueError, match='^compile must be true, false or "auto"'):
        _pipeline(compile="fast")
    torch._dynamo.reset()


@pytest.mark.slow
def test_inductor_compiled_sampling_matches_eager() -> None:
    """The real backend (minutes on a busy CPU: C++ kernels are built)."""
    torch._dynamo.reset()
    pipe, eager = _pipeline(compile=True), _pipeline(compile=False)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(pipe(n=2, steps=3, generator=g(), progress=False),
                               eager(n=2, steps=3, generator=g(), progress=False), rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


def test_an_autoencoder_trains_when_compile_is_on(tmp_path) -> None:
    """train.compile=true (what "auto" picks for a long 32x32 run) on a VAE: the loss looks through the compile
    wrapper (it calls encode / decode), so training works instead of refusing the wrapped net (vae_shapes32 did)."""
    sets = ["train.steps=2", "train.batch=8", "data.n=64", "model.channels=8", "train.device=cpu", "train.ckpt_every=0",
            "train.sample_every=0", "train.compile=true"]
    tr = build_trainer(C.resolve("vae_digits", sets), tmp_path / "vae", progress=False)
    assert tr.fast_path["compile"] is True
    loss = tr.train_step()[0]
    assert loss == loss and abs(loss) < 1e6  # finite
    tr.close()
