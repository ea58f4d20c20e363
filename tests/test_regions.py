"""Suspect regions: components, measurements, ranking, and QuPath's GeoJSON rules."""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest

from slidescore.core.regions import Region, find_regions, regions_geojson


def _map() -> np.ndarray:
    p = np.full((1, 40, 50), 0.1, np.float32)
    p[0, 5:8, 5:9] = 0.8  # 12 cells, peak 0.8
    p[0, 6, 6] = 0.95
    p[0, 30:32, 40:41] = 0.6  # 2 cells
    p[0, 20:25, 20:25] = np.nan  # not scored: never a region
    return p


def test_components_are_measured_in_level0_pixels_and_um() -> None:
    regs = find_regions(_map(), ["parasitized"], [0.5], cell_px0=32.0, mpp0=0.25)
    assert [r.rank for r in regs] == [1, 2]
    top = regs[0]
    assert top.peak_probability == pytest.approx(0.95) and top.n_cells == 12
    assert top.bbox_px == (5 * 32, 5 * 32, 3 * 32, 4 * 32)
    assert top.area_um2 == pytest.approx(12 * (32 * 0.25) ** 2)
    assert top.centroid_px == pytest.approx((6.5 * 32, 7.0 * 32))
    assert top.peak_px == pytest.approx((6.5 * 32, 6.5 * 32))
    assert top.bbox_um == pytest.approx(tuple(v * 0.25 for v in top.bbox_px))
    assert regs[1].peak_probability == pytest.approx(0.6)


def test_min_area_and_per_class_thresholds() -> None:
    p = np.concatenate([_map(), _map()[:, ::-1]])
    regs = find_regions(p, ["a", "b"], [0.5, 0.9], cell_px0=32.0, mpp0=0.25)
    assert sorted((r.class_name, r.n_cells) for r in regs) == [("a", 2), ("a", 12), ("b", 1)]
    regs = find_regions(p, ["a", "b"], [0.5, 0.9], cell_px0=32.0, mpp0=0.25, min_area_um2=2 * 64.0)
    assert sorted((r.class_name, r.n_cells) for r in regs) == [("a", 2), ("a", 12)]


def test_geojson_follows_qupath_rules() -> None:
    regs = find_regions(_map(), ["parasitized"], [0.5], cell_px0=32.0, mpp0=0.25)
    gj = json.loads(json.dumps(regions_geojson(regs, {"parasitized": (230, 25, 75)}, "s1")))
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == 2
    for f, r in zip(gj["features"], regs, strict=True):
        assert f["type"] == "Feature"
        uuid.UUID(f["id"])
        geom = f["geometry"]
        assert geom["type"] == "Polygon"
        ring = geom["coordinates"][0]
        assert ring[0] == ring[-1] and len(ring) >= 4  # closed linear ring
        xs, ys = [pt[0] for pt in ring], [pt[1] for pt in ring]
        y, x, h, w = r.bbox_px
        assert (min(xs), max(xs), min(ys), max(ys)) == (x, x + w, y, y + h)  # (x, y) order, level-0 px
        props = f["properties"]
        assert props["objectType"] == "annotation"
        cls = props["classification"]
        assert cls["name"] == "parasitized" and len(cls["color"]) == 3 and all(isinstance(c, int) for c in cls["color"])
        assert all(isinstance(v, float) for v in props["measurements"].values())
    # deterministic ids: a rerun writes identical bytes
    assert regions_geojson(regs, {}, "s1")["features"][0]["id"] == gj["features"][0]["id"]


def test_map_coordinates_apply_the_affine_to_pixel_positions() -> None:
    from slidescore.core.regions import georeference_regions, regions_map_geojson

    regs = find_regions(_map(), ["parasitized"], [0.5], cell_px0=32.0, mpp0=0.25e6)
    # a rotated grid: x = 0.3·col − 0.4·row + 1000, y = −0.4·col − 0.3·row + 9000 (0.5 m pixels)
    georef = {"epsg": 32633, "affine": [0.3, -0.4, 1000.0, -0.4, -0.3, 9000.0], "units": "metre"}
    mapped = georeference_regions(regs, georef)
    assert [r.rank for r in mapped] == [r.rank for r in regs] and regs[0].centroid_map_x is None
    for r in mapped:
        cy, cx = r.centroid_px
        assert (r.centroid_map_x, r.centroid_map_y) == pytest.approx((0.3 * cx - 0.4 * cy + 1000, -0.4 * cx - 0.3 * cy + 9000))
        y, x, h, w = r.bbox_px
        corners = [(0.3 * px - 0.4 * py + 1000, -0.4 * px - 0.3 * py + 9000) for py in (y, y + h) for px in (x, x + w)]
        assert r.bbox_map == pytest.approx((min(c[0] for c in corners), min(c[1] for c in corners),
                                            max(c[0] for c in corners), max(c[1] for c in corners)))
    gj = json.loads(json.dumps(regions_map_geojson(mapped, georef, "s1")))
    assert gj["crs"] == {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    ring = gj["features"][0]["geometry"]["coordinates"][0]
    assert ring[0] == ring[-1] and len(ring) == 5
    np.testing.assert_allclose(sorted(map(tuple, ring[:4])), sorted(corners_of(mapped[0])))
    assert gj["features"][0]["properties"]["area_map_units2"] == pytest.approx(mapped[0].area_um2 / 1e12)
    assert "crs" not in regions_map_geojson(mapped, {**georef, "epsg": None}, "s1")


def corners_of(r: Region) -> list[tuple[float, float]]:
    y, x, h, w = r.bbox_px
    return [(0.3 * px - 0.4 * py + 1000, -0.4 * px - 0.3 * py + 9000) for py, px in ((y, x), (y, x + w), (y + h, x + w), (y + h, x))]


@pytest.mark.parametrize("seed", range(4))
def test_measurements_match_a_region_by_region_reference(seed: int) -> None:
    """Every region's cells, mean, centroid, bbox and peak (first cell in raster order holding the
    maximum, ties included) as a plain loop over each labelled component computes them."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    m = ndimage.uniform_filter(rng.random((2, 61, 77)), size=(1, 4, 4)).astype(np.float32)
    m = np.round((m - m.min()) / (m.max() - m.min()), 2)  # rounding makes ties within regions
    m[:, rng.random((61, 77)) < 0.08] = np.nan
    thr, cell, mpp = (0.55, 0.6), 8.0, 0.5
    regs = find_regions(m, ["a", "b"], thr, cell_px0=cell, mpp0=mpp, min_area_um2=3 * (cell * mpp) ** 2)
    expected = []
    for ci in range(2):
        p = np.nan_to_num(m[ci], nan=0.0)
        labels, n = ndimage.label(p >= thr[ci], structure=np.ones((3, 3)))
        for k in range(1, n + 1):
            ys, xs = np.nonzero(labels == k)  # raster order
            if len(ys) < 3:
                continue
            vals = p[ys, xs].astype(np.float64)
            j = int(np.argmax(vals))  # first maximum
            expected.append((ci, len(ys), vals.mean(), (ys.mean() + 0.5) * cell, (xs.mean() + 0.5) * cell,
                             (ys.min() * cell, xs.min() * cell, (ys.max() + 1 - ys.min()) * cell, (xs.max() + 1 - xs.min()) * cell),
                             float(vals[j]), ((ys[j] + 0.5) * cell, (xs[j] + 0.5) * cell)))
    assert len(regs) == len(expected) > 10
    got = {(r.class_index, r.bbox_px): r for r in regs}
    for ci, n_cells, mean, cy, cx, bbox, peak, peak_px in expected:
        r = got[(ci, bbox)]
        assert (r.n_cells, r.peak_px, r.class_name) == (n_cells, peak_px, "ab"[ci])
        assert r.mean_probability == pytest.approx(mean, rel=1e-12) and r.peak_probability == pytest.approx(peak, rel=1e-7)
        assert r.centroid_px == pytest.approx((cy, cx), rel=1e-12) and r.centroid_um == pytest.approx((cy * mpp, cx * mpp), rel=1e-12)
        assert r.area_um2 == pytest.approx(n_cells * (cell * mpp) ** 2)
    keys = [(-r.peak_probability, -r.mean_probability, -r.area_um2) for r in regs]
    assert keys == sorted(keys) and [r.rank for r in regs] == list(range(1, len(regs) + 1))
