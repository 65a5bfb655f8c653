"""The DDPM U-Net (Ho et al. 2020; 001 "Network Architecture").

A Wide-ResNet-style encoder/decoder with skip connections between matching resolutions, a sinusoidal time
embedding added in every residual block, self-attention at chosen feature resolutions and in the middle
block, optional class conditioning (with a learned null class for classifier-free guidance) and optional
cross-attention to a context sequence (for latent / text-conditioned diffusion).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from torchdiffusion.nets.embeddings import TimeEmbedding

__all__ = [
    "AttentionBlock",
    "CrossAttention2d",
    "Downsample",
    "ResBlock",
    "SelfAttention2d",
    "UNet",
    "Upsample",
    "group_count",
]


def group_count(ch: int, groups: int) -> int:
    """Largest divisor of ``ch`` that is ``<= groups``: the number of GroupNorm groups used for ``ch``."""
    for g in range(max(1, min(groups, ch)), 0, -1):
        if ch % g == 0:
            return g
    return 1


def _norm(ch: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(group_count(ch, groups), ch)


def _zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of ``module`` in place (DDPM's ``init_scale=0`` layers) and return it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """DDPM residual block: ``GN-SiLU-conv3x3, + dense(SiLU(emb)), GN-SiLU-dropout-conv3x3`` plus a skip.

    The skip is a 1x1 convolution when the channel count changes; the last convolution is zero-initialised
    so that the block starts as (a projection of) the identity.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float = 0.0, groups: int = 32):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_ch))
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(emb)[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the ``H*W`` spatial positions of a GroupNorm-ed feature map.

    Returns the attention *contribution* (the caller adds the residual). ``softmax(Q K^T / sqrt(d)) V`` is
    computed by :func:`torch.nn.functional.scaled_dot_product_attention`; the output projection is
    zero-initialised (DDPM).
    """

    def __init__(self, ch: int, num_heads: int = 1, groups: int = 32):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {ch}")
        self.num_heads = num_heads
        self.norm = _norm(ch, groups)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj_out = _zero_(nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        heads = self.num_heads
        qkv = self.qkv(self.norm(x)).reshape(B, 3, heads, C // heads, H * W)
        # each (B, heads, N, d), contiguous in d: the fused (flash) kernels need a unit stride there, else torch falls
        # back to the slower math kernel
        q, k, v = qkv.transpose(-1, -2).contiguous().unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d)
        out = out.transpose(-1, -2).reshape(B, C, H, W)
        return self.proj_out(out)


class CrossAttention2d(nn.Module):
    """Multi-head cross-attention: queries from the GroupNorm-ed feature map, keys/values from a context.

    ``context`` has shape ``(B, L, context_dim)``; ``context_mask`` (``(B, L)`` bool, True = keep) hides
    padding tokens. Returns the contribution ``proj(softmax(Q K^T / sqrt(d)) V)`` of shape ``(B, C, H, W)``
    (the caller adds the residual). A sample whose tokens are all masked gets a zero contribution. The
    output projection is zero-initialised.
    """

    def __init__(self, ch: int, context_dim: int, num_heads: int = 1, groups: int = 32):
        super().__init__()
        if ch % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide the channel count {ch}")
        self.num_heads = num_heads
        self.norm = _norm(ch, groups)
        self.to_q = nn.Linear(ch, ch)
        self.to_kv = nn.Linear(context_dim, 2 * ch)
        self.proj_out = _zero_(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        B, C, H, W = x.shape
        heads, d = self.num_heads, C // self.num_heads
        L = context.shape[1]
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q = self.to_q(h).reshape(B, H * W, heads, d).transpose(1, 2)  # (B, heads, N, d)
        k, v = self.to_kv(context).reshape(B, L, 2, heads, d).permute(2, 0, 3, 1, 4)  # (B, heads, L, d)
        attn_mask = None
        keep_any = None
        if context_mask is not None:
            keep_any = context_mask.any(dim=1)  # (B,)
            # A fully masked row would give NaN; attend to everything there and zero the result below.
            safe = context_mask | ~keep_any[:, None]
            attn_mask = safe[:, None, None, :]  # (B, 1, 1, L), broadcast over heads and queries
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, heads, N, d)
        out = self.proj_out(out.transpose(1, 2).reshape(B, H * W, C))  # (B, N, C)
        if keep_any is not None:
            out = out * keep_any[:, None, None].to(out.dtype)
        return out.transpose(1, 2).reshape(B, C, H, W)


class AttentionBlock(nn.Module):
    """``x + SelfAttn(GN(x))``, then (if ``context_dim`` is set and a context is given) ``+ CrossAttn``."""

    def __init__(self, ch: int, num_heads: int = 1, groups: int = 32, context_dim: int | None = None):
        super().__init__()
        self.self_attn = SelfAttention2d(ch, num_heads, groups)
        self.cross_attn = (
            None if context_dim is None else CrossAttention2d(ch, context_dim, num_heads, groups)
        )

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        x = x + self.self_attn(x)
        if self.cross_attn is not None and context is not None:
            x = x + self.cross_attn(x, context, context_mask)
        return x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling followed by a 3x3 convolution."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def fourier_input(x: Tensor, exponents: Sequence[int]) -> Tensor:
    """``x`` with ``sin(2^n pi x)`` and ``cos(2^n pi x)`` of every channel appended for each ``n`` (VDM's Fourier
    features of the input, Kingma et al. 2021 app. C: periods ``2^(1-n)`` near the quantization step make the
    fine-scale structure of the data easy to see)."""
    if not exponents:
        return x
    feats = [x]
    for n in exponents:
        arg = (2.0**n * torch.pi) * x
        feats += [torch.sin(arg), torch.cos(arg)]
    return torch.cat(feats, dim=1)


class _Stage(nn.Module):
    """A residual block optionally followed by an attention block (one step of the down/up paths)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, h: Tensor, emb: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        h = self.res(h, emb)
        if self.attn is not None:
            h = self.attn(h, context, context_mask)
        return h


class UNet(nn.Module):
    """The DDPM U-Net noise/score network ``eps_theta(x, t[, cond][, context])`` (Ho et al. 2020).

    Layout: ``conv3x3 -> [num_res_blocks x (ResBlock [+ Attn]) -> Downsample]_levels -> middle (Res, Attn,
    Res) -> [(num_res_blocks + 1) x (concat skip, ResBlock [+ Attn]) -> Upsample]_levels -> GN-SiLU-conv3x3``
    with no down/upsampling at the last/first level. Level ``i`` has ``channels * channel_mult[i]`` channels
    and works at resolution ``image_size / 2**i``; attention is used at the levels whose resolution is in
    ``attn_resolutions`` (placement is fixed at construction from ``image_size``; other input sizes that
    are divisible by ``2**(len(channel_mult) - 1)`` are accepted).

    The time embedding (width ``4 * channels``) is ``TimeEmbedding`` of ``time_scale * t`` and is added,
    through a per-block projection, in every residual block. With ``num_classes`` a class embedding with
    ``num_classes + 1`` rows (the last, ``self.null_class``, is the learned "no label" class) is added to it.
    With ``context_dim`` every attention block also cross-attends to ``context``. ``fourier_features``
    (exponents ``n``) appends :func:`fourier_input` features of ``x`` before the first convolution.

    ``checkpointing`` (activation checkpointing, ``model.checkpointing``): while training with gradients, every
    residual / attention stage keeps only its inputs and recomputes its activations in the backward pass
    (``torch.utils.checkpoint``, non-reentrant), trading about one more forward pass for the memory of the
    activations; the result and the gradients are those of the plain network (up to rounding). The attribute
    may be switched at any time (it holds no weights).
    """

    def __init__(
        self,
        in_channels: int = 1,
        out_channels: int | None = None,
        image_size: int = 32,
        channels: int = 64,
        channel_mult: Sequence[int] = (1, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.0,
        num_classes: int | None = None,
        time_scale: float = 1.0,
        groups: int = 32,
        num_heads: int = 1,
        context_dim: int | None = None,
        fourier_features: Sequence[int] = (),
        augment_dim: int = 0,
        checkpointing: bool = False,
    ):
        super().__init__()
        self.checkpointing = bool(checkpointing)
        channel_mult = tuple(int(m) for m in channel_mult)
        self.fourier_features = tuple(int(n) for n in fourier_features)
        if not channel_mult:
            raise ValueError("channel_mult must be non-empty")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 or None, got {num_classes}")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.image_size = image_size
        self.channels = channels
        self.channel_mult = channel_mult
        self.num_res_blocks = num_res_blocks
        self.attn_resolutions = tuple(int(r) for r in attn_resolutions)
        self.num_classes = num_classes
        self.null_class = num_classes
        self.time_scale = float(time_scale)
        self.context_dim = context_dim
        self.downsample_factor = 2 ** (len(channel_mult) - 1)
        if image_size % self.downsample_factor:
            raise ValueError(
                f"image_size={image_size} must be divisible by "
                f"2**(len(channel_mult)-1)={self.downsample_factor}"
            )

        emb_dim = 4 * channels
        self.time_embed = TimeEmbedding(channels, emb_dim, time_scale)
        self.class_embed = None if num_classes is None else nn.Embedding(num_classes + 1, emb_dim)

        def attn(ch: int, res: int) -> AttentionBlock | None:
            if res not in self.attn_resolutions:
                return None
            return AttentionBlock(ch, num_heads, groups, context_dim)

        self.conv_in = nn.Conv2d(in_channels * (1 + 2 * len(self.fourier_features)), channels, 3, padding=1)
        skip_chs = [channels]
        ch, res = channels, image_size
        self.down = nn.ModuleList()
        for level, mult in enumerate(channel_mult):
            out_ch = channels * mult
            for _ in range(num_res_blocks):
                self.down.append(_Stage(ResBlock(ch, out_ch, emb_dim, dropout, groups), attn(out_ch, res)))
                ch = out_ch
                skip_chs.append(ch)
            if level != len(channel_mult) - 1:
                self.down.append(Downsample(ch))
                res //= 2
                skip_chs.append(ch)

        self.mid = _Stage(
            ResBlock(ch, ch, emb_dim, dropout, groups), AttentionBlock(ch, num_heads, groups, context_dim)
        )
        self.mid_res2 = ResBlock(ch, ch, emb_dim, dropout, groups)

        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            out_ch = channels * mult
            for _ in range(num_res_blocks + 1):
                res_block = ResBlock(ch + skip_chs.pop(), out_ch, emb_dim, dropout, groups)
                self.up.append(_Stage(res_block, attn(out_ch, res)))
                ch = out_ch
            if level != 0:
                self.up.append(Upsample(ch))
                res *= 2
        assert not skip_chs

        self.norm_out = _norm(ch, groups)
        self.conv_out = _zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))
        # augmentation labels (data.augment): linear without bias, so the zero label (no augmentation) adds nothing;
        # made last, so that the other layers start from the same weights as without it (same seed)
        self.augment_embed = nn.Linear(augment_dim, emb_dim, bias=False) if augment_dim else None

    def _embed(self, x: Tensor, t: Tensor | float, cond: Tensor | None) -> Tensor:
        B = x.shape[0]
        t = torch.as_tensor(t, device=x.device)
        if t.numel() == 1:
            t = t.reshape(1).expand(B)
        elif t.numel() == B:
            t = t.reshape(B)
        else:
            raise ValueError(f"t must be a scalar or have shape ({B},), got shape {tuple(t.shape)}")
        emb = self.time_embed(t.to(torch.float32))
        if self.class_embed is None:
            if cond is not None:
                raise ValueError("cond was given but the UNet was built without num_classes")
            return emb
        if cond is None:
            labels = torch.full((B,), self.null_class, dtype=torch.long, device=x.device)
        else:
            cond = torch.as_tensor(cond, device=x.device)
            if cond.is_floating_point() or cond.is_complex():
                raise ValueError(f"cond must hold integer class labels, got dtype {cond.dtype}")
            if cond.numel() == 1:
                cond = cond.reshape(1).expand(B)
            elif cond.numel() == B:
                cond = cond.reshape(B)
            else:
                raise ValueError(f"cond must be a scalar or have shape ({B},), got shape {tuple(cond.shape)}")
            cond = cond.long()
            if bool(((cond < -1) | (cond > self.null_class)).any()):
                raise ValueError(
                    f"class labels must lie in [0, {self.num_classes - 1}] (or be -1 / {self.null_class} "
                    f"for the null class), got values in [{int(cond.min())}, {int(cond.max())}]"
                )
            labels = torch.where(cond == -1, torch.full_like(cond, self.null_class), cond)
        return emb + self.class_embed(labels).to(emb.dtype)

    def _check_context(self, B: int, context: Tensor | None, context_mask: Tensor | None) -> None:
        if context is None:
            if context_mask is not None:
                raise ValueError("context_mask was given without context")
            return
        if self.context_dim is None:
            raise ValueError("context was given but the UNet was built without context_dim")
        if context.ndim != 3 or context.shape[0] != B or context.shape[2] != self.context_dim:
            raise ValueError(
                f"context must have shape ({B}, L, {self.context_dim}), got {tuple(context.shape)}"
            )
        if context_mask is not None and (
            context_mask.dtype != torch.bool or tuple(context_mask.shape) != (B, context.shape[1])
        ):
            raise ValueError(
                f"context_mask must be a bool tensor of shape ({B}, {context.shape[1]}), "
                f"got {context_mask.dtype} {tuple(context_mask.shape)}"
            )

    def forward(
        self,
        x: Tensor,
        t: Tensor | float,
        cond: Tensor | None = None,
        *,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        augment: Tensor | None = None,
    ) -> Tensor:
        """Predict a tensor of the shape of ``x`` (B, C, H, W) at process time ``t`` (scalar or ``(B,)``).

        ``cond``: optional ``(B,)`` integer class labels (``-1`` or ``self.null_class`` = no label; ``None``
        = no label for every sample). ``context``: optional ``(B, L, context_dim)`` sequence for
        cross-attention, with optional ``context_mask`` ``(B, L)`` bool (True = keep); without a context the
        cross-attention layers are skipped (the same as a fully masked context). ``augment``: optional
        ``(B, augment_dim)`` labels of the augmentation each image underwent (``data.augment``); ``None`` is the
        zero label, un-augmented data, as at sampling time.
        """
        if x.ndim != 4:
            raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
        B, c_in, H, W = x.shape
        if c_in != self.in_channels:
            raise ValueError(
                f"expected x with {self.in_channels} channels, got {c_in} (shape {tuple(x.shape)})"
            )
        f = self.downsample_factor
        if H % f or W % f:
            raise ValueError(
                f"spatial size {H}x{W} must be divisible by 2**(len(channel_mult)-1)={f} for this UNet"
            )
        self._check_context(B, context, context_mask)
        emb = self._embed(x, t, cond)
        if augment is not None:
            if self.augment_embed is None:
                raise ValueError("augment labels were given but the UNet was built without augment_dim")
            if tuple(augment.shape) != (B, self.augment_embed.in_features):
                raise ValueError(f"augment labels must have shape ({B}, {self.augment_embed.in_features}), "
                                 f"got {tuple(augment.shape)}")
            emb = emb + self.augment_embed(augment.to(emb.dtype))

        run = self._checkpointed if self.checkpointing and self.training and torch.is_grad_enabled() else _call
        h = self.conv_in(fourier_input(x, self.fourier_features))
        hs = [h]
        for block in self.down:
            h = run(block, h, emb, context, context_mask) if isinstance(block, _Stage) else block(h)
            hs.append(h)
        h = run(self.mid, h, emb, context, context_mask)
        h = run(self.mid_res2, h, emb)
        for block in self.up:
            if isinstance(block, _Stage):
                h = run(block, torch.cat([h, hs.pop()], dim=1), emb, context, context_mask)
            else:
                h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))

    @staticmethod
    def _checkpointed(block: nn.Module, *args) -> Tensor:
        """``block(*args)`` under activation checkpointing (its activations recomputed in the backward pass)."""
        return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)


def _call(block: nn.Module, *args) -> Tensor:
    return block(*args)
