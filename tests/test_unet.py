"""Tests of the DDPM U-Net (torchdiffusion.nets.unet)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from torchdiffusion.nets.unet import (
    AttentionBlock,
    CrossAttention2d,
    SelfAttention2d,
    UNet,
    group_count,
)

SMALL = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, groups=8)


def _unzero(module: nn.Module, std: float = 0.05) -> nn.Module:
    """Re-initialise the zero-initialised weights (last res-block convs, attention projections, conv_out)."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for p in module.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def _small(**kw) -> UNet:
    torch.manual_seed(0)
    return UNet(**{**SMALL, **kw}).eval()


def test_group_count_divides() -> None:
    assert group_count(64, 32) == 32
    assert group_count(48, 32) == 24
    assert group_count(6, 32) == 6
    assert group_count(7, 4) == 1
    assert group_count(12, 8) == 6


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("batch", [1, 3])
def test_output_shape_matches_input(size: int, batch: int) -> None:
    net = _unzero(_small(in_channels=3, image_size=size, attn_resolutions=(size // 2,)))
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        out = net(x, torch.rand(batch))
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_out_channels_and_rectangular_input() -> None:
    net = _small(in_channels=1, out_channels=2, image_size=8)
    with torch.no_grad():
        out = net(torch.randn(2, 1, 8, 12), torch.rand(2))
    assert out.shape == (2, 2, 8, 12)


def test_zero_init_output_is_zero() -> None:
    net = _small(image_size=8)
    with torch.no_grad():
        out = net(torch.randn(2, 1, 8, 8), torch.rand(2))
    assert torch.equal(out, torch.zeros_like(out))
    assert not net.conv_out.weight.any()
    for m in net.modules():
        if hasattr(m, "conv2"):
            assert not m.conv2.weight.any()


def test_param_count_independent_of_time_scale() -> None:
    def count(net: nn.Module) -> int:
        return sum(p.numel() for p in net.parameters())

    a = _small(image_size=8, time_scale=1.0)
    b = _small(image_size=8, time_scale=999.0)
    assert count(a) == count(b)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]


def test_time_dependence_and_time_mlp_gradient() -> None:
    net = _unzero(_small(image_size=8, time_scale=1000.0))
    torch.manual_seed(1)
    x = torch.randn(2, 1, 8, 8)
    out1 = net(x, torch.full((2,), 0.1))
    out2 = net(x, torch.full((2,), 0.7))
    assert (out1 - out2).abs().max() > 1e-4
    # A scalar t is broadcast over the batch.
    with torch.no_grad():
        torch.testing.assert_close(net(x, torch.tensor(0.1)), out1.detach())
        torch.testing.assert_close(net(x, 0.1), out1.detach())
    (out1.square().mean() + out2.square().mean()).backward()
    for name, p in net.time_embed.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_class_conditioning_is_used() -> None:
    net = _unzero(_small(image_size=8, num_classes=10))
    assert net.null_class == 10
    torch.manual_seed(2)
    x = torch.randn(3, 1, 8, 8)
    t = torch.rand(3)
    with torch.no_grad():
        a = net(x, t, torch.tensor([0, 1, 2]))
        b = net(x, t, torch.tensor([3, 4, 5]))
        none = net(x, t)
        null = net(x, t, torch.full((3,), net.null_class))
        minus = net(x, t, torch.full((3,), -1))
        mixed = net(x, t, torch.tensor([0, -1, 2]))
    assert ((a - b).flatten(1).abs().amax(1) > 1e-4).all()
    assert (a - none).abs().max() > 1e-4
    torch.testing.assert_close(none, null, rtol=0, atol=0)
    torch.testing.assert_close(none, minus, rtol=0, atol=0)
    torch.testing.assert_close(mixed[[0, 2]], a[[0, 2]])
    torch.testing.assert_close(mixed[1], none[1])
    for bad in (11, -2, 100):
        with pytest.raises(ValueError, match="class labels"):
            net(x, t, torch.tensor([0, bad, 1]))
    with pytest.raises(ValueError, match="integer"):
        net(x, t, torch.tensor([0.0, 1.0, 2.0]))


def test_cond_on_unconditional_net_raises() -> None:
    net = _small(image_size=8)
    with pytest.raises(ValueError, match="num_classes"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([0]))


def test_attention_runs_at_requested_resolution() -> None:
    torch.manual_seed(0)
    net = UNet(
        in_channels=1,
        image_size=32,
        channels=16,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(16,),
        groups=8,
    ).eval()
    seen: dict[str, list[tuple[int, int]]] = {"mid": [], "other": []}

    def hook(kind: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            assert output.shape == args[0].shape
            seen[kind].append(tuple(args[0].shape[-2:]))

        return fn

    for name, m in net.named_modules():
        if isinstance(m, AttentionBlock):
            m.register_forward_hook(hook("mid" if name.startswith("mid") else "other"))
    with torch.no_grad():
        net(torch.randn(1, 1, 32, 32), torch.rand(1))
    # Level 1 (16x16): num_res_blocks attention blocks on the way down, num_res_blocks + 1 on the way up.
    assert seen["other"] == [(16, 16)] * 3
    # The middle block runs at the lowest resolution 32 / 2**2.
    assert seen["mid"] == [(8, 8)]


def test_self_attention_permutation_equivariant() -> None:
    torch.manual_seed(3)
    block = _unzero(AttentionBlock(16, num_heads=2, groups=4), std=0.2)
    x = torch.randn(2, 16, 1, 10)
    perm = torch.randperm(10)
    with torch.no_grad():
        y = block(x)
        y_perm = block(x[..., perm])
    assert (y - x).abs().max() > 1e-3  # the attention actually contributes
    torch.testing.assert_close(y_perm, y[..., perm], rtol=1e-5, atol=1e-5)


def test_self_attention_mixes_positions() -> None:
    """Changing one position changes the output at the other positions (global receptive field)."""
    torch.manual_seed(4)
    attn = _unzero(SelfAttention2d(8, num_heads=1, groups=4), std=0.2)
    x = torch.randn(1, 8, 4, 4)
    x2 = x.clone()
    x2[..., 0, 0] += 3.0
    with torch.no_grad():
        d = (attn(x) - attn(x2)).abs()
    assert d[..., 3, 3].max() > 1e-4


def _cross(seed: int = 5) -> CrossAttention2d:
    torch.manual_seed(seed)
    return _unzero(CrossAttention2d(16, context_dim=6, num_heads=2, groups=4), std=0.2)


def test_cross_attention_single_token_is_constant_over_positions() -> None:
    ca = _cross()
    x = torch.randn(2, 16, 3, 5)
    ctx = torch.randn(2, 1, 6)
    with torch.no_grad():
        out = ca(x, ctx)
    assert out.shape == x.shape
    flat = out.flatten(2)
    torch.testing.assert_close(flat, flat[..., :1].expand_as(flat), rtol=1e-5, atol=1e-6)
    assert flat.abs().max() > 1e-3
    assert (flat[0, :, 0] - flat[1, :, 0]).abs().max() > 1e-4  # depends on each sample's context


def test_cross_attention_token_permutation_invariant() -> None:
    ca = _cross()
    x = torch.randn(2, 16, 4, 4)
    ctx = torch.randn(2, 7, 6)
    perm = torch.randperm(7)
    with torch.no_grad():
        out = ca(x, ctx)
        out_perm = ca(x, ctx[:, perm])
    assert (out - out[..., :1, :1]).abs().max() > 1e-4  # not constant with several tokens
    torch.testing.assert_close(out_perm, out, rtol=1e-5, atol=1e-6)


def test_cross_attention_mask_equals_dropping_tokens() -> None:
    ca = _cross()
    x = torch.randn(2, 16, 4, 4)
    ctx = torch.randn(2, 5, 6)
    mask = torch.tensor([[True, True, True, False, False], [True, False, True, True, False]])
    with torch.no_grad():
        masked = ca(x, ctx, mask)
        dropped0 = ca(x[:1], ctx[:1, :3])
        dropped1 = ca(x[1:], ctx[1:, [0, 2, 3]])
        unmasked = ca(x, ctx)
        all_masked = ca(x, ctx, torch.zeros(2, 5, dtype=torch.bool))
    torch.testing.assert_close(masked[:1], dropped0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked[1:], dropped1, rtol=1e-5, atol=1e-6)
    assert (masked - unmasked).abs().max() > 1e-4
    assert torch.equal(all_masked, torch.zeros_like(all_masked))


def test_unet_with_context() -> None:
    net = _unzero(_small(image_size=8, attn_resolutions=(8,), context_dim=6))
    torch.manual_seed(6)
    x = torch.randn(2, 1, 8, 8)
    t = torch.rand(2)
    ctx = torch.randn(2, 4, 6)
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    with torch.no_grad():
        out = net(x, t, context=ctx, context_mask=mask)
        out_pad = net(x, t, context=torch.cat([ctx[:, :2], torch.randn(2, 2, 6)], 1), context_mask=mask)
        out_other = net(x, t, context=torch.randn(2, 4, 6))
        out_none = net(x, t)
        out_all_masked = net(x, t, context=ctx, context_mask=torch.zeros(2, 4, dtype=torch.bool))
    assert out.shape == x.shape
    torch.testing.assert_close(out_pad[0], out[0], rtol=1e-5, atol=1e-6)  # padding content is ignored
    assert (out - out_other).abs().max() > 1e-4
    torch.testing.assert_close(out_none, out_all_masked, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="context must have shape"):
        net(x, t, context=torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="context_mask"):
        net(x, t, context=ctx, context_mask=mask.float())


def test_context_without_context_dim_raises() -> None:
    net = _small(image_size=8)
    with pytest.raises(ValueError, match="context_dim"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1), context=torch.randn(1, 2, 4))


def test_bad_inputs_raise() -> None:
    net = _small(in_channels=1, image_size=8, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="expected x with 1 channels, got 3"):
        net(torch.randn(1, 3, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="10x8 must be divisible by .*=4"):
        net(torch.randn(1, 1, 10, 8), torch.rand(1))
    with pytest.raises(ValueError, match="8x6 must be divisible"):
        net(torch.randn(1, 1, 8, 6), torch.rand(1))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        net(torch.randn(1, 8, 8), torch.rand(1))
    with pytest.raises(ValueError, match="t must be a scalar"):
        net(torch.randn(2, 1, 8, 8), torch.rand(3))
    with pytest.raises(ValueError, match="image_size"):
        UNet(image_size=30, channels=16, channel_mult=(1, 2, 2), groups=8)
    with pytest.raises(ValueError, match="num_heads"):
        UNet(image_size=8, channels=16, channel_mult=(1,), attn_resolutions=(8,), groups=8, num_heads=3)
