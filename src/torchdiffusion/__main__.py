"""``python -m torchdiffusion`` (also what ``torchrun -m torchdiffusion`` runs)."""

import sys

from torchdiffusion.cli.main import main

sys.exit(main())
