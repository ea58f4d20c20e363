"""Outputs on an object store: a run reading s3://in/… and writing s3://out/… (real moto S3 server)."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from slidescore.config import JobConfig, SampleSpec
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.layout import MOSAIC
from tests.conftest import textured_image, write_tiff


def check_qupath_geojson(gj: dict[str, Any], regions: list[dict[str, Any]]) -> None:
    """The GeoJSON rules QuPath needs (as tests/test_regions.py), against the regions.json entries."""
    assert gj["type"] == "FeatureCollection" and len(gj["features"]) == len(regions)
    for f, r in zip(gj["features"], regions, strict=True):
        assert f["type"] == "Feature"
        uuid.UUID(f["id"])
        geom = f["geometry"]
        assert geom["type"] in ("Polygon", "MultiPolygon")  # cells touching at a corner: one part each
        polygons = [geom["coordinates"]] if geom["type"] == "Polygon" else geom["coordinates"]
        outers = [poly[0] for poly in polygons]
        assert all(ring[0] == ring[-1] and len(ring) >= 4 for poly in polygons for ring in poly)
        y, x, h, w = r["bbox_px"]
        xs, ys = [p[0] for ring in outers for p in ring], [p[1] for ring in outers for p in ring]
        assert (min(xs), max(xs), min(ys), max(ys)) == (x, x + w, y, y + h)  # the outline spans the region's box
        props = f["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"] == r["class_name"]
        assert props["measurements"]["rank"] == r["rank"]
        assert all(isinstance(v, float) for v in props["measurements"].values())


def _store(uri: str) -> zarr.storage.FsspecStore:
    return zarr.storage.FsspecStore.from_url(uri, storage_options={"endpoint_url": os.environ["AWS_ENDPOINT_URL"]}, read_only=True)


@pytest.fixture()
def buckets(s3fs_client, tmp_path: Path) -> tuple[str, str]:
    tag = f"{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    names = (f"in-{tag}", f"out-{tag}")
    for n in names:
        s3fs_client.mkdir(n)
    return names


def _cfg(out: str) -> JobConfig:
    return JobConfig.from_dict({"output": {"uri": out}, "tiling": {"chunk_cells": 8}, "mask": {"min_foreground_frac": 0.05},
                                "regions": {"thresholds": [0.45]}})


@pytest.fixture()
def slide(tmp_path: Path) -> Path:
    img = textured_image(520, 480, seed=21, fg_box=(60, 40, 380, 360))
    return write_tiff(tmp_path / "slide.tif", img, mpp=0.25, n_levels=2, tile_px=128)


@pytest.mark.s3
def test_s3_in_s3_out_equals_local_run(tmp_path: Path, buckets, s3fs_client, slide: Path, random_model_dir: Path) -> None:
    from ome_zarr_models.v04 import Image, ImageLabel

    bin_, bout = buckets
    s3fs_client.put(str(slide), f"{bin_}/slides/slide.tif")
    model = load_model(str(random_model_dir))
    (local,) = score_samples([str(slide)], _cfg(str(tmp_path / "out")), str(tmp_path / "out"), model=model)
    out_uri = f"s3://{bout}/results"
    (remote,) = score_samples([f"s3://{bin_}/slides/slide.tif"], _cfg(out_uri), out_uri, model=model)
    assert local.status == remote.status == "ok", remote.error
    assert remote.out_dir == f"{out_uri}/slide"
    # the whole layout is on S3 (nothing written locally), the completion marker included
    keys = {k.split(f"{bout}/results/", 1)[1] for k in s3fs_client.find(f"{bout}/results")}
    for name in ("run.json", "slide/_SUCCESS", "slide/run.json", "slide/regions.json", "slide/regions.csv",
                 "slide/regions.geojson", "slide/overview.png", "slide/.run_key", f"slide/{MOSAIC}/.zattrs",
                 f"slide/{MOSAIC}/OME/METADATA.ome.xml", f"slide/{MOSAIC}/labels/suspect/0/.zarray", "slide/mask.ome.zarr/0/.zarray"):
        assert name in keys, name
    assert any(k.startswith(f"slide/.blocks/{remote.run['run_key']}/") for k in keys)
    assert not any(".tmp-" in k for k in keys)
    # identical mosaic (every level) and labels
    for level in range(2):
        np.testing.assert_array_equal(mz.read_level(f"{remote.out_dir}/{MOSAIC}", level),
                                      mz.read_level(Path(local.out_dir) / MOSAIC, level))
    lab_s3 = np.asarray(zarr.open_group(_store(f"{remote.out_dir}/{MOSAIC}"), mode="r")["labels/suspect/0"])
    lab_local = np.asarray(zarr.open_group(str(Path(local.out_dir) / MOSAIC), mode="r")["labels/suspect/0"])
    np.testing.assert_array_equal(lab_s3, lab_local)
    # the same OME-Zarr checks as a local mosaic: validated with ome-zarr-models straight from S3
    img = Image.from_zarr(zarr.open_group(_store(f"{remote.out_dir}/{MOSAIC}"), mode="r"))
    assert [a.name for a in img.attributes.multiscales[0].axes] == ["c", "y", "x"]
    ImageLabel.from_zarr(zarr.open_group(_store(f"{remote.out_dir}/{MOSAIC}/labels/suspect"), mode="r"))
    Image.from_zarr(zarr.open_group(_store(f"{remote.out_dir}/mask.ome.zarr"), mode="r"))
    zarray = json.loads(s3fs_client.cat(f"{bout}/results/slide/{MOSAIC}/0/.zarray"))
    assert zarray["dimension_separator"] == "/" and zarray["compressor"]["id"] == "blosc"
    # regions: the same boxes and probabilities; the GeoJSON passes the QuPath checks
    regs_s3 = json.loads(s3fs_client.cat(f"{bout}/results/slide/regions.json"))["regions"]
    regs_local = json.loads((Path(local.out_dir) / "regions.json").read_text())["regions"]
    assert len(regs_s3) == len(regs_local) > 0
    for a, b in zip(regs_s3, regs_local, strict=True):
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    check_qupath_geojson(json.loads(s3fs_client.cat(f"{bout}/results/slide/regions.geojson")), regs_s3)
    assert s3fs_client.cat(f"{bout}/results/slide/overview.png") == (Path(local.out_dir) / "overview.png").read_bytes()
    run = json.loads(s3fs_client.cat(f"{bout}/results/slide/run.json"))
    assert run["input"]["uri"] == f"s3://{bin_}/slides/slide.tif" and run["input"]["etag"]


@pytest.mark.s3
def test_s3_output_resume_and_multi_image(tmp_path: Path, buckets, s3fs_client, slide: Path, random_model_dir: Path) -> None:
    bin_, bout = buckets
    s3fs_client.put(str(slide), f"{bin_}/slide.tif")
    model = load_model(str(random_model_dir))
    out_uri = f"s3://{bout}/r"
    cfg = _cfg(out_uri)
    (first,) = score_samples([f"s3://{bin_}/slide.tif"], cfg, out_uri, model=model)
    assert first.status == "ok", first.error
    success = s3fs_client.cat(f"{bout}/r/slide/_SUCCESS")
    geo = s3fs_client.cat(f"{bout}/r/slide/regions.geojson")
    clean = mz.read_level(f"{first.out_dir}/{MOSAIC}", 0)
    # a rerun is skipped and rewrites nothing (the completion marker keeps its timestamp)
    (again,) = score_samples([f"s3://{bin_}/slide.tif"], cfg, out_uri, model=model)
    assert again.status == "skipped" and s3fs_client.cat(f"{bout}/r/slide/_SUCCESS") == success
    # interrupted: no completion marker and one block marker lost → only that block is scored again
    markers = sorted(s3fs_client.find(f"{bout}/r/slide/.blocks"))
    assert len(markers) == first.run["blocks"]["total"] > 1
    s3fs_client.rm(f"{bout}/r/slide/_SUCCESS")
    s3fs_client.rm(markers[1])
    s3fs_client.invalidate_cache()
    (res,) = score_samples([f"s3://{bin_}/slide.tif"], cfg, out_uri, model=model)
    assert res.status == "ok" and res.run["blocks"]["resumed"] == len(markers) - 1
    np.testing.assert_array_equal(mz.read_level(f"{first.out_dir}/{MOSAIC}", 0), clean)
    assert s3fs_client.cat(f"{bout}/r/slide/regions.geojson") == geo
    # a sample of two images (one on S3, one local) written to S3; a bad one fails alone, recorded on S3
    spec = SampleSpec("smear", (f"s3://{bin_}/slide.tif", str(slide)))
    bad = SampleSpec("broken", (f"s3://{bin_}/slide.tif", f"s3://{bin_}/missing.tif"))
    ok, failed = score_samples([spec, bad], cfg, out_uri, model=model)
    assert ok.status == "ok" and failed.status == "failed" and "image 'missing'" in failed.error
    for iid in ("slide", "slide-2"):
        np.testing.assert_array_equal(mz.read_level(f"{out_uri}/smear/images/{iid}/{MOSAIC}", 0), clean)
    doc = json.loads(s3fs_client.cat(f"{bout}/r/smear/regions.json"))
    assert doc["n_regions_total"] == 2 * first.run["regions"]["total"]
    assert s3fs_client.exists(f"{bout}/r/smear/_SUCCESS")
    rows = [json.loads(line) for line in s3fs_client.cat(f"{bout}/r/failures.jsonl").decode().splitlines()]
    assert [r["sample_id"] for r in rows] == ["broken"]
