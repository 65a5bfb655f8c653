"""``python -m torchdiffusion`` (also what ``torchrun -m torchdiffusion`` runs) and the ``torchdiffusion`` console
script. The entry is lazy: ``--version`` answers from the package metadata without importing torch (a fraction of
a second instead of seconds); every other command loads :mod:`torchdiffusion.cli.main` by name (``importlib``:
our one late import of our own code, for start-up time only)."""

from __future__ import annotations

import importlib
import sys

from torchdiffusion._files import package_version


def main(argv: list[str] | None = None) -> int:
    """``torchdiffusion ...``: ``--version`` at once, anything else through :func:`torchdiffusion.cli.main.main`."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["--version"], ["-V"]):
        print(f"torchdiffusion {package_version()}")
        return 0
    return importlib.import_module("torchdiffusion.cli.main").main(argv)


if __name__ == "__main__":
    sys.exit(main())
