"""L3 data: 2-D toys with exact densities, the 8x8 digits, image folders, ``.npz``; splits."""

from .datasets import (  # noqa: F401
    IMAGE_EXTS,
    TOYS,
    Checkerboard,
    Dataset,
    digits,
    load,
    load_image_folder,
    load_npz,
    toy,
    toy_density,
)
