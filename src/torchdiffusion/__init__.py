"""torchdiffusion: diffusion and score-based generative models along four axes.

process (``td.DDPM``, ``td.VP``, ``td.SubVP``, ``td.VE``, ``td.EDM``) x parameterization (``td.Denoiser``)
x loss (``td.losses``) x discretization (``td.sample`` with ``td.samplers`` and ``td.grids``).
"""

from . import grids, oracle, samplers
from .denoiser import PREDICTIONS, Denoiser
from .oracle import GaussianMixture
from .processes import DDPM, EDM, VE, VP, Process, SubVP, process_from_config
from .samplers import sample

__version__ = "0.1.0"

__all__ = [
    "DDPM", "EDM", "PREDICTIONS", "VE", "VP", "Denoiser", "GaussianMixture", "Process", "SubVP",
    "grids", "oracle", "process_from_config", "sample", "samplers",
]
