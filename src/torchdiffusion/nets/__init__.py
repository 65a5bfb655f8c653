"""Networks: MLP for vectors, U-Net for images, and the factory that builds them from a config."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from torchdiffusion.nets.autoencoder import Autoencoder
from torchdiffusion.nets.classifier import NoisyClassifier
from torchdiffusion.nets.conditioning import CrossAttentionUNet
from torchdiffusion.nets.embeddings import TimeEmbedding, sinusoidal_embedding
from torchdiffusion.nets.energy import energy_score_net
from torchdiffusion.nets.likelihood import LikelihoodNet, VariationalDequantizer
from torchdiffusion.nets.mlp import MLP
from torchdiffusion.nets.text import TextEncoder, TextUNet
from torchdiffusion.nets.unet import UNet

NETS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "unet": UNet, "energy": energy_score_net,
                                           "classifier": NoisyClassifier,
                                           "autoencoder": Autoencoder, "vae": Autoencoder,
                                           "unet_xattn": CrossAttentionUNet, "unet_text": TextUNet}

__all__ = ["MLP", "Autoencoder", "CrossAttentionUNet", "LikelihoodNet", "NETS", "NoisyClassifier", "TextEncoder",
           "TextUNet", "TimeEmbedding", "UNet", "VariationalDequantizer", "sinusoidal_embedding"]
