"""Suspect regions: threshold the probability map, label connected components, measure, rank.

Works on the stitched cell-resolution map (never on blocks, so regions do not depend on block
boundaries). Coordinates are reported in level-0 pixels of the source image and in µm; the
conversion is given by the caller as ``cell_px0`` (level-0 pixels per cell) and ``mpp0`` (µm per
level-0 pixel). Also builds the QuPath-importable GeoJSON FeatureCollection (pure data).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass
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

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


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
    to class c's regions when ``prob[c] >= thresholds[c]``.
    """
    structure = ndimage.generate_binary_structure(2, connectivity)
    cell_area_um2 = (cell_px0 * mpp0) ** 2
    found: list[dict[str, Any]] = []
    for ci, name in enumerate(class_names):
        p = np.nan_to_num(prob[ci], nan=0.0)
        labels, n = ndimage.label(p >= thresholds[ci], structure=structure)
        if n == 0:
            continue
        idx = np.arange(1, n + 1)
        counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        peaks = ndimage.maximum(p, labels, idx)
        peak_pos = ndimage.maximum_position(p, labels, idx)
        means = ndimage.mean(p, labels, idx)
        centroids = ndimage.center_of_mass(np.ones_like(p), labels, idx)
        for j, sl in enumerate(ndimage.find_objects(labels)):
            if sl is None:
                continue
            area = float(counts[j]) * cell_area_um2
            if area < min_area_um2:
                continue
            y0, y1, x0, x1 = sl[0].start, sl[0].stop, sl[1].start, sl[1].stop
            bbox = (y0 * cell_px0, x0 * cell_px0, (y1 - y0) * cell_px0, (x1 - x0) * cell_px0)
            cy, cx = ((centroids[j][0] + 0.5) * cell_px0, (centroids[j][1] + 0.5) * cell_px0)
            py, px = ((peak_pos[j][0] + 0.5) * cell_px0, (peak_pos[j][1] + 0.5) * cell_px0)
            found.append(
                dict(
                    class_name=name,
                    class_index=ci,
                    peak_probability=float(peaks[j]),
                    mean_probability=float(means[j]),
                    n_cells=int(counts[j]),
                    area_um2=area,
                    bbox_px=tuple(float(v) for v in bbox),
                    centroid_px=(float(cy), float(cx)),
                    peak_px=(float(py), float(px)),
                    bbox_um=tuple(float(v) * mpp0 for v in bbox),
                    centroid_um=(float(cy) * mpp0, float(cx) * mpp0),
                    threshold=float(thresholds[ci]),
                    image=image,
                )
            )
    return rank_regions(found)


def rank_regions(found: list[dict[str, Any]]) -> list[Region]:
    """Sort region measurements (peak, mean, area; descending) and number them from 1."""
    order = sorted(found, key=lambda r: (-r["peak_probability"], -r["mean_probability"], -r["area_um2"], r["bbox_px"]))
    return [Region(rank=i + 1, **r) for i, r in enumerate(order)]


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
