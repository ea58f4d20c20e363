"""The one factory that picks a :class:`~slidescore.io.base.SlideReader` implementation for a URI.

Backends import :mod:`slidescore.io.base` only; this module imports the backends, so the two never
import each other. ``backend`` (config ``input.backend``, or a manifest sample's ``backend=``) is
``auto`` (chosen from the file's signature and name, below), ``tifffile`` (the streaming readers:
tifffile for the TIFF family, zarr for Zarr), ``openslide`` or ``dicom``. ``auto`` picks:

- ``dicomweb+http(s)://…``, a folder / ``s3://`` prefix of ``.dcm`` instances, a file with the
  ``DICM`` magic → DICOM (:mod:`slidescore.io.dicom`);
- a folder / prefix with Zarr metadata → zarr;
- ``.mrxs .ndpi .vms .vmu .scn .bif .svslide`` → OpenSlide, and TIFFs whose header names a vendor
  only OpenSlide lays out right (Philips, Leica SCN, Ventana BIF, Hamamatsu NDPI);
- anything else (tiled / striped TIFF, SVS, OME-TIFF, GeoTIFF) → tifffile, which streams from
  object storage; OpenSlide reads local files only, so a remote slide it reads is fetched whole into
  a per-node cache first (:mod:`slidescore.io.remote_cache`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slidescore.errors import (
    InputError,
    SampleNotFoundError,
    SlideScoreError,
    UnsupportedImageError,
)
from slidescore.io import storage
from slidescore.io.base import SlideReader

if TYPE_CHECKING:  # io.dicom is imported when a series is opened (its wsidicom import is slow)
    from slidescore.io.dicom import DicomOptions

BACKENDS = ("auto", "tifffile", "openslide", "dicom")
#: names read through OpenSlide under ``auto`` (formats tifffile does not lay out, or multi-file ones)
OPENSLIDE_SUFFIXES = (".mrxs", ".ndpi", ".vms", ".vmu", ".scn", ".bif", ".svslide")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_ZARR_MARKERS = (".zattrs", ".zgroup", ".zarray", "zarr.json")


def open_image(uri: str, *, max_tile_bytes: int | None = None, backend: str = "auto",
               cache_dir: str | None = None, cache_max_bytes: int | None = None,
               dicom: DicomOptions | None = None) -> SlideReader:
    """Open an image by its path or URL (``s3://…``, ``dicomweb+https://…``) with ``backend``.

    Only the header is read (a remote slide read through OpenSlide is fetched whole first, into
    ``cache_dir`` bounded by ``cache_max_bytes``; ``None``: the defaults of
    :mod:`~slidescore.io.remote_cache`). ``max_tile_bytes`` bounds one decoded tile / chunk
    (``None``: :data:`~slidescore.io.base.MAX_TILE_BYTES`; a job passes ``limits.max_tile_bytes``).
    ``dicom``: the optical path and focal plane of a DICOM series (config ``input.dicom``; ``None``:
    the defaults of :mod:`slidescore.io.dicom`); ignored for images that are not DICOM.
    Every failure is one of ours (:class:`~slidescore.errors.SlideScoreError`), naming the URI:
    whatever a library raises on a corrupt file is reported as :class:`UnsupportedImageError`.
    """
    if backend not in BACKENDS:
        raise InputError(f"{uri}: unknown reader backend {backend!r}; expected one of {list(BACKENDS)} "
                         "(input.backend, or backend= in the manifest)", uri=uri, key="input.backend")
    cache = {"cache_dir": cache_dir, "cache_max_bytes": cache_max_bytes, "dicom": dicom}  # per backend: OpenSlide, DICOM
    try:
        return _open(uri, max_tile_bytes, backend, cache)
    except SlideScoreError:
        raise
    except Exception as e:  # the reader boundary: nothing a library raises on a hostile file escapes as its own type
        raise UnsupportedImageError(f"{uri}: cannot be opened as an image ({type(e).__name__}: {e}); the file may be "
                                    "truncated or corrupt — expected a TIFF/SVS/OME-TIFF file, an OME-Zarr folder, a "
                                    "slide OpenSlide reads or a DICOM WSI series", uri=uri) from None


def _open_dicom(uri: str, max_tile_bytes: int | None, options: DicomOptions | None = None) -> SlideReader:
    try:
        from slidescore.io.dicom import open_dicom
    except ImportError as e:
        raise UnsupportedImageError(f"{uri}: DICOM WSI support is not available ({e}); install slidescore with "
                                    "wsidicom", uri=uri) from None
    return open_dicom(uri, max_tile_bytes=max_tile_bytes, options=options)


def _looks_like_dicom(uri: str) -> bool:
    try:
        from slidescore.io.dicom import looks_like_dicom
    except ImportError:
        return False
    return bool(looks_like_dicom(uri))


def _open(uri: str, max_tile_bytes: int | None, backend: str, cache: dict[str, Any]) -> SlideReader:
    if backend == "dicom" or uri.startswith(("dicomweb+http://", "dicomweb+https://")):
        return _open_dicom(uri, max_tile_bytes, cache["dicom"])  # not a file system path: routed before storage.filesystem
    if not storage.is_local(uri):
        return _open_remote(uri, max_tile_bytes, backend, cache)
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    path = Path(uri)
    if not path.exists():
        raise SampleNotFoundError(
            f"{uri}: no such file or directory; check the path (local paths are relative to the working directory)",
            uri=uri,
        )
    if backend == "openslide" or (backend == "auto" and path.is_file() and _openslide_format(path)):
        from slidescore.io.openslide_reader import OpenSlideReader

        return OpenSlideReader(uri, max_tile_bytes=max_tile_bytes)
    if path.is_dir():
        if any((path / m).exists() for m in _ZARR_MARKERS):
            from slidescore.io.zarr_image import ZarrImageReader

            return ZarrImageReader(uri, max_tile_bytes=max_tile_bytes)
        if backend == "auto" and _looks_like_dicom(uri):
            return _open_dicom(uri, max_tile_bytes, cache["dicom"])
        raise UnsupportedImageError(
            f"{uri}: is a directory but not a Zarr store (no .zattrs/.zgroup/zarr.json) nor a DICOM WSI series (no .dcm "
            "instances); pass a slide file, an OME-Zarr folder or a folder of DICOM instances", uri=uri)
    if os.path.getsize(path) == 0:
        raise UnsupportedImageError(f"{uri}: file is empty (0 bytes); re-export or re-upload the image", uri=uri)
    if backend == "auto":
        with open(path, "rb") as f:
            head = f.read(132)
        if not head.startswith(_TIFF_MAGIC) and _looks_like_dicom(uri):
            return _open_dicom(uri, max_tile_bytes, cache["dicom"])
    from slidescore.io.tiff import TiffReader

    return TiffReader(uri, max_tile_bytes=max_tile_bytes)


def _openslide_format(path: Path) -> bool:
    """Whether ``auto`` reads a local file through OpenSlide: a name OpenSlide owns, or a TIFF whose
    vendor (OpenSlide's own detection) tifffile does not lay out as one pyramid."""
    name = path.name.lower()
    if name.endswith(OPENSLIDE_SUFFIXES):
        return True
    if not name.endswith((".tif", ".tiff")):
        return False  # .svs, .ome.tif(f) are read by both: tifffile streams, so it keeps them
    with open(path, "rb") as f:
        if not f.read(4).startswith(_TIFF_MAGIC):
            return False
    from slidescore.io.openslide_reader import detect_vendor

    return detect_vendor(str(path)) in ("philips", "leica", "ventana", "hamamatsu")


def _open_remote(uri: str, max_tile_bytes: int | None, backend: str, cache: dict[str, Any]) -> SlideReader:
    name = uri.rstrip("/").lower()
    if backend == "openslide" or (backend == "auto" and name.endswith(OPENSLIDE_SUFFIXES)):
        from slidescore.io.openslide_reader import OpenSlideReader
        from slidescore.io.remote_cache import fetch_slide

        local = fetch_slide(uri, cache_dir=cache["cache_dir"], cache_max_bytes=cache["cache_max_bytes"])
        return OpenSlideReader(local.path, uri=uri, max_tile_bytes=max_tile_bytes, fetch_stats=local.stats, keep=local)
    fs, path = storage.filesystem(uri)
    meta = storage.info(uri)
    if meta.get("type") == "directory":
        listing = storage.with_retries(lambda: fs.ls(path, detail=False), uri, "listing the prefix")
        names = {str(n).rstrip("/").rsplit("/", 1)[-1] for n in listing}
        if names & set(_ZARR_MARKERS):
            from slidescore.io.zarr_image import ZarrImageReader

            return ZarrImageReader(uri, max_tile_bytes=max_tile_bytes)
        if backend == "auto" and _looks_like_dicom(uri):
            return _open_dicom(uri, max_tile_bytes, cache["dicom"])
        raise UnsupportedImageError(f"{uri}: is a prefix but not a Zarr store (no .zattrs/.zgroup/zarr.json) nor a DICOM "
                                    "WSI series (no .dcm objects); pass an image object, an OME-Zarr prefix or a prefix "
                                    "of DICOM instances", uri=uri)
    if int(meta.get("size") or 0) == 0:
        raise UnsupportedImageError(f"{uri}: object is empty (0 bytes); re-upload the image", uri=uri)
    if backend == "auto" and name.endswith(".dcm") and _looks_like_dicom(uri):
        return _open_dicom(uri, max_tile_bytes, cache["dicom"])
    from slidescore.io.tiff import TiffReader

    reader = TiffReader(uri, handle=storage.open_binary(uri), max_tile_bytes=max_tile_bytes)
    if backend == "auto" and reader.openslide_vendor:  # e.g. a Philips TIFF: its pyramid is OpenSlide's to lay out
        reader.close()
        return _open_remote(uri, max_tile_bytes, "openslide", cache)
    return reader


def input_fingerprint(uri: str) -> dict[str, Any]:
    """What identifies an image's content for run keys, whatever files it is made of.

    One file: :func:`slidescore.io.storage.fingerprint` (size plus ETag or mtime). A DICOM WSI series
    (a folder, a prefix, a DICOMweb URL): :func:`slidescore.io.dicom.fingerprint` (every instance).
    A MIRAX ``.mrxs`` or a Hamamatsu ``.vms`` / ``.vmu``: the main file's fingerprint plus a digest of
    every part it reads (:func:`slidescore.io.remote_cache.slide_parts`), so a changed data file
    starts the sample afresh.
    """
    if uri.startswith(("dicomweb+http://", "dicomweb+https://")):
        from slidescore.io.dicom import fingerprint as dicom_fingerprint

        return dicom_fingerprint(uri)
    fp = storage.fingerprint(uri)
    name = uri.rstrip("/").lower()
    if name.endswith((".mrxs", ".vms", ".vmu")):
        import hashlib

        from slidescore.io.remote_cache import slide_parts

        parts = slide_parts(uri)
        fp["parts"] = len(parts)
        fp["parts_sha256"] = hashlib.sha256("\n".join(f"{p.rel}\t{p.size}\t{p.tag}" for p in parts).encode()).hexdigest()
        return fp
    local_dir = storage.is_local(uri) and Path(uri.removeprefix("file://")).is_dir()
    is_dir = local_dir or (not storage.is_local(uri) and storage.info(uri).get("type") == "directory")
    if is_dir and not name.endswith(".zarr") and _looks_like_dicom(uri):
        from slidescore.io.dicom import fingerprint as dicom_fingerprint

        return dicom_fingerprint(uri)
    return fp
