"""The reader interface and helpers every backend shares (the factory is :mod:`slidescore.io.open`).

A :class:`SlideReader` exposes the pyramid (``levels``, level-0 ``mpp``) and reads a box of one
level as an (h, w, c) array, without loading the rest of the image. ``read_padded`` extends a read
past the image edge with a fill value, which is how the patch grid's border policy is realised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import UnsupportedImageError

log = logging.getLogger(__name__)


class _LibraryNotes(logging.Filter):
    """A reading library's warnings about a file (tifffile: a corrupted tag list, a series it could not build)
    reach the user as slidescore's one error naming that file, or not at all when the file reads: kept at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.WARNING:
            return True
        log.debug("%s: %s", record.name, record.getMessage())
        return False


logging.getLogger("tifffile").addFilter(_LibraryNotes())

#: The largest decoded tile / chunk (bytes) a reader accepts, checked from the header when a file is
#: opened, before any pixel is decoded: readers decode whole tiles, and a header of a few hundred
#: bytes can declare one 60,000² tile (10 GB). 256 MiB is 4,096 × 4,096 RGBA float32 px, far above
#: what scanners and the OME-Zarr writers use (256²–1024² px). Readers take ``max_tile_bytes``
#: (``open_image(uri, max_tile_bytes=…)``); ``None`` means this value, read when the file is opened.
#: A job's ``limits.max_tile_bytes`` reaches the reader through that argument
#: (:mod:`slidescore.stages.limits`), and is also checked against :attr:`max_chunk_bytes` of an open
#: reader while planning.
MAX_TILE_BYTES = 256 * 2**20


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


def _mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n < 2**30 else f"{n / 2**30:,.1f} GiB"


def check_chunk_bytes(uri: str, level: int, chunk_shape: Sequence[int], dtype: Any, limit: int | None,
                      kind: str = "tile") -> int:
    """The decoded size in bytes of one tile / chunk of ``chunk_shape`` and ``dtype``; refuses one
    above ``limit`` (``None``: :data:`MAX_TILE_BYTES`) from the header alone, before it is decoded."""
    limit = MAX_TILE_BYTES if limit is None else limit
    nbytes = math.prod(int(n) for n in chunk_shape) * np.dtype(dtype).itemsize
    if nbytes > limit:
        dims = " × ".join(f"{int(n):,}" for n in chunk_shape)
        raise UnsupportedImageError(
            f"{uri}: level {level} is stored in {kind}s of {dims} ({np.dtype(dtype).name}), {_mib(nbytes)} decoded each, "
            f"above limits.max_tile_bytes = {limit:,} ({_mib(limit)}); every read decodes whole {kind}s — re-export the "
            f"image tiled (e.g. 512 × 512 px tiles), or raise limits.max_tile_bytes in the config if this image is real",
            uri=uri, level=level, chunk_shape=tuple(int(n) for n in chunk_shape), chunk_bytes=nbytes, limit=limit,
            key="limits.max_tile_bytes",
        )
    return nbytes


def check_level_shapes(uri: str, shapes: Sequence[tuple[int, int, int]]) -> None:
    """Refuse a pyramid with a level without pixels (a zero or negative size in the header) or whose
    levels disagree on the number of channels."""
    if not shapes:
        raise UnsupportedImageError(f"{uri}: the image has no levels; re-export the image", uri=uri)
    for i, (h, w, c) in enumerate(shapes):
        if h < 1 or w < 1 or c < 1:
            raise UnsupportedImageError(
                f"{uri}: level {i} has no pixels (height {h}, width {w}, {c} channels in the header); "
                "the file is corrupt or not an image — re-export it", uri=uri, level=i)
        if c != shapes[0][2]:
            raise UnsupportedImageError(
                f"{uri}: level {i} has {c} channels, level 0 has {shapes[0][2]}; the pyramid is inconsistent — re-export it",
                uri=uri, level=i)


def read_failed(uri: str, level: int, box: Box, err: BaseException, where: str = "") -> UnsupportedImageError:
    """The error of a read that failed in a library (a codec, tifffile, zarr): names the file, the
    level and the box (and ``where``, e.g. the chunk), never lets the library's type escape."""
    at = f" ({where})" if where else ""
    return UnsupportedImageError(
        f"{uri}: failed to decode level {level} box {box}{at} ({type(err).__name__}: {err}); "
        "the file may be truncated or corrupt — re-export or re-upload it",
        uri=uri, level=level,
    )
