"""L3 data: 2-D toys with exact densities, the 8x8 digits, ``.npz``; image folders streamed from disk; splits."""

from .datasets import (  # noqa: F401
    IMAGE_EXTS,
    TOYS,
    Checkerboard,
    Dataset,
    digits,
    examples,
    load,
    load_image_folder,
    load_npz,
    toy,
    toy_density,
)
from .folder import BadImageError, ImageFolder  # noqa: F401
