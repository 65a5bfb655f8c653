"""Networks: MLP for vectors, U-Net for images, and the factory that builds them from a config."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from .autoencoder import Autoencoder
from .classifier import NoisyClassifier
from .conditioning import CrossAttentionUNet
from .embeddings import TimeEmbedding, sinusoidal_embedding
from .energy import energy_score_net
from .mlp import MLP
from .unet import UNet

NETS: dict[str, Callable[..., nn.Module]] = {"mlp": MLP, "unet": UNet, "energy": energy_score_net,
                                           "classifier": NoisyClassifier,
                                           "autoencoder": Autoencoder, "vae": Autoencoder,
                                           "unet_xattn": CrossAttentionUNet}

__all__ = ["MLP", "Autoencoder", "CrossAttentionUNet", "NETS", "NoisyClassifier", "TimeEmbedding", "UNet",
           "sinusoidal_embedding"]
