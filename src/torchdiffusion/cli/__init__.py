"""L6 command line: ``commands`` (the registry), one module per command family (``main``: train, config, demo;
``sample``; ``eval``; ``likelihood``; ``makedata``: make-data; ``scorefield``; ``studio``; ``export``:
export-diffusers; ``fit``: fitted grids kept in the run folder), and the entry point :func:`main`.
The console script is the lazy :func:`torchdiffusion.__main__.main` (``--version`` without importing torch)."""

from torchdiffusion.cli.main import main  # noqa: F401
