"""slidescore: score gigapixel images with overlapping patches, blend, mosaic, rank regions.

:func:`score_array` scores an in-memory image with any torch module (see :mod:`slidescore.api`).
"""

from typing import Any

from slidescore.version import __version__

__all__ = ["__version__", "score_array"]


def __getattr__(name: str) -> Any:  # lazy: ``import slidescore`` must not import torch
    if name == "score_array":
        from slidescore.api import score_array

        return score_array
    raise AttributeError(f"module 'slidescore' has no attribute {name!r}")
