"""Networks: MLP for vectors, U-Net for images, and the factory that builds them from a config."""

from __future__ import annotations

from torch import nn

from .autoencoder import Autoencoder
from .classifier import NoisyClassifier
from .conditioning import CrossAttentionUNet
from .embeddings import TimeEmbedding, sinusoidal_embedding
from .energy import energy_score_net
from .mlp import MLP
from .unet import UNet

NETS: dict[str, type[nn.Module]] = {"mlp": MLP, "unet": UNet}
NETS["energy"] = energy_score_net  # type: ignore[assignment]  (a factory: EnergyNet -> score)
NETS["classifier"] = NoisyClassifier
NETS.update({"autoencoder": Autoencoder, "vae": Autoencoder, "unet_xattn": CrossAttentionUNet})  # issue 9

__all__ = ["MLP", "Autoencoder", "CrossAttentionUNet", "NETS", "NoisyClassifier", "TimeEmbedding", "UNet",
           "sinusoidal_embedding"]
