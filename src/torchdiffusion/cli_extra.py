"""Imports the modules that add further CLI commands (each registers itself with ``cli.command``)."""

from . import cli_likelihood  # noqa: F401,E402  (torchdiffusion likelihood)

# isort: split
from . import cli_score  # noqa: F401,E402  (torchdiffusion scorefield)

# isort: split
from . import cli_eval  # noqa: F401,E402  (torchdiffusion eval)
