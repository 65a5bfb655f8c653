"""Text conditioning: a small transformer text encoder and the U-Net that cross-attends to it (issue 30).

:class:`TextEncoder` turns token ids ``(B, L)`` (from :class:`torchdiffusion.data.tokenizer.CaptionTokenizer`:
``0`` = padding) into states ``(B, 1 + L, dim)`` and a keep-mask ``(B, 1 + L)``: token plus learned position
embeddings, a learned start vector in front (position 0, never masked), then pre-norm
``nn.TransformerEncoder`` layers whose attention ignores the padding (``src_key_padding_mask``), and a final
LayerNorm. Padding tokens are masked everywhere downstream, so their ids and embeddings change nothing.

The empty prompt is "no text": all padding, so only the start vector is left, and the encoder's output for it is
one learned vector. Negative ids (``-1``, the null condition that ``drop_labels`` and classifier-free guidance
write, exactly as for class labels) are read as padding too, so a dropped prompt, a guidance pass's unconditional
half and the empty prompt are the same input: the unconditional model.

:class:`TextUNet` is the text-to-image network ``net(x, t, cond)`` with ``cond`` the token ids: the encoder's
states enter every attention block of a :class:`~torchdiffusion.nets.unet.UNet` through cross-attention
(``softmax(Q K^T / sqrt(d)) V``, ``K, V`` from the text states) with the padding mask. The encoder is part of the
network, so it trains jointly with the diffusion model and is saved in the same weights.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from torchdiffusion.nets.unet import UNet


class TextEncoder(nn.Module):
    """Token ids ``(B, L)`` (``L <= max_length``; ``0`` and negative ids = padding) -> ``(states (B, 1 + L, dim),
    keep (B, 1 + L) bool)`` (module doc)."""

    def __init__(self, vocab_size: int, max_length: int, dim: int = 64, layers: int = 2, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("max_length", max_length), ("dim", dim), ("layers", layers),
                        ("heads", heads)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"the text encoder's {name} must be a whole number >= 1, got {v!r}")
        if dim % heads:
            raise ValueError(f"the text encoder's heads ({heads}) must divide its width dim ({dim})")
        self.vocab_size, self.max_length, self.dim = vocab_size, max_length, dim
        self.token = nn.Embedding(vocab_size, dim)
        self.position = nn.Parameter(torch.randn(1 + max_length, dim) * 0.02)
        self.start = nn.Parameter(torch.randn(dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        ids = torch.as_tensor(ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool or ids.ndim != 2:
            raise ValueError(f"token ids must be a (B, L) integer tensor, got {ids.dtype} {tuple(ids.shape)}")
        B, n_tok = ids.shape
        if n_tok > self.max_length:
            raise ValueError(f"{n_tok} tokens exceed the text encoder's max_length {self.max_length}")
        ids = ids.long()
        if bool((ids >= self.vocab_size).any()):
            raise ValueError(f"token ids must be < the vocabulary size {self.vocab_size}, got {int(ids.max())}")
        keep_tok = ids > 0
        h = self.token(ids.clamp(min=0))
        h = torch.cat([self.start.expand(B, 1, -1), h], 1) + self.position[: 1 + n_tok]
        keep = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=ids.device), keep_tok], 1)
        h = self.layers(h, src_key_padding_mask=~keep)
        return self.norm(h), keep


class TextUNet(nn.Module):
    """``net(x, t, cond)`` with ``cond`` the token ids ``(B, L)`` (``None``: the empty prompt for every sample): a
    :class:`UNet` built with ``context_dim = text_dim`` cross-attending to :class:`TextEncoder` states with their
    padding mask (module doc). ``unet_kw``: the UNet's arguments (not ``num_classes`` / ``context_dim``)."""

    def __init__(self, vocab_size: int, max_length: int, text_dim: int = 64, text_layers: int = 2,
                 text_heads: int = 4, **unet_kw):
        super().__init__()
        self.text = TextEncoder(vocab_size, max_length, text_dim, text_layers, text_heads)
        self.unet = UNet(num_classes=None, context_dim=text_dim, **unet_kw)

    def forward(self, x: Tensor, t, cond: Tensor | None = None, **kw) -> Tensor:
        B = x.shape[0]
        if cond is None:
            cond = torch.zeros(B, 1, dtype=torch.long, device=x.device)
        cond = torch.as_tensor(cond, device=x.device)
        if cond.ndim != 2 or cond.shape[0] != B:
            raise ValueError(f"a text-conditioned net takes token ids of shape ({B}, L) as cond, got "
                             f"{tuple(cond.shape)} (class labels belong to a class-conditional run)")
        states, keep = self.text(cond)
        return self.unet(x, t, context=states, context_mask=keep, **kw)
