"""Regions of interest on object storage (issue 20, item 1): a GeoJSON and a mask PNG read from the
loopback S3 server, an image on S3, the local runner and the Ray job (``jobs.score`` with a manifest
line ``URI roi=s3://…``); the ROI travels inside the plan, so the Ray actors score exactly the
patches the local runner does."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest

from slidescore.config import JobConfig, SampleSpec
from slidescore.io import mosaic as mz
from slidescore.io.roi_source import load_roi
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff

pytestmark = pytest.mark.s3

GEOJSON = [{"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
            "geometry": {"type": "Polygon", "coordinates": [[[64, 32], [224, 32], [224, 192], [64, 192], [64, 32]]]}}]


@pytest.fixture()
def bucket(s3fs_client, tmp_path: Path) -> str:
    name = f"roi-{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(name)
    return name


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    d = tmp_path_factory.mktemp("roi_s3")
    mask = np.zeros((64, 80), np.uint8)  # a quarter-resolution mask of the 256 × 320 slide
    mask[8:48, 16:56] = 255
    Image.fromarray(mask).save(d / "mask.png")
    (d / "roi.geojson").write_text(json.dumps(GEOJSON))
    write_tiff(d / "slide.tif", textured_image(256, 320, seed=8), mpp=0.5)
    return {"slide": d / "slide.tif", "geojson": d / "roi.geojson", "png": d / "mask.png"}


def _cfg() -> JobConfig:
    return JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}, "report": {"enabled": False},
                                "model": {"device": "cpu"}})


def test_roi_files_on_s3_score_like_local_ones(s3fs_client, bucket: str, files: dict[str, Path], random_model_dir: Path,
                                               tmp_path: Path) -> None:
    for name in ("slide.tif", "roi.geojson", "mask.png"):
        key = {"slide.tif": "slide", "roi.geojson": "geojson", "mask.png": "png"}[name]
        s3fs_client.put(str(files[key]), f"{bucket}/in/{name}")
    remote = load_roi(f"s3://{bucket}/in/roi.geojson")
    assert remote.sha256 == hashlib.sha256(files["geojson"].read_bytes()).hexdigest() == load_roi(str(files["geojson"])).sha256
    model = load_model(str(random_model_dir), device="cpu")
    specs = [SampleSpec("local", (str(files["slide"]),), roi=str(files["geojson"])),
             SampleSpec("s3poly", (f"s3://{bucket}/in/slide.tif",), roi=f"s3://{bucket}/in/roi.geojson"),
             SampleSpec("s3mask", (f"s3://{bucket}/in/slide.tif",), roi=f"s3://{bucket}/in/mask.png"),
             SampleSpec("missing", (str(files["slide"]),), roi=f"s3://{bucket}/in/nope.geojson")]
    local = tmp_path / "out"  # the inputs and ROIs are on S3; S3 outputs are tested in test_s3_output.py
    res = score_samples(specs, _cfg(), str(local), model=model)
    assert [r.status for r in res] == ["ok", "ok", "ok", "failed"], [r.error for r in res]
    assert res[3].error_type == "RoiError" and "cannot be read" in res[3].error
    assert "nope.geojson" in res[3].error and "sample 'missing'" in res[3].error
    mosaics = {sid: mz.read_level(str(local / sid / "probabilities.ome.zarr"), 0) for sid in ("local", "s3poly", "s3mask")}
    np.testing.assert_array_equal(mosaics["s3poly"], mosaics["local"])
    np.testing.assert_array_equal(mosaics["s3mask"], mosaics["local"])  # the same box as a mask image
    _, ys, xs = np.nonzero(np.isfinite(mosaics["local"]))  # the ROI's cells [2, 12) × [4, 14), give or take a patch
    assert ys.size and ys.min() >= 2 - 3 and ys.max() <= 11 + 3 and xs.min() >= 4 - 3 and xs.max() <= 13 + 3
    runs = {sid: json.loads((local / sid / "run.json").read_text()) for sid in ("s3poly", "s3mask")}
    assert runs["s3poly"]["input"]["roi"]["uri"] == f"s3://{bucket}/in/roi.geojson"
    assert runs["s3poly"]["input"]["roi"]["sha256"] == remote.sha256
    assert runs["s3mask"]["input"]["roi"]["kind"] == "mask"
    assert runs["s3poly"]["input"]["roi"]["inside_area_um2"] == runs["s3mask"]["input"]["roi"]["inside_area_um2"] \
        == pytest.approx(160 * 160 * 0.25)
    failure = json.loads((local / "failures.jsonl").read_text().splitlines()[0])
    assert failure["sample_id"] == "missing" and failure["error_type"] == "RoiError"


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    import ray

    with pytest.MonkeyPatch.context() as mp:  # as tests/test_distributed.py: workers inherit the S3 endpoint; no auth token
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.mark.ray
@pytest.mark.slow
def test_ray_job_with_manifest_roi_equals_the_local_runner(ray_cluster, s3fs_client, bucket: str, files: dict[str, Path],
                                                           random_model_dir: Path, tmp_path: Path) -> None:
    from jobs.score import main

    s3fs_client.put(str(files["geojson"]), f"{bucket}/roi.geojson")
    manifest = tmp_path / "samples.txt"
    manifest.write_text(f"tumour: {files['slide']} roi=s3://{bucket}/roi.geojson\n{files['slide']}\n")
    out = tmp_path / "ray"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({**_cfg().to_dict(), "model": {"name": str(random_model_dir), "device": "cpu"},
                               "output": {"uri": str(out)}, "samples": {"manifest": str(manifest)},
                               "cluster": {"n_actors": 2, "num_cpus_per_actor": 0.5}}))
    assert main(["--config", str(job), "-q"]) == 0
    model = load_model(str(random_model_dir), device="cpu")
    (ref,) = score_samples([SampleSpec("tumour", (str(files["slide"]),), roi=str(files["geojson"]))], _cfg(),
                           str(tmp_path / "local"), model=model)
    assert ref.status == "ok"
    ray_map = mz.read_level(str(out / "tumour" / "probabilities.ome.zarr"), 0)
    np.testing.assert_array_equal(ray_map, mz.read_level(str(tmp_path / "local" / "tumour" / "probabilities.ome.zarr"), 0))
    whole = mz.read_level(str(out / "slide" / "probabilities.ome.zarr"), 0)  # the line without roi: the whole slide
    assert np.isfinite(ray_map).sum() < np.isfinite(whole).sum()
    run = json.loads((out / "tumour" / "run.json").read_text())
    assert run["input"]["roi"]["uri"] == f"s3://{bucket}/roi.geojson"
    assert "roi" not in json.loads((out / "slide" / "run.json").read_text())["input"]
