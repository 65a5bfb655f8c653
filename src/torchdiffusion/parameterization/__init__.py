"""L2 parameterization: ``Denoiser`` (eps / x0 / v / score and EDM preconditioning), guidance wrappers
(``CFG``, ``ClassifierGuidance``, ``MultiView``) and diffusers interop (axis 2 of docs/design.md)."""

from .denoiser import PRECONDITIONINGS, PREDICTIONS, Denoiser, prediction_from  # noqa: F401
from .guidance import CFG, VIEWS, ClassifierGuidance, MultiView, View, check_view, get_view, same_process  # noqa: F401
