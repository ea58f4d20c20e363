"""Suspect regions: components, measurements, ranking, outlines, and QuPath's GeoJSON rules."""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from slidescore.core.regions import Region, find_regions, regions_geojson, trace_outline


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
        assert props["bbox_px"] == list(r.bbox_px)
        assert polygon_area(geom) * 0.25**2 == pytest.approx(r.area_um2)  # the outline, not the box
    # deterministic ids: a rerun writes identical bytes
    assert regions_geojson(regs, {}, "s1")["features"][0]["id"] == gj["features"][0]["id"]
    # a region built without an outline is exported as its box
    bare = dataclasses.replace(regs[0], outline=None)
    (ring,) = regions_geojson([bare], {}, "s1")["features"][0]["geometry"]["coordinates"]
    y, x, h, w = bare.bbox_px
    assert ring == [[x, y], [x + w, y], [x + w, y + h], [x, y + h], [x, y]] and shoelace(ring) > 0


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
    assert ring[0] == ring[-1] and len(ring) == 5  # the top region is a 3 × 4 block: its outline is its box
    np.testing.assert_allclose(sorted(map(tuple, ring[:4])), sorted(corners_of(mapped[0])))
    # this affine mirrors (determinant < 0): the rings are reversed so exteriors stay counter-clockwise
    # in (easting, northing), and the area is the pixel area times |determinant|
    for f, r in zip(gj["features"], mapped, strict=True):
        assert shoelace(f["geometry"]["coordinates"][0]) > 0
        assert polygon_area(f["geometry"]) == pytest.approx(r.n_cells * 32.0**2 * 0.25)
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


# ---- outlines: the thresholded cells' boundary, exported as level-0 pixel polygons ----

C, MPP = 16.0, 0.5  # level-0 px per cell, µm per level-0 px


def shoelace(ring: list[list[float]]) -> float:
    """Signed area of a closed ring of (x, y) points: positive = counter-clockwise in (x, y) taken y-up."""
    a = np.asarray(ring, np.float64)
    return float(np.sum(a[:-1, 0] * a[1:, 1] - a[1:, 0] * a[:-1, 1]) / 2)


def polygons(geometry: dict[str, Any]) -> list[list[list[list[float]]]]:
    assert geometry["type"] in ("Polygon", "MultiPolygon")
    return [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]


def polygon_area(geometry: dict[str, Any]) -> float:
    """Shoelace area of a Polygon / MultiPolygon, holes subtracted (by their orientation)."""
    return sum(shoelace(ring) for poly in polygons(geometry) for ring in poly)


def inside(points: np.ndarray, geometry: dict[str, Any]) -> np.ndarray:
    """Even-odd rule over every ring (parts never overlap, so a point in a part inside another's hole counts once)."""
    px, py = points[:, 0], points[:, 1]
    odd = np.zeros(len(points), bool)
    for poly in polygons(geometry):
        for ring in poly:
            r = np.asarray(ring, np.float64)
            for (x0, y0), (x1, y1) in zip(r[:-1], r[1:], strict=True):
                crosses = (y0 > py) != (y1 > py)
                with np.errstate(divide="ignore", invalid="ignore"):
                    xc = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
                odd ^= crosses & (px < xc)
    return odd


def check_outline(region: Region, geometry: dict[str, Any], members: np.ndarray, cell: float = C, mpp: float = MPP) -> None:
    """Everything the outline promises, against the region's own cells (``members``: bool map)."""
    # area: polygon area × µm² per px² = area_um2 (here exactly; the acceptance is within one cell)
    assert polygon_area(geometry) * mpp**2 == pytest.approx(region.area_um2, abs=(cell * mpp) ** 2 * 1e-9)
    assert polygon_area(geometry) == members.sum() * cell**2
    for poly in polygons(geometry):
        for k, ring in enumerate(poly):
            r = np.asarray(ring, np.float64)
            assert len(ring) >= 5 and ring[0] == ring[-1]  # closed; rectilinear: at least 4 corners
            assert (shoelace(ring) > 0) == (k == 0)  # exterior counter-clockwise, holes clockwise
            assert np.all(r / cell == np.round(r / cell))  # every vertex on the cell grid
            steps = np.diff(r, axis=0)
            assert np.all((steps[:, 0] == 0) != (steps[:, 1] == 0))  # axis-parallel, no zero-length edge
            turns = np.append(steps, steps[:1], axis=0)
            a, b = turns[:-1], turns[1:]
            assert np.all(a[:, 0] * b[:, 1] - a[:, 1] * b[:, 0] != 0)  # no collinear vertex, the closing one included
            assert is_simple(r / cell)
    # the polygon holds every region cell's centre and no other cell's centre
    ys, xs = np.mgrid[: members.shape[0], : members.shape[1]]
    centres = np.stack([(xs.ravel() + 0.5) * cell, (ys.ravel() + 0.5) * cell], axis=1)
    np.testing.assert_array_equal(inside(centres, geometry).reshape(members.shape), members)


def is_simple(ring: np.ndarray) -> bool:
    """No grid point visited twice along the closed rectilinear ring (cell units): no self-touching (JTS-valid)."""
    visited = []
    for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True):
        n = int(abs(x1 - x0) + abs(y1 - y0))
        visited += [(x0 + (x1 - x0) * t / n, y0 + (y1 - y0) * t / n) for t in range(n)]
    return len(visited) == len(set(visited))


def regions_of(mask: np.ndarray, connectivity: int = 2) -> tuple[list[Region], list[dict[str, Any]], np.ndarray]:
    """find_regions on a 0/1 map, the exported geometries (ranked order), and the component labels."""
    prob = np.where(mask, 0.9, 0.1).astype(np.float32)[None]
    regs = find_regions(prob, ["a"], [0.5], cell_px0=C, mpp0=MPP, connectivity=connectivity)
    gj = json.loads(json.dumps(regions_geojson(regs, {}, "s"), allow_nan=False))
    labels, _ = ndimage.label(mask, structure=ndimage.generate_binary_structure(2, connectivity))
    return regs, [f["geometry"] for f in gj["features"]], labels


def members_of(region: Region, labels: np.ndarray) -> np.ndarray:
    y, x = (int(v // C) for v in region.peak_px)
    return labels == labels[y, x]


def _mask(shape: tuple[int, int], *cells: tuple[slice | int, slice | int]) -> np.ndarray:
    m = np.zeros(shape, bool)
    for c in cells:
        m[c] = True
    return m


SHAPES = {
    "blob": ndimage.binary_dilation(_mask((12, 12), (5, 6)), iterations=3),
    "ring with a hole": _mask((9, 9), (slice(2, 7), slice(1, 7))) & ~_mask((9, 9), (slice(3, 5), slice(3, 5))),
    "L-shape": _mask((8, 8), (slice(1, 6), 2), (5, slice(2, 6))),
    "corner-touching cells": _mask((5, 5), (1, 1), (2, 2)),
    "touching the map edges": _mask((6, 7), (slice(0, 6), 6), (0, slice(3, 7)), (slice(2, 4), slice(5, 7))),
    "hole touching the exterior at a corner": _mask((6, 6), (slice(1, 5), slice(1, 5))) & ~_mask((6, 6), (2, 2), (3, 3), (4, 4)),
    "a part inside a hole, touching it at a corner": (_mask((7, 7), (slice(0, 7), slice(0, 7)))
                                                      & ~_mask((7, 7), (slice(1, 6), slice(1, 6)))) | _mask((7, 7), (4, 4), (5, 5)),
}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("connectivity", [1, 2])
def test_outline_is_the_boundary_of_the_region_cells(name: str, connectivity: int) -> None:
    mask = SHAPES[name]
    regs, geoms, labels = regions_of(mask, connectivity)
    assert len(regs) == labels.max()
    for r, g in zip(regs, geoms, strict=True):
        check_outline(r, g, members_of(r, labels))
        assert r.outline is not None and r.outline.area_cells() == r.n_cells
        assert r.to_dict()["outline"] == r.outline.summary()


def test_outline_shapes_and_orientation() -> None:
    """The parts, holes and exact vertex sequences: exterior counter-clockwise in (x, y) with y taken
    upwards (x, then +x along the top edge first), i.e. clockwise on screen where y points down."""
    (one,), (g,), _ = regions_of(_mask((3, 3), (1, 2)))
    assert g == {"type": "Polygon", "coordinates": [[[32.0, 16.0], [48.0, 16.0], [48.0, 32.0], [32.0, 32.0], [32.0, 16.0]]]}
    assert one.bbox_px == (16.0, 32.0, 16.0, 16.0) and one.outline.summary() == {"parts": 1, "holes": 0, "vertices": 4}

    (ring,), (g,), _ = regions_of(SHAPES["ring with a hole"])
    assert g["type"] == "Polygon" and len(g["coordinates"]) == 2  # exterior + one hole
    assert [len(r) for r in g["coordinates"]] == [5, 5]  # straight runs merged: 4 corners each, closed
    assert g["coordinates"][1] == [[3 * C, 5 * C], [5 * C, 5 * C], [5 * C, 3 * C], [3 * C, 3 * C], [3 * C, 5 * C]]  # clockwise
    assert ring.outline.summary() == {"parts": 1, "holes": 1, "vertices": 8}

    (lshape,), (g,), _ = regions_of(SHAPES["L-shape"])
    assert g["coordinates"] == [[[2 * C, 1 * C], [3 * C, 1 * C], [3 * C, 5 * C], [6 * C, 5 * C], [6 * C, 6 * C], [2 * C, 6 * C],
                                 [2 * C, 1 * C]]]

    # two cells touching only at a corner: one region under 8-connectivity, exported as a MultiPolygon
    # of two squares meeting at the vertex (a ring through that vertex twice would be invalid for JTS)
    (diag,), (g,), _ = regions_of(SHAPES["corner-touching cells"], connectivity=2)
    assert g["type"] == "MultiPolygon" and len(g["coordinates"]) == 2 and diag.n_cells == 2
    assert diag.outline.summary() == {"parts": 2, "holes": 0, "vertices": 8}
    two, geoms, _ = regions_of(SHAPES["corner-touching cells"], connectivity=1)
    assert len(two) == 2 and all(g["type"] == "Polygon" for g in geoms)

    # a hole meeting the exterior (or another hole) at a vertex stays a hole of its own, not a notch
    # of the exterior through that vertex
    (notched,), (g,), _ = regions_of(SHAPES["hole touching the exterior at a corner"])
    assert g["type"] == "Polygon" and notched.outline.summary() == {"parts": 1, "holes": 2, "vertices": 14}
    assert g["coordinates"][2] == [[3 * C, 4 * C], [4 * C, 4 * C], [4 * C, 3 * C], [3 * C, 3 * C], [3 * C, 4 * C]]

    # a part inside the hole of another, touching it at a corner: the frame with its hole, and the part
    (framed,), (g,), _ = regions_of(SHAPES["a part inside a hole, touching it at a corner"])
    assert g["type"] == "MultiPolygon" and [len(p) for p in g["coordinates"]] == [2, 1]


def test_outline_of_a_region_on_the_map_edge_reaches_the_edge() -> None:
    mask = SHAPES["touching the map edges"]
    (r,), (g,), labels = regions_of(mask)
    xs = [p[0] for p in g["coordinates"][0]]
    ys = [p[1] for p in g["coordinates"][0]]
    assert (min(ys), max(xs)) == (0.0, mask.shape[1] * C)
    check_outline(r, g, labels == 1)


def test_outlines_with_min_area_and_several_classes() -> None:
    """Only the kept regions are traced, each class on its own map; an outline never takes another region's cells."""
    p = np.concatenate([_map(), _map()[:, ::-1]])
    regs = find_regions(p, ["a", "b"], [0.5, 0.9], cell_px0=32.0, mpp0=0.25, min_area_um2=2 * 64.0)
    assert sorted(r.n_cells for r in regs) == [2, 12]
    for r in regs:
        assert r.outline is not None and r.outline.area_cells() == r.n_cells and r.outline.cell_px0 == 32.0
    assert all(r.outline is None for r in find_regions(p, ["a", "b"], [0.5, 0.9], cell_px0=32.0, mpp0=0.25, outlines=False))


def test_trace_outline_of_an_empty_mask() -> None:
    assert trace_outline(np.zeros((3, 4), bool)) == ()
    (part,) = trace_outline(np.ones((2, 3), bool))
    assert [r.tolist() for r in part] == [[[0, 0], [3, 0], [3, 2], [0, 2]]]


@settings(max_examples=50, deadline=None)
@given(mask=hnp.arrays(bool, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=14)),
       connectivity=st.sampled_from([1, 2]))
def test_outline_area_is_the_cell_count_on_random_masks(mask: np.ndarray, connectivity: int) -> None:
    regs, geoms, labels = regions_of(mask, connectivity)
    assert len(regs) == labels.max()
    for r, g in zip(regs, geoms, strict=True):
        members = members_of(r, labels)
        assert polygon_area(g) == members.sum() * C**2 == r.n_cells * C**2
        check_outline(r, g, members)
