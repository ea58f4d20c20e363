"""The reader interface and the factory that picks an implementation for a URI.

A :class:`SlideReader` exposes the pyramid (``levels``, level-0 ``mpp``) and reads a box of one
level as an (h, w, c) array, without loading the rest of the image. ``read_padded`` extends a read
past the image edge with a fill value, which is how the patch grid's border policy is realised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from slidescore.errors import SampleNotFoundError, UnsupportedImageError
from slidescore.types import Box, LevelInfo


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


def open_image(uri: str) -> SlideReader:
    """Open a TIFF-family file or a Zarr / OME-Zarr image by its path or fsspec URL (``s3://…``)."""
    from slidescore.io import storage

    if not storage.is_local(uri):
        return _open_remote(uri)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = Path(uri)
    if not path.exists():
        raise SampleNotFoundError(
            f"{uri}: no such file or directory; check the path (local paths are relative to the working directory)",
            uri=uri,
        )
    if path.is_dir():
        if (path / ".zattrs").exists() or (path / "zarr.json").exists() or (path / ".zgroup").exists() or (path / ".zarray").exists():
            from slidescore.io.zarr_image import ZarrImageReader

            return ZarrImageReader(uri)
        raise UnsupportedImageError(
            f"{uri}: is a directory but not a Zarr store (no .zattrs/.zgroup/zarr.json); pass a TIFF file or an OME-Zarr folder",
            uri=uri,
        )
    if os.path.getsize(path) == 0:
        raise UnsupportedImageError(f"{uri}: file is empty (0 bytes); re-export or re-upload the image", uri=uri)
    from slidescore.io.tiff import TiffReader

    return TiffReader(uri)


def _open_remote(uri: str) -> SlideReader:
    from slidescore.io import storage

    fs, path = storage.filesystem(uri)
    meta = storage.info(uri)
    if meta.get("type") == "directory":
        markers = (".zattrs", ".zgroup", ".zarray", "zarr.json")
        listing = storage.with_retries(lambda: fs.ls(path, detail=False), uri, "listing the prefix")
        names = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in listing}
        if names & set(markers):
            from slidescore.io.zarr_image import ZarrImageReader

            return ZarrImageReader(uri)
        raise UnsupportedImageError(f"{uri}: is a prefix but not a Zarr store (no .zattrs/.zgroup/zarr.json); "
                                    "pass an image object or an OME-Zarr prefix", uri=uri)
    if int(meta.get("size") or 0) == 0:
        raise UnsupportedImageError(f"{uri}: object is empty (0 bytes); re-upload the image", uri=uri)
    from slidescore.io.tiff import TiffReader

    return TiffReader(uri, handle=storage.open_binary(uri))


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
