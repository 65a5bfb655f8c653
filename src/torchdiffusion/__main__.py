"""``python -m torchdiffusion`` (also what ``torchrun -m torchdiffusion`` runs)."""

import sys

from .cli import main

sys.exit(main())
