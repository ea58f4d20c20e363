"""Slides read through OpenSlide (openslide-python with the openslide-bin library): every format
OpenSlide 4 reads — MIRAX, Hamamatsu NDPI / VMS / VMU, Leica SCN, Ventana BIF, Philips TIFF,
Sakura SVSlide, Aperio SVS and generic tiled TIFF — behind the :class:`~slidescore.io.base.SlideReader`
contract.

Levels are OpenSlide's, with the same downsample policy as the TIFF reader (level-0 width over the
level's width); a box of a level is read by ``read_region`` at the level-0 location OpenSlide maps
back onto it. µm/px come from ``openslide.mpp-x`` under the TIFF reader's policy: a generic TIFF
whose only resolution is a 72/96/150/300/600 dpi software default has none. OpenSlide returns
RGBA (transparent where nothing was scanned); it is composited onto the slide's
``openslide.background-color`` (white when absent), so the reader gives RGB. One decoded tile is
bounded from ``openslide.level[N].tile-width/height`` when the slide is opened. OpenSlide reads
local files only: a remote slide is fetched whole first (:mod:`slidescore.io.remote_cache`), and
the reader is named by its remote URI. An OpenSlide error poisons its handle, so a failed read is
reported (:class:`~slidescore.errors.UnsupportedImageError` with the file, level and box) and every
later read of that reader fails the same way.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import UnsupportedImageError
from slidescore.io.base import check_chunk_bytes, check_level_shapes, read_failed

_DEFAULT_DPI = {72.0, 96.0, 150.0, 300.0, 600.0}  # as slidescore.io.tiff: software defaults, not measurements


def detect_vendor(path: str) -> str | None:
    """OpenSlide's name for the format of a local file (``aperio``, ``mirax``, ``generic-tiff`` …),
    ``None`` when OpenSlide does not read it."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(path)
    except Exception:  # an unreadable file is not OpenSlide's: the caller's own reader reports it
        return None


def composite(rgba: np.ndarray, background: tuple[int, int, int]) -> np.ndarray:
    """RGB of non-premultiplied RGBA pixels over an opaque ``background`` (rounded to nearest)."""
    rgb = rgba[..., :3].astype(np.uint16)
    a = rgba[..., 3:4].astype(np.uint16)
    if (a == 255).all():
        return np.ascontiguousarray(rgba[..., :3])
    bg = np.asarray(background, np.uint16)
    return ((rgb * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


class OpenSlideReader:
    """A slide opened through OpenSlide (local file; ``uri`` names it in messages and records)."""

    n_channels = 3
    dtype = np.dtype(np.uint8)

    def __init__(self, path: str, *, uri: str | None = None, max_tile_bytes: int | None = None,
                 fetch_stats: dict[str, Any] | None = None, keep: Any = None) -> None:
        """Open ``path`` (a local file OpenSlide reads). ``fetch_stats``: what fetching a remote slide
        cost (recorded in run.json); ``keep``: an object closed with the reader (a cache pin)."""
        import openslide

        self.uri = uri or path
        self.path = path
        self.fetch_stats = fetch_stats
        self._keep = keep
        self._slide: Any = None
        try:
            self._slide = openslide.OpenSlide(path)
        except openslide.OpenSlideUnsupportedFormatError:
            self.close()
            raise UnsupportedImageError(
                f"{self.uri}: not a slide OpenSlide reads (formats: MIRAX, NDPI, VMS, VMU, SCN, BIF, Philips TIFF, "
                "SVSlide, SVS, generic tiled TIFF); check the file, or set input.backend to another reader",
                uri=self.uri) from None
        except Exception as e:  # openslide.OpenSlideError on a corrupt header, OSError on a missing part
            self.close()
            raise UnsupportedImageError(
                f"{self.uri}: OpenSlide cannot open it ({type(e).__name__}: {e}); the file (or, for a multi-file format "
                "such as MIRAX or VMS, one of its parts) may be missing, truncated or corrupt — re-export or re-upload it",
                uri=self.uri) from None
        try:
            self._init_levels(max_tile_bytes)
        except BaseException:
            self.close()
            raise

    def _init_levels(self, max_tile_bytes: int | None) -> None:
        props = self._slide.properties
        dims = list(self._slide.level_dimensions)
        check_level_shapes(self.uri, [(h, w, 3) for w, h in dims])
        w0 = dims[0][0]
        self.levels = tuple(LevelInfo(i, h, w, downsample=w0 / w) for i, (w, h) in enumerate(dims))
        self._ds = [float(d) for d in self._slide.level_downsamples]  # OpenSlide's own, for level-0 locations
        self.vendor = str(props.get("openslide.vendor", ""))
        self.background = _background(props.get("openslide.background-color"))
        self.max_chunk_bytes = 0
        hinted = True
        for i in range(len(dims)):
            tw, th = props.get(f"openslide.level[{i}].tile-width"), props.get(f"openslide.level[{i}].tile-height")
            if tw and th:  # RGBA as OpenSlide decodes it
                self.max_chunk_bytes = max(self.max_chunk_bytes,
                                           check_chunk_bytes(self.uri, i, (int(th), int(tw), 4), np.uint8, max_tile_bytes))
            else:
                hinted = False
        if not hinted:  # e.g. Leica SCN (several areas per level): bound the TIFF's own tiles / strips instead
            self.max_chunk_bytes = max(self.max_chunk_bytes, _tiff_chunk_bytes(self.path, self.uri, max_tile_bytes))
        self.mpp, self.mpp_source = self._read_mpp(props)
        self.georeference = None

    def _read_mpp(self, props: Any) -> tuple[float | None, str]:
        raw = props.get("openslide.mpp-x")
        try:
            mpp = float(raw) if raw is not None else None
        except ValueError:
            mpp = None
        if mpp is None or not (mpp > 0 and np.isfinite(mpp)):
            return None, "none"
        if props.get("tiff.ResolutionUnit") == "inch":
            m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*", str(props.get("tiff.XResolution", "")))
            if m and round(float(m.group(1)), 3) in _DEFAULT_DPI:
                return None, f"none (tiff:XResolution {float(m.group(1)):g} dpi looks like a software default)"
        return mpp, f"openslide:mpp-x({self.vendor or 'unknown'})"

    def read(self, level: int, box: Box) -> np.ndarray:
        """Pixels of ``box`` (inside the level) as (h, w, 3) uint8, composited onto the background."""
        ds = self._ds[level]
        loc = (int(round(box.x * ds)), int(round(box.y * ds)))
        try:
            region = self._slide.read_region(loc, level, (box.w, box.h))
            rgba = np.asarray(region)
        except Exception as e:  # openslide.OpenSlideError (a codec or I/O failure; the handle stays failed)
            raise read_failed(self.uri, level, box, e) from None
        if rgba.shape != (box.h, box.w, 4):
            raise UnsupportedImageError(f"{self.uri}: OpenSlide returned {rgba.shape} for level {level} box {box}; the "
                                        "slide may be corrupt — re-export it", uri=self.uri, level=level)
        return composite(rgba, self.background)

    def close(self) -> None:
        slide, self._slide = self._slide, None
        if slide is not None:
            slide.close()
        keep, self._keep = self._keep, None
        if keep is not None:
            keep.close()


def _tiff_chunk_bytes(path: str, uri: str, limit: int | None) -> int:
    """The largest decoded tile / strip (RGBA) of any page of a TIFF-based slide, from its headers;
    refused above ``limit``. 0 for a file that is not a TIFF (its reader bounds its own images)."""
    import tifffile

    with open(path, "rb") as f:
        if f.read(4) not in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
            return 0
    largest = 0
    with tifffile.TiffFile(path) as tif:
        for i in range(len(tif.pages)):
            page: Any = tif.pages[i]  # a page's index stands for its level in the message
            chunks: tuple[int, ...] = tuple(getattr(page, "chunks", ()))
            if len(chunks) >= 2:
                largest = max(largest, check_chunk_bytes(uri, i, (int(chunks[0]), int(chunks[1]), 4), np.uint8, limit,
                                                         "tile" if page.is_tiled else "strip"))
    return largest


def _background(value: Any) -> tuple[int, int, int]:
    """``openslide.background-color`` (``RRGGBB`` hex) as RGB; white when absent or malformed."""
    if isinstance(value, str) and re.fullmatch(r"[0-9a-fA-F]{6}", value.strip()):
        v = int(value.strip(), 16)
        return (v >> 16) & 255, (v >> 8) & 255, v & 255
    return 255, 255, 255
