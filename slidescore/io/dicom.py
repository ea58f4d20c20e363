"""DICOM WSI reader (wsidicom): a series from a local folder, an ``s3://`` prefix or a DICOMweb server.

A DICOM whole-slide image is a *series* of instances (files), one or more per pyramid level, each
stored in tiles ("frames") that are either all present in row-major order (``TILED_FULL``) or
listed with their positions (``TILED_SPARSE``: tiles a scanner left out read as the background,
white for RGB). A folder or prefix is listed once; every file is opened as a seekable stream
(:func:`slidescore.io.storage.open_binary`: a block cache over ranged GETs on S3, nothing staged)
and parsed by wsidicom, which reads frames on demand. A ``dicomweb+http(s)://…/studies/…/series/…``
URL reads the same through WADO-RS (:mod:`slidescore.io.dicom_web`). µm/px is the level-0
``PixelSpacing`` (column spacing, mm × 1000). A series with several optical paths or focal planes
is read at one of each (:class:`DicomOptions`; by default the first optical path, by sorted
identifier, and the focal plane nearest z = 0 µm, the nominal focus); levels without that path and
plane are left out. Whatever wsidicom and the installed codecs decode is read: JPEG baseline and
lossless, JPEG 2000, JPEG-LS, RLE and uncompressed. Every file that looks like a WSI instance must
open: a truncated or corrupt one fails the sample, naming the file, instead of silently giving a
pyramid without that level.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import (
    InputError,
    SampleNotFoundError,
    SlideScoreError,
    TransientStorageError,
    UnsupportedImageError,
)
from slidescore.io import storage
from slidescore.io.base import check_chunk_bytes, check_level_shapes, read_failed
from slidescore.io.dicom_web import (
    WSI_SOP_CLASS,
    import_wsidicom,
    is_dicomweb,
    open_web_series,
    web_error,
)

DICOM_SUFFIX = ".dcm"
#: a folder holding more files than this is not read as one series (a hostile or mistaken prefix)
MAX_SERIES_FILES = 10_000
#: threads wsidicom decodes the tiles of one read with
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
_ZARR_MARKERS = (".zattrs", ".zgroup", ".zarray", "zarr.json")
#: packages whose exceptions mean "this frame does not decode" (never retried as storage trouble)
_DECODERS = ("PIL", "imagecodecs", "wsidicom", "pydicom", "pylibjpeg", "turbojpeg")


class _Undecodable(Exception):
    """A decoder's error (``args[0]``), carried past :func:`~slidescore.io.storage.with_retries`."""


@dataclass(frozen=True)
class DicomOptions:
    """Which plane of a multi-plane series is read: ``optical_path`` (its identifier, e.g. ``"0"``)
    and ``focal_plane`` (µm); ``None`` picks the default (see the module docstring)."""

    optical_path: str | None = None
    focal_plane: float | None = None


def _has_magic(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _head(handle: Any) -> bytes:
    """The first 132 bytes of a file: the preamble and, in a DICOM file, the ``DICM`` marker."""
    handle.seek(0)
    return bytes(handle.read(132))


def looks_like_dicom(uri: str) -> bool:
    """Whether ``uri`` names DICOM: a ``dicomweb+`` URL, a local file with the ``DICM`` marker, a local
    folder of ``.dcm`` files (or files with the marker), or an ``s3://``-style prefix or object whose
    names end in ``.dcm`` (one LIST). Never raises: anything unreadable is "not DICOM" here and is
    reported by whoever opens it."""
    try:
        if is_dicomweb(uri):
            return True
        if storage.is_local(uri):
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            if os.path.isfile(path):  # a .dcm without the marker too: its opener says what is wrong with it
                return path.lower().endswith(DICOM_SUFFIX) or _has_magic(path)
            if not os.path.isdir(path):
                return False
            names = sorted(os.listdir(path))
            if any(n in _ZARR_MARKERS for n in names):
                return False
            if any(n.lower().endswith(DICOM_SUFFIX) for n in names):
                return True
            files = [os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))]
            return any(_has_magic(f) for f in files[:8])
        if uri.lower().rstrip("/").endswith(DICOM_SUFFIX):
            return True
        fs, path = storage.filesystem(uri)
        names = [str(n).rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path.rstrip("/"), detail=False)]
        return not any(n in _ZARR_MARKERS for n in names) and any(n.lower().endswith(DICOM_SUFFIX) for n in names)
    except Exception:  # a probe: the opener reports what is wrong with the URI
        return False


def open_dicom(uri: str, *, max_tile_bytes: int | None, options: DicomOptions | None = None) -> DicomReader:
    """Open the DICOM WSI series at ``uri`` (folder, single file, ``s3://`` prefix or ``dicomweb+`` URL).

    Only headers are read. Every failure is a :class:`~slidescore.errors.SlideScoreError` naming the URI.
    """
    return DicomReader(uri, max_tile_bytes=max_tile_bytes, options=options)


def fingerprint(uri: str) -> dict[str, Any]:
    """What identifies a series' content for run keys (as :func:`slidescore.io.storage.fingerprint`
    does for one file): for a folder or prefix, every file's name, size and ETag or mtime (one LIST),
    hashed; over DICOMweb, the series' SOP instance UIDs (instances are immutable under their UID)."""
    if is_dicomweb(uri):
        from slidescore.io.dicom_web import series_instance_uids

        uids = series_instance_uids(uri)
        return {"uri": uri, "instances": len(uids), "instances_sha256": hashlib.sha256("\n".join(uids).encode()).hexdigest()}
    fs, path = storage.filesystem(uri)
    meta = storage.info(uri)
    if meta.get("type") != "directory":
        return storage.fingerprint(uri)
    entries = storage.with_retries(lambda: fs.ls(path.rstrip("/"), detail=True), uri, "listing the series")
    rows = []
    for e in sorted(entries, key=lambda e: str(e["name"])):
        if e.get("type") == "directory":
            continue
        stamp = e.get("ETag") or e.get("etag") or e.get("mtime") or ""
        stamp = stamp.timestamp() if hasattr(stamp, "timestamp") else stamp
        rows.append(f"{str(e['name']).rsplit('/', 1)[-1]}\t{int(e.get('size') or 0)}\t{str(stamp).strip(chr(34))}")
    return {"uri": uri if not storage.is_local(uri) else os.path.abspath(path), "files": len(rows),
            "size_bytes": sum(int(e.get("size") or 0) for e in entries if e.get("type") != "directory"),
            "files_sha256": hashlib.sha256("\n".join(rows).encode()).hexdigest()}


def _reopen(uri: str, max_tile_bytes: int | None, options: DicomOptions | None) -> DicomReader:
    return DicomReader(uri, max_tile_bytes=max_tile_bytes, options=options)


class DicomReader:
    """One DICOM WSI series (one optical path, one focal plane) as a :class:`~slidescore.io.base.SlideReader`.

    Pickles as its URI and options (open handles do not pickle): the copy opens the series anew.
    """

    def __init__(self, uri: str, *, max_tile_bytes: int | None = None, options: DicomOptions | None = None) -> None:
        self.uri = uri
        self.options = options or DicomOptions()
        self._max_tile_bytes = max_tile_bytes
        self._wsi: Any = None
        self._handles: list[Any] = []
        self._files: dict[str, list[str]] = {}  # instance identifier → its files (names in read errors)
        self._remote = not storage.is_local(uri)
        try:
            self._open()
        except BaseException as e:
            self.close()
            if isinstance(e, SlideScoreError) or not isinstance(e, Exception):
                raise
            mapped = web_error(e, uri, "opening the series") if self._web else None
            if mapped is not None:
                raise mapped from None
            if type(e).__module__.split(".")[0] in ("botocore", "aiobotocore", "s3fs", "aiohttp") or isinstance(e, OSError):
                raise storage.classify(e, uri, "opening the series") from None
            # wsidicom and pydicom raise many types on a malformed series
            raise UnsupportedImageError(
                f"{uri}: not a readable DICOM WSI series ({type(e).__name__}: {e}); expected the instances of one "
                "VL Whole Slide Microscopy series — re-export or re-upload it", uri=uri) from None

    @property
    def _web(self) -> bool:
        return is_dicomweb(self.uri)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_reopen, (self.uri, self._max_tile_bytes, self.options))

    # -- opening -----------------------------------------------------------------------------------
    def _open(self) -> None:
        wsidicom = import_wsidicom()
        if self._web:
            self._wsi = open_web_series(self.uri)
        else:
            source = wsidicom.file.wsidicom_file_source.WsiDicomFileSource(self._open_instances())
            self._wsi = wsidicom.WsiDicom(source, source_owned=True)
        self._select_levels()

    def _list_files(self) -> list[str]:
        """The files of the series: a folder's / prefix's files (one LIST), or the one file named."""
        uri = self.uri
        if storage.is_local(uri):
            path = uri[len("file://"):] if uri.startswith("file://") else uri
            if not os.path.exists(path):
                raise SampleNotFoundError(f"{uri}: no such file or folder; check the path", uri=uri)
            if os.path.isfile(path):
                return [path]
            return sorted(str(p) for p in Path(path).iterdir() if p.is_file())
        fs, path = storage.filesystem(uri)
        meta = storage.info(uri)
        proto = storage.protocol_of(uri)
        if meta.get("type") != "directory":
            return [uri]
        entries = storage.with_retries(lambda: fs.ls(path.rstrip("/"), detail=True), uri, "listing the series")
        names = sorted(str(e["name"]) for e in entries if e.get("type") != "directory")
        # objects without a suffix may be DICOM (archives often drop it); other suffixes are not opened
        names = [n for n in names if n.lower().endswith(DICOM_SUFFIX) or "." not in n.rsplit("/", 1)[-1]]
        return [f"{proto}://{n}" for n in names]

    def _open_instances(self) -> list[Any]:
        """Every WSI instance of the folder / prefix, opened and checked; other files are skipped."""
        wsidicom = import_wsidicom()
        WsiDicomIO, WsiDicomReader = wsidicom.file.io.wsidicom_io.WsiDicomIO, wsidicom.file.io.wsidicom_reader.WsiDicomReader  # noqa: N806
        files = self._list_files()
        if len(files) > MAX_SERIES_FILES:
            raise UnsupportedImageError(f"{self.uri}: {len(files):,} files, more than one series holds "
                                        f"(at most {MAX_SERIES_FILES:,}); pass the folder of one series", uri=self.uri)
        ios: list[Any] = []
        other: list[str] = []
        for name in files:
            handle = storage.open_binary(name)
            self._handles.append(handle)
            head = storage.with_retries(functools.partial(_head, handle), name, "reading its header")
            if len(head) < 132 or head[128:132] != b"DICM":
                if name.lower().endswith(DICOM_SUFFIX):
                    raise UnsupportedImageError(
                        f"{self.uri}: {name} is named .dcm but is not a DICOM file (no DICM marker at byte 128; "
                        f"{len(head)} bytes at its start); it is truncated or corrupt — re-export or re-upload it",
                        uri=self.uri, file=name)
                continue
            try:
                io = WsiDicomIO(handle, owned=True)
                sop = io.media_storage_sop_class_uid
            except (InputError, TransientStorageError):
                raise
            except Exception as e:  # pydicom raises many types on a damaged file meta header
                raise UnsupportedImageError(
                    f"{self.uri}: {name}: unreadable DICOM file meta header ({type(e).__name__}: {e}); the file is "
                    "truncated or corrupt — re-export or re-upload it", uri=self.uri, file=name) from None
            if str(sop) != WSI_SOP_CLASS:
                other.append(f"{name} ({getattr(sop, 'name', sop)})")
                continue
            try:  # what wsidicom's file source does, but a failure here names the file instead of being logged away
                ids = WsiDicomReader(io).uids
            except (InputError, TransientStorageError):
                raise
            except Exception as e:
                raise UnsupportedImageError(
                    f"{self.uri}: {name} is a WSI instance wsidicom cannot read ({type(e).__name__}: {e}); a truncated "
                    "header, or a transfer syntax without an installed codec — re-export it (JPEG, JPEG 2000, JPEG-LS "
                    "or uncompressed)", uri=self.uri, file=name) from None
            ios.append(io)
            self._files.setdefault(str(ids.identifier), []).append(name.rsplit("/", 1)[-1])
        if not ios:
            found = f"DICOM files of other kinds: {', '.join(other[:3])}{' …' if len(other) > 3 else ''}" if other \
                else f"{len(files)} files, none of them DICOM"
            raise UnsupportedImageError(
                f"{self.uri}: no DICOM whole-slide image instances (VL Whole Slide Microscopy Image Storage) in {found}; "
                "pass the folder or prefix of one WSI series", uri=self.uri)
        return ios

    def _select_levels(self) -> None:
        """The pyramid levels holding the chosen optical path and focal plane, level 0 first."""
        uri, wsi = self.uri, self._wsi
        levels = sorted(wsi.levels, key=lambda lv: -lv.size.width)
        base = levels[0]
        paths = sorted(str(p) for p in base.optical_paths)
        planes = sorted(float(z) for z in base.focal_planes)
        path = self.options.optical_path
        if path is None:
            path = paths[0]
        elif path not in paths:
            raise UnsupportedImageError(f"{uri}: no optical path {path!r}; the series has {paths} — choose one of them "
                                        "(input.dicom.optical_path in the config)", uri=uri, key="input.dicom.optical_path")
        z = self.options.focal_plane
        if z is None:
            z = min(planes, key=lambda p: (abs(p), p))
        elif not any(abs(z - p) < 1e-6 for p in planes):
            raise UnsupportedImageError(f"{uri}: no focal plane at {z} µm; the series has {planes} µm — choose one of "
                                        "them (input.dicom.focal_plane in the config)", uri=uri, key="input.dicom.focal_plane")
        else:
            z = next(p for p in planes if abs(z - p) < 1e-6)
        self._path, self._z = path, z
        self._levels = [lv for lv in levels if path in lv.optical_paths and z in lv.focal_planes]
        data = [lv.get_instance(z, path).image_data for lv in self._levels]
        spp, bits = data[0].samples_per_pixel, data[0].bits
        if spp not in (1, 3) or bits not in (8, 16) or (spp == 3 and bits != 8):
            raise UnsupportedImageError(f"{uri}: {spp} samples of {bits} bits per pixel; expected 8-bit RGB or 8/16-bit "
                                        "grayscale", uri=uri)
        self.n_channels = spp
        self.dtype = np.dtype(np.uint8 if bits == 8 else np.uint16)
        check_level_shapes(uri, [(lv.size.height, lv.size.width, d.samples_per_pixel) for lv, d in zip(self._levels, data, strict=True)])
        self.max_chunk_bytes = max(check_chunk_bytes(uri, i, (lv.tile_size.height, lv.tile_size.width, spp), self.dtype,
                                                     self._max_tile_bytes) for i, lv in enumerate(self._levels))
        w0 = base.size.width
        self.levels = tuple(LevelInfo(i, lv.size.height, lv.size.width, downsample=w0 / lv.size.width)
                            for i, lv in enumerate(self._levels))
        try:
            spacing = base.pixel_spacing  # SizeMm(width = column spacing, height = row spacing)
        except Exception:  # wsidicom raises its own error for a level without PixelSpacing
            spacing = None
        if spacing is not None and float(spacing.width) > 0:
            self.mpp: float | None = float(spacing.width) * 1000.0
            self.mpp_source = "dicom:PixelSpacing"
        else:
            self.mpp, self.mpp_source = None, "none (no PixelSpacing in the DICOM pixel measures)"

    # -- reading -----------------------------------------------------------------------------------
    def read(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` (inside level ``level``) as an (h, w, c) array."""
        geometry = import_wsidicom().geometry
        region = geometry.Region(geometry.Point(box.x, box.y), geometry.Size(box.w, box.h))
        lv = self._levels[level]

        def get() -> Any:
            try:
                return lv.get_region(region, self._z, self._path, threads=DECODE_THREADS)
            except Exception as e:  # an HTTP failure becomes ours (a busy server is retried), a decoder's stays
                mapped = web_error(e, self.uri, f"reading level {level} box {box}") if self._web else None
                if mapped is not None:
                    raise mapped from None
                if type(e).__module__.split(".")[0] in _DECODERS:  # PIL's errors are OSErrors: not storage trouble
                    raise _Undecodable(e) from None
                raise

        try:
            image = storage.with_retries(get, self.uri, f"reading level {level} box {box}") if self._remote else get()
            arr = np.asarray(image)
        except (InputError, TransientStorageError):
            raise
        except Exception as e:  # wsidicom and the codecs raise many types on a damaged series
            cause = e.args[0] if isinstance(e, _Undecodable) else e
            raise read_failed(self.uri, level, box, cause, self._where(level)) from None
        if arr.ndim == 2:
            arr = arr[..., None]
        if arr.shape != (box.h, box.w, self.n_channels):
            raise read_failed(self.uri, level, box, ValueError(f"decoded shape {arr.shape}"))
        return arr.astype(self.dtype, copy=False)

    def _where(self, level: int) -> str:
        """The files (or, over DICOMweb, the instance UIDs) of a level, for read errors."""
        ids = [str(i) for i in self._levels[level].instances]
        names = [n for i in ids for n in self._files.get(i, [])] if self._files else [f"instance {i}" for i in ids]
        return ", ".join(names[:4]) + (" …" if len(names) > 4 else "")

    def close(self) -> None:
        wsi, self._wsi = self._wsi, None
        if wsi is not None:
            with contextlib.suppress(Exception):  # closing streams of a failed series: nothing left to report
                wsi.close()
        for h in self._handles:
            with contextlib.suppress(Exception):
                h.close()
        self._handles = []
