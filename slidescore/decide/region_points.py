"""Operating points fitted on regions, the unit a job reports, rather than on single patches.

A job thresholds the *blended* stride-resolution map (each cell the mean of the k² overlapping
patch probabilities that cover it) and reports connected components as suspect regions. A
threshold chosen for patch precision or recall does not keep that promise for regions: blending
smooths scores and a parasite near a cell edge lies inside only part of the patches covering its
cell (9/16 for patch 64, stride 16), so a threshold above ~0.56 loses regions by construction.
Here a threshold is swept over blended maps of smears with known object positions, regions are
found with the job's own :func:`slidescore.core.regions.find_regions`, and the figures a specialist
sees are counted:

* region precision: the fraction of regions whose box holds an object;
* region recall: the fraction of objects inside some region's box;
* region specificity: 1 − false regions / negative patch fields, where a patch field is the
  independent unit of the sample-level call (scored patches / k², as the pipeline counts them)
  and negative fields are the fields less the objects.

``precision_P`` takes, among thresholds with pooled precision >= P, the one of highest recall,
then most regions that hold an object (objects resolved, not merged into blobs), then highest
precision, then closest to 0.5. ``recall_R`` takes the highest threshold with pooled recall >= R
(recall never rises with the threshold: components at a higher threshold lie inside those at a
lower one). Numpy only; the maps come from the caller (``slidescore.score_array`` on a
calibrated classifier, or a job's mosaic).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidescore.core.regions import find_regions

# thresholds swept (the map's probabilities are continuous; a 0.01 grid keeps cards readable)
DEFAULT_GRID = tuple(round(float(t), 2) for t in np.arange(0.01, 1.0, 0.01))


@dataclass(frozen=True)
class RegionSample:
    """One blended map with the positions of its true objects.

    ``prob`` is (H, W) cells (NaN: not scored); ``points`` (N, 2) object centres (y, x) in the
    map's pixel units (``cell_px`` pixels per cell); ``n_fields`` the sample's patch fields.
    """

    prob: np.ndarray
    points: np.ndarray
    n_fields: float
    name: str = ""


def region_counts(prob: np.ndarray, points: np.ndarray, threshold: float, *, cell_px: float, mpp: float = 1.0,
                  min_area_um2: float = 0.0, connectivity: int = 2) -> dict[str, int]:
    """Regions of ``prob >= threshold`` (the job's rule) and the objects they hold."""
    regions = find_regions(np.asarray(prob)[None], ("object",), (float(threshold),), cell_px0=cell_px, mpp0=mpp,
                           min_area_um2=min_area_um2, connectivity=connectivity, outlines=False)  # counts only
    pts = np.asarray(points, np.float64).reshape(-1, 2)
    found = np.zeros(len(pts), bool)
    holding = merged = 0
    for r in regions:
        y, x, h, w = r.bbox_px
        inside = (pts[:, 0] >= y) & (pts[:, 0] < y + h) & (pts[:, 1] >= x) & (pts[:, 1] < x + w)
        n_in = int(inside.sum())
        holding += n_in > 0
        merged += n_in if n_in > 1 else 0
        found |= inside
    return {"n_regions": len(regions), "true_regions": int(holding), "false_regions": len(regions) - int(holding),
            "found": int(found.sum()), "n_objects": len(pts), "merged_objects": int(merged)}


def figures_from_counts(c: dict[str, Any], n_fields: float) -> dict[str, Any]:
    """Precision, recall (with 95 % Clopper–Pearson lower bounds) and per-field specificity from counts."""
    from scipy.stats import beta

    def lower(k: int, n: int) -> float:
        return float(beta.ppf(0.05, k, n - k + 1)) if n and k else 0.0

    n_neg = max(float(n_fields) - c["n_objects"], 1.0)
    out = dict(c)
    out.update(
        precision=c["true_regions"] / c["n_regions"] if c["n_regions"] else float("nan"),
        recall=c["found"] / c["n_objects"] if c["n_objects"] else float("nan"),
        precision_lower_95=lower(c["true_regions"], c["n_regions"]),
        recall_lower_95=lower(c["found"], c["n_objects"]),
        specificity=1.0 - c["false_regions"] / n_neg,
        n_fields=round(float(n_fields), 3),
    )
    return out


@dataclass(frozen=True)
class RegionSweep:
    """Counts summed over samples at each threshold of ``thresholds`` (ascending)."""

    thresholds: tuple[float, ...]
    counts: tuple[dict[str, int], ...]
    n_fields: float

    def figures(self, i: int) -> dict[str, Any]:
        return {"threshold": self.thresholds[i], **figures_from_counts(self.counts[i], self.n_fields)}

    def index(self, threshold: float) -> int:
        """Index of the swept threshold closest to ``threshold``."""
        return int(np.argmin(np.abs(np.asarray(self.thresholds) - threshold)))


def sweep_regions(samples: Sequence[RegionSample], thresholds: Sequence[float] = DEFAULT_GRID, *, cell_px: float,
                  mpp: float = 1.0, min_area_um2: float = 0.0, connectivity: int = 2) -> RegionSweep:
    """Region counts of every sample at every threshold, pooled (summed) over samples."""
    ths = tuple(sorted(float(t) for t in thresholds))
    pooled = []
    for t in ths:
        total: dict[str, int] = {}
        for s in samples:
            for k, v in region_counts(s.prob, s.points, t, cell_px=cell_px, mpp=mpp, min_area_um2=min_area_um2,
                                      connectivity=connectivity).items():
                total[k] = total.get(k, 0) + v
        pooled.append(total)
    return RegionSweep(ths, tuple(pooled), float(sum(s.n_fields for s in samples)))


def pick_region_threshold(sweep: RegionSweep, kind: str, target: float) -> tuple[int, bool]:
    """Index of the operating point ``kind`` (precision | recall) at ``target`` in ``sweep``; attained?"""
    figs = [sweep.figures(i) for i in range(len(sweep.thresholds))]
    if kind == "recall":
        ok = [i for i, f in enumerate(figs) if f["recall"] >= target - 1e-12]
        if ok:
            return max(ok, key=lambda i: sweep.thresholds[i]), True
        return 0, False  # unreachable: the lowest threshold (most recall)
    if kind != "precision":
        raise ValueError(f"operating point kind: expected precision or recall, got {kind!r}")

    def key(i: int) -> tuple[float, ...]:
        f = figs[i]
        return (f["recall"], f["true_regions"], f["precision"], -abs(sweep.thresholds[i] - 0.5))

    ok = [i for i, f in enumerate(figs) if f["n_regions"] and f["precision"] >= target - 1e-12]
    if ok:
        return max(ok, key=key), True
    scored = [i for i, f in enumerate(figs) if f["n_regions"]]
    if not scored:
        return 0, False
    return max(scored, key=lambda i: (figs[i]["precision"], *key(i))), False  # best precision there is


def region_operating_points(sweep: RegionSweep, names: Sequence[str], class_name: str, *, fitted_on: str,
                            rule: dict[str, Any]) -> dict[str, Any]:
    """Card entries (``unit: region``) for operating-point ``names`` of a one-class model."""
    from slidescore.decide.calibration import parse_operating_point

    points: dict[str, Any] = {}
    for name in names:
        kind, target = parse_operating_point(name)
        i, ok = pick_region_threshold(sweep, kind, target)
        fig = rounded(sweep.figures(i))
        points[name] = {"kind": kind, "target": target, "unit": "region", "thresholds": [sweep.thresholds[i]],
                        "attained": {class_name: ok}, "validation": {class_name: fig}, "fitted_on": fitted_on,
                        "region_rule": dict(rule)}
    return points


def rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def held_out_figures(samples: Sequence[RegionSample], threshold: float, *, cell_px: float, mpp: float = 1.0,
                     min_area_um2: float = 0.0, connectivity: int = 2) -> dict[str, Any]:
    """Pooled region figures of ``samples`` at one threshold (for held-out reporting)."""
    sw = sweep_regions(samples, (threshold,), cell_px=cell_px, mpp=mpp, min_area_um2=min_area_um2,
                       connectivity=connectivity)
    return rounded(sw.figures(0))
