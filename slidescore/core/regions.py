"""Suspect regions: threshold the probability map, label connected components, measure, rank.

Works on the stitched cell-resolution map (never on blocks, so regions do not depend on block
boundaries). Coordinates are reported in level-0 pixels of the source image and in µm; the
conversion is given by the caller as ``cell_px0`` (level-0 pixels per cell) and ``mpp0`` (µm per
level-0 pixel). Each region also carries its thresholded outline (:class:`Outline`), traced along the
cell edges, so its polygon area is exactly ``area_um2``. Also builds the QuPath-importable GeoJSON
FeatureCollection (pure data) and, for georeferenced images (GeoTIFF), map coordinates and a second
GeoJSON in the image's CRS.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True, eq=False)
class Outline:
    """A region's thresholded outline, traced exactly along the edges of its cells (:func:`trace_outlines`).

    ``parts``: one polygon per 4-connected piece of the region (an 8-connected region whose cells
    touch only at a corner has several), each a tuple of rings: the exterior ring, then its holes.
    A ring is an int32 ``(n, 2)`` array of ``(x, y) = (column, row)`` cell-grid vertices: vertex
    ``(x, y)`` is the corner of level-0 pixel ``(x·c, y·c)``, ``c = cell_px0`` (cell (i, j) covers
    level-0 rows ``[i·c, (i+1)·c)`` and columns ``[j·c, (j+1)·c)``). Rings are open (the first vertex
    is not repeated; :meth:`geometry` closes them) and hold corners only (straight runs merged).

    Orientation, in ``(x, y)`` as written (the RFC 7946 right-hand rule applied to the numbers, as
    GeoJSON validators check it): exterior rings counter-clockwise (positive shoelace area), holes
    clockwise (negative). On screen, with the image's y axis pointing down, the same exterior ring
    appears clockwise.

    Every ring is simple (no vertex visited twice) and parts meet at most at single vertices, so the
    geometry is valid under OGC/JTS rules (QuPath's geometry model): where two cells of a region
    touch only at a corner they become two parts of a MultiPolygon; a polygon passing through the
    shared vertex twice would be a self-touching ring, which JTS reports invalid.
    """

    parts: tuple[tuple[np.ndarray, ...], ...]
    cell_px0: float

    @property
    def n_holes(self) -> int:
        return sum(len(p) - 1 for p in self.parts)

    @property
    def n_vertices(self) -> int:
        """Distinct vertices over all rings (a ring of n corners is written with n + 1 points, closed)."""
        return sum(len(r) for p in self.parts for r in p)

    def area_cells(self) -> int:
        """Shoelace area in cells (holes subtracted): the region's cell count."""
        return sum(_ring_area2(r) for p in self.parts for r in p) // 2

    def summary(self) -> dict[str, int]:
        """What ``regions.json`` records of the outline (the polygons themselves are in ``regions.geojson``)."""
        return {"parts": len(self.parts), "holes": self.n_holes, "vertices": self.n_vertices}

    def geometry(self, affine: list[float] | tuple[float, ...] | None = None) -> dict[str, Any]:
        """The GeoJSON geometry: level-0 pixel ``(x, y)``, or map coordinates through ``affine``
        (level-0 pixel → map, ``[a, b, c, d, e, f]``; rings reversed when it mirrors, so the
        orientation rule holds in the map CRS too). A ``Polygon`` for one part, else ``MultiPolygon``."""
        c = float(self.cell_px0)
        flip = False
        if affine is not None:
            a, b, _, d, e, _ = affine
            flip = a * e - b * d < 0
        polys = []
        for part in self.parts:
            rings = []
            for ring in part:
                xy = ring.astype(np.float64) * c
                if affine is not None:
                    xy = np.stack([affine[0] * xy[:, 0] + affine[1] * xy[:, 1] + affine[2],
                                   affine[3] * xy[:, 0] + affine[4] * xy[:, 1] + affine[5]], axis=1)
                if flip:
                    xy = xy[::-1]
                pts = xy.tolist()
                rings.append(pts + pts[:1])
            polys.append(rings)
        if len(polys) == 1:
            return {"type": "Polygon", "coordinates": polys[0]}
        return {"type": "MultiPolygon", "coordinates": polys}


def _ring_area2(ring: np.ndarray) -> int:
    """Twice the signed shoelace area of an open ring of (x, y) vertices (positive: counter-clockwise)."""
    x, y = ring[:, 0].astype(np.int64), ring[:, 1].astype(np.int64)
    return int(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


# direction codes of unit cell edges: 0 = +x, 1 = +y, 2 = −x, 3 = −y; (dx, dy) of each
_DX = np.array([1, 0, -1, 0])
_DY = np.array([0, 1, 0, -1])
# start vertex of a cell's edge of each direction, relative to the cell's top-left corner:
# top edge (cell above empty) runs +x, right edge +y, bottom edge −x, left edge −y, so the cell lies
# on the left of its edges in (x, y) with y taken upwards: exterior rings come out counter-clockwise
_SX = np.array([0, 1, 1, 0])
_SY = np.array([0, 0, 1, 1])


def trace_outline(mask: np.ndarray) -> tuple[tuple[np.ndarray, ...], ...]:
    """The outline of the cells of ``mask`` (2-D bool), as :attr:`Outline.parts` in its vertex
    coordinates (vertex ``(x, y)`` = top-left corner of cell ``(y, x)``); see :func:`trace_outlines`."""
    m = np.asarray(mask, bool)
    return trace_outlines(m.astype(np.int32), 1)[0] if m.any() else ()


# Long on purpose: one vectorised pass over the label image, then one linear walk of the edges; split, the
# edge arrays would have to be handed between functions that mean nothing alone.
def trace_outlines(labels: np.ndarray, n: int) -> list[tuple[tuple[np.ndarray, ...], ...]]:
    """The outlines of regions 1..n of a label image (0: no region), in its cell-grid vertex coordinates.

    Returns :attr:`Outline.parts` of each label (vertex ``(x, y)`` = top-left corner of cell
    ``(y, x)``). One vectorised pass over the image for all regions at once (numpy), then one Python
    step per boundary edge to order the rings: linear in the image plus the total boundary length,
    with no per-region numpy calls (a slide may hold 10⁵ regions).

    Every boundary cell edge is directed with its cell on the left; each edge is followed by the
    edge leaving its end vertex. Only at a vertex where two cells touch diagonally (the two others
    empty) there are two choices: crossing over to the other cell when both lie in one 4-connected
    piece (its boundary then goes around the empty cells separately: a hole touching the exterior at
    that vertex) and otherwise turning back onto the same cell (the two pieces become separate parts
    meeting at the vertex). Then every ring is simple and bounds exactly one 4-connected piece, and a
    region's parts are its 4-connected pieces whatever connectivity made it one region. Two regions
    never share an edge (they would be one component), so the regions' edges never mix.
    """
    h, w = labels.shape
    m = labels > 0
    p = np.zeros((h + 2, w + 2), bool)
    p[1:-1, 1:-1] = m
    # boundary edges: a cell's top, right, bottom, left edge (directions 0..3) with no cell beyond it;
    # np.nonzero lists each direction's edges in raster order, so their start vertices come sorted
    found = [np.nonzero(m & ~p[:-2, 1:-1]), np.nonzero(m & ~p[1:-1, 2:]), np.nonzero(m & ~p[2:, 1:-1]),
             np.nonzero(m & ~p[1:-1, :-2])]
    cr = np.concatenate([f[0] for f in found])  # each edge's cell (row, column)
    cc = np.concatenate([f[1] for f in found])
    d = np.repeat(np.arange(4), [len(f[0]) for f in found])
    n_edges = len(d)
    out: list[tuple[tuple[np.ndarray, ...], ...]] = [()] * n
    if n_edges == 0:
        return out
    sx, sy = cc + _SX[d], cr + _SY[d]  # start vertex
    n_vertices = (h + 1) * (w + 1)
    keys = d * n_vertices + sy * (w + 1) + sx  # sorted: by direction, then start vertex in raster order
    end = (sy + _DY[d]) * (w + 1) + sx + _DX[d]

    def leaving(direction: np.ndarray) -> np.ndarray:
        """The edge of that direction leaving each edge's end vertex, or −1."""
        q = direction * n_vertices + end
        i = np.minimum(np.searchsorted(keys, q), n_edges - 1)
        return np.where(keys[i] == q, i, -1)

    left, straight, right = leaving((d + 1) % 4), leaving(d), leaving((d + 3) % 4)
    nxt = np.where(left >= 0, left, np.where(straight >= 0, straight, right))
    diagonal = np.flatnonzero((left >= 0) & (right >= 0))
    pieces = labels
    if diagonal.size:  # only then can a region have several 4-connected pieces
        pieces = ndimage.label(m)[0]  # 4-connected
        other = right[diagonal]
        same = pieces[cr[diagonal], cc[diagonal]] == pieces[cr[other], cc[other]]
        nxt[diagonal[same]] = other[same]
    # order the edges ring by ring: one step per edge
    follow = nxt.tolist()
    seen = bytearray(n_edges)
    order: list[int] = []
    starts: list[int] = []
    for s in range(n_edges):
        if seen[s]:
            continue
        starts.append(len(order))
        e = s
        while not seen[e]:
            seen[e] = 1
            order.append(e)
            e = follow[e]
    ordered = np.asarray(order)
    bounds = np.asarray(starts + [n_edges])
    # a ring's vertices: the start of every edge whose direction differs from the previous edge's
    prev = np.arange(-1, n_edges - 1)
    prev[bounds[:-1]] = bounds[1:] - 1
    corner = d[ordered] != d[ordered[prev]]
    pos = np.flatnonzero(corner)
    vx, vy = sx[ordered[pos]], sy[ordered[pos]]
    counts = np.diff(np.searchsorted(pos, bounds))  # corners per ring (≥ 4)
    first = np.cumsum(counts) - counts
    following = np.arange(1, len(pos) + 1)
    following[first + counts - 1] = first
    area2 = np.add.reduceat(vx * vy[following] - vx[following] * vy, first)  # > 0: exterior, < 0: hole
    head = ordered[bounds[:-1]]  # each ring's first edge
    region, piece = labels[cr[head], cc[head]], pieces[cr[head], cc[head]]
    rank = np.lexsort((area2 < 0, piece, region))  # by region, piece, exterior first (stable: found order)
    xy = np.stack([vx, vy], axis=1).astype(np.int32)
    rings = np.split(xy, first[1:])
    exterior, owner = (area2 > 0).tolist(), region.tolist()
    parts: list[list[np.ndarray]] = []
    for g, g_next in zip(rank.tolist(), rank[1:].tolist() + [-1], strict=True):
        if exterior[g]:
            parts.append([rings[g]])
        else:
            parts[-1].append(rings[g])
        if g_next < 0 or owner[g_next] != owner[g]:
            out[owner[g] - 1] = tuple(tuple(q) for q in parts)
            parts = []
    return out


@dataclass(frozen=True)
class Region:
    """One suspect region. Boxes are ``(y, x, h, w)``; points are ``(y, x)``; ``outline``: its
    thresholded outline (None for a region built without one: its box stands in)."""

    rank: int
    class_name: str
    class_index: int
    peak_probability: float
    mean_probability: float
    n_cells: int
    area_um2: float
    bbox_px: tuple[float, float, float, float]
    centroid_px: tuple[float, float]
    peak_px: tuple[float, float]
    bbox_um: tuple[float, float, float, float]
    centroid_um: tuple[float, float]
    threshold: float
    image: str = ""
    # map coordinates (georeferenced images only): centroid and (min_x, min_y, max_x, max_y) in CRS units
    centroid_map_x: float | None = None
    centroid_map_y: float | None = None
    bbox_map: tuple[float, float, float, float] | None = None
    # the cells' outline (arrays: left out of comparisons; the measurements above identify a region)
    outline: Outline | None = field(default=None, compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """The measurements as JSON values; of the outline only its counts (:meth:`Outline.summary`)."""
        # the fields are flat (numbers, strings, tuples of numbers): no deep copy (asdict) needed
        d = {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}
        d["outline"] = None if self.outline is None else self.outline.summary()
        return d


def find_regions(
    prob: np.ndarray,
    class_names: list[str] | tuple[str, ...],
    thresholds: list[float] | tuple[float, ...],
    *,
    cell_px0: float,
    mpp0: float,
    min_area_um2: float = 0.0,
    connectivity: int = 2,
    image: str = "",
    outlines: bool = True,
) -> list[Region]:
    """All regions of all classes, ranked by peak then mean probability then area (rank 1 = top).

    ``prob`` is (C, H, W) with NaN for cells not scored (never part of a region). A cell belongs
    to class c's regions when ``prob[c] >= thresholds[c]``. A region's peak is its first cell (in
    raster order) holding its highest probability. With ``outlines`` each region carries its
    :class:`Outline`, all of a window's regions traced in one pass over its label image
    (:func:`trace_outlines`; callers that need only the measurements, such as threshold sweeps,
    may skip it).

    Memory follows the regions, not the canvas: each class's map is cut into row windows that hold
    whole components (:func:`_windows`); one window's rows at a time are copied, cropped to the
    columns holding cells above the threshold, labelled and traced. The windows are taken
    top to bottom, so the regions come in the order of a labelling of the whole map, and every
    figure and outline is the one a whole-map pass gives (``tests/test_regions_memory.py``).
    """
    prob = np.asarray(prob)
    structure = ndimage.generate_binary_structure(2, connectivity)
    found: list[dict[str, Any]] = []
    for ci, name in enumerate(class_names):
        common = dict(class_name=name, class_index=ci, threshold=float(thresholds[ci]), image=image)
        for r0, r1 in _windows(prob[ci], thresholds[ci]):
            p, fg = _above(prob[ci], thresholds[ci], r0, r1)
            cols = np.flatnonzero(fg.any(axis=0))
            c0, c1 = int(cols[0]), int(cols[-1]) + 1
            found += _window_regions(p[:, c0:c1], fg[:, c0:c1], (r0, c0), structure, common, cell_px0=cell_px0, mpp0=mpp0,
                                     min_area_um2=min_area_um2, outlines=outlines)
    return rank_regions(found)


# cells of a class's map that find_regions copies and labels at a time, unless one component's rows
# hold more (1 Mi cells: 4 MB of float32 for the copy, 4 MB of int32 labels)
_WINDOW_CELLS = 1 << 20


def _above(prob_c: np.ndarray, threshold: float, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``r0:r1`` of one class's map with NaN as 0 (a copy), and its cells at or above the threshold."""
    p = np.nan_to_num(prob_c[r0:r1], nan=0.0)
    return p, p >= threshold


def _windows(prob_c: np.ndarray, threshold: float) -> list[tuple[int, int]]:
    """Row ranges ``(r0, r1)``, top to bottom, that hold whole components of the cells at or above the threshold.

    A component never crosses a row without such cells (under either connectivity), so the runs of
    rows holding some are cut there; consecutive runs are joined while the range stays within
    :data:`_WINDOW_CELLS` (a longer run is one range). Surveyed in bands: nothing canvas-sized."""
    h, w = prob_c.shape
    if h == 0 or w == 0:
        return []
    step = max(1, _WINDOW_CELLS // w)
    rows = np.concatenate([_above(prob_c, threshold, r0, min(h, r0 + step))[1].any(axis=1) for r0 in range(0, h, step)])
    edges = np.flatnonzero(np.diff(np.concatenate([[0], rows.astype(np.int8), [0]])))
    out: list[tuple[int, int]] = []
    for r0, r1 in zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True):
        if out and (r1 - out[-1][0]) * w <= _WINDOW_CELLS:
            out[-1] = (out[-1][0], r1)
        else:
            out.append((r0, r1))
    return out


def _window_regions(p: np.ndarray, fg: np.ndarray, origin: tuple[int, int], structure: np.ndarray, common: dict[str, Any], *,
                    cell_px0: float, mpp0: float, min_area_um2: float, outlines: bool) -> list[dict[str, Any]]:
    """The regions of one window (``p`` its values, ``fg`` its cells above the threshold; ``origin``
    its top-left cell in the map), measured in map coordinates, in their raster order."""
    labels, n = ndimage.label(fg, structure=structure)
    if n == 0:
        return []
    y0, x0 = origin
    # per-region measurements in one pass over the labelled cells (bincount and one sort, not one scan
    # of the window per statistic): count, mean, centroid, first cell of the peak. Sums run over the
    # cells in raster order and in map coordinates, as over the whole map: the same float64 sums.
    cells = np.flatnonzero(labels)
    lab = labels.ravel()[cells]
    val = p.ravel()[cells].astype(np.float64)
    counts = np.bincount(lab, minlength=n + 1)[1:]
    means = np.bincount(lab, weights=val, minlength=n + 1)[1:] / counts
    ys, xs = np.divmod(cells, p.shape[1])
    ys += y0
    xs += x0
    cys = np.bincount(lab, weights=ys, minlength=n + 1)[1:] / counts
    cxs = np.bincount(lab, weights=xs, minlength=n + 1)[1:] / counts
    order = np.lexsort((-val, lab))  # by region, then value descending; stable: ties in raster order
    top = order[np.searchsorted(lab[order], np.arange(1, n + 1))]
    peaks, peak_y, peak_x = val[top], ys[top], xs[top]
    # bounding boxes (every label 1..n has cells), then the regions large enough, as Python numbers
    bb = np.array([(sl[0].start + y0, sl[1].start + x0, sl[0].stop + y0, sl[1].stop + x0) for sl in ndimage.find_objects(labels)],
                  np.float64)
    areas = counts * (cell_px0 * mpp0) ** 2
    keep = np.flatnonzero(areas >= min_area_um2)
    boxes = np.stack([bb[:, 0], bb[:, 1], bb[:, 2] - bb[:, 0], bb[:, 3] - bb[:, 1]], axis=1) * cell_px0
    cents = np.stack([cys + 0.5, cxs + 0.5], axis=1) * cell_px0
    peak_pts = np.stack([peak_y + 0.5, peak_x + 0.5], axis=1) * cell_px0
    columns = zip(peaks[keep].tolist(), means[keep].tolist(), counts[keep].tolist(), areas[keep].tolist(),
                  boxes[keep].tolist(), cents[keep].tolist(), peak_pts[keep].tolist(), (boxes[keep] * mpp0).tolist(),
                  (cents[keep] * mpp0).tolist(), strict=True)
    traced: list[Outline | None] = [None] * len(keep)
    if outlines:  # every kept region traced at once (the others' cells left out), then moved to map vertices
        if len(keep) < n:
            wanted = np.zeros(n + 1, bool)
            wanted[keep + 1] = True
            labels[~wanted[labels]] = 0
        shift = np.array([x0, y0], np.int32)
        all_parts = trace_outlines(labels, n)
        traced = [Outline(tuple(tuple(ring + shift for ring in part) for part in all_parts[k]), float(cell_px0))
                  for k in keep.tolist()]
    return [dict(common, peak_probability=pk, mean_probability=mean, n_cells=int(cnt), area_um2=float(area), bbox_px=tuple(box),
                 centroid_px=tuple(cen), peak_px=tuple(pt), bbox_um=tuple(box_um), centroid_um=tuple(cen_um), outline=outline)
            for (pk, mean, cnt, area, box, cen, pt, box_um, cen_um), outline in zip(columns, traced, strict=True)]


def rank_key(peak: float, mean: float, area_um2: float, bbox_px: tuple[float, ...], image_index: int = 0) -> tuple[Any, ...]:
    """The one ranking rule: peak, mean, area (descending); ties by image order, then raster order of the box."""
    return (-peak, -mean, -area_um2, image_index, tuple(bbox_px))


def rank_regions(found: list[dict[str, Any]]) -> list[Region]:
    """Sort region measurements by :func:`rank_key` and number them from 1."""
    order = sorted(found, key=lambda r: rank_key(r["peak_probability"], r["mean_probability"], r["area_um2"], r["bbox_px"]))
    return [Region(rank=i + 1, **r) for i, r in enumerate(order)]


def rank_across_images(per_image: list[list[Region]]) -> list[Region]:
    """Rank the regions of several images together by :func:`rank_key` and number them from 1."""
    keyed = [(rank_key(r.peak_probability, r.mean_probability, r.area_um2, r.bbox_px, i), r)
             for i, rs in enumerate(per_image) for r in rs]
    return [replace(r, rank=n + 1) for n, (_, r) in enumerate(sorted(keyed, key=lambda kr: kr[0]))]


def regions_geojson(regions: list[Region], colors: dict[str, tuple[int, int, int]], sample_id: str) -> dict[str, Any]:
    """A FeatureCollection QuPath imports: level-0 pixel polygons, annotation objects.

    Each feature's geometry is the region's outline (:meth:`Outline.geometry`: a ``Polygon`` with
    its holes as interior rings, or a ``MultiPolygon`` when cells of an 8-connected region touch only
    at a corner; closed rings, exterior counter-clockwise in (x, y), holes clockwise), so its area
    is ``area_um2``; a region without an outline gets its bounding box. Properties: ``objectType``
    ``annotation``, a ``classification`` with name and RGB colour, numeric ``measurements``, and
    ``bbox_px`` (y, x, h, w; QuPath ignores it). IDs are deterministic UUIDs (sample, rank), so a
    rerun writes identical files.
    """
    features = []
    for r in regions:
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"slidescore:{sample_id}:{r.image}:{r.rank}")),
                "geometry": (r.outline if r.outline is not None else _box_outline(r.bbox_px)).geometry(),
                "properties": {
                    "objectType": "annotation",
                    "name": f"{r.class_name} #{r.rank}",
                    "classification": {"name": r.class_name, "color": list(colors.get(r.class_name, (255, 0, 0)))},
                    "isLocked": False,
                    "bbox_px": list(r.bbox_px),
                    "measurements": {
                        "rank": float(r.rank),
                        "peak_probability": r.peak_probability,
                        "mean_probability": r.mean_probability,
                        "area_um2": r.area_um2,
                        "threshold": r.threshold,
                    },
                },
            }
        )
    return {"type": "FeatureCollection", "features": features}


def _box_outline(bbox_px: tuple[float, float, float, float]) -> Outline:
    """What stands in for a region built without an outline: its box (one ring in level-0 px, counter-clockwise)."""
    y, x, h, w = bbox_px
    return Outline(((np.array([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], np.float64),),), 1.0)


def _to_map(affine: list[float] | tuple[float, ...], y_px: float, x_px: float) -> tuple[float, float]:
    a, b, c, d, e, f = affine
    return a * x_px + b * y_px + c, d * x_px + e * y_px + f


def georeference_regions(regions: list[Region], georeference: dict[str, Any]) -> list[Region]:
    """The regions with map coordinates: ``affine`` (level-0 pixel → map, ``[a, b, c, d, e, f]``) applied."""
    affine = georeference["affine"]
    out = []
    for r in regions:
        mx, my = _to_map(affine, *r.centroid_px)
        corners = [_to_map(affine, y, x) for y, x in _bbox_corners(r.bbox_px)]
        xs, ys = [p[0] for p in corners], [p[1] for p in corners]
        out.append(dataclasses.replace(r, centroid_map_x=mx, centroid_map_y=my, bbox_map=(min(xs), min(ys), max(xs), max(ys))))
    return out


def _bbox_corners(bbox_px: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    y, x, h, w = bbox_px
    return [(y, x), (y, x + w), (y + h, x + w), (y + h, x), (y, x)]


def regions_map_geojson(regions: list[Region], georeference: dict[str, Any], sample_id: str) -> dict[str, Any]:
    """A FeatureCollection in the image's map CRS (GIS tools): each region's outline (or, without
    one, its box) mapped through the affine, rings reversed where the affine mirrors (north-up
    images) so exteriors stay counter-clockwise in (easting, northing).

    Coordinates are (x, y) = (easting, northing) in the CRS's units; a ``crs`` member names the EPSG
    code (the GeoJSON 2008 form GDAL and QGIS read; RFC 7946 readers assume WGS 84 without it).
    """
    affine = georeference["affine"]
    unit_um = _UNIT_UM.get(str(georeference.get("units")))
    features = []
    for r in regions:
        geometry = (r.outline if r.outline is not None else _box_outline(r.bbox_px)).geometry(affine)
        cx, cy = _to_map(affine, *r.centroid_px)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"slidescore:{sample_id}:{r.image}:{r.rank}:map")),
            "geometry": geometry,
            "properties": {"rank": r.rank, "class_name": r.class_name, "peak_probability": r.peak_probability,
                           "mean_probability": r.mean_probability, "area_um2": r.area_um2,
                           "area_map_units2": r.area_um2 / unit_um**2 if unit_um else None,
                           "centroid_map_x": cx, "centroid_map_y": cy, "threshold": r.threshold, "image": r.image},
        })
    gj: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if georeference.get("epsg"):
        gj["crs"] = {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{georeference['epsg']}"}}
    return gj


_UNIT_UM = {"metre": 1e6, "foot": 0.3048e6, "US survey foot": 1200 / 3937 * 1e6, "kilometre": 1e9, "nautical mile": 1852e6}
