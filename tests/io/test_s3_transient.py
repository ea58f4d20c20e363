"""A throttled object store while the mosaic is written: retried, classified, nothing corrupted.

A loopback HTTP proxy in front of the real moto S3 server answers ``503 SlowDown`` to PUTs of
level-0 mosaic chunks while told to; everything else passes through unchanged.
"""

from __future__ import annotations

import http.client
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from slidescore.config import JobConfig
from slidescore.io import mosaic as mz
from slidescore.io.outputs import read_bytes
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.layout import MOSAIC
from tests.conftest import textured_image, write_tiff

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class ThrottlingProxy:
    """Forward every request to ``upstream``; answer 503 SlowDown to the next ``fail`` matching PUTs."""

    def __init__(self, upstream: str, match: str) -> None:
        self.match, self.fail, self.failed = match, 0, 0
        host, port = upstream.removeprefix("http://").split(":")
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.command == "PUT" and proxy.match in self.path and proxy.fail > 0:
                    proxy.fail -= 1
                    proxy.failed += 1
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    self.close_connection = True
                    return
                conn = http.client.HTTPConnection(host, int(port), timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "expect")}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection", "date", "server"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else resp.getheader("Content-Length") or 0))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def throttled(s3_server: str, s3fs_client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[ThrottlingProxy, str]]:
    bucket = f"out-{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(bucket)
    proxy = ThrottlingProxy(s3_server, f"/{MOSAIC}/0/0/")  # level-0 chunk keys (0/c/y/x), not metadata
    # through the proxy, and without botocore's retries (nor its adaptive client-side rate limiter,
    # which would slow every later request): those of s3fs and of slidescore are under test
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("SLIDESCORE_S3_MAX_ATTEMPTS", "1")
    monkeypatch.setenv("SLIDESCORE_S3_RETRY_MODE", "standard")
    yield proxy, bucket
    proxy.close()


def test_throttled_chunk_writes_are_retried_then_classified(throttled: tuple[ThrottlingProxy, str], tmp_path: Path) -> None:
    proxy, bucket = throttled
    img = textured_image(400, 400, seed=8, fg_box=(40, 40, 320, 320))
    slide = write_tiff(tmp_path / "slide.tif", img, mpp=0.5, n_levels=1, tile_px=128)
    model = load_model("builtin:smearnet")
    cfg = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "report": {"enabled": False}})
    (local,) = score_samples([str(slide)], cfg, str(tmp_path / "local"), model=model)
    assert local.status == "ok", local.error
    out = f"s3://{bucket}/run"

    # a short burst of throttling: absorbed by the retries, the mosaic is complete and exact
    proxy.fail = 2
    (res,) = score_samples([str(slide)], cfg, out, model=model)
    assert res.status == "ok", res.error
    assert proxy.failed == 2 and proxy.fail == 0
    np.testing.assert_array_equal(mz.read_level(f"{out}/slide/{MOSAIC}", 0), mz.read_level(Path(local.out_dir) / MOSAIC, 0))

    # throttling that outlasts the retries: the sample fails with a transient storage error that
    # names the chunk write, and its earlier finished outputs stay intact
    before = read_bytes(f"{out}/slide/_SUCCESS")
    proxy.fail, proxy.failed = 10**6, 0
    cfg2 = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "report": {"enabled": False}, "output": {"overwrite": True}})
    (bad,) = score_samples([str(slide)], cfg2, f"s3://{bucket}/run2", model=model)
    assert bad.status == "failed"
    assert "transient storage error" in (bad.error or "") and "mosaic chunks" in (bad.error or ""), bad.error
    assert proxy.failed >= 2 * 5  # retried (by s3fs, 5 tries, then by slidescore) before giving up
    assert read_bytes(f"{out}/slide/_SUCCESS") == before

    # the store recovers: the same run resumes and completes, equal to the local run
    proxy.fail = 0
    (again,) = score_samples([str(slide)], cfg, f"s3://{bucket}/run2", model=model)
    assert again.status == "ok", again.error
    np.testing.assert_array_equal(mz.read_level(f"s3://{bucket}/run2/slide/{MOSAIC}", 0),
                                  mz.read_level(Path(local.out_dir) / MOSAIC, 0))
