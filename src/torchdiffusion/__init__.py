"""torchdiffusion: diffusion and score-based generative models along four axes.

process (``td.DDPM``, ``td.VP``, ``td.SubVP``, ``td.VE``, ``td.EDM``, ``td.LearnedVP``) x parameterization
(``td.Denoiser``) x loss (``td.losses``) x discretization (``td.sample`` with ``td.samplers`` and ``td.grids``);
trained runs through ``td.Pipeline``.
"""

from torchdiffusion import data, evaluation, likelihood, losses, nets, oracle, parameterization, runs, samplers
from torchdiffusion.oracle import GaussianMixture
from torchdiffusion.parameterization.denoiser import PREDICTIONS, Denoiser
from torchdiffusion.parameterization.guidance import CFG, ClassifierGuidance, MultiView
from torchdiffusion.processes import DDPM, EDM, VE, VP, LearnedVP, Process, SubVP, process_from_config
from torchdiffusion.runs.pipeline import Pipeline
from torchdiffusion.samplers import grids, sample

__version__ = "0.1.0"

__all__ = [
    "CFG", "DDPM", "EDM", "PREDICTIONS", "VE", "VP", "ClassifierGuidance", "Denoiser", "GaussianMixture", "LearnedVP",
    "MultiView", "Pipeline", "Process", "SubVP", "data", "evaluation", "grids", "likelihood", "losses", "nets",
    "oracle", "parameterization", "process_from_config", "runs", "sample", "samplers",
]
