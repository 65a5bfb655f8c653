"""L6 command line: ``commands`` (the registry), one module per command family (``main``: train, sample,
demo; ``eval``; ``likelihood``; ``makedata``: make-data; ``scorefield``; ``studio``; ``export``: export-diffusers;
``fit``: fitted grids kept in the run folder), and the entry point :func:`main`."""

from torchdiffusion.cli.main import main  # noqa: F401
