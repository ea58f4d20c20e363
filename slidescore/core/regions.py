"""Suspect regions: threshold the probability map, label connected components, measure, rank.

Works on the stitched cell-resolution map (never on blocks, so regions do not depend on block
boundaries). Coordinates are reported in level-0 pixels of the source image and in µm; the
conversion is given by the caller as ``cell_px0`` (level-0 pixels per cell) and ``mpp0`` (µm per
level-0 pixel). Also builds the QuPath-importable GeoJSON FeatureCollection (pure data) and, for
georeferenced images (GeoTIFF), map coordinates and a second GeoJSON in the image's CRS.
"""

from __future__ import annotations

import dataclasses
import uuid
from dataclasses import dataclass, fields, replace
from typing import Any

import numpy as np
from scipy import ndimage


@dataclass(frozen=True)
class Region:
    """One suspect region. Boxes are ``(y, x, h, w)``; points are ``(y, x)``."""

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

    def to_dict(self) -> dict[str, Any]:
        # the fields are flat (numbers, strings, tuples of numbers): no deep copy (asdict) needed
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}


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
) -> list[Region]:
    """All regions of all classes, ranked by peak then mean probability then area (rank 1 = top).

    ``prob`` is (C, H, W) with NaN for cells not scored (never part of a region). A cell belongs
    to class c's regions when ``prob[c] >= thresholds[c]``. A region's peak is its first cell (in
    raster order) holding its highest probability.
    """
    structure = ndimage.generate_binary_structure(2, connectivity)
    cell_area_um2 = (cell_px0 * mpp0) ** 2
    found: list[dict[str, Any]] = []
    for ci, name in enumerate(class_names):
        p = np.nan_to_num(prob[ci], nan=0.0)
        labels, n = ndimage.label(p >= thresholds[ci], structure=structure)
        if n == 0:
            continue
        # per-region measurements in one pass over the labelled cells (bincount and one sort, not
        # one scan of the map per statistic): count, mean, centroid, first cell of the peak
        cells = np.flatnonzero(labels)
        lab = labels.ravel()[cells]
        val = p.ravel()[cells].astype(np.float64)
        counts = np.bincount(lab, minlength=n + 1)[1:]
        means = np.bincount(lab, weights=val, minlength=n + 1)[1:] / counts
        ys, xs = np.divmod(cells, p.shape[1])
        cys = np.bincount(lab, weights=ys, minlength=n + 1)[1:] / counts
        cxs = np.bincount(lab, weights=xs, minlength=n + 1)[1:] / counts
        order = np.lexsort((-val, lab))  # by region, then value descending; stable: ties in raster order
        top = order[np.searchsorted(lab[order], np.arange(1, n + 1))]
        peaks, peak_y, peak_x = val[top], ys[top], xs[top]
        # bounding boxes (every label 1..n has cells), then the regions large enough, as Python numbers
        bb = np.array([(sl[0].start, sl[1].start, sl[0].stop, sl[1].stop) for sl in ndimage.find_objects(labels)], np.float64)
        areas = counts * cell_area_um2
        keep = np.flatnonzero(areas >= min_area_um2)
        boxes = np.stack([bb[:, 0], bb[:, 1], bb[:, 2] - bb[:, 0], bb[:, 3] - bb[:, 1]], axis=1) * cell_px0
        cents = np.stack([cys + 0.5, cxs + 0.5], axis=1) * cell_px0
        peak_pts = np.stack([peak_y + 0.5, peak_x + 0.5], axis=1) * cell_px0
        columns = zip(peaks[keep].tolist(), means[keep].tolist(), counts[keep].tolist(), areas[keep].tolist(),
                      boxes[keep].tolist(), cents[keep].tolist(), peak_pts[keep].tolist(), (boxes[keep] * mpp0).tolist(),
                      (cents[keep] * mpp0).tolist(), strict=True)
        thr = float(thresholds[ci])
        found += [dict(class_name=name, class_index=ci, peak_probability=pk, mean_probability=mean, n_cells=int(cnt),
                       area_um2=float(area), bbox_px=tuple(box), centroid_px=tuple(cen), peak_px=tuple(pt), bbox_um=tuple(box_um),
                       centroid_um=tuple(cen_um), threshold=thr, image=image)
                  for pk, mean, cnt, area, box, cen, pt, box_um, cen_um in columns]
    return rank_regions(found)


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

    Each feature has a closed rectangular ring (the region's bounding box), ``objectType``
    ``annotation``, a ``classification`` with name and RGB colour, and numeric ``measurements``.
    IDs are deterministic UUIDs (sample, rank), so a rerun writes identical files.
    """
    features = []
    for r in regions:
        y, x, h, w = r.bbox_px
        ring = [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]]
        features.append(
            {
                "type": "Feature",
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"slidescore:{sample_id}:{r.image}:{r.rank}")),
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"{r.class_name} #{r.rank}",
                    "classification": {"name": r.class_name, "color": list(colors.get(r.class_name, (255, 0, 0)))},
                    "isLocked": False,
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
    """A FeatureCollection in the image's map CRS (GIS tools): each region's box mapped through the affine.

    Coordinates are (x, y) = (easting, northing) in the CRS's units; a ``crs`` member names the EPSG
    code (the GeoJSON 2008 form GDAL and QGIS read; RFC 7946 readers assume WGS 84 without it).
    """
    affine = georeference["affine"]
    unit_um = _UNIT_UM.get(str(georeference.get("units")))
    features = []
    for r in regions:
        ring = [list(_to_map(affine, y, x)) for y, x in _bbox_corners(r.bbox_px)]
        cx, cy = _to_map(affine, *r.centroid_px)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"slidescore:{sample_id}:{r.image}:{r.rank}:map")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
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
