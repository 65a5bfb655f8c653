"""torchdiffusion: diffusion and score-based generative models along four axes.

process (``td.DDPM``, ``td.VP``, ``td.SubVP``, ``td.VE``, ``td.EDM``, ``td.LearnedVP``) x parameterization
(``td.Denoiser``) x loss (``td.losses``) x discretization (``td.sample`` with ``td.samplers`` and ``td.grids``);
trained runs through ``td.Pipeline``.

The names load on first use (PEP 562 ``__getattr__``), so that ``torchdiffusion --version`` and other
start-ups that need no tensors do not pay for importing torch; ``import torchdiffusion as td; td.DDPM`` is
unchanged.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("data", "evaluation", "likelihood", "losses", "nets", "oracle", "parameterization", "runs",
               "samplers", "grids")
_NAMES = {  # public name -> the module that defines it
    "GaussianMixture": "oracle", "PREDICTIONS": "parameterization.denoiser", "Denoiser": "parameterization.denoiser",
    "CFG": "parameterization.guidance", "ClassifierGuidance": "parameterization.guidance",
    "MultiView": "parameterization.guidance", "DDPM": "processes", "EDM": "processes", "VE": "processes",
    "VP": "processes", "LearnedVP": "processes", "Process": "processes", "SubVP": "processes",
    "process_from_config": "processes", "Pipeline": "runs.pipeline", "sample": "samplers",
}

__all__ = sorted([*_NAMES, *(m for m in _SUBMODULES)])


def __getattr__(name: str):
    if name == "grids":
        value = importlib.import_module("torchdiffusion.samplers.grids")
    elif name in _SUBMODULES:
        value = importlib.import_module(f"torchdiffusion.{name}")
    elif name in _NAMES:
        value = getattr(importlib.import_module(f"torchdiffusion.{_NAMES[name]}"), name)
    else:
        raise AttributeError(f"module 'torchdiffusion' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
