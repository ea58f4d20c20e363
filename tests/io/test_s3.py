"""Reading from a real S3 API server on loopback (moto server mode) through s3fs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from botocore.exceptions import ClientError

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.errors import InputError, SampleNotFoundError, UnsupportedImageError
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.run.local import score_samples
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


# -- storage failures as per-sample errors ------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def small_tif(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = textured_image(192, 160, seed=17, fg_box=(16, 16, 150, 120))
    return write_tiff(tmp_path_factory.mktemp("small") / "good.tif", img, mpp=0.5)


def _run(uris: list[str], out: Path, model_dir: Path) -> dict[str, Any]:
    results = score_samples(uris, JobConfig.from_dict({"tiling": {"chunk_cells": 8}}), str(out), model=load_model(str(model_dir)))
    return {r.sample_id: r for r in results}


def test_zero_byte_and_missing_objects_fail_alone(bucket: str, s3fs_client, small_tif: Path, tmp_path: Path,
                                                  random_model_dir: Path) -> None:
    s3fs_client.put(str(small_tif), f"{bucket}/good.tif")
    s3fs_client.pipe(f"{bucket}/empty.tif", b"")
    by_id = _run([f"s3://{bucket}/empty.tif", f"s3://{bucket}/missing.tif", f"s3://{bucket}/good.tif"], tmp_path, random_model_dir)
    assert by_id["good"].status == "ok" and (tmp_path / "good" / "_SUCCESS").exists()
    assert by_id["empty"].status == "failed" and "empty (0 bytes)" in by_id["empty"].error and "re-upload" in by_id["empty"].error
    assert by_id["missing"].status == "failed" and by_id["missing"].error_type == "SampleNotFoundError"
    assert f"s3://{bucket}/missing.tif" in by_id["missing"].error and "check the bucket, key" in by_id["missing"].error
    failed = sorted(json.loads(x)["sample_id"] for x in (tmp_path / "failures.jsonl").read_text().splitlines())
    assert failed == ["empty", "missing"]


def test_wrong_endpoint_fails_the_sample_quickly_and_others_finish(monkeypatch: pytest.MonkeyPatch, s3_server: str,
                                                                   small_tif: Path, tmp_path: Path, random_model_dir: Path) -> None:
    # a port held bound but not listening: connections are refused, and no other process (a server another
    # test starts meanwhile) can take it, as one picked and released could be — that made this test flaky
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{held.getsockname()[1]}"
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        t0 = time.perf_counter()
        by_id = _run(["s3://slides/remote.tif", str(small_tif)], tmp_path, random_model_dir)
        elapsed = time.perf_counter() - t0
    assert by_id["good"].status == "ok"
    err = by_id["remote"]
    assert err.status == "failed" and err.error_type == "InputError"
    assert "cannot reach the storage endpoint" in err.error and "AWS_ENDPOINT_URL" in err.error and endpoint in err.error
    assert elapsed < 60, f"a refused connection took {elapsed:.1f} s with the default timeouts and retries"


@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory: pytest.TempPathFactory, small_tif: Path):
    """A second moto server that enforces IAM once set up: a bucket, two objects and a user allowed to read
    only ``lab/open/*`` are made with authorisation off, then moto's ``/moto-api/reset-auth`` turns it on.

    The policy grants by *resource*, not by action name: moto releases map a HEAD or a ListObjectsV2 to
    different IAM action names (5.2 checks HEAD against an action that ``s3:GetObject`` does not cover),
    and what this test is about is our error for an object the credentials may not read."""
    import boto3

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "INITIAL_NO_AUTH_ACTION_COUNT"}
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start on {endpoint}") from None
                time.sleep(0.1)
        admin = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="admin", aws_secret_access_key="admin")
        iam, s3 = boto3.client("iam", **admin), boto3.client("s3", **admin)
        iam.create_user(UserName="reader")
        iam.put_user_policy(UserName="reader", PolicyName="read-open", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:Get*", "s3:List*", "s3:Head*"],
                           "Resource": ["arn:aws:s3:::lab", "arn:aws:s3:::lab/open/*"]}]}))
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        s3.create_bucket(Bucket="lab")
        data = small_tif.read_bytes()
        s3.put_object(Bucket="lab", Key="open/good.tif", Body=data)
        s3.put_object(Bucket="lab", Key="secret/locked.tif", Body=data)
        # authorisation from now on, whatever number of calls this moto release counted above
        req = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["status"] == "ok"
        reader = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"])
        assert reader.head_object(Bucket="lab", Key="open/good.tif")["ContentLength"] == len(data)
        with pytest.raises(ClientError, match="403|Forbidden|AccessDenied"):  # the server itself enforces the policy
            reader.head_object(Bucket="lab", Key="secret/locked.tif")
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_access_denied_is_a_clear_per_sample_error(monkeypatch: pytest.MonkeyPatch, s3_server: str, iam_s3: tuple[str, str, str],
                                                   tmp_path: Path, random_model_dir: Path) -> None:
    endpoint, key_id, secret = iam_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    by_id = _run(["s3://lab/secret/locked.tif", "s3://lab/open/good.tif"], tmp_path, random_model_dir)
    assert by_id["good"].status == "ok", by_id["good"].error  # the same server, credentials and pixels: allowed
    err = by_id["locked"]
    assert err.status == "failed" and err.error_type == "InputError"
    assert "s3://lab/secret/locked.tif" in err.error and "access denied" in err.error and "s3:GetObject" in err.error
