"""Reading from a real S3 API server on loopback (moto server mode) through s3fs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from slidescore.config import JobConfig
from slidescore.errors import InputError, SampleNotFoundError, UnsupportedImageError
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.pipeline import score_samples
from slidescore.types import Box
from tests.conftest import textured_image, write_tiff

pytestmark = pytest.mark.s3


@pytest.fixture()
def bucket(s3fs_client, tmp_path: Path) -> str:
    name = f"in-{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(name)
    return name


def test_same_pixels_and_scores_from_disk_and_s3(tmp_path: Path, bucket: str, s3fs_client, random_model_dir: Path) -> None:
    img = textured_image(640, 560, seed=9, fg_box=(64, 32, 480, 400))
    tif = write_tiff(tmp_path / "slide.tif", img, mpp=0.25, n_levels=2, compression="jpeg", tile_px=128)
    s3fs_client.put(str(tif), f"{bucket}/slides/slide.tif")
    uri = f"s3://{bucket}/slides/slide.tif"
    local, remote = open_image(str(tif)), open_image(uri)
    try:
        assert remote.levels == local.levels and remote.mpp == pytest.approx(local.mpp)
        box = Box(100, 50, 300, 260)
        np.testing.assert_array_equal(remote.read(1, box), local.read(1, box))
    finally:
        local.close()
        remote.close()
    model = load_model(str(random_model_dir))
    cfg = JobConfig.from_dict({"tiling": {"chunk_cells": 8}})
    maps = []
    for src, out in ((str(tif), tmp_path / "a"), (uri, tmp_path / "b")):
        (res,) = score_samples([src], cfg, str(out), model=model)
        assert res.status == "ok", res.error
        maps.append(mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0))
        if src == uri:
            assert res.run["input"]["etag"] and res.run["input"]["uri"] == uri
    np.testing.assert_array_equal(maps[0], maps[1])


def test_s3_bad_inputs_give_clear_errors(bucket: str, s3fs_client, tmp_path: Path) -> None:
    with pytest.raises(SampleNotFoundError, match="not found"):
        open_image(f"s3://{bucket}/missing.tif")
    s3fs_client.pipe(f"{bucket}/empty.tif", b"")
    with pytest.raises(UnsupportedImageError, match="empty"):
        open_image(f"s3://{bucket}/empty.tif")
    s3fs_client.pipe(f"{bucket}/notes.tif", b"hello, not a tiff")
    with pytest.raises(UnsupportedImageError, match="not a readable TIFF"):
        open_image(f"s3://{bucket}/notes.tif")


def test_wrong_endpoint_is_a_clear_input_error(monkeypatch: pytest.MonkeyPatch, s3_server: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("SLIDESCORE_S3_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("SLIDESCORE_S3_MAX_ATTEMPTS", "1")
    with pytest.raises(InputError, match="AWS_ENDPOINT_URL"):
        open_image("s3://whatever/slide.tif")


def test_ome_zarr_from_s3(tmp_path: Path, bucket: str, s3fs_client) -> None:
    import zarr

    img = textured_image(300, 200, seed=4)
    root = zarr.open_group(str(tmp_path / "img.ome.zarr"), mode="w", zarr_format=2)
    root.create_array("0", data=np.moveaxis(img, -1, 0), chunks=(3, 64, 64))
    root.attrs["multiscales"] = [{"version": "0.4", "axes": [{"name": "c", "type": "channel"},
                                  {"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}],
                                  "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 0.5, 0.5]}]}]}]
    s3fs_client.put(str(tmp_path / "img.ome.zarr"), f"{bucket}/img.ome.zarr", recursive=True)
    r = open_image(f"s3://{bucket}/img.ome.zarr")
    assert r.mpp == pytest.approx(0.5) and r.levels[0].height == 300
    np.testing.assert_array_equal(r.read(0, Box(10, 20, 30, 40)), img[10:40, 20:60])


def test_list_images_under_a_prefix(bucket: str, s3fs_client, tmp_path: Path) -> None:
    from slidescore.io.storage import list_images

    for key in ("b.svs", "a.tif", "notes.txt", "sub/c.tif"):
        s3fs_client.pipe(f"{bucket}/in/{key}", b"x")
    s3fs_client.pipe(f"{bucket}/in/d.ome.zarr/.zattrs", b"{}")
    assert list_images(f"s3://{bucket}/in/") == [f"s3://{bucket}/in/{k}" for k in ("a.tif", "b.svs", "d.ome.zarr")]
    (tmp_path / "x.tiff").write_bytes(b"x")
    (tmp_path / "y.zarr").mkdir()
    (tmp_path / "z.png").write_bytes(b"x")
    assert list_images(str(tmp_path)) == [str(tmp_path / "x.tiff"), str(tmp_path / "y.zarr")]
    with pytest.raises(SampleNotFoundError):
        list_images(f"s3://{bucket}/nothing-here/")
