"""Regions of interest (issue 20, item 1): reading GeoJSON / mask images (slidescore.io.roi_source),
rasterising them onto the cell grid (slidescore.core.roi), the planning hook, the run key, run.json and
the report, the CLI's ``--roi``, the manifest's ``roi=``, map coordinates of GeoTIFFs, and the errors
for hostile, misplaced or mis-unit ROIs. Figures are recomputed here independently (pixel-centre
rasterisation with scikit-image, patch fractions by brute force)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from skimage.draw import polygon as sk_polygon

from slidescore.config import JobConfig, SampleSpec, parse_manifest
from slidescore.core.roi import RoiMask, mask_scale, polygon_cell_fractions, raster_cell_fractions
from slidescore.errors import ConfigError, RoiError
from slidescore.io.roi_source import load_roi, parse_geojson
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.plan import plan_images
from tests.conftest import textured_image, write_tiff
from tests.io.test_geotiff import EASTING, NORTHING, write_geotiff

H, W = 256, 320  # level-0 px of the test image (0.5 µm/px; the test models score at 0.5 µm/px, 64-px patches)


def feature(rings: list[list[list[float]]], name: str | None = None, kind: str = "annotation", multi: bool = False) -> dict:
    props: dict = {"objectType": kind}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    geom = {"type": "MultiPolygon", "coordinates": [rings]} if multi else {"type": "Polygon", "coordinates": rings}
    return {"type": "Feature", "geometry": geom, "properties": props}


def ring(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def write_json(path: Path, doc: object) -> Path:
    path.write_text(json.dumps(doc))
    return path


# -- rasterisation ------------------------------------------------------------------------------
def test_polygon_fractions_equal_pixel_centre_rasterisation() -> None:
    """With cells of 8 level-0 px, 8×8 points per cell are the pixel centres: the fractions equal a
    pixel-centre rasterisation (scikit-image) of the same polygon with its hole, reduced to cells."""
    rng = np.random.default_rng(3)
    t = np.sort(rng.uniform(0, 2 * np.pi, 40))
    r = rng.uniform(40, 60, 40)
    outer = np.stack([100 + r * np.cos(t), 90 + r * np.sin(t)], 1)  # (x, y), a star-ish polygon
    hole = np.stack([100 + 15 * np.cos(t), 90 + 15 * np.sin(t)], 1)[::-1]
    got = polygon_cell_fractions([(np.vstack([outer, outer[:1]]), np.vstack([hole, hole[:1]]))], [], (24, 28), 8.0, (190, 220), 8)
    ref = np.zeros((192, 224), bool)
    ref[sk_polygon(outer[:, 1] - 0.5, outer[:, 0] - 0.5, (190, 220))] = True  # skimage: pixel (r, c) is the point (r, c)
    ref[sk_polygon(hole[:, 1] - 0.5, hole[:, 0] - 0.5, (190, 220))] = False
    ref_cells = ref.reshape(24, 8, 28, 8).mean(axis=(1, 3))
    np.testing.assert_allclose(got, ref_cells, atol=1e-6)
    assert 0.1 < got.mean() < 0.4 and ((got > 0) & (got < 1)).sum() > 20  # partial cells along both rings


def test_union_minus_excluded_and_points_outside_the_image() -> None:
    a = np.array(ring(0, 0, 40, 40), float)
    b = np.array(ring(20, 20, 64, 64), float)  # overlaps a and runs past the 48-px image
    cut = np.array(ring(0, 0, 8, 8), float)
    got = polygon_cell_fractions([(a,), (b,)], [(cut,)], (6, 6), 8.0, (48, 48), 8)
    ref = np.zeros((48, 48), bool)
    ref[:40, :40] = True
    ref[20:, 20:] = True
    ref[:8, :8] = False
    np.testing.assert_array_equal(got, ref.reshape(6, 8, 6, 8).mean(axis=(1, 3)))


def test_strips_never_change_the_result_and_crossings_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import slidescore.core.roi as roi

    rng = np.random.default_rng(9)
    zigzag = np.array([[x, 5.0 if i % 2 else 180.0] for i, x in enumerate(np.linspace(3, 200, 61))] + [[200, 190], [3, 190]])
    polys = [(np.vstack([zigzag, zigzag[:1]]),), (np.array(ring(*rng.uniform(0, 100, 2), *rng.uniform(100, 200, 2))),)]
    whole = polygon_cell_fractions(polys, [], (25, 26), 8.0, (200, 205), 8)
    monkeypatch.setattr(roi, "STRIP_CROSSINGS", 50)  # one cell row at a time (each holds more crossings than that)
    monkeypatch.setattr(roi, "STRIP_SAMPLES", 3000)
    np.testing.assert_array_equal(polygon_cell_fractions(polys, [], (25, 26), 8.0, (200, 205), 8), whole)
    monkeypatch.setattr(roi, "MAX_CROSSINGS", 1000)
    with pytest.raises(RoiError, match="cross the sampling rows .* times, more than 1,000; simplify"):
        polygon_cell_fractions(polys, [], (25, 26), 8.0, (200, 205), 8)


def test_mask_fractions_are_exact_area_at_any_scale() -> None:
    rng = np.random.default_rng(1)
    full = rng.random((96, 120)) < 0.4
    half = full[::2, ::2]
    # a half-resolution mask: each of its pixels covers 2×2 level-0 pixels
    got = raster_cell_fractions(half, (2.0, 2.0), (6, 8), 16.0)
    np.testing.assert_allclose(got, _cells(np.kron(half, np.ones((2, 2))), 16), atol=1e-6)
    assert mask_scale(RoiMask(half), (96, 120), 0.5, "t") == (2.0, 2.0)
    assert mask_scale(RoiMask(np.zeros((33, 40), bool)), (97, 120), 0.5, "t") == (3.0, 3.0)  # ceil(97 / 3) rows
    with pytest.raises(RoiError, match="aspect"):
        mask_scale(RoiMask(np.zeros((50, 50), bool)), (96, 120), 0.5, "t")


def _cells(full: np.ndarray, c: int) -> np.ndarray:
    h, w = full.shape
    ch, cw = -(-h // c), -(-w // c)
    pad = np.zeros((ch * c, cw * c))
    pad[:h, :w] = full
    return pad.reshape(ch, c, cw, c).mean(axis=(1, 3))


# -- GeoJSON parsing -------------------------------------------------------------------------------
def test_qupath_export_classes_holes_multipolygons_and_skipped_objects(tmp_path: Path) -> None:
    doc = [  # QuPath 0.4 "Export objects as GeoJSON": a list of Features
        feature([ring(10, 10, 100, 100), ring(40, 40, 60, 60)], "Tumor"),
        feature([ring(150, 10, 200, 60)], "Tumor", multi=True),
        feature([ring(0, 0, 300, 200)], "Stroma"),
        feature([ring(5, 5, 9, 9)], "Tumor", kind="detection"),
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [3, 3]}, "properties": {}},
        {"type": "Feature", "id": "PathCellObject", "geometry": {"type": "Polygon", "coordinates": [ring(1, 1, 3, 3)]},
         "properties": {"classification": {"name": "Tumor"}}},  # QuPath 0.2: the object type in the id
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(1, 1, 2, 2)]},
         "properties": {"classification": "Necrosis"}},  # an older export: the name as a string
    ]
    shapes = parse_geojson(json.dumps(doc).encode(), "x.geojson")
    assert [f.name for f in shapes.features] == ["Tumor", "Tumor", "Stroma", "Necrosis"]
    assert shapes.skipped == {"detection": 1, "Point": 1, "cell": 1} and not shapes.has_crs
    assert len(shapes.features[0].polygons[0]) == 2  # exterior and hole
    fc = parse_geojson(json.dumps({"type": "FeatureCollection", "features": doc[:1]}).encode(), "x.geojson")
    assert fc.features[0].name == "Tumor"


@pytest.mark.parametrize(("text", "match"), [
    (b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [NaN, 1], [1, 1], [0, 0]]]}}', "not valid JSON"),
    (b'[' * 100_000 + b']' * 100_000, "nested too deeply|not valid JSON"),
    (b'\xff\xfe garbage', "not valid JSON"),
    (b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], ["a", 1], [1, 1]]]}}', r"\[x, y\] numbers"),
    (b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1e300, 1], [1, 1]]]}}', "finite numbers"),
    (b'{"type": "Topology"}', "expected a GeoJSON FeatureCollection"),
    (b'{"type": "FeatureCollection", "features": 3}', "without a 'features' list"),
    (b'{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0]]]}, "crs": {"x": 1}}', "crs"),
])
def test_hostile_geojson_is_refused_clearly(text: bytes, match: str) -> None:
    with pytest.raises(RoiError, match=match):
        parse_geojson(text, "bad.geojson")


def test_vertex_feature_and_size_bounds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import slidescore.io.roi_source as rs

    monkeypatch.setattr(rs, "MAX_VERTICES", 10)
    with pytest.raises(RoiError, match="more than 10 vertices"):
        parse_geojson(json.dumps([feature([ring(0, 0, 5, 5)]), feature([ring(0, 0, 6, 6)]), feature([ring(1, 1, 2, 2)])]).encode(), "v")
    monkeypatch.setattr(rs, "MAX_FEATURES", 2)
    with pytest.raises(RoiError, match="3 features"):
        parse_geojson(json.dumps([feature([ring(0, 0, 1, 1)])] * 3).encode(), "f")
    monkeypatch.setattr(rs, "MAX_ROI_BYTES", 100)
    big = write_json(tmp_path / "big.geojson", [feature([ring(0, 0, 1, 1)])] * 5)
    with pytest.raises(RoiError, match="bytes"):
        load_roi(str(big))
    with pytest.raises(RoiError, match="cannot be read"):
        load_roi(str(tmp_path / "missing.geojson"))
    with pytest.raises(RoiError, match="unknown kind"):
        load_roi(str(tmp_path / "roi.shp"))
    from PIL import Image

    Image.fromarray(np.zeros((20, 30), np.uint8)).save(tmp_path / "m.png")
    monkeypatch.setattr(rs, "MAX_MASK_PIXELS", 500)
    with pytest.raises(RoiError, match="30×20 mask image, more than 500 pixels"):
        load_roi(str(tmp_path / "m.png"))
    (tmp_path / "bad.png").write_bytes((tmp_path / "m.png").read_bytes()[:40])
    with pytest.raises(RoiError, match="cannot be decoded as a mask image"):
        load_roi(str(tmp_path / "bad.png"))


# -- the planning hook, errors, run key -----------------------------------------------------------
@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiff(tmp_path_factory.mktemp("roi") / "slide.tif", textured_image(H, W, seed=2), mpp=0.5)


@pytest.fixture(scope="module")
def model(random_model_dir: Path):
    return load_model(str(random_model_dir), device="cpu")


def plan_one(slide: Path, model, tmp: Path, roi: str | None, **mask: object):
    cfg = JobConfig.from_dict({"mask": {"method": "none", **mask}, "tiling": {"chunk_cells": 8}})
    [plan] = plan_images(SampleSpec("s", (str(slide),), roi=roi), cfg, model.card, model.checksum, str(tmp / "out"), dry_run=True)
    return plan


def test_plan_valid_patches_follow_the_roi_and_min_inside_frac(slide: Path, model, tmp_path: Path) -> None:
    roi = write_json(tmp_path / "roi.geojson", {"type": "FeatureCollection", "features": [
        feature([ring(64, 32, 224, 192), ring(128, 96, 160, 128)], "Tumor")]})
    plan = plan_one(slide, model, tmp_path, str(roi), min_inside_frac=0.5)
    grid = plan.grid  # level 0 scored (0.5 µm/px): cells of 16 level-0 px, patches of 4 × 4 cells
    inside = np.zeros((grid.cells_shape[0] * 16, grid.cells_shape[1] * 16))
    inside[32:192, 64:224] = 1
    inside[96:128, 128:160] = 0
    cells = inside.reshape(grid.cells_shape[0], 16, grid.cells_shape[1], 16).mean(axis=(1, 3))
    # brute force: a patch (a, b) covers cells a−3…a, b−3…b; its fraction is the mean of its in-image cells
    expect = np.zeros(grid.patches_shape, bool)
    for a in range(grid.patches_shape[0]):
        for b in range(grid.patches_shape[1]):
            c = cells[max(0, a - 3) : a + 1, max(0, b - 3) : b + 1]
            expect[a, b] = c.size > 0 and c.mean() >= 0.5
    np.testing.assert_array_equal(plan.valid, expect)
    assert plan.roi["inside_area_um2"] == pytest.approx((160 * 160 - 32 * 32) * 0.25)
    assert plan.roi["kind"] == "geojson" and plan.roi["classes"] == {"Tumor": 1} and plan.roi["coordinates"] == "pixels"
    strict = plan_one(slide, model, tmp_path, str(roi), min_inside_frac=1.0)
    assert strict.valid.sum() < plan.valid.sum() and (strict.valid <= plan.valid).all()
    none = plan_one(slide, model, tmp_path, None)
    assert none.roi is None and none.valid.all()
    assert plan.run_key != none.run_key != strict.run_key


def test_run_key_follows_the_roi_content_not_its_path(slide: Path, model, tmp_path: Path) -> None:
    doc = [feature([ring(64, 32, 224, 192)])]
    a = plan_one(slide, model, tmp_path, str(write_json(tmp_path / "a.geojson", doc)))
    b = plan_one(slide, model, tmp_path, str(write_json(tmp_path / "b.geojson", doc)))
    c = plan_one(slide, model, tmp_path, str(write_json(tmp_path / "c.geojson", [feature([ring(64, 32, 224, 190)])])))
    assert a.run_key == b.run_key != c.run_key
    assert a.roi["sha256"] == b.roi["sha256"] != c.roi["sha256"]
    # what intake compares with (sample_run_key_for) holds the ROI too: the sample's, or mask.roi of the job config
    from slidescore.io.storage import fingerprint
    from slidescore.stages.plan import sample_run_key_for

    cfg = JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}})
    fp = [fingerprint(str(slide))]
    assert sample_run_key_for(fp, model.checksum, model.card, cfg, image_ids=["s"], roi=str(tmp_path / "a.geojson")) == a.run_key
    with_cfg = cfg.replace(mask={"roi": str(tmp_path / "c.geojson")})
    assert sample_run_key_for(fp, model.checksum, model.card, with_cfg, image_ids=["s"]) == c.run_key


def test_include_exclude_and_intersect_with_the_automatic_mask(slide: Path, model, tmp_path: Path) -> None:
    doc = [feature([ring(0, 0, 320, 256)], "Tissue"), feature([ring(100, 80, 200, 180)], "Artefact")]
    roi = str(write_json(tmp_path / "r.geojson", doc))
    cut = plan_one(slide, model, tmp_path, roi, roi_exclude=["Artefact"])
    assert cut.roi["inside_area_um2"] == pytest.approx((320 * 256 - 100 * 100) * 0.25)
    only = plan_one(slide, model, tmp_path, roi, roi_include=["Artefact"])
    assert only.roi["inside_area_um2"] == pytest.approx(100 * 100 * 0.25)
    with pytest.raises(RoiError, match=r"no polygon left after filtering.*'Artefact' \(1\), 'Tissue' \(1\)"):
        plan_one(slide, model, tmp_path, roi, roi_include=["Tumor"])
    # intersect: the brightfield mask (foreground only in the box) and the ROI (the left half)
    fg_slide = write_tiff(tmp_path / "fg.tif", textured_image(H, W, seed=4, fg_box=(0, 0, 256, 192)), mpp=0.5)
    half = str(write_json(tmp_path / "half.geojson", [feature([ring(96, 0, 320, 256)])]))
    cfg = JobConfig.from_dict({"mask": {"roi": half}, "tiling": {"chunk_cells": 8}})
    [both] = plan_images(SampleSpec("s", (str(fg_slide),)), cfg, model.card, model.checksum, str(tmp_path / "o"), dry_run=True)
    cfg_r = JobConfig.from_dict({"mask": {"roi": half, "roi_mode": "replace"}, "tiling": {"chunk_cells": 8}})
    [repl] = plan_images(SampleSpec("s", (str(fg_slide),)), cfg_r, model.card, model.checksum, str(tmp_path / "o"), dry_run=True)
    cols = np.flatnonzero(both.valid.any(axis=0))
    # patch b covers cells b−3…b: from b = 7 half of it is in the ROI (cells ≥ 6); up to b = 14 it holds
    # foreground (cells < 12), a quarter ≥ min_foreground_frac; replace: up to the last patch (cell 19 alone)
    assert (cols.min(), cols.max()) == (7, 14)
    assert np.flatnonzero(repl.valid.any(axis=0)).tolist() == list(range(7, 23))
    assert (both.valid <= repl.valid).all()


@pytest.mark.parametrize(("doc", "match"), [
    ([feature([ring(330, 260, 400, 300)])], "lies outside the image"),
    ([feature([ring(2000, 1000, 2500, 1600)])], "look like µm or map coordinates"),
    ([feature([ring(-900, 10, 100, 100)])], "look like µm or map coordinates"),
    ([feature([ring(10, 10, 11, 11)])], "no patch position is at least 0.5 inside"),
])
def test_misplaced_rois_fail_the_sample_clearly(slide: Path, model, tmp_path: Path, doc: list, match: str) -> None:
    with pytest.raises(RoiError, match=match) as e:
        plan_one(slide, model, tmp_path, str(write_json(tmp_path / "bad.geojson", doc)))
    assert "sample 's'" in str(e.value)


def test_roi_for_a_sample_of_several_images_is_refused(slide: Path, model, tmp_path: Path) -> None:
    roi = str(write_json(tmp_path / "r.geojson", [feature([ring(0, 0, 100, 100)])]))
    spec = SampleSpec("two", (str(slide), str(slide.with_name("other.tif"))), roi=roi)
    with pytest.raises(RoiError, match="applies to one image"):
        plan_images(spec, JobConfig(), model.card, model.checksum, str(tmp_path / "o"), dry_run=True)


def test_mask_images_png_tiff_and_ome_zarr_labels(slide: Path, model, tmp_path: Path) -> None:
    import zarr
    from PIL import Image

    full = np.zeros((H, W), np.uint8)
    full[32:192, 64:224] = 1
    quarter = full[::4, ::4] * 255
    Image.fromarray(quarter).save(tmp_path / "m.png")
    import tifffile

    tifffile.imwrite(tmp_path / "m.tif", np.stack([quarter] * 3, -1), photometric="rgb")
    # OME-Zarr labels with a scale of 2 µm per pixel (= 4 level-0 px at 0.5 µm/px), written by zarr itself
    g = zarr.open_group(str(tmp_path / "m.zarr"), mode="w", zarr_format=2)
    g.create_array("0", data=quarter)
    g.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "y", "type": "space", "unit": "micrometer"},
                                                          {"name": "x", "type": "space", "unit": "micrometer"}],
                               "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [2.0, 2.0]}]}]}]
    areas = []
    for name in ("m.png", "m.tif", "m.zarr"):
        plan = plan_one(slide, model, tmp_path, str(tmp_path / name))
        assert plan.roi["kind"] == "mask" and plan.roi["mask_px0"] == [4.0, 4.0]
        areas.append(plan.roi["inside_area_um2"])
    assert areas == pytest.approx([160 * 160 * 0.25] * 3)
    Image.fromarray(np.zeros_like(quarter)).save(tmp_path / "empty.png")
    with pytest.raises(RoiError, match="covers no part of the image"):
        plan_one(slide, model, tmp_path, str(tmp_path / "empty.png"))
    # a scale of 4 µm per pixel (8 level-0 px): the box [8, 48) × [16, 56) in mask pixels is level-0 rows
    # [64, 384) and columns [128, 448), clipped to the 256 × 320 image
    g.attrs["multiscales"] = [{**g.attrs["multiscales"][0], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [4.0, 4.0]}]}]}]
    assert plan_one(slide, model, tmp_path, str(tmp_path / "m.zarr")).roi["inside_area_um2"] == pytest.approx(192 * 192 * 0.25)


def test_geojson_in_the_map_crs_of_a_geotiff(tmp_path: Path, random_model_dir: Path) -> None:
    from tests.conftest import make_model_package

    src = write_geotiff(tmp_path / "field.tif", textured_image(H, W, seed=6))  # 0.5 m/px, EPSG:32633, top-left at (E, N)
    fieldnet = load_model(str(make_model_package(tmp_path / "fieldnet", constant=0.7, mpp=0.5e6)), device="cpu")

    def to_map(x: float, y: float) -> list[float]:
        return [EASTING + 0.5 * x, NORTHING - 0.5 * y]

    pixel_ring = ring(64, 32, 224, 192)
    crs = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32633"}}
    mapped = {"type": "FeatureCollection", "crs": crs, "features": [feature([[to_map(*p) for p in pixel_ring]])]}
    cfg = JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}})

    def plan(doc: object, **mask: object):
        c = cfg.replace(mask=mask) if mask else cfg
        roi = str(write_json(tmp_path / "r.geojson", doc))
        return plan_images(SampleSpec("f", (str(src),), roi=roi), c, fieldnet.card, fieldnet.checksum, str(tmp_path / "o"),
                           dry_run=True)[0]

    in_map = plan(mapped)
    in_px = plan([feature([pixel_ring])])
    assert in_map.roi["coordinates"] == "map" and in_px.roi["coordinates"] == "pixels"
    np.testing.assert_array_equal(in_map.valid, in_px.valid)
    assert in_map.roi["inside_area_um2"] == pytest.approx(160 * 160 * 0.25e12)
    no_crs = {"type": "FeatureCollection", "features": mapped["features"]}
    with pytest.raises(RoiError, match="set mask.roi_crs: map"):
        plan(no_crs)
    assert plan(no_crs, roi_crs="map").roi["coordinates"] == "map"
    with pytest.raises(RoiError, match="reproject the ROI to EPSG:32633"):
        plan({**mapped, "crs": {"type": "name", "properties": {"name": "EPSG:4326"}}})


# -- manifest, config, CLI ---------------------------------------------------------------------
def test_manifest_roi_words_and_config_checks() -> None:
    entries = parse_manifest("a.tif roi=a.geojson\nB: b.tif roi=s3://x/b.png\nc.tif\n", "m")
    assert entries[0] == SampleSpec(None, ("a.tif",), roi="a.geojson")
    assert entries[1] == SampleSpec("B", ("b.tif",), roi="s3://x/b.png")
    assert entries[2] == "c.tif"
    with pytest.raises(ConfigError, match="applies to one image"):
        parse_manifest("S: a.tif b.tif roi=r.geojson", "m")
    with pytest.raises(ConfigError, match="at most one"):
        parse_manifest("a.tif roi=x roi=y", "m")
    with pytest.raises(ConfigError, match="names no image"):
        parse_manifest("roi=x.geojson", "m")
    with pytest.raises(ConfigError, match="mask.roi_mode"):
        JobConfig.from_dict({"mask": {"roi_mode": "union"}})
    with pytest.raises(ConfigError, match="mask.min_inside_frac"):
        JobConfig.from_dict({"mask": {"min_inside_frac": 1.5}})
    with pytest.raises(ConfigError, match="in both"):
        JobConfig.from_dict({"mask": {"roi_include": ["A"], "roi_exclude": ["A"]}})


def test_cli_scores_inside_the_roi_and_records_it(slide: Path, random_model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from slidescore.cli import main
    from slidescore.io.mosaic import read_level

    roi = write_json(tmp_path / "tumour.geojson", [feature([ring(64, 32, 224, 192)], "Tumor")])
    out = tmp_path / "out"
    (tmp_path / "job.yaml").write_text("report: {gradcam: false}\ntiling: {chunk_cells: 8}\n")
    args = ["score", str(slide), "--roi", str(roi), "--model", str(random_model_dir), "-o", str(out), "-q",
            "-c", str(tmp_path / "job.yaml")]
    assert main(args) == 0, capsys.readouterr().err
    run = json.loads((out / "slide" / "run.json").read_text())
    rec = run["input"]["roi"]
    assert rec["uri"] == str(roi) and rec["kind"] == "geojson" and len(rec["sha256"]) == 64
    assert rec["inside_area_um2"] == pytest.approx(160 * 160 * 0.25)
    # the scored cells: only those within a patch (3 cells) of the ROI's cells [2, 12) × [4, 14)
    prob = read_level(str(out / "slide" / "probabilities.ome.zarr"), 0)[0]
    ys, xs = np.nonzero(np.isfinite(prob))
    assert ys.size and ys.min() >= 2 - 3 and ys.max() <= 11 + 3 and xs.min() >= 4 - 3 and xs.max() <= 13 + 3
    assert run["area"]["scored_cells"] == ys.size
    # the counts and the sample call rest on the ROI's valid patches only: fields of k² = 16 scored cells
    plan = plan_one(slide, load_model(str(random_model_dir), device="cpu"), tmp_path, str(roi), method="brightfield")
    assert run["patches"]["scored"] == int(plan.valid.sum()) < plan.valid.size
    assert int(plan.grid.covered_cells(plan.valid).sum()) == ys.size
    assert run["decision"]["sample_call"]["per_class"]["parasitized"]["n_examined"] == ys.size // 16
    html = (out / "slide" / "report.html").read_text()
    assert "id='roi'" in html and rec["sha256"][:12] in html
    top = json.loads((out / "run.json").read_text())
    assert top["config"]["mask"]["roi"] == str(roi)
    capsys.readouterr()
    assert main([*args[:2], str(slide), *args[2:]]) == 2
    assert "--roi: applies to the one image" in capsys.readouterr().err


def test_a_bad_roi_fails_only_its_sample(slide: Path, model, tmp_path: Path) -> None:
    good = write_json(tmp_path / "g.geojson", [feature([ring(64, 32, 224, 192)])])
    bad = write_json(tmp_path / "b.geojson", [feature([ring(5000, 3000, 9000, 6000)])])
    cfg = JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}, "report": {"enabled": False}})
    res = score_samples([SampleSpec("good", (str(slide),), roi=str(good)), SampleSpec("bad", (str(slide),), roi=str(bad))],
                        cfg, str(tmp_path / "out"), model=model)
    assert [r.status for r in res] == ["ok", "failed"]
    line = json.loads((tmp_path / "out" / "failures.jsonl").read_text().splitlines()[0])
    assert line["error_type"] == "RoiError" and "look like µm or map coordinates" in line["error"]
    assert not (tmp_path / "out" / "bad" / "_SUCCESS").exists()

