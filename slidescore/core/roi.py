"""Regions of interest on the cell grid (pure numpy/scipy): polygons or a mask image → the inside
fraction of every output cell, combined with the automatic foreground mask into the valid patches.

A sample's ROI (``mask.roi`` or the sample's ``roi``; read by :mod:`slidescore.io.roi_source`) is
either :class:`RoiShapes` — GeoJSON polygons with holes, in level-0 pixels ``(x, y)`` or in the map CRS
of a GeoTIFF (mapped through the inverse of the reader's ``georeference["affine"]``) — or
:class:`RoiMask`, a raster whose nonzero pixels are inside. :func:`apply_roi` rasterises it once per
image at planning onto the cell grid of invariant 3:

- polygons are **supersampled**: ``n × n`` points per cell (``n`` = the cell's edge in level-0 pixels,
  at most 16; fewer on very large grids), the even-odd rule within a polygon (holes), the union of the
  included polygons minus the union of the excluded ones, points outside the image outside; a cell's
  value is the fraction of its points inside. With ``n`` equal to the cell edge the points are the
  level-0 pixel centres, so the fraction is that of the pixels a QuPath mask export would mark;
- a mask image is resampled by **exact area overlap** (its pixels are squares of ``sy × sx`` level-0
  pixels, from its scale metadata or from its size relative to level 0).

A patch's inside fraction is the mean of its k × k cells (:func:`slidescore.core.mask.patch_fractions`,
as for the foreground); a patch is valid only when it reaches ``mask.min_inside_frac``. ``intersect``
multiplies the foreground fractions by the inside fractions (the mask written to ``mask.ome.zarr`` is
then the foreground inside the ROI) and requires both thresholds; ``replace`` uses the ROI alone.
Everything downstream (scored patches, blending, regions, area, the sample call) follows from the
valid patches, so it covers the ROI — and, as in the tile-averaging practice, the blended map also
covers the margin of kept patches that lies outside it (less than a patch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import sparse

from slidescore.config.sections import MaskConfig
from slidescore.core.mask import patch_fractions
from slidescore.core.tiling import PatchGrid
from slidescore.errors import RoiError

MAX_SAMPLES = 400_000_000  # supersampling points over the whole grid (fewer per cell on larger grids)
STRIP_SAMPLES = 8_000_000  # points rasterised at once (bounds memory to ~64 MB)
STRIP_CROSSINGS = 2_000_000  # edge crossings handled at once (~100 MB of index arrays)
MAX_CROSSINGS = 200_000_000  # in all: a hostile polygon (millions of edges each spanning the slide) is refused
FAR_FACTOR = 1.5  # coordinates beyond this many image extents are not level-0 pixels


@dataclass(frozen=True)
class RoiFeature:
    """One GeoJSON feature: its classification name and its polygons (exterior ring, then holes),
    each ring an (n, 2) float64 array of ``(x, y)`` (closed: first point = last)."""

    name: str | None
    polygons: tuple[tuple[np.ndarray, ...], ...]


@dataclass(frozen=True)
class RoiShapes:
    """Polygons of a GeoJSON: its features, the EPSG code of its ``crs`` member (``has_crs``: it had one),
    and the objects skipped (``{"detection": 3, "Point": 1}``: not area annotations)."""

    features: tuple[RoiFeature, ...]
    has_crs: bool = False
    epsg: int | None = None
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class RoiMask:
    """A raster ROI: ``inside`` (2-D bool), and its pixel size in µm (y, x) from scale metadata
    (``None``: aligned by size — its extent is the image's level 0)."""

    inside: np.ndarray
    px_um: tuple[float, float] | None = None


@dataclass(frozen=True)
class RoiSource:
    """A loaded ROI file: where from, what kind (``geojson`` / ``mask``), the SHA-256 of what was hashed
    (the file's bytes; for a TIFF / OME-Zarr mask the decoded mask) and its size — the run key includes
    the checksum — and its content."""

    uri: str
    kind: str
    sha256: str
    size_bytes: int
    content: RoiShapes | RoiMask


# Long: one pipeline of checks with the message for each (source → level-0 geometry → cells → valid).
def apply_roi(source: RoiSource, cell_fg: np.ndarray, grid: PatchGrid, *, level0_shape: tuple[int, int],
              level_downsample: float, mpp0: float, georeference: dict[str, Any] | None, mcfg: MaskConfig,
              sample_id: str) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The ROI on the cell grid, combined with the automatic mask.

    Returns ``(cell_fg, valid, record)``: the cell fractions to write as the mask, the valid patch
    positions, and the run record's ``roi`` entry (uri, kind, checksum, inside area in µm², …).
    Raises :class:`~slidescore.errors.RoiError` naming the sample and the file.
    """
    where = f"sample {sample_id!r}: ROI {source.uri}"
    cell_px0 = grid.stride_px * level_downsample
    record: dict[str, Any] = {"uri": source.uri, "kind": source.kind, "sha256": source.sha256,
                              "size_bytes": source.size_bytes, "mode": mcfg.roi_mode, "min_inside_frac": mcfg.min_inside_frac}
    if isinstance(source.content, RoiMask):
        sy, sx = mask_scale(source.content, level0_shape, mpp0, where)
        inside = raster_cell_fractions(source.content.inside, (sy, sx), grid.cells_shape, cell_px0)
        record.update(rasterised="exact area overlap", mask_shape=list(source.content.inside.shape),
                      mask_px0=[sy, sx])
    else:
        shapes = source.content
        include, exclude, names = select_features(shapes, mcfg.roi_include, mcfg.roi_exclude, where)
        crs = _crs(shapes, mcfg.roi_crs, georeference, where)
        if crs == "map" and georeference is not None:  # _crs refuses map coordinates without one
            include, exclude = map_to_pixels(include, georeference), map_to_pixels(exclude, georeference)
        check_extent(include, level0_shape, crs, georeference, where)
        n = samples_per_cell(cell_px0, grid.cells_shape)
        inside = polygon_cell_fractions(include, exclude, grid.cells_shape, cell_px0, level0_shape, n, where)
        record.update(rasterised=f"supersampled, {n}×{n} points per cell", coordinates=crs,
                      classes=names, include=list(mcfg.roi_include), exclude=list(mcfg.roi_exclude),
                      n_polygons=len(include), n_excluded=len(exclude), skipped=dict(shapes.skipped))
    cell_um2 = (cell_px0 * mpp0) ** 2
    area_um2 = float(inside.astype(np.float64).sum() * cell_um2)
    if not area_um2 > 0:
        raise RoiError(f"{where}: covers no part of the image ({level0_shape[1]}×{level0_shape[0]} level-0 px); "
                       "check that it belongs to this image and is in level-0 pixels", uri=source.uri)
    cell_fg, valid = combine(cell_fg, inside, grid, mode=mcfg.roi_mode, method=mcfg.method,
                             min_foreground_frac=mcfg.min_foreground_frac, min_inside_frac=mcfg.min_inside_frac)
    if not valid.any():
        best = float(patch_fractions(inside, grid.k, grid.patches_shape).max())
        raise RoiError(f"{where}: no patch position is at least {mcfg.min_inside_frac:g} inside the ROI (or foreground "
                       f"inside it); the best is {best:.3g} inside — lower mask.min_inside_frac, or check the ROI "
                       f"(inside area {area_um2:.4g} µm²)", uri=source.uri)
    record.update(inside_area_um2=area_um2, inside_cells=float(inside.astype(np.float64).sum()),
                  patches_valid=int(valid.sum()))
    return cell_fg, valid, record


def combine(cell_fg: np.ndarray, inside: np.ndarray, grid: PatchGrid, *, mode: str, method: str,
            min_foreground_frac: float, min_inside_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """``(cell fractions, valid patches)`` of the ROI with the automatic mask (``intersect``) or alone (``replace``)."""
    keep = patch_fractions(inside, grid.k, grid.patches_shape) >= max(min_inside_frac, 1e-6)
    if mode == "replace" or method == "none":
        return inside.astype(np.float32), keep
    fg = (cell_fg * inside).astype(np.float32)
    return fg, keep & (patch_fractions(fg, grid.k, grid.patches_shape) >= max(min_foreground_frac, 1e-6))


def select_features(shapes: RoiShapes, include: tuple[str, ...], exclude: tuple[str, ...], where: str
                    ) -> tuple[list[tuple[np.ndarray, ...]], list[tuple[np.ndarray, ...]], dict[str, int]]:
    """The polygons to include and to cut out, by classification name; ``names`` counts the features per class."""
    names: dict[str, int] = {}
    for f in shapes.features:
        key = f.name if f.name is not None else "(unclassified)"
        names[key] = names.get(key, 0) + 1
    inc = [p for f in shapes.features if (not include or f.name in include) and f.name not in exclude for p in f.polygons]
    exc = [p for f in shapes.features if f.name is not None and f.name in exclude for p in f.polygons]
    if not inc:
        found = ", ".join(f"{k!r} ({v})" for k, v in sorted(names.items())) or "none"
        skipped = f"; skipped: {shapes.skipped}" if shapes.skipped else ""
        raise RoiError(f"{where}: no polygon left after filtering (mask.roi_include {list(include)}, roi_exclude "
                       f"{list(exclude)}); its classes: {found}{skipped} — fix the class names or the file")
    return inc, exc, names


def _crs(shapes: RoiShapes, option: str, georeference: dict[str, Any] | None, where: str) -> str:
    """``pixels`` or ``map``: ``mask.roi_crs``, or (``auto``) map when the GeoJSON has a ``crs`` member."""
    crs = option if option != "auto" else ("map" if shapes.has_crs else "pixels")
    if crs == "pixels":
        return crs
    if georeference is None:
        raise RoiError(f"{where}: the ROI is in map coordinates ({'its crs member' if shapes.has_crs else 'mask.roi_crs: map'}) "
                       "but the image has no georeference (not a GeoTIFF); give the ROI in level-0 pixels "
                       "(mask.roi_crs: pixels)")
    epsg = georeference.get("epsg")
    if shapes.epsg is not None and epsg is not None and shapes.epsg != epsg:
        raise RoiError(f"{where}: the ROI's CRS is EPSG:{shapes.epsg} but the image is in EPSG:{epsg}; reproject the "
                       f"ROI to EPSG:{epsg} (e.g. ogr2ogr -t_srs EPSG:{epsg})")
    return crs


def map_to_pixels(polygons: list[tuple[np.ndarray, ...]], georeference: dict[str, Any]) -> list[tuple[np.ndarray, ...]]:
    """Map ``(easting, northing)`` rings to level-0 pixel ``(x, y)`` = (col, row) through the inverse affine."""
    a, b, c, d, e, f = (float(v) for v in georeference["affine"])
    inv = np.linalg.inv(np.array([[a, b], [d, e]], np.float64))
    return [tuple((ring - (c, f)) @ inv.T for ring in poly) for poly in polygons]


def check_extent(polygons: list[tuple[np.ndarray, ...]], level0_shape: tuple[int, int], crs: str,
                 georeference: dict[str, Any] | None, where: str) -> None:
    """Refuse polygons outside the image, or reaching so far beyond it that they are in other units."""
    pts = np.concatenate([poly[0] for poly in polygons])
    x0, y0 = pts.min(axis=0)
    x1, y1 = pts.max(axis=0)
    h, w = level0_shape
    box = f"x {x0:.6g}…{x1:.6g}, y {y0:.6g}…{y1:.6g}"
    size = f"the image is {w}×{h} level-0 px"
    far = x1 > FAR_FACTOR * w + 1 or y1 > FAR_FACTOR * h + 1 or x0 < -(FAR_FACTOR - 1) * w - 1 or y0 < -(FAR_FACTOR - 1) * h - 1
    if far and crs == "pixels":
        hint = (" (the image is a GeoTIFF: if these are its map coordinates, set mask.roi_crs: map)"
                if georeference is not None else "")
        raise RoiError(f"{where}: coordinates ({box}) reach far beyond the image ({size}): they look like µm or map "
                       f"coordinates, not level-0 pixels{hint}; export the annotations in pixels (QuPath's GeoJSON export is)")
    if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h or far:
        raise RoiError(f"{where}: the ROI ({box}{', mapped from map coordinates' if crs == 'map' else ''}) lies outside "
                       f"the image ({size}); check that it belongs to this image")


def samples_per_cell(cell_px0: float, cells_shape: tuple[int, int]) -> int:
    """Supersampling points per cell edge: the cell's edge in level-0 pixels, at most 16, fewer on huge grids."""
    n = max(1, min(16, math.ceil(cell_px0 - 1e-9)))
    cap = max(1, int(math.sqrt(MAX_SAMPLES / max(1, cells_shape[0] * cells_shape[1]))))
    return min(n, cap)


def polygon_cell_fractions(include: list[tuple[np.ndarray, ...]], exclude: list[tuple[np.ndarray, ...]],
                           cells_shape: tuple[int, int], cell_px0: float, level0_shape: tuple[int, int],
                           n: int, where: str = "ROI") -> np.ndarray:
    """Inside fraction per cell of (∪ include) ∖ (∪ exclude): ``n × n`` points per cell, at level-0
    ``((r + ½)·step, (c + ½)·step)``, ``step = cell_px0 / n``; points outside the image are outside.

    Memory is bounded by rasterising strips of cell rows holding at most :data:`STRIP_SAMPLES` points
    and :data:`STRIP_CROSSINGS` edge crossings; more than :data:`MAX_CROSSINGS` in all is refused."""
    ch, cw = cells_shape
    step = cell_px0 / n
    cols = cw * n
    inc_edges, exc_edges = _edges(include), _edges(exclude)
    per_cell_row = (_row_crossings(inc_edges, ch * n, step) + _row_crossings(exc_edges, ch * n, step)).reshape(ch, n).sum(1)
    if per_cell_row.sum() > MAX_CROSSINGS:
        raise RoiError(f"{where}: the polygons cross the sampling rows {int(per_cell_row.sum()):,} times, more than "
                       f"{MAX_CROSSINGS:,}; simplify the annotations (QuPath: Objects › Annotations › Simplify shape)")
    col_ok = (np.arange(cols) + 0.5) * step < level0_shape[1]
    out = np.zeros(cells_shape, np.float32)
    c0 = 0
    while c0 < ch:
        c1, load = c0 + 1, int(per_cell_row[c0])
        while c1 < ch and (c1 + 1 - c0) * n * cols <= STRIP_SAMPLES and load + per_cell_row[c1] <= STRIP_CROSSINGS:
            load += int(per_cell_row[c1])
            c1 += 1
        r0, r1 = c0 * n, c1 * n
        inside = _scan(inc_edges, r0, r1, cols, step)
        if exc_edges[0].size:
            inside &= ~_scan(exc_edges, r0, r1, cols, step)
        inside &= col_ok[None, :]
        inside[(np.arange(r0, r1) + 0.5) * step >= level0_shape[0]] = False
        out[c0:c1] = inside.reshape(c1 - c0, n, cw, n).mean(axis=(1, 3), dtype=np.float64)
        c0 = c1
    return out


def _row_span(seg: np.ndarray, r0: int, r1: int, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Per edge, the first and the stop sample row whose centre ``(r + ½)·step`` lies in [y_min, y_max),
    clipped to rows ``r0 … r1 − 1`` (half-open: every closed ring crosses every row an even number of times)."""
    ylo, yhi = np.minimum(seg[:, 1], seg[:, 3]), np.maximum(seg[:, 1], seg[:, 3])
    first = np.clip(np.ceil(ylo / step - 0.5), r0, r1).astype(np.int64)
    stop = np.clip(np.ceil(yhi / step - 0.5), r0, r1).astype(np.int64)
    return first, stop


def _row_crossings(edges: tuple[np.ndarray, np.ndarray], rows: int, step: float) -> np.ndarray:
    """How many edge crossings each sample row has (a difference array over the edges' row spans)."""
    seg = edges[0]
    diff = np.zeros(rows + 1, np.int64)
    if seg.size:
        first, stop = _row_span(seg, 0, rows, step)
        np.add.at(diff, first, 1)
        np.add.at(diff, stop, -1)
    return np.cumsum(diff)[:rows]


def _edges(polygons: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, np.ndarray]:
    """Every ring edge as (x0, y0, x1, y1) rows, and the index of its polygon (the even-odd rule holds per polygon)."""
    segs, owner = [], []
    for i, poly in enumerate(polygons):
        for ring in poly:
            s = np.concatenate([ring[:-1], ring[1:]], axis=1)
            segs.append(s[s[:, 1] != s[:, 3]])  # horizontal edges cross no row centre
            owner.append(np.full(len(segs[-1]), i, np.int64))
    if not segs:
        return np.zeros((0, 4)), np.zeros(0, np.int64)
    return np.concatenate(segs), np.concatenate(owner)


def _scan(edges: tuple[np.ndarray, np.ndarray], r0: int, r1: int, cols: int, step: float) -> np.ndarray:
    """Points inside the union of the polygons, rows ``r0 … r1 − 1`` of the sample grid (scanline, even-odd)."""
    seg, owner = edges
    out = np.zeros((r1 - r0, cols), bool)
    if not seg.size:
        return out
    first, stop = _row_span(seg, r0, r1, step)
    counts = stop - first
    keep = counts > 0
    if not keep.any():
        return out
    seg, owner, first, counts = seg[keep], owner[keep], first[keep], counts[keep]
    idx = np.repeat(np.arange(len(seg)), counts)
    offsets = np.arange(idx.size) - np.repeat(np.cumsum(counts) - counts, counts)
    rows = first[idx] + offsets
    yc = (rows + 0.5) * step
    x0, y0, x1, y1 = seg[idx, 0], seg[idx, 1], seg[idx, 2], seg[idx, 3]
    xc = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)
    order = np.lexsort((xc, rows, owner[idx]))
    rows, xc = rows[order], xc[order]
    # per (polygon, row) the crossings come in pairs: [1st, 2nd), [3rd, 4th), … are inside
    start = np.clip(np.ceil(xc[0::2] / step - 0.5), 0, cols).astype(np.int64)
    end = np.clip(np.ceil(xc[1::2] / step - 0.5), 0, cols).astype(np.int64)
    r = rows[0::2] - r0
    diff = np.zeros((r1 - r0, cols + 1), np.int32)
    np.add.at(diff, (r, start), 1)
    np.add.at(diff, (r, end), -1)
    return np.cumsum(diff, axis=1)[:, :cols] > 0


def mask_scale(mask: RoiMask, level0_shape: tuple[int, int], mpp0: float, where: str) -> tuple[float, float]:
    """Level-0 pixels per mask pixel (y, x): from the mask's µm scale, else from its size (same aspect as level 0)."""
    h, w = mask.inside.shape
    H, W = level0_shape
    if mask.px_um is not None:
        return mask.px_um[0] / mpp0, mask.px_um[1] / mpp0
    sy, sx = H / h, W / w
    f = round((sy + sx) / 2)
    if f >= 1 and abs(math.ceil(H / f) - h) <= 1 and abs(math.ceil(W / f) - w) <= 1:
        return float(f), float(f)  # a mask exported at an integer downsample (rows and columns rounded)
    if abs(sy - sx) > 0.01 * max(sy, sx):
        raise RoiError(f"{where}: the mask image is {w}×{h} px, not the aspect of the image's level 0 ({W}×{H} px), "
                       "so it cannot be aligned by its size; export the mask of the whole image (any downsample), "
                       "or as OME-Zarr with its pixel size")
    return sy, sx


def raster_cell_fractions(inside: np.ndarray, px0: tuple[float, float], cells_shape: tuple[int, int],
                          cell_px0: float) -> np.ndarray:
    """Inside fraction per cell of a mask whose pixels are ``px0`` = (sy, sx) level-0 pixels: exact area overlap."""
    ry = _overlap(cells_shape[0], cell_px0, inside.shape[0], px0[0])
    rx = _overlap(cells_shape[1], cell_px0, inside.shape[1], px0[1])
    out = np.zeros(cells_shape, np.float64)
    rows = max(1, STRIP_SAMPLES // max(1, inside.shape[1]))
    for y in range(0, inside.shape[0], rows):
        strip = inside[y : y + rows].astype(np.float32)
        out += ry[:, y : y + rows] @ np.asarray((rx @ strip.T).T)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _overlap(n_dst: int, dst_px: float, n_src: int, src_px: float) -> sparse.csr_matrix:
    """R[i, m] = |[i·dst, (i+1)·dst) ∩ [m·src, (m+1)·src)| / dst, vectorised."""
    a = np.arange(n_dst) * dst_px
    b = a + dst_px
    m0 = np.clip(np.floor(a / src_px), 0, n_src).astype(np.int64)
    m1 = np.clip(np.ceil(b / src_px), 0, n_src).astype(np.int64)
    counts = np.maximum(m1 - m0, 0)
    rows = np.repeat(np.arange(n_dst), counts)
    cols = np.repeat(m0, counts) + np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)
    ov = np.minimum(b[rows], (cols + 1) * src_px) - np.maximum(a[rows], cols * src_px)
    ok = ov > 0
    return sparse.csr_matrix((ov[ok] / dst_px, (rows[ok], cols[ok])), shape=(n_dst, n_src))
