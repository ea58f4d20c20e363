"""TIFF-family reader (tifffile), lazy and tile by tile, plus the pyramidal TIFF writer.

Levels come from the first series' pyramid (SubIFDs or reduced-resolution pages); boxes are read
through tifffile's Zarr store, which decodes only the tiles a box touches. Resolution (µm/px) is
taken, in order, from OME-XML ``PhysicalSizeX``, an Aperio ``MPP =`` description, or the TIFF
resolution tags (centimetre or inch units).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import tifffile
import zarr

from slidescore.errors import InputError, TransientStorageError, UnsupportedImageError
from slidescore.io.readers import as_yxc
from slidescore.io.storage import with_retries
from slidescore.types import Box, LevelInfo

_DEFAULT_DPI = {72.0, 96.0, 150.0, 300.0, 600.0}
_OME_UNITS_UM = {"µm": 1.0, "um": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6}


class TiffReader:
    """A pyramidal (or single-level) TIFF opened lazily."""

    def __init__(self, uri: str, handle: Any = None) -> None:
        self.uri = uri
        self._handle = handle
        try:
            self._tif = tifffile.TiffFile(handle if handle is not None else uri)
            series = self._tif.series[0]
            self._levels = list(series.levels)
        except (tifffile.TiffFileError, ValueError, IndexError, OSError) as e:
            raise UnsupportedImageError(
                f"{uri}: not a readable TIFF ({type(e).__name__}: {e}); expected a tiled or striped TIFF/SVS/OME-TIFF",
                uri=uri,
            ) from None
        self._axes = series.axes
        shape0 = self._shape(self._levels[0])
        if shape0[0] < 1 or shape0[1] < 1:
            raise UnsupportedImageError(f"{uri}: image has no pixels (shape {series.shape})", uri=uri)
        self.levels = tuple(
            LevelInfo(i, *self._shape(lv)[:2], downsample=shape0[1] / self._shape(lv)[1]) for i, lv in enumerate(self._levels)
        )
        self.n_channels = shape0[2]
        self.dtype = np.dtype(series.dtype)
        self.mpp, self.mpp_source = self._read_mpp()
        self._arrays: dict[int, zarr.Array] = {}

    def _shape(self, level: tifffile.TiffPageSeries) -> tuple[int, int, int]:
        axes = level.axes.upper().replace("S", "C")
        shape = dict(zip(axes, level.shape, strict=True))
        return shape.get("Y", 0), shape.get("X", 0), shape.get("C", 1)

    def _array(self, level: int) -> zarr.Array:
        if level not in self._arrays:
            store = self._tif.series[0].aszarr(level=level)
            self._arrays[level] = zarr.open_array(store, mode="r")
        return self._arrays[level]

    def read(self, level: int, box: Box) -> np.ndarray:
        arr = self._array(level)
        axes = self._levels[level].axes.upper()
        sl = []
        for ax in axes:
            if ax == "Y":
                sl.append(slice(box.y, box.y1))
            elif ax == "X":
                sl.append(slice(box.x, box.x1))
            else:
                sl.append(slice(None))
        try:
            data = with_retries(lambda: np.asarray(arr[tuple(sl)]), self.uri, f"reading level {level} box {box}") \
                if self._handle is not None else np.asarray(arr[tuple(sl)])
        except (InputError, TransientStorageError):
            raise
        except Exception as e:  # decoders raise many types (imagecodecs errors, ValueError, OSError)
            raise UnsupportedImageError(
                f"{self.uri}: failed to decode level {level} box {box} ({type(e).__name__}: {e}); the file may be truncated or corrupt — re-export or re-upload it",
                uri=self.uri,
            ) from None
        return as_yxc(data, axes, self.uri)

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

    def close(self) -> None:
        self._tif.close()
        if self._handle is not None:
            self._handle.close()


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
) -> None:
    """Write a tiled pyramidal RGB TIFF (level 0 plus SubIFDs), rendering tile by tile.

    ``render(y, x, h, w, downsample)`` returns the (h, w, 3) uint8 pixels of a box at the level with
    that downsample; memory stays at one tile whatever the image size. Resolution tags carry µm/px.
    """
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
            extra: dict[str, Any] = dict(subifds=n_levels - 1, metadata=None) if lvl == 0 else dict(subfiletype=1)
            tw.write(tiles(ds), shape=(h, w, 3), **opts, **res, **extra)
