"""``slidescore serve``: one sample in the browser — the source slide at full resolution, the
probability overlay and the ranked regions, zoomable and pannable, served from the sample folder.

A small stdlib HTTP server (:class:`http.server.ThreadingHTTPServer`, loopback by default) renders
256² px tiles on demand through slidescore's own readers (:func:`~slidescore.io.open_image`: local
files and ``s3://`` alike), one tile's box per request. The page (``webview_static/``: plain
JavaScript, nothing fetched from elsewhere) places the tiles by CSS transform.

URL scheme (every other path is 404; nothing in a URL names a file):

* ``/`` (``/index.html``), ``/webview.js``, ``/webview.css``: the page;
* ``/info.json``: the sample, the tile pyramid (``levels``: index, width, height, downsample), the
  classes (name, colour, threshold) and the tile size;
* ``/regions.geojson``: the sample's ``regions.geojson`` (level-0 pixel outlines, ranked);
* ``/tile/<level>/<ty>/<tx>.jpg`` (or ``.png``): the source slide, tile ``(ty, tx)`` of pyramid
  level ``level`` — level-0 pixels ``[ty·256·d, (ty+1)·256·d)`` (``d`` its downsample), clipped at
  the image edge. Levels are the file's own, then up to :data:`MAX_VIRTUAL` virtual 2× levels below
  its coarsest (area means of a box of at most ``256·8`` px a side) so a flat image still zooms out;
* ``/overlay/<class>/<level>/<ty>/<tx>.png``: the same tile's area as an RGBA colour map of one
  class, rendered from the mosaic level whose cells are the coarsest still at most one tile pixel
  (or level 0): the class's ``omero`` colour, alpha = round(255·p), alpha 0 where not scored.

Geometry as :mod:`slidescore.report.viewer` reads it: mosaic level ``m``'s cells are
``scale_m / mpp0`` level-0 px (``stride · 2^m · level downsample``), placed by the
``coordinateTransformations`` of ``probabilities.ome.zarr``; a tile pixel takes the cell holding its
centre (:func:`slidescore.report.images.cells_at`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from PIL import Image

from slidescore.core.types import Box
from slidescore.io import SlideReader, open_image
from slidescore.io import mosaic as mz
from slidescore.report.images import cells_at, to_rgb
from slidescore.report.viewer import _zattrs, resolve_sample_dir, yx_transform
from slidescore.stages.records import SampleRecord

log = logging.getLogger(__name__)

TILE_PX = 256
MAX_VIRTUAL = 3  # virtual 2× levels below the coarsest stored one: a tile reads at most (256·2³)² px
DEFAULT_COLORS = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/webview.js": ("webview.js", "text/javascript; charset=utf-8"), "/webview.css": ("webview.css", "text/css; charset=utf-8")}
TILE_RE = re.compile(r"/tile/(\d{1,3})/(\d{1,9})/(\d{1,9})\.(jpg|png)")
OVERLAY_RE = re.compile(r"/overlay/(\d{1,3})/(\d{1,3})/(\d{1,9})/(\d{1,9})\.png")
CSP = "default-src 'self'; img-src 'self'; style-src 'self'; script-src 'self'; connect-src 'self'; frame-ancestors 'none'"


class NotFound(Exception):
    """A request for nothing this server serves (unknown path, tile out of range): 404."""


class ReaderCache:
    """An LRU of open readers by URI; a reader in use is closed only once its last user is done."""

    def __init__(self, size: int = 4) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._open: OrderedDict[str, SlideReader] = OrderedDict()
        self._users: dict[int, int] = {}
        self._evicted: dict[int, SlideReader] = {}

    @contextlib.contextmanager
    def reader(self, uri: str) -> Iterator[SlideReader]:
        with self._lock:
            r = self._open.get(uri)
            if r is not None:
                self._open.move_to_end(uri)
        if r is None:
            opened = open_image(uri)  # outside the lock: a header read may take a round trip on S3
            with self._lock:
                r = self._open.get(uri)
                raced = r is not None  # another request opened it meanwhile: keep theirs
                if r is None:
                    r = self._open[uri] = opened
                while len(self._open) > self.size:
                    _, old = self._open.popitem(last=False)
                    self._evicted[id(old)] = old
            if raced:
                opened.close()
        with self._lock:
            self._users[id(r)] = self._users.get(id(r), 0) + 1
        try:
            yield r
        finally:
            with self._lock:
                self._users[id(r)] -= 1
                done = [self._evicted.pop(k) for k in list(self._evicted) if not self._users.get(k)]
            for old in done:
                old.close()

    def close(self) -> None:
        with self._lock:
            readers = [*self._open.values(), *self._evicted.values()]
            self._open.clear()
            self._evicted.clear()
        for r in readers:
            r.close()


@dataclass(frozen=True)
class TileLevel:
    """One level of the tile pyramid: read from ``source_level`` (subsampled by ``factor`` for a virtual one)."""

    index: int
    height: int
    width: int
    downsample: float  # level-0 px per tile px
    source_level: int
    factor: int = 1

    def n_tiles(self) -> tuple[int, int]:
        return -(-self.height // TILE_PX), -(-self.width // TILE_PX)


@dataclass(frozen=True)
class MosaicLevel:
    cell_px0: float  # level-0 px per cell
    origin_px0: tuple[float, float]  # level-0 position (pixel edges) of cell (0, 0)'s top-left corner
    height: int
    width: int


class WebSample:
    """One sample's outputs and source, as the web viewer reads them (readers through a :class:`ReaderCache`)."""

    def __init__(self, sample_dir: str | Path, *, image: str | None = None, readers: ReaderCache | None = None) -> None:
        d = Path(sample_dir)
        run = SampleRecord.from_dict(json.loads((d / "run.json").read_text()))
        inp = run.image_input
        if inp.mpp0 is None:
            raise ValueError(f"{d / 'run.json'}: names no input.mpp0; cannot place the overlay on the slide")
        self.dir, self.sample_id, self.mpp0 = d, run.sample_id, float(inp.mpp0)
        self.source_uri = image or inp.uri
        self.mosaic_uri = str(d / (run.outputs.mosaic or "probabilities.ome.zarr"))
        self.readers = readers or ReaderCache()
        window = (inp.conversion or {}).get("window")  # the dtype window scoring used (non-uint8 pixels)
        self.window: tuple[float, float] | None = (float(window[0]), float(window[1])) if window else None
        attrs = _zattrs(Path(self.mosaic_uri))
        omero = attrs.get("omero", {}).get("channels", [])
        self.classes: list[str] = [c.get("label", f"class {i}") for i, c in enumerate(omero)] or list(run.model.card["classes"])
        self.colors: list[tuple[int, int, int]] = []
        for i, _ in enumerate(self.classes):
            hexc = str(omero[i].get("color") or "") if i < len(omero) else ""  # the mosaic's omero colour, "RRGGBB"
            rgb = (int(hexc[0:2], 16), int(hexc[2:4], 16), int(hexc[4:6], 16)) if len(hexc) == 6 else DEFAULT_COLORS[i % len(DEFAULT_COLORS)]
            self.colors.append(rgb)
        self.thresholds = dict(run.thresholds)
        with self.readers.reader(self.source_uri) as src:
            self.height, self.width = src.levels[0].height, src.levels[0].width
            self.tile_levels = _tile_levels(src)
        with self.readers.reader(self.mosaic_uri) as mos:
            self.encoding = mz.Encoding.from_attrs(attrs, mos.dtype)
            self.mosaic_levels = []
            for m, info in enumerate(mos.levels):
                (sy, sx), (ty, tx) = yx_transform(attrs, m)
                if abs(sx - sy) > 1e-9 * sy:
                    raise ValueError(f"{self.mosaic_uri}: level {m} has non-square cells ({sy} × {sx} µm); expected square cells")
                cell = sy / self.mpp0
                # a cell's centre lies at translation / mpp0 (a pixel-centre coordinate): its edge starts half a cell before
                origin = (ty / self.mpp0 + 0.5 - cell / 2, tx / self.mpp0 + 0.5 - cell / 2)
                self.mosaic_levels.append(MosaicLevel(cell, origin, info.height, info.width))
        self.regions_path = d / "regions.geojson"

    def info(self) -> dict[str, Any]:
        return {
            "sample_id": self.sample_id, "source": self.source_uri, "mpp0": self.mpp0, "width": self.width, "height": self.height,
            "tile_px": TILE_PX,
            "levels": [{"level": t.index, "width": t.width, "height": t.height, "downsample": t.downsample} for t in self.tile_levels],
            "classes": [{"index": i, "name": n, "color": "#{:02x}{:02x}{:02x}".format(*c), "threshold": self.thresholds.get(n)}
                        for i, (n, c) in enumerate(zip(self.classes, self.colors, strict=True))],
            "mosaic_cell_px0": [m.cell_px0 for m in self.mosaic_levels],
        }

    def regions(self) -> dict[str, Any]:
        if not self.regions_path.exists():
            return {"type": "FeatureCollection", "features": []}
        return dict(json.loads(self.regions_path.read_text()))

    def _tile_box(self, level: int, ty: int, tx: int) -> tuple[TileLevel, Box]:
        if not 0 <= level < len(self.tile_levels):
            raise NotFound(f"level {level}: the pyramid has levels 0…{len(self.tile_levels) - 1}")
        lv = self.tile_levels[level]
        ny, nx = lv.n_tiles()
        if not (0 <= ty < ny and 0 <= tx < nx):
            raise NotFound(f"tile ({ty}, {tx}) of level {level}: the level has {ny} × {nx} tiles")
        y, x = ty * TILE_PX, tx * TILE_PX
        return lv, Box(y, x, min(TILE_PX, lv.height - y), min(TILE_PX, lv.width - x))

    def tile(self, level: int, ty: int, tx: int) -> np.ndarray:
        """The slide's tile as (h, w, 3) uint8 (h, w = 256 but at the bottom / right edge)."""
        lv, box = self._tile_box(level, ty, tx)
        f = lv.factor
        with self.readers.reader(self.source_uri) as src:
            info = src.levels[lv.source_level]
            sbox = Box(box.y * f, box.x * f, min(box.h * f, info.height - box.y * f), min(box.w * f, info.width - box.x * f))
            pix = np.asarray(src.read(lv.source_level, sbox))
        if f > 1:
            pix = _area_mean(pix, f, box.h, box.w)
        return to_rgb(self._to_uint8(pix))

    def _to_uint8(self, pix: np.ndarray) -> np.ndarray:
        if pix.dtype == np.uint8:
            return pix
        if self.window is not None:
            lo, hi = self.window
        elif np.issubdtype(pix.dtype, np.integer):
            lo, hi = 0.0, float(np.iinfo(pix.dtype).max)
        else:
            lo, hi = 0.0, 1.0
        scaled = (pix.astype(np.float32) - lo) * (255.0 / max(hi - lo, 1e-12))
        return np.clip(np.nan_to_num(scaled), 0, 255).astype(np.uint8)

    def mosaic_level_for(self, downsample: float) -> int:
        """The coarsest mosaic level whose cells are at most one tile pixel (or level 0)."""
        best = 0
        for m, ml in enumerate(self.mosaic_levels):
            if ml.cell_px0 <= max(downsample, self.mosaic_levels[0].cell_px0) + 1e-9:
                best = m
        return best

    def probabilities(self, cls: int, level: int, ty: int, tx: int) -> np.ndarray:
        """The tile's area as one class's probabilities per tile pixel (float32, NaN = not scored)."""
        if not 0 <= cls < len(self.classes):
            raise NotFound(f"class {cls}: the mosaic has classes 0…{len(self.classes) - 1}")
        lv, box = self._tile_box(level, ty, tx)
        m = self.mosaic_level_for(lv.downsample)
        ml, d = self.mosaic_levels[m], lv.downsample
        oy, ox = box.y * d - ml.origin_px0[0], box.x * d - ml.origin_px0[1]  # the tile's corner, from cell (0, 0)'s
        # the cells under the first and last pixel centres of the tile, clipped to the level: one tile's box of cells
        ky0 = max(0, math.floor((oy + 0.5 * d) / ml.cell_px0))
        kx0 = max(0, math.floor((ox + 0.5 * d) / ml.cell_px0))
        ky1 = min(ml.height, math.floor((oy + (box.h - 0.5) * d) / ml.cell_px0) + 1)
        kx1 = min(ml.width, math.floor((ox + (box.w - 0.5) * d) / ml.cell_px0) + 1)
        if ky1 <= ky0 or kx1 <= kx0:
            return np.full((box.h, box.w), np.nan, np.float32)
        with self.readers.reader(self.mosaic_uri) as mos:
            stored = np.asarray(mos.read(m, Box(ky0, kx0, ky1 - ky0, kx1 - kx0)))[..., cls]
        prob = mz.decode(stored, self.encoding)
        origin = (oy - ky0 * ml.cell_px0, ox - kx0 * ml.cell_px0)
        return cells_at(prob, (box.h, box.w), d, ml.cell_px0, origin)

    def overlay(self, cls: int, level: int, ty: int, tx: int) -> np.ndarray:
        """The tile's area as (h, w, 4) uint8 RGBA: the class colour, alpha = round(255·p), 0 where not scored."""
        return colorize(self.probabilities(cls, level, ty, tx), self.colors[cls] if 0 <= cls < len(self.colors) else (0, 0, 0))

    def close(self) -> None:
        self.readers.close()


def colorize(prob: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Probabilities (NaN = not scored) → RGBA: ``color`` everywhere, alpha 0 (p = 0 or NaN) … 255 (p = 1)."""
    out = np.empty((*prob.shape, 4), np.uint8)
    out[..., :3] = np.asarray(color, np.uint8)
    out[..., 3] = np.rint(np.clip(np.nan_to_num(prob, nan=0.0), 0.0, 1.0) * 255).astype(np.uint8)
    return out


def _tile_levels(src: SlideReader) -> list[TileLevel]:
    levels = [TileLevel(lv.index, lv.height, lv.width, float(lv.downsample), lv.index) for lv in src.levels]
    last = levels[-1]
    for k in range(1, MAX_VIRTUAL + 1):
        if max(levels[-1].height, levels[-1].width) <= TILE_PX:
            break
        f = 2**k
        levels.append(TileLevel(len(levels), -(-last.height // f), -(-last.width // f), last.downsample * f, last.source_level, f))
    return levels


def _area_mean(pix: np.ndarray, f: int, h: int, w: int) -> np.ndarray:
    """(h·f, w·f, c) → (h, w, c) means of f × f pixels (edge pixels repeated to fill a partial block)."""
    pad = np.pad(pix, ((0, h * f - pix.shape[0]), (0, w * f - pix.shape[1]), (0, 0)), mode="edge")
    mean = pad.reshape(h, f, w, f, -1).astype(np.float32).mean(axis=(1, 3))
    return mean.astype(pix.dtype) if np.issubdtype(pix.dtype, np.floating) else np.rint(mean).astype(pix.dtype)


def encode_image(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    if fmt == "jpg":
        img.save(buf, "JPEG", quality=85)
    else:
        img.save(buf, "PNG", compress_level=3)
    return buf.getvalue()


class Handler(BaseHTTPRequestHandler):
    """Routes GET requests to the page, the sample's metadata and the tiles; nothing else."""

    server: ViewerServer
    server_version = "slidescore-serve"

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = urlsplit(self.path).path
        try:
            status, ctype, body, cache = self._route(path)
        except NotFound as e:
            status, ctype, body, cache = 404, "text/plain; charset=utf-8", f"not found: {e}\n".encode(), "no-store"
        except Exception as e:  # a read failed (storage, a corrupt chunk): say so, keep serving
            log.warning("%s: %s", path, e)
            status, ctype, body, cache = 500, "text/plain; charset=utf-8", f"error: {type(e).__name__}: {e}\n".encode(), "no-store"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", cache)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CSP)
        self.end_headers()
        self.wfile.write(body)

    def _route(self, path: str) -> tuple[int, str, bytes, str]:
        sample = self.server.sample
        if path in STATIC:
            name, ctype = STATIC[path]
            return 200, ctype, (resources.files("slidescore.report") / "webview_static" / name).read_bytes(), "no-cache"
        if path == "/info.json":
            return 200, "application/json", json.dumps(sample.info()).encode(), "no-cache"
        if path == "/regions.geojson":
            return 200, "application/geo+json", json.dumps(sample.regions()).encode(), "no-cache"
        if m := TILE_RE.fullmatch(path):
            level, ty, tx = (int(v) for v in m.groups()[:3])
            fmt = m.group(4)
            return 200, "image/jpeg" if fmt == "jpg" else "image/png", encode_image(sample.tile(level, ty, tx), fmt), "max-age=300"
        if m := OVERLAY_RE.fullmatch(path):
            cls, level, ty, tx = (int(v) for v in m.groups())
            return 200, "image/png", encode_image(sample.overlay(cls, level, ty, tx), "png"), "max-age=300"
        raise NotFound(path[:200])

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's signature)
        log.debug("%s " + format, self.address_string(), *args)


class ViewerServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, sample: WebSample, host: str = "127.0.0.1", port: int = 0) -> None:
        self.sample = sample
        super().__init__((host, port), Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def make_server(output: str | Path, sample: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
                image: str | None = None) -> ViewerServer:
    """A server (bound, not yet serving) for one sample of ``output`` (a sample folder or a run's root)."""
    ws = WebSample(resolve_sample_dir(output, sample), image=image)
    try:
        return ViewerServer(ws, host, port)
    except BaseException:
        ws.close()
        raise


def serve(output: str | Path, sample: str | None = None, *, host: str = "127.0.0.1", port: int = 0,
          image: str | None = None, announce: Any = print) -> None:
    """Serve one sample until interrupted (Ctrl-C)."""
    server = make_server(output, sample, host=host, port=port, image=image)
    try:
        announce(f"serving {server.sample.sample_id} at {server.url}  (Ctrl-C to stop)")
        if host not in ("127.0.0.1", "localhost", "::1"):
            announce(f"warning: listening on {host}: anyone who can reach this address can see the slide")
        with contextlib.suppress(KeyboardInterrupt):
            server.serve_forever()
    finally:
        server.server_close()
        server.sample.close()
