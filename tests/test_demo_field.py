"""The second embedded default: a GeoTIFF field scene scored by the built-in multi-label model.

The recall the demo prints is recomputed here from the planted patterns (the truth file) and the
regions it wrote (``regions.geojson`` outlines, rasterised here), and the map-CRS regions are
checked against the GeoTIFF's own tags.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageDraw

from slidescore.cli import main

CLASSES = ("Fish", "Flower", "Sugar", "Gravel")


def rasterise(features: list[dict], size_px: int, scale: int) -> dict[str, np.ndarray]:
    """Each class's region outlines (level-0 pixel polygons, holes included) at 1/``scale`` of level 0."""
    n = -(-size_px // scale)
    out = {c: Image.new("1", (n, n), 0) for c in CLASSES}
    for f in features:
        g = f["geometry"]
        polys = g["coordinates"] if g["type"] == "MultiPolygon" else [g["coordinates"]]
        draw = ImageDraw.Draw(out[f["properties"]["classification"]["name"]])
        for rings in polys:
            for k, ring in enumerate(rings):  # exterior, then holes
                draw.polygon([(x / scale, y / scale) for x, y in ring], fill=0 if k else 1)
    return {c: np.asarray(im, bool) for c, im in out.items()}


@pytest.mark.slow
def test_field_demo_finds_the_planted_patterns_per_class(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["demo", "--kind", "field", "--output", str(tmp_path), "--seed", "3", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "per-class recall of the planted patterns" in out
    tif = next(tmp_path.glob("demo-field-*.tif"))
    with tifffile.TiffFile(tif) as t:  # a real tiled GeoTIFF pyramid
        assert t.is_geotiff and t.pages[0].is_tiled and len(t.series[0].levels) == 4
        geo = t.geotiff_metadata
        assert geo["ProjectedCSTypeGeoKey"] == 32633 and list(geo["ModelPixelScale"][:2]) == [10.0, 10.0]
        easting, northing = (float(v) for v in geo["ModelTiepoint"][3:5])
    truth = np.load(tif.with_suffix(".truth.npz"))["labels"]
    sample = next(p for p in tmp_path.iterdir() if p.is_dir())
    demo = json.loads((sample / "demo.json").read_text())
    run = json.loads((sample / "run.json").read_text())
    assert run["decision"]["operating_point"] == "precision_0.90"
    assert run["input"]["level_mpp"] == pytest.approx(20e6)  # level 1: 20 m/px, the model's resolution
    thresholds = run["thresholds"]
    assert len(set(thresholds.values())) == 4  # a threshold of its own per class

    # recall recomputed: the written outlines rasterised (8 level-0 px per pixel), read at the 32-px cells' centres
    size = truth.shape[1]
    features = json.loads((sample / "regions.geojson").read_text())["features"]
    assert {f["properties"]["classification"]["name"] for f in features} == set(CLASSES)
    masks = rasterise(features, size, 8)
    centres = np.arange(16, size, 32)
    for k, c in enumerate(CLASSES):
        detected = masks[c][2::4, 2::4]  # pixel (i·4 + 2) at 1/8 = level-0 px 32·i + 16, the cell centre
        lab = truth[k][np.ix_(centres, centres)]
        ids = [i for i in np.unique(lab) if i]
        found = sum(detected[lab == i].mean() >= 0.25 for i in ids)
        fig = next(f for f in demo["classes"] if f["class"] == c)
        assert (fig["planted"], fig["found"]) == (len(ids), found), c
        assert found / len(ids) >= 0.9, (c, found, len(ids))
        on_pattern = (detected & (lab > 0)).sum() / max(1, detected.sum())
        assert fig["area_precision"] == pytest.approx(on_pattern, abs=1e-9)
        assert on_pattern >= 0.6, (c, on_pattern)  # the regions lie mostly on the planted patterns
        assert f"{c:<8} {thresholds[c]:>9.3f}" in out
    # several labels at once: some cells are in regions of two classes
    assert (np.sum([m for m in masks.values()], axis=0) >= 2).any()

    # the same regions in the scene's CRS: the GeoTIFF's affine applied to the pixel outlines
    gj = json.loads((sample / "regions.map.geojson").read_text())
    assert gj["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    by_rank = {int(f["properties"]["measurements"]["rank"]): f for f in features}
    for f in gj["features"][:20]:
        px = by_rank[f["properties"]["rank"]]["geometry"]
        ring_px = np.asarray(px["coordinates"][0] if px["type"] == "Polygon" else px["coordinates"][0][0], float)
        ring_map = np.asarray(f["geometry"]["coordinates"][0] if f["geometry"]["type"] == "Polygon"
                              else f["geometry"]["coordinates"][0][0], float)
        expected = np.c_[easting + 10.0 * ring_px[:, 0], northing - 10.0 * ring_px[:, 1]]
        # the same corners (the map ring runs the other way round, from another start: compare as sets)
        assert len(ring_map) == len(ring_px) and set(map(tuple, ring_map.round(3))) == set(map(tuple, expected.round(3)))


def test_a_small_field_scene_is_a_georeferenced_pyramid_with_its_truth(tmp_path: Path) -> None:
    from slidescore.core.types import Box
    from slidescore.io import open_image
    from slidescore.offline.field import FieldSpec, make_scene, write_field_geotiff

    spec = FieldSpec(size_px=1024, seed=5, patterns_per_class=1, radius_px=(70.0, 110.0))
    scene = make_scene(spec)
    again = make_scene(spec)
    np.testing.assert_array_equal(scene.image, again.image)  # seeded: the same pixels every time
    tif = write_field_geotiff(tmp_path / "f.tif", scene, n_levels=3)
    r = open_image(str(tif))
    try:
        assert r.mpp == pytest.approx(10e6) and len(r.levels) == 3  # 10 m/px in µm/px
        geo = r.georeference  # type: ignore[attr-defined]
        assert geo["epsg"] == 32633 and geo["affine"] == pytest.approx([10.0, 0.0, 400_000.0, 0.0, -10.0, 5_100_000.0])
        np.testing.assert_array_equal(r.read(0, Box(100, 200, 50, 60)), scene.image[100:150, 200:260])  # lossless
        lvl1 = r.read(1, Box(0, 0, 512, 512)).astype(float)
        assert np.abs(lvl1 - scene.image.reshape(512, 2, 512, 2, 3).mean(axis=(1, 3))).max() <= 0.5  # area average
    finally:
        r.close()
    # no-data outside the rotated footprint, never inside it; one pattern per class, some overlapping
    assert (scene.image[~scene.footprint] == 0).all() and (scene.image[scene.footprint].max(axis=-1) > 0).all()
    assert not scene.footprint[0].all() and scene.footprint[512, 512]
    assert [p.class_name for p in scene.patterns] == list(CLASSES)
    truth = np.load(tif.with_suffix(".truth.npz"))
    np.testing.assert_array_equal(truth["labels"], scene.labels)
    for k, p in enumerate(scene.patterns):
        assert (scene.labels[k] == p.instance).sum() == p.area_px > 0
        assert not (scene.labels[k] > 0)[~scene.footprint].any()
