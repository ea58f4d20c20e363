"""The reader interface and helpers every backend shares (the factory is :mod:`slidescore.io.open`).

A :class:`SlideReader` exposes the pyramid (``levels``, level-0 ``mpp``) and reads a box of one
level as an (h, w, c) array, without loading the rest of the image. ``read_padded`` extends a read
past the image edge with a fill value, which is how the patch grid's border policy is realised.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import UnsupportedImageError


@runtime_checkable
class SlideReader(Protocol):
    """A lazily-read multi-resolution image.

    Readers may also have ``georeference`` (a dict with ``epsg``, ``affine`` and ``units`` for
    GeoTIFF field images, else ``None``); read it with ``getattr(reader, "georeference", None)``.
    """

    uri: str
    levels: tuple[LevelInfo, ...]
    mpp: float | None
    mpp_source: str
    n_channels: int
    dtype: np.dtype

    def read(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` (inside the level) as an (h, w, c) array."""
        ...

    def close(self) -> None: ...


def expect_reads(reader: SlideReader, level: int, boxes: list[Box]) -> None:
    """Announce the boxes about to be read (clipped as :func:`read_padded` reads them), if the reader
    can use it: a tiled TIFF then decodes the tiles that several boxes share (their halo) once."""
    expect = getattr(reader, "expect", None)
    if expect is None:
        return
    info = reader.levels[level]
    inner = [c for c in (b.clip(info.height, info.width) for b in boxes) if not c.empty]
    if inner:
        expect(level, inner)


def read_padded(reader: SlideReader, level: int, box: Box, fill: float) -> np.ndarray:
    """Read ``box`` of ``level``; the parts outside the image are ``fill``."""
    info = reader.levels[level]
    inner = box.clip(info.height, info.width)
    if inner == box:  # inside the image (most blocks): no padded copy
        return reader.read(level, box)
    out = np.full((box.h, box.w, reader.n_channels), fill, dtype=reader.dtype)
    if not inner.empty:
        data = reader.read(level, inner)
        out[inner.y - box.y : inner.y1 - box.y, inner.x - box.x : inner.x1 - box.x] = data
    return out


def as_yxc(arr: np.ndarray, axes: str, uri: str) -> np.ndarray:
    """Reorder an array with named axes into (y, x, c), dropping singleton non-spatial axes."""
    axes = axes.upper().replace("S", "C")
    for ax in list(axes):
        if ax not in "YXC":
            i = axes.index(ax)
            if arr.shape[i] != 1:
                raise UnsupportedImageError(
                    f"{uri}: axis {ax!r} has size {arr.shape[i]}; only 2-D (y, x[, c]) images are supported — "
                    "export one plane (z/t) per sample",
                    uri=uri,
                )
            arr = arr.take(0, axis=i)
            axes = axes.replace(ax, "")
    if "C" not in axes:
        arr = arr[..., None]
        axes += "C"
    return np.moveaxis(arr, [axes.index("Y"), axes.index("X"), axes.index("C")], [0, 1, 2])
