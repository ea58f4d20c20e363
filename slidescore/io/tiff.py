"""TIFF-family reader (tifffile), lazy and tile by tile, plus the pyramidal TIFF writer.

Levels come from the first series' pyramid (SubIFDs or reduced-resolution pages); boxes are read
through tifffile's Zarr store, which decodes only the tiles a box touches. Blocks are read with a
halo (patch − stride pixels below and right) that lies in tiles the next block and the next block
row read again; such tiles are kept decoded
(:class:`TileCache`) for the later reads announced with :meth:`TiffReader.expect`, so every tile is
decoded once. Resolution (µm/px) is
taken, in order, from GeoTIFF tags (pixel size in a projected CRS's linear unit), OME-XML
``PhysicalSizeX``, an Aperio ``MPP =`` description, or the TIFF resolution tags (centimetre or inch
units). A GeoTIFF also gives :attr:`TiffReader.georeference`: the EPSG code and the affine from
level-0 pixel corners to map coordinates, so outputs can be given in map units too.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import tifffile
import zarr

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import (
    InputError,
    SlideScoreError,
    TransientStorageError,
    UnsupportedImageError,
)
from slidescore.io.base import as_yxc, check_chunk_bytes, check_level_shapes, read_failed
from slidescore.io.storage import with_retries

#: threads decoding the tiles of one read
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))
#: upper bound of the decoded tiles a reader keeps for later reads (a row-major scan needs ~2 tile rows)
TILE_CACHE_MAX_BYTES = 256 * 2**20


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    """Threads decoding tiles for every reader of the process (libjpeg-turbo, zlib, zstd release the GIL)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="tile-decode")
        return _POOL


class TileCache:
    """Decoded tiles kept for as many announced reads as still need them.

    Blocks are read with a halo that overlaps the next block and the next block row, so the tiles
    along block edges are read two to four times; decoding (JPEG) dominates reading. The scorer
    announces its read boxes up front (:meth:`TiffReader.expect`); a tile touched by several of them
    is decoded once, kept until the last of those reads, then dropped. Bounded in bytes (least
    recently used first, a safety net: an evicted tile is decoded again) and thread-safe (read-ahead).
    """

    def __init__(self, max_bytes: int = TILE_CACHE_MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self._tiles: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()
        self._needed: dict[tuple[int, int, int], int] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.decoded = 0

    def __len__(self) -> int:
        return len(self._tiles)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def need(self, keys: Iterator[tuple[int, int, int]]) -> None:
        with self._lock:
            for k in keys:
                self._needed[k] = self._needed.get(k, 0) + 1

    def use(self, key: tuple[int, int, int]) -> np.ndarray | None:
        """The cached tile (``None`` if not cached) for one announced read, which is counted off."""
        with self._lock:
            left = self._needed.get(key, 0) - 1
            if left > 0:
                self._needed[key] = left
                tile = self._tiles.get(key)
                if tile is not None:
                    self._tiles.move_to_end(key)
            else:
                self._needed.pop(key, None)
                tile = self._tiles.pop(key, None)
                if tile is not None:
                    self._bytes -= tile.nbytes
            if tile is not None:
                self.hits += 1
            return tile

    def keep(self, key: tuple[int, int, int], tile: np.ndarray) -> None:
        """Keep a freshly decoded tile if a later announced read still needs it."""
        with self._lock:
            self.decoded += 1
            if self._needed.get(key, 0) <= 0 or key in self._tiles or tile.nbytes > self.max_bytes:
                return
            self._tiles[key] = tile = tile.copy()  # not a view: the rest of the read it came from is freed
            self._bytes += tile.nbytes
            while self._bytes > self.max_bytes:
                _, gone = self._tiles.popitem(last=False)
                self._bytes -= gone.nbytes


_DEFAULT_DPI = {72.0, 96.0, 150.0, 300.0, 600.0}
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class TiffReader:
    """A pyramidal (or single-level) TIFF opened lazily."""

    def __init__(self, uri: str, handle: Any = None, *, max_tile_bytes: int | None = None) -> None:
        """Open ``uri`` (or ``handle``, a seekable binary file of it) from its header alone.

        Refused with :class:`UnsupportedImageError`: not a TIFF, a level without pixels, a pixel type
        tifffile cannot decode, or a tile / strip that decodes to more than ``max_tile_bytes``
        (``None``: :data:`~slidescore.io.base.MAX_TILE_BYTES`). Anything else a library raises on a
        corrupt header is reported the same way, with the URI.
        """
        self.uri = uri
        self._handle = handle
        try:
            self._open(max_tile_bytes)
        except BaseException as e:
            self.close()
            if isinstance(e, SlideScoreError) or not isinstance(e, Exception):
                raise
            # tifffile, numpy and the tag parsers raise many types on a corrupt or truncated header
            raise UnsupportedImageError(
                f"{uri}: not a readable TIFF ({type(e).__name__}: {e}); the file may be truncated or corrupt — expected a "
                "tiled or striped TIFF/SVS/OME-TIFF",
                uri=uri,
            ) from None

    def _open(self, max_tile_bytes: int | None) -> None:
        uri = self.uri
        self._tif: tifffile.TiffFile = tifffile.TiffFile(self._handle if self._handle is not None else uri)
        series = self._tif.series[0]
        self._levels = list(series.levels)
        self._axes = series.axes
        if series.dtype is None or any(lv.dtype is None for lv in self._levels):
            raise UnsupportedImageError(
                f"{uri}: pixel type not supported (SampleFormat/BitsPerSample of the first image); export 8/16/32-bit "
                "integer or float pixels", uri=uri)
        shapes = [self._shape(lv) for lv in self._levels]
        check_level_shapes(uri, shapes)
        for i, lv in enumerate(self._levels):
            if any(int(n) < 1 for n in lv.keyframe.chunks):
                raise UnsupportedImageError(
                    f"{uri}: level {i} has tiles / strips of shape {lv.keyframe.chunks} (TileLength, TileWidth or "
                    "RowsPerStrip is 0); the file is corrupt — re-export it", uri=uri, level=i)
        # one decoded tile / strip of every level, from the header: a hostile one is refused before any allocation
        self.max_chunk_bytes = max(check_chunk_bytes(uri, i, lv.keyframe.chunks, lv.dtype, max_tile_bytes,
                                                     "tile" if lv.keyframe.is_tiled else "strip")
                                   for i, lv in enumerate(self._levels))
        shape0 = shapes[0]
        self.levels = tuple(LevelInfo(i, h, w, downsample=shape0[1] / w) for i, (h, w, _) in enumerate(shapes))
        self.n_channels = shape0[2]
        self.dtype = np.dtype(series.dtype)
        self.georeference: dict[str, Any] | None = None
        geo = self._tif.geotiff_metadata if self._tif.is_geotiff else None
        if geo:
            self.georeference, self.mpp, self.mpp_source = read_georeference(geo, uri)
        else:
            self.mpp, self.mpp_source = self._read_mpp()
        self._arrays: dict[int, zarr.Array] = {}
        self._direct: dict[int, Any] = {}
        self.tile_cache = TileCache()
        self._expected: dict[tuple[int, Box], int] = {}
        self._expect_lock = threading.Lock()

    def _shape(self, level: tifffile.TiffPageSeries) -> tuple[int, int, int]:
        axes = level.axes.upper().replace("S", "C")
        shape = dict(zip(axes, level.shape, strict=True))
        return shape.get("Y", 0), shape.get("X", 0), shape.get("C", 1)

    def _array(self, level: int) -> zarr.Array:
        if level not in self._arrays:
            # tiles of one read decoded in parallel (libjpeg-turbo and zlib release the GIL)
            store = self._tif.series[0].aszarr(level=level, maxworkers=DECODE_THREADS)
            self._arrays[level] = zarr.open_array(store, mode="r")
        return self._arrays[level]

    def read(self, level: int, box: Box) -> np.ndarray:
        try:
            return self._read(level, box)
        except (InputError, TransientStorageError):
            raise
        except Exception as e:  # tifffile, zarr and the codecs raise many types on a corrupt file
            raise read_failed(self.uri, level, box, e) from None

    def _read(self, level: int, box: Box) -> np.ndarray:
        arr = self._array(level)
        axes = self._levels[level].axes.upper()
        iy, ix = axes.find("Y"), axes.find("X")
        tiled = iy >= 0 and ix >= 0 and all(c == n for i, (c, n) in enumerate(zip(arr.chunks, arr.shape, strict=True))
                                            if i not in (iy, ix))
        with self._expect_lock:
            announced = self._expected.get((level, box), 0)
            if announced:
                self._expected[(level, box)] = announced - 1
        direct = self._tile_page(level) is not None
        if not tiled or not (announced or direct):  # planes or pages in chunks of their own: through zarr
            return as_yxc(self._get(arr, axes, level, box), axes, self.uri)
        box = box.clip(arr.shape[iy], arr.shape[ix])  # what lies outside is left out, as a Zarr read does
        return as_yxc(self._read_tiles(arr, axes, level, box, arr.chunks[iy], arr.chunks[ix], cached=bool(announced)),
                      axes, self.uri)

    def _tile_page(self, level: int) -> Any:
        """The level's one tiled page when its tiles can be read and decoded directly, else ``None``.

        One page of contiguous samples (SVS, OME-TIFF and GeoTIFF pyramids, our own writer): tiles
        are read in runs of adjacent bytes (tifffile ``read_segments``) and decoded on a thread pool
        straight from the page's codec, without the Zarr store's asynchronous machinery (reading
        every block of the 16k benchmark smear's level 1: 0.45–0.64 s against 0.66–0.71 s through
        the store, interleaved runs). Anything else (planes in pages of their own, volumes,
        separate sample planes) is read through the Zarr store.
        """
        if level not in self._direct:
            lv = self._levels[level]
            page = lv.keyframe if len(lv.pages) == 1 else None
            ok = (page is not None and page.is_tiled and page.imagedepth == 1 and lv.axes.upper() in ("YXS", "YX")
                  and (page.samplesperpixel == 1 or page.planarconfig == 1))
            self._direct[level] = page if ok else None
        return self._direct[level]

    def _decode_tiles(self, level: int, keys: list[tuple[int, int]], th: int, tw: int) -> dict[tuple[int, int], np.ndarray]:
        """Tiles ``(ty, tx)`` of a direct level, decoded (full tile size, edge tiles padded)."""
        page = self._tile_page(level)
        ntx = -(-page.imagewidth // tw)
        index = {ty * ntx + tx: (ty, tx) for ty, tx in keys}
        idx = sorted(index)
        shape = (th, tw, page.samplesperpixel) if page.samplesperpixel > 1 or "S" in self._levels[level].axes.upper() else (th, tw)
        fh = self._tif.filehandle

        # tiles a writer left out (no bytes) decode to the fill value; the rest are read in runs
        present = [i for i in idx if page.databytecounts[i] > 0 and page.dataoffsets[i] > 0]
        absent: list[tuple[bytes | None, int]] = [(None, i) for i in sorted(set(idx) - set(present))]

        def fetch() -> list[tuple[bytes | None, int]]:
            segments: Any = fh.read_segments([page.dataoffsets[i] for i in present], [page.databytecounts[i] for i in present],
                                             indices=present, sort=True, lock=fh.lock, flat=True)  # (bytes, index) pairs
            return absent + list(segments)

        def decode(seg: tuple[bytes | None, int]) -> np.ndarray:
            data, i = seg
            tile = page.decode(data, i, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
            if tile is None:  # a tile the writer left out (no bytes): the fill value
                return np.full(shape, page.nodata, page.dtype)
            return tile.reshape(shape)

        try:
            segs = with_retries(fetch, self.uri, f"reading level {level} tiles") if self._handle is not None else fetch()
            tiles = list(_decode_pool().map(decode, segs)) if len(segs) > 1 else [decode(segs[0])]
        except (InputError, TransientStorageError):
            raise
        except Exception as e:  # decoders raise many types (imagecodecs errors, ValueError, OSError)
            raise UnsupportedImageError(
                f"{self.uri}: failed to decode level {level} tiles {[index[i] for i in idx][:4]}… ({type(e).__name__}: {e}); "
                "the file may be truncated or corrupt — re-export or re-upload it",
                uri=self.uri,
            ) from None
        return {index[i]: t for (_, i), t in zip(segs, tiles, strict=True)}

    def expect(self, level: int, boxes: list[Box]) -> None:
        """Announce reads (exact boxes, any order): tiles shared by several are decoded only once."""
        try:
            arr = self._array(level)
        except Exception as e:  # a level tifffile cannot present as a Zarr store (a corrupt file)
            raise UnsupportedImageError(f"{self.uri}: cannot read level {level} ({type(e).__name__}: {e}); the file may be "
                                        "truncated or corrupt — re-export or re-upload it", uri=self.uri, level=level) from None
        axes = self._levels[level].axes.upper()
        iy, ix = axes.find("Y"), axes.find("X")
        if iy < 0 or ix < 0:
            return
        th, tw = arr.chunks[iy], arr.chunks[ix]
        with self._expect_lock:
            for box in boxes:
                self._expected[(level, box)] = self._expected.get((level, box), 0) + 1
        for box in boxes:
            self.tile_cache.need((level, ty, tx) for ty in range(box.y // th, -(-box.y1 // th))
                                 for tx in range(box.x // tw, -(-box.x1 // tw)))

    def _read_tiles(self, arr: zarr.Array, axes: str, level: int, box: Box, th: int, tw: int,
                    cached: bool = True) -> np.ndarray:
        """The box, assembled from cached edge tiles (``cached``: an announced read) and the rest,
        decoded directly (:meth:`_tile_page`) or in one Zarr read of their tile-aligned rectangle."""
        iy, ix = axes.find("Y"), axes.find("X")
        height, width = arr.shape[iy], arr.shape[ix]
        ty0, ty1 = box.y // th, -(-box.y1 // th)
        tx0, tx1 = box.x // tw, -(-box.x1 // tw)
        shape = list(arr.shape)
        shape[iy], shape[ix] = box.h, box.w
        out = np.empty(shape, arr.dtype)

        def put(dst_y: int, dst_x: int, src: np.ndarray, sy: slice, sx: slice) -> None:
            dst = [slice(None)] * len(axes)
            dst[iy], dst[ix] = slice(dst_y, dst_y + sy.stop - sy.start), slice(dst_x, dst_x + sx.stop - sx.start)
            src_sl = [slice(None)] * len(axes)
            src_sl[iy], src_sl[ix] = sy, sx
            out[tuple(dst)] = src[tuple(src_sl)]

        def place(ty: int, tx: int, tile: np.ndarray) -> None:  # a tile (cropped to the level) into the box
            y0, x0 = ty * th, tx * tw
            a, b = max(box.y, y0), max(box.x, x0)
            put(a - box.y, b - box.x, tile, slice(a - y0, min(box.y1, y0 + th) - y0), slice(b - x0, min(box.x1, x0 + tw) - x0))

        missing: list[tuple[int, int]] = []
        for ty in range(ty0, ty1):
            for tx in range(tx0, tx1):
                tile = self.tile_cache.use((level, ty, tx)) if cached else None
                if tile is None:
                    missing.append((ty, tx))
                else:
                    place(ty, tx, tile)
        if not missing:
            return out
        fresh: dict[tuple[int, int], np.ndarray] = {}
        if self._tile_page(level) is not None:
            for (ty, tx), tile in self._decode_tiles(level, missing, th, tw).items():
                fresh[(ty, tx)] = tile[: min(th, height - ty * th), : min(tw, width - tx * tw)]
        else:  # one read of the tile-aligned rectangle around the missing tiles (zarr decodes whole tiles anyway)
            my0, my1 = min(t[0] for t in missing), max(t[0] for t in missing) + 1
            mx0, mx1 = min(t[1] for t in missing), max(t[1] for t in missing) + 1
            rect = Box(my0 * th, mx0 * tw, min(my1 * th, height) - my0 * th, min(mx1 * tw, width) - mx0 * tw)
            data = self._get(arr, axes, level, rect)
            for ty, tx in missing:
                sl = [slice(None)] * len(axes)
                sl[iy] = slice(ty * th - rect.y, min(ty * th + th, height) - rect.y)
                sl[ix] = slice(tx * tw - rect.x, min(tx * tw + tw, width) - rect.x)
                fresh[(ty, tx)] = data[tuple(sl)]
        for (ty, tx), tile in fresh.items():
            if cached:
                self.tile_cache.keep((level, ty, tx), tile)
            place(ty, tx, tile)
        return out

    def _get(self, arr: zarr.Array, axes: str, level: int, box: Box) -> np.ndarray:
        sl = []
        for ax in axes:
            if ax == "Y":
                sl.append(slice(box.y, box.y1))
            elif ax == "X":
                sl.append(slice(box.x, box.x1))
            else:
                sl.append(slice(None))
        try:
            return with_retries(lambda: np.asarray(arr[tuple(sl)]), self.uri, f"reading level {level} box {box}") \
                if self._handle is not None else np.asarray(arr[tuple(sl)])
        except (InputError, TransientStorageError):
            raise
        except Exception as e:  # decoders raise many types (imagecodecs errors, ValueError, OSError)
            raise UnsupportedImageError(
                f"{self.uri}: failed to decode level {level} box {box} ({type(e).__name__}: {e}); the file may be truncated or corrupt — re-export or re-upload it",
                uri=self.uri,
            ) from None

    def _read_mpp(self) -> tuple[float | None, str]:
        tif = self._tif
        page: Any = tif.pages[0]
        if tif.is_ome and tif.ome_metadata:
            m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata)
            u = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata)
            if m:
                factor = _OME_UNITS_UM.get(u.group(1) if u else "µm")
                if factor is not None:
                    return float(m.group(1)) * factor, "ome:PhysicalSizeX"
        desc = page.description or ""
        m = re.search(r"MPP\s*=\s*([0-9.eE+-]+)", desc)
        if m:
            return float(m.group(1)), "aperio:MPP"
        unit = page.tags.get("ResolutionUnit")
        xres = page.tags.get("XResolution")
        if unit is not None and xres is not None:
            num, den = xres.value
            ppu = num / den if den else 0
            if ppu > 0:
                if unit.value == 3:  # centimetre
                    return 1e4 / ppu, "tiff:XResolution(cm)"
                if unit.value == 2:  # inch
                    if round(ppu, 3) in _DEFAULT_DPI:
                        # 72/96/300 dpi are what office and screenshot software write: not a measurement
                        return None, f"none (tiff:XResolution {ppu:g} dpi looks like a software default)"
                    return 25400 / ppu, "tiff:XResolution(inch)"
        return None, "none"

    @property
    def openslide_vendor(self) -> str | None:
        """OpenSlide's name for a vendor TIFF whose pyramid tifffile does not lay out as one series
        (Philips, Leica SCN, Ventana BIF, Hamamatsu NDPI), else ``None``: ``input.backend: auto``
        reads those through OpenSlide."""
        for flag, vendor in (("is_philips", "philips"), ("is_scn", "leica"), ("is_bif", "ventana"), ("is_ndpi", "hamamatsu")):
            if getattr(self._tif, flag, False):
                return vendor
        return None

    def close(self) -> None:
        tif = getattr(self, "_tif", None)  # None: the file was never opened (a failed open)
        if tif is not None:
            tif.close()
        if self._handle is not None:
            self._handle.close()


# GeoKey ids and EPSG unit codes (GeoTIFF 1.1, OGC 19-008r4)
_LINEAR_UNITS_M = {9001: ("metre", 1.0), 9002: ("foot", 0.3048), 9003: ("US survey foot", 1200 / 3937),
                   9030: ("nautical mile", 1852.0), 9036: ("kilometre", 1000.0)}
_USER_DEFINED = 32767


def _metre_crs(epsg: int) -> bool:
    """Projected CRSs known to use metres, for files that omit ProjLinearUnitsGeoKey."""
    return (32601 <= epsg <= 32660 or 32701 <= epsg <= 32760  # WGS 84 / UTM north, south
            or 25828 <= epsg <= 25838 or 3040 <= epsg <= 3049  # ETRS89 / UTM
            or 26901 <= epsg <= 26923  # NAD83 / UTM
            or epsg in (3857, 3395, 3035, 2154, 27700, 28992, 31287, 3413, 3031, 5070, 2056, 3006))


def read_georeference(geo: dict[str, Any], uri: str) -> tuple[dict[str, Any], float | None, str]:
    """The georeference of a GeoTIFF and its pixel size in µm (``None`` when not a length).

    Returns ``(georeference, mpp, mpp_source)``. ``georeference["affine"]`` is ``[a, b, c, d, e, f]``
    with ``x_map = a·col + b·row + c`` and ``y_map = d·col + e·row + f`` for level-0 pixel coordinates
    whose origin is the top-left corner of the top-left pixel (a ``PixelIsPoint`` tiepoint is shifted
    by half a pixel to that convention, as GDAL does).
    """
    model = int(geo.get("GTModelTypeGeoKey", 0) or 0)  # 1 projected, 2 geographic, 3 geocentric
    if "ModelTransformation" in geo:
        m = [float(v) for v in np.asarray(geo["ModelTransformation"], dtype=np.float64).ravel()]
        a, b, c, d, e, f = m[0], m[1], m[3], m[4], m[5], m[7]
        source = "geotiff:ModelTransformation"
    elif "ModelPixelScale" in geo and "ModelTiepoint" in geo:
        sx, sy = (float(v) for v in geo["ModelPixelScale"][:2])
        i, j, _, x, y, _ = (float(v) for v in np.asarray(geo["ModelTiepoint"], dtype=np.float64).ravel()[:6])
        a, b, c, d, e, f = sx, 0.0, x - i * sx, 0.0, -sy, y + j * sy
        source = "geotiff:ModelPixelScale"
    else:
        raise UnsupportedImageError(
            f"{uri}: GeoTIFF without ModelPixelScale+ModelTiepoint or ModelTransformation tags; the pixel grid has no "
            "map position — re-export it with a geotransform (e.g. gdal_translate)", uri=uri)
    if int(geo.get("GTRasterTypeGeoKey", 1) or 1) == 2:  # PixelIsPoint: the tiepoint is a pixel centre
        c, f = c - 0.5 * a - 0.5 * b, f - 0.5 * d - 0.5 * e
    epsg_key = "GeographicTypeGeoKey" if model == 2 else "ProjectedCSTypeGeoKey"
    code = geo.get(epsg_key)
    epsg = int(code) if code is not None and int(code) not in (0, _USER_DEFINED) else None
    pixel_size = math.hypot(a, d)
    georef: dict[str, Any] = {"epsg": epsg, "affine": [a, b, c, d, e, f], "model": {1: "projected", 2: "geographic", 3: "geocentric"}.get(model, "unknown"),
                              "pixel_origin": "top-left corner of pixel (0, 0), level-0 pixels (col, row)"}
    crs = f"EPSG:{epsg}" if epsg else "a user-defined CRS"
    if model == 2:
        georef["units"] = "degree"
        return georef, None, (f"none (GeoTIFF in geographic coordinates, {crs}: the pixel size {pixel_size:g}° is an angle, "
                              "not a length — set input.mpp to the ground pixel size in µm, or reproject to a projected CRS)")
    unit_code = geo.get("ProjLinearUnitsGeoKey")
    if unit_code is not None and int(unit_code) in _LINEAR_UNITS_M:
        unit, to_m = _LINEAR_UNITS_M[int(unit_code)]
        unit_source = "ProjLinearUnitsGeoKey"
    elif unit_code is None and epsg is not None and _metre_crs(epsg):
        unit, to_m = "metre", 1.0
        unit_source = f"EPSG:{epsg}"
    else:
        georef["units"] = "unknown"
        return georef, None, (f"none (GeoTIFF in {crs} with linear unit code {unit_code}, which slidescore does not know; "
                              "set input.mpp to the ground pixel size in µm)")
    georef["units"] = unit
    return georef, pixel_size * to_m * 1e6, f"{source}({unit}, {unit_source})"


def write_tiff_pyramid(
    path: str,
    shape: tuple[int, int],
    render: Callable[[int, int, int, int, int], np.ndarray],
    *,
    mpp: float | None,
    n_levels: int,
    tile_px: int = 256,
    compression: str = "jpeg",
    progress: Callable[[int], None] | None = None,
    layout: str = "subifds",
) -> None:
    """Write a tiled pyramidal RGB TIFF, rendering tile by tile.

    ``render(y, x, h, w, downsample)`` returns the (h, w, 3) uint8 pixels of a box at the level with
    that downsample; memory stays at one tile whatever the image size. Resolution tags carry µm/px.
    ``layout``: ``subifds`` puts the reduced levels in SubIFDs of level 0 (tifffile reads the
    pyramid; OpenSlide and Bio-Formats see level 0 only); ``svs`` writes the Aperio SVS layout —
    level 0, a stripped thumbnail, then the reduced levels as pages, each described
    ``Aperio Image Library …|MPP = …`` — which tifffile, OpenSlide (vendor ``aperio``) and
    Bio-Formats (and so QuPath) all read as one pyramid. Both give the same pixels per level.
    """
    if layout not in ("subifds", "svs"):
        raise ValueError(f"layout: expected 'subifds' or 'svs', got {layout!r}")
    h0, w0 = shape

    def tiles(downsample: int) -> Iterator[np.ndarray]:
        h, w = -(-h0 // downsample), -(-w0 // downsample)
        for y in range(0, h, tile_px):
            for x in range(0, w, tile_px):
                th, tw = min(tile_px, h - y), min(tile_px, w - x)
                tile = np.zeros((tile_px, tile_px, 3), np.uint8)
                tile[:th, :tw] = render(y, x, th, tw, downsample)
                if progress:
                    progress(1)
                yield tile

    opts: dict[str, Any] = dict(tile=(tile_px, tile_px), compression=compression, photometric="rgb", dtype="uint8")
    if compression == "jpeg":
        opts["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for lvl in range(n_levels):
            ds = 2**lvl
            h, w = -(-h0 // ds), -(-w0 // ds)
            res: dict[str, Any] = {} if mpp is None else dict(resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER")
            if layout == "svs":
                desc = f"Aperio Image Library (slidescore)\r\n{w0}x{h0} [0,0 {w0}x{h0}] ({tile_px}x{tile_px}) -> {w}x{h}"
                extra: dict[str, Any] = dict(description=desc + ("" if mpp is None else f"|MPP = {mpp!r}"), metadata=None)
            else:
                extra = dict(subifds=n_levels - 1, metadata=None) if lvl == 0 else dict(subfiletype=1)
            tw.write(tiles(ds), shape=(h, w, 3), **opts, **res, **extra)
            if layout == "svs" and lvl == 0:
                # Aperio's second page: a stripped thumbnail of at most 1024 px, smaller than the coarsest level
                # (Bio-Formats sorts the described pages by size and drops the smallest when it is stripped)
                ds_t = 2 ** max(n_levels, math.ceil(math.log2(max(h0, w0) / 1024)))
                th, tw_ = -(-h0 // ds_t), -(-w0 // ds_t)
                tw.write(render(0, 0, th, tw_, ds_t), photometric="rgb", compression=compression, rowsperstrip=64,
                         description=f"Aperio Image Library (slidescore)\r\n{w0}x{h0} -> {tw_}x{th} thumbnail", metadata=None,
                         **{k: v for k, v in opts.items() if k == "compressionargs"})
