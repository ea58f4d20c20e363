"""GeoTIFF field images: affine and EPSG from real GeoKey tags, pixel size in metres → µm/px, and
region coordinates carried into map units (regions.json, regions.map.geojson, run.json)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import make_model_package, textured_image

# GeoKey ids (GeoTIFF 1.1): GTModelType 1024, GTRasterType 1025, GeographicType 2048, ProjectedCSType 3072,
# ProjLinearUnits 3076; values: projected 1 / geographic 2, PixelIsArea 1 / PixelIsPoint 2, metre 9001, foot 9002
EASTING, NORTHING = 500_000.0, 5_000_000.0


def write_geotiff(path: Path, img: np.ndarray, *, epsg: int = 32633, pixel_m: float = 0.5, model: int = 1,
                  raster_type: int = 1, units: int | None = 9001, transformation: list[float] | None = None) -> Path:
    """A tiled GeoTIFF with real GeoKeyDirectory, ModelPixelScale/ModelTiepoint (or ModelTransformation) tags."""
    keys = [(1024, model), (1025, raster_type), (2048 if model == 2 else 3072, epsg)]
    if units is not None:
        keys.append((3076, units))
    directory = [1, 1, 0, len(keys)] + [v for k, val in keys for v in (k, 0, 1, val)]
    extratags: list[tuple] = [(34735, "H", len(directory), directory, False)]
    if transformation is not None:
        extratags.append((34264, "d", 16, transformation, False))
    else:
        extratags += [(33550, "d", 3, (pixel_m, pixel_m, 0.0), False),
                      (33922, "d", 6, (0.0, 0.0, 0.0, EASTING, NORTHING, 0.0), False)]
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64), compression="zlib", extratags=extratags)
    return path


def _affine_apply(affine: list[float], y: float, x: float) -> tuple[float, float]:
    a, b, c, d, e, f = affine
    return a * x + b * y + c, d * x + e * y + f


def test_utm_geotiff_gives_mpp_epsg_and_affine(tmp_path: Path) -> None:
    img = textured_image(200, 300, seed=2)
    r = open_image(str(write_geotiff(tmp_path / "field.tif", img)))
    try:
        assert r.mpp == pytest.approx(0.5e6)  # 0.5 m/px in µm/px
        assert "ModelPixelScale" in r.mpp_source and "metre" in r.mpp_source
        geo = r.georeference  # type: ignore[attr-defined]
        assert geo["epsg"] == 32633 and geo["units"] == "metre" and geo["model"] == "projected"
        assert geo["affine"] == pytest.approx([0.5, 0.0, EASTING, 0.0, -0.5, NORTHING])
        np.testing.assert_array_equal(r.read(0, Box(10, 20, 30, 40)), img[10:40, 20:60])
    finally:
        r.close()


def test_transformation_point_convention_and_units(tmp_path: Path) -> None:
    img = textured_image(100, 100, seed=1)
    # a rotated 2 US-survey-ft grid given as ModelTransformation, tiepoint at pixel centres (PixelIsPoint)
    m = [1.2, 1.6, 0, 1000.0, 1.6, -1.2, 0, 2000.0, 0, 0, 0, 0, 0, 0, 0, 1]
    r = open_image(str(write_geotiff(tmp_path / "rot.tif", img, epsg=2263, raster_type=2, units=9003, transformation=m)))
    try:
        geo = r.georeference  # type: ignore[attr-defined]
        assert geo["units"] == "US survey foot" and geo["epsg"] == 2263
        # PixelIsPoint → corner convention: origin moves half a pixel up-left along both pixel axes
        assert geo["affine"] == pytest.approx([1.2, 1.6, 1000.0 - 0.6 - 0.8, 1.6, -1.2, 2000.0 - 0.8 + 0.6])
        assert r.mpp == pytest.approx(2.0 * 1200 / 3937 * 1e6)  # |(1.2, 1.6)| = 2 US ft per pixel
    finally:
        r.close()
    # a projected CRS without ProjLinearUnitsGeoKey: UTM is known to be metric
    r = open_image(str(write_geotiff(tmp_path / "nounit.tif", img, epsg=32733, units=None)))
    assert r.mpp == pytest.approx(0.5e6) and "EPSG:32733" in r.mpp_source
    r.close()


def test_geographic_degrees_are_refused_with_the_fix(tmp_path: Path, random_model_dir: Path) -> None:
    img = textured_image(128, 128, seed=3)
    src = write_geotiff(tmp_path / "wgs84.tif", img, epsg=4326, model=2, pixel_m=1e-5, units=None)
    r = open_image(str(src))
    assert r.mpp is None and r.georeference["units"] == "degree"  # type: ignore[attr-defined]
    r.close()
    (res,) = score_samples([str(src)], JobConfig.from_dict({"tiling": {"chunk_cells": 8}}), str(tmp_path / "out"),
                           model=load_model(str(random_model_dir)))
    assert res.status == "failed" and res.error_type == "ResolutionError"
    assert "geographic" in res.error and "EPSG:4326" in res.error and "input.mpp" in res.error and "wgs84" in res.error


def test_regions_carry_map_coordinates(tmp_path: Path) -> None:
    img = textured_image(256, 320, seed=5)
    img[:, :160] = 0  # no-data on the left half: only the right half is scored, so the region is off-centre
    src = write_geotiff(tmp_path / "field.tif", img)
    model = load_model(str(make_model_package(tmp_path / "fieldnet", constant=0.7, mpp=0.5e6)))
    cfg = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "mask": {"method": "nodata", "nodata_value": 0}})
    (res,) = score_samples([str(src)], cfg, str(tmp_path / "out"), model=model)
    assert res.status == "ok", res.error
    out = Path(res.out_dir)
    run = json.loads((out / "run.json").read_text())
    geo = run["input"]["georeference"]
    assert geo["epsg"] == 32633 and run["input"]["mpp0"] == pytest.approx(0.5e6)
    regions = json.loads((out / "regions.json").read_text())["regions"]
    assert len(regions) == 1
    reg = regions[0]
    cy, cx = reg["centroid_px"]
    assert cx > 160  # the scored half
    mx, my = _affine_apply(geo["affine"], cy, cx)
    assert (reg["centroid_map_x"], reg["centroid_map_y"]) == pytest.approx((EASTING + 0.5 * cx, NORTHING - 0.5 * cy))
    assert (reg["centroid_map_x"], reg["centroid_map_y"]) == pytest.approx((mx, my))
    y, x, h, w = reg["bbox_px"]
    assert reg["bbox_map"] == pytest.approx([EASTING + 0.5 * x, NORTHING - 0.5 * (y + h), EASTING + 0.5 * (x + w), NORTHING - 0.5 * y])
    with (out / "regions.csv").open() as f:  # the spreadsheet carries the map centroid too
        (row,) = list(csv.DictReader(f))
    assert (float(row["centroid_map_x"]), float(row["centroid_map_y"])) == pytest.approx((mx, my))
    gj = json.loads((out / "regions.map.geojson").read_text())
    assert gj["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32633"
    (feat,) = gj["features"]
    ring = np.asarray(feat["geometry"]["coordinates"][0])
    assert ring[0].tolist() == ring[-1].tolist()
    assert (ring[:, 0].min(), ring[:, 1].min(), ring[:, 0].max(), ring[:, 1].max()) == pytest.approx(tuple(reg["bbox_map"]))
    assert feat["properties"]["area_map_units2"] == pytest.approx(reg["area_um2"] / 1e12)  # µm² → m²
    # the pixel GeoJSON for QuPath stays in level-0 pixels
    px = json.loads((out / "regions.geojson").read_text())
    assert "crs" not in px and max(p[0] for p in px["features"][0]["geometry"]["coordinates"][0]) <= 320
