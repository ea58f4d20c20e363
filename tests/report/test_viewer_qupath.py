"""napari layers built headless match the OME-Zarr transforms; the QuPath region outlines follow its
importer's rules and enclose exactly the thresholded cells; the QuPath tile heat map is bounded."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import zarr
from scipy import ndimage

from slidescore.cli import main
from slidescore.errors import ConfigError
from slidescore.io import mosaic as mz
from slidescore.report.qupath import tile_heatmap_geojson
from slidescore.report.viewer import build_layers, close_layers, open_viewer, resolve_sample_dir
from tests.test_regions import check_outline, polygon_area, polygons


def _ome_transforms(group: Path) -> list[tuple[list[float], list[float]]]:
    attrs = dict(zarr.open_group(str(group), mode="r").attrs)
    out = []
    for ds in attrs["multiscales"][0]["datasets"]:
        t = {c["type"]: c for c in ds["coordinateTransformations"]}
        out.append((t["scale"]["scale"][-2:], t["translation"]["translation"][-2:]))
    return out


def test_layers_have_the_ome_zarr_scale_and_translation(scored_batch) -> None:
    out, results = scored_batch
    res = results[0]
    sample = Path(res.out_dir)
    assert resolve_sample_dir(out, res.sample_id) == sample
    layers = build_layers(sample)
    try:
        _check_layers(layers, res, sample)
    finally:
        close_layers(layers)


def _check_layers(layers, res, sample: Path) -> None:
    by_name = {kw["name"]: (data, kw, kind) for data, kw, kind in layers}
    mpp0 = res.run["input"]["mpp0"]

    src, skw, kind = by_name[f"{res.sample_id} (source)"]
    assert kind == "image" and skw["rgb"] and skw["scale"] == (mpp0, mpp0) and skw["translate"] == (0.0, 0.0)
    assert skw["multiscale"] and [lv.shape[:2] for lv in src][0] == (1536, 1536)

    data, kw, kind = by_name["probability: parasitized"]
    ome = _ome_transforms(sample / "probabilities.ome.zarr")
    assert list(kw["scale"]) == ome[0][0] and list(kw["translate"]) == ome[0][1]
    # napari derives the other levels from level 0 (scale·2^l, translate + (2^l − 1)/2 · scale): the metadata agrees
    for lvl, (scale, trans) in enumerate(ome):
        f = 2**lvl
        assert scale == pytest.approx([s * f for s in kw["scale"]])
        assert trans == pytest.approx([t + (f - 1) / 2 * s for t, s in zip(kw["translate"], kw["scale"], strict=True)])
    # a cell's world centre is the centre of the source pixels it covers
    n = kw["scale"][0] / mpp0
    assert kw["translate"][0] + 3 * kw["scale"][0] == pytest.approx((3 * n + (n - 1) / 2) * mpp0)
    # lazily read values equal the mosaic
    ref = mz.read_level(sample / "probabilities.ome.zarr", 1)[0]
    np.testing.assert_array_equal(np.asarray(data[1][5:40:2, 3:30]), ref[5:40:2, 3:30])
    # napari reads a whole (thumbnail) level as np.asarray(level), i.e. level[...]
    np.testing.assert_array_equal(np.asarray(data[1]), ref)
    np.testing.assert_array_equal(data[1][..., 3:9], ref[:, 3:9])
    assert np.asarray(src[-1]).shape == src[-1].shape and src[-1][..., 0].shape == src[-1].shape[:2]
    assert kw["colormap"]["colors"][-1][3] == 1.0 and kw["colormap"]["colors"][0][3] == 0.0
    assert kw["contrast_limits"] == (0.0, 1.0)

    _, lkw, lkind = by_name["suspect (thresholded)"]
    lome = _ome_transforms(sample / "probabilities.ome.zarr" / "labels" / "suspect")
    assert lkind == "labels" and list(lkw["scale"]) == lome[0][0] and list(lkw["translate"]) == lome[0][1]

    rects, rkw, rkind = by_name["regions"]
    assert rkind == "shapes" and rkw["shape_type"] == "rectangle" and len(rects) == len(res.regions)
    r = res.regions[0]
    y, x, h, w = r.bbox_px
    np.testing.assert_allclose(rects[0][0], [(y - 0.5) * mpp0, (x - 0.5) * mpp0])
    np.testing.assert_allclose(rects[0][2], [(y + h - 0.5) * mpp0, (x + w - 0.5) * mpp0])
    assert rkw["features"]["rank"][0] == 1


def test_view_without_napari_says_how_to_install(scored_batch, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        import napari  # noqa: F401

        pytest.skip("napari is installed; this checks the message shown without it")
    except ImportError:
        pass
    out, _ = scored_batch
    assert main(["view", str(out)]) == 2
    assert "slidescore[view]" in capsys.readouterr().err
    assert main(["view", str(out / "nope")]) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the no-display check is for Linux (X11 / Wayland)")
def test_view_without_a_display_is_a_usage_error(scored_batch, monkeypatch: pytest.MonkeyPatch) -> None:
    """Qt aborts the whole process (SIGABRT) with no display; open_viewer says what to do first."""
    for var in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM"):
        monkeypatch.delenv(var, raising=False)
    _, results = scored_batch
    with pytest.raises(ConfigError, match="no display.*ssh -X"):
        open_viewer(results[0].out_dir)


def test_region_outlines_follow_qupath_rules_and_enclose_the_thresholded_cells(scored_batch) -> None:
    """regions.geojson as QuPath's importer reads it (PathIO: a FeatureCollection of Features with a
    Polygon / MultiPolygon in level-0 pixels, objectType, classification {name, [r, g, b]}, numeric
    measurements, strict JSON), each outline's area equal to ``area_um2`` (the issue's acceptance:
    within a cell) and enclosing exactly the region's cells of the thresholded level-0 map."""
    _, results = scored_batch
    checked = 0
    for res in results:
        sample = Path(res.out_dir)
        gj = json.loads((sample / "regions.geojson").read_text())
        listed = json.loads((sample / "regions.json").read_text())["regions"]
        assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(listed) == len(res.regions)
        json.dumps(gj, allow_nan=False)
        prob = mz.read_level(sample / "probabilities.ome.zarr", 0)[0]
        mpp0, thr = res.run["input"]["mpp0"], res.run["thresholds"]["parasitized"]
        structure = ndimage.generate_binary_structure(2, res.run["config"]["regions"]["connectivity"])
        labels, _ = ndimage.label(np.nan_to_num(prob, nan=0.0) >= thr, structure=structure)
        for f, r, row in zip(gj["features"], res.regions, listed, strict=True):
            assert f["type"] == "Feature" and uuid.UUID(f["id"])
            props = f["properties"]
            assert props["objectType"] == "annotation" and props["classification"]["name"] == r.class_name
            assert all(isinstance(c, int) for c in props["classification"]["color"])
            assert all(isinstance(v, float) for v in props["measurements"].values())
            assert props["bbox_px"] == row["bbox_px"] == list(r.bbox_px)  # the box stays, as a property
            assert row["outline"] == r.outline.summary() and row["outline"]["vertices"] > 0
            geom = f["geometry"]
            assert all(isinstance(v, float) for poly in polygons(geom) for ring in poly for pt in ring for v in pt)
            cell = r.outline.cell_px0
            assert abs(polygon_area(geom) * mpp0**2 - row["area_um2"]) <= (cell * mpp0) ** 2  # within a cell
            y, x = (int(v // cell) for v in r.peak_px)
            check_outline(r, geom, labels == labels[y, x], cell=cell, mpp=mpp0)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize("max_tiles", [20000, 40, 7])
def test_tile_heatmap_is_bounded_and_averages_scored_cells(scored_batch, max_tiles: int) -> None:
    _, results = scored_batch
    res = results[0]
    prob = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    cell_px0 = 32.0
    fc = tile_heatmap_geojson(prob, ["parasitized"], cell_px0, res.sample_id, max_tiles=max_tiles)
    feats = fc["features"]
    f = fc["properties"]["cells_per_tile"]
    assert 0 < len(feats) <= max_tiles
    if max_tiles == 20000:
        assert f == 1  # small image: one tile per cell
    for feat in feats[:: max(1, len(feats) // 25)]:
        ring = np.asarray(feat["geometry"]["coordinates"][0])
        x0, y0 = ring[0]
        ty, tx = int(y0 // (f * cell_px0)), int(x0 // (f * cell_px0))
        block = prob[0, ty * f : (ty + 1) * f, tx * f : (tx + 1) * f]
        assert feat["properties"]["objectType"] == "tile"
        assert feat["properties"]["measurements"]["probability"] == pytest.approx(float(np.nanmean(block)), abs=1e-4)
        assert ring[2][0] - x0 == pytest.approx(block.shape[1] * cell_px0)
    json.dumps(fc, allow_nan=False)  # strict JSON: QuPath rejects NaN
