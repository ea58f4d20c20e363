"""The one factory that picks a :class:`~slidescore.io.base.SlideReader` implementation for a URI.

Backends import :mod:`slidescore.io.base` only; this module imports the backends, so the two never
import each other.
"""

from __future__ import annotations

import os
from pathlib import Path

from slidescore.errors import SampleNotFoundError, SlideScoreError, UnsupportedImageError
from slidescore.io import storage
from slidescore.io.base import SlideReader


def open_image(uri: str, *, max_tile_bytes: int | None = None) -> SlideReader:
    """Open a TIFF-family file or a Zarr / OME-Zarr image by its path or fsspec URL (``s3://…``).

    Only the header is read. ``max_tile_bytes`` bounds one decoded tile / chunk (``None``:
    :data:`~slidescore.io.base.MAX_TILE_BYTES`; a job passes ``limits.max_tile_bytes``). Every
    failure is one of ours (:class:`~slidescore.errors.SlideScoreError`), naming the URI: whatever
    a library raises on a corrupt file is reported as :class:`UnsupportedImageError`.
    """
    try:
        return _open(uri, max_tile_bytes)
    except SlideScoreError:
        raise
    except Exception as e:  # the reader boundary: nothing a library raises on a hostile file escapes as its own type
        raise UnsupportedImageError(f"{uri}: cannot be opened as an image ({type(e).__name__}: {e}); the file may be "
                                    "truncated or corrupt — expected a TIFF/SVS/OME-TIFF file or an OME-Zarr folder",
                                    uri=uri) from None


def _open(uri: str, max_tile_bytes: int | None) -> SlideReader:
    if not storage.is_local(uri):
        return _open_remote(uri, max_tile_bytes)
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

            return ZarrImageReader(uri, max_tile_bytes=max_tile_bytes)
        raise UnsupportedImageError(
            f"{uri}: is a directory but not a Zarr store (no .zattrs/.zgroup/zarr.json); pass a TIFF file or an OME-Zarr folder",
            uri=uri,
        )
    if os.path.getsize(path) == 0:
        raise UnsupportedImageError(f"{uri}: file is empty (0 bytes); re-export or re-upload the image", uri=uri)
    from slidescore.io.tiff import TiffReader

    return TiffReader(uri, max_tile_bytes=max_tile_bytes)


def _open_remote(uri: str, max_tile_bytes: int | None) -> SlideReader:
    fs, path = storage.filesystem(uri)
    meta = storage.info(uri)
    if meta.get("type") == "directory":
        markers = (".zattrs", ".zgroup", ".zarray", "zarr.json")
        listing = storage.with_retries(lambda: fs.ls(path, detail=False), uri, "listing the prefix")
        names = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in listing}
        if names & set(markers):
            from slidescore.io.zarr_image import ZarrImageReader

            return ZarrImageReader(uri, max_tile_bytes=max_tile_bytes)
        raise UnsupportedImageError(f"{uri}: is a prefix but not a Zarr store (no .zattrs/.zgroup/zarr.json); "
                                    "pass an image object or an OME-Zarr prefix", uri=uri)
    if int(meta.get("size") or 0) == 0:
        raise UnsupportedImageError(f"{uri}: object is empty (0 bytes); re-upload the image", uri=uri)
    from slidescore.io.tiff import TiffReader

    return TiffReader(uri, handle=storage.open_binary(uri), max_tile_bytes=max_tile_bytes)
