"""L6 command line: ``commands`` (the registry), one module per command family (``main``: train, sample,
demo; ``eval``; ``likelihood``; ``makedata``: make-data; ``scorefield``; ``studio``), and the entry point
:func:`main`."""

from torchdiffusion.cli.main import main  # noqa: F401
