"""All file and storage access: image readers, the OME-Zarr mosaic writer, output files.

This package is the only place that imports tifffile, zarr, fsspec/s3fs and dask. Readers are
chosen by one factory, :func:`open_image`; each implements the small :class:`SlideReader`
protocol (levels, mpp, ``read(level, box)``).
"""

from slidescore.io.base import SlideReader, read_padded
from slidescore.io.open import open_image

__all__ = ["SlideReader", "open_image", "read_padded"]
