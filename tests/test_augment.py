"""Non-leaking augmentation (data.augment; torchdiffusion.data.augment): the labels name exactly the transform each
image underwent, the zero label is the identity for the network, and a run trained with it loads and scores
un-augmented data."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import one_line_error
from torchdiffusion.data.augment import AUGMENT_DIM, augment, translate
from torchdiffusion.data.datasets import Dataset, load
from torchdiffusion.likelihood import bits_per_dim
from torchdiffusion.likelihood.continuous import dequantizer_of
from torchdiffusion.nets.likelihood import LikelihoodNet, VariationalDequantizer
from torchdiffusion.nets.unet import UNet
from torchdiffusion.parameterization.denoiser import Denoiser, process_for_net, unwrap
from torchdiffusion.processes import process_from_config
from torchdiffusion.runs import config
from torchdiffusion.runs.build import load_run
from torchdiffusion.runs.train import AugmentLabelled, build_trainer
from torchdiffusion.samplers import sample


def short_error(e: pytest.ExceptionInfo, expect: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and expect in msg, msg


def reference_transform(img: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """The transform a label names, pixel by pixel (flip x, flip y, k quarter turns counter-clockwise as
    torch.rot90 on (H, W), then a shift with the border repeated)."""
    out = img.clone()
    if label[0] == 1:
        out = out.flip(-1)
    if label[1] == 1:
        out = out.flip(-2)
    k = round(math.atan2(float(label[3]), float(label[2]) + 1) / (math.pi / 2)) % 4
    out = torch.rot90(out, k, (-2, -1))
    H, W = out.shape[-2:]
    dx, dy = round(float(label[4]) * W), round(float(label[5]) * H)
    shifted = torch.empty_like(out)
    for i in range(H):
        for j in range(W):
            shifted[..., i, j] = out[..., min(max(i - dy, 0), H - 1), min(max(j - dx, 0), W - 1)]
    return shifted


def test_zero_probability_is_the_identity_with_zero_labels():
    x = torch.randn(16, 1, 8, 8)
    y, labels = augment(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(y, x)
    assert labels.shape == (16, AUGMENT_DIM) and not labels.any()


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 6), (2, 4, 6)])
def test_labels_name_the_transform(shape):
    """Every augmented image equals the transform its label names (computed pixel by pixel); rectangular images are
    never rotated."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, *shape, generator=g)
    y, labels = augment(x, 0.6, g, max_shift=2)
    assert labels[:, 0].any() and labels[:, 4].any()
    if shape[1] != shape[2]:
        assert not labels[:, 2:4].any()
    else:
        assert labels[:, 3].abs().sum() > 0 and (labels[:, 2] == -2).any()
    for b in range(len(x)):
        assert torch.equal(y[b], reference_transform(x[b], labels[b])), b


def test_translate_repeats_the_border():
    x = torch.arange(9.0).reshape(1, 1, 3, 3)
    right = translate(x, torch.tensor([1]), torch.tensor([0]))
    assert torch.equal(right[0, 0], torch.tensor([[0.0, 0, 1], [3, 3, 4], [6, 6, 7]]))
    up = translate(x, torch.tensor([0]), torch.tensor([-1]))
    assert torch.equal(up[0, 0], torch.tensor([[3.0, 4, 5], [6, 7, 8], [6, 7, 8]]))


def test_each_operation_applies_with_probability_p():
    n, p = 20000, 0.2
    _, labels = augment(torch.zeros(n, 1, 8, 8), p, torch.Generator().manual_seed(2))
    se = math.sqrt(p * (1 - p) / n)
    for frac in (labels[:, 0].mean(), labels[:, 1].mean(), (labels[:, 2:4] != 0).any(1).float().mean()):
        assert abs(float(frac) - p) < 5 * se
    # a translation is drawn with probability p, and then is (0, 0) with probability 1/9 (max_shift 1 at 8x8)
    moved = (labels[:, 4:] != 0).any(1).float().mean()
    assert abs(float(moved) - p * 8 / 9) < 5 * se


def test_bad_input_is_one_line():
    with pytest.raises(ValueError) as e:
        augment(torch.zeros(4, 8), 0.1)
    short_error(e, "images")
    with pytest.raises(ValueError) as e:
        augment(torch.zeros(4, 1, 8, 8), 1.5)
    short_error(e, "[0, 1]")


def test_unet_zero_label_is_no_label():
    torch.manual_seed(0)
    net = UNet(1, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,),
               groups=8, augment_dim=AUGMENT_DIM).eval()
    with torch.no_grad():
        net.augment_embed.weight.normal_()
        for w in net.parameters():  # the zero-initialized layers (DDPM's init) would hide every difference
            if not w.any():
                w.normal_(std=0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.full((3,), 0.5)
    plain = net(x, t)
    assert torch.equal(net(x, t, augment=torch.zeros(3, AUGMENT_DIM)), plain)
    label = torch.zeros(3, AUGMENT_DIM)
    label[:, 0] = 1
    assert (net(x, t, augment=label) - plain).abs().max() > 1e-3
    with pytest.raises(ValueError) as e:
        net(x, t, augment=torch.zeros(3, 2))
    short_error(e, "augment labels must have shape")
    bare = UNet(1, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), groups=8)
    with pytest.raises(ValueError) as e:
        bare(x, t, augment=label)
    short_error(e, "without augment_dim")


def _digits(n: int = 64) -> Dataset:
    d = load("digits")
    return Dataset(d.x[:n], d.y[:n], levels=17, num_classes=10, name="digits")


def test_training_with_augment_trains_the_label_embedding_and_scores_plain_data(tmp_path):
    """A likelihood run with data.augment: the labels' embedding moves (it gets gradients), the run loads with it
    and scores un-augmented digits (finite bits/dim), and the same run without augmentation has no embedding."""
    cfg = config.resolve("likelihood_digits", ["data.augment=0.5", "train.steps=3", "train.batch=16",
                                               "train.device=cpu", "train.threads=1", "model.channels=16"])
    tr = build_trainer(cfg, tmp_path / "aug", dataset=_digits(), progress=False)
    inner = tr.model.net.net
    w0 = inner.augment_embed.weight.detach().clone()
    tr.run()
    assert not torch.equal(inner.augment_embed.weight, w0)
    model, _ = load_run(tmp_path / "aug")
    r = bits_per_dim(model, _digits(8).x, method="vlb", levels=17, n_t=4, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(r.bpd).all()
    plain = build_trainer(config.resolve("likelihood_digits", ["data.augment=0", "train.steps=1", "model.channels=16"]),
                          tmp_path / "plain", dataset=_digits(), progress=False)
    assert plain.model.net.net.augment_embed is None


@pytest.mark.parametrize("sets, expect", [(["data.augment=1.5"], "data.augment must be a number in [0, 1]"),
                                          (["data.augment=true"], "'data.augment' expects a number"),
                                          (["model.net=mlp", "data.name=ring", "data.augment=0.1"],
                                           "data.augment needs model.net=unet")])
def test_bad_augment_config_is_one_line(tmp_path, sets, expect):
    with pytest.raises(ValueError) as e:
        cfg = config.resolve("likelihood_digits" if "data.name=ring" not in sets else "vp", sets)
        build_trainer(cfg, tmp_path / "bad", progress=False)
    short_error(e, expect)


def test_cli_refuses_a_bad_augment_probability(tmp_path, capsys):
    msg = one_line_error(capsys, "train", "likelihood_digits", "--set", "data.augment=2", "--out", str(tmp_path / "r"))
    assert "data.augment must be a number in [0, 1]" in msg


def test_class_conditional_run_trains_with_augment(tmp_path):
    """The labels ride beside the class labels: a class-conditional DDPM run trains with data.augment and samples."""
    cfg = config.resolve("digits", ["data.augment=0.3", "train.steps=2", "train.batch=16", "train.device=cpu",
                                    "model.channels=16", "data.holdout=0"])
    tr = build_trainer(cfg, tmp_path / "cond", dataset=_digits(), progress=False)
    assert tr.run()["step"] == 2
    model, _ = load_run(tmp_path / "cond")
    g = torch.Generator().manual_seed(0)
    x = sample(model, torch.randn(4, 1, 8, 8, generator=g), sampler="ddim", steps=3, cond=torch.arange(4),
               generator=g)
    assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()


def test_schedule_and_dequantizer_are_found_through_the_wrappers():
    """unwrap reaches the LikelihoodNet through the augmentation wrapper and torch.compile, in either nesting, so the
    process reads the trained schedule and the bound finds the dequantizer (not the process's own copy)."""
    proc = process_from_config({"name": "learned"})
    other = process_from_config({"name": "learned"}).schedule  # a schedule the process does not hold
    inner = LikelihoodNet(UNet(1, image_size=8, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                               attn_resolutions=(4,), groups=8, augment_dim=AUGMENT_DIM), other,
                          VariationalDequantizer(1))
    labels = torch.zeros(2, AUGMENT_DIM)
    for wrapped in (AugmentLabelled(torch.compile(inner), labels), torch.compile(AugmentLabelled(inner, labels))):
        assert unwrap(wrapped) is inner
        assert process_for_net(proc, wrapped).schedule is other
        assert dequantizer_of(Denoiser(wrapped, proc)) is inner.dequantizer
