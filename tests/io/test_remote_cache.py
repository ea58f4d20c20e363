"""The per-node cache of remote slides read through OpenSlide (slidescore.io.remote_cache), against
the loopback S3 server: whole multi-file slides, ranged parallel GETs, keys by ETag, LRU eviction
that spares open slides, one fetch when several processes want the same slide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slidescore.errors import InputError, SampleNotFoundError, UnsupportedImageError
from slidescore.io import remote_cache
from slidescore.io.remote_cache import fetch_slide

pytestmark = pytest.mark.s3


def _put(fs: Any, key: str, data: bytes) -> str:
    bucket = key.split("/", 1)[0]
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    fs.pipe_file(key, data)
    return f"s3://{key}"


def _blob(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def test_fetch_once_then_hit(s3fs_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote_cache, "RANGE_BYTES", 1000)  # 37 ranged GETs, in parallel
    data = _blob(36_500, 1)
    uri = _put(s3fs_client, "cache-a/x/slide.svs", data)
    first = fetch_slide(uri, cache_dir=str(tmp_path))
    assert Path(first.path).read_bytes() == data and Path(first.path).name == "slide.svs"
    assert first.stats["cache_hit"] is False and first.stats["bytes"] == len(data) and first.stats["files"] == 1
    second = fetch_slide(uri, cache_dir=str(tmp_path))
    assert second.path == first.path and second.stats["cache_hit"] is True and second.stats["bytes"] == 0
    first.close()
    second.close()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_a_changed_object_is_fetched_again(s3fs_client: Any, tmp_path: Path) -> None:
    uri = _put(s3fs_client, "cache-b/slide.svs", _blob(5000, 1))
    old = fetch_slide(uri, cache_dir=str(tmp_path))
    old.close()
    _put(s3fs_client, "cache-b/slide.svs", _blob(5000, 2))  # same size, new ETag
    new = fetch_slide(uri, cache_dir=str(tmp_path))
    assert new.path != old.path and not new.stats["cache_hit"]
    assert Path(new.path).read_bytes() == _blob(5000, 2)
    new.close()


def test_mirax_and_vms_are_fetched_whole(s3fs_client: Any, tmp_path: Path) -> None:
    parts = {"slide.mrxs": b"mrxs", "slide/Slidedat.ini": b"[GENERAL]\n", "slide/Index.dat": _blob(300, 3),
             "slide/Data0000.dat": _blob(4000, 4)}
    for k, v in parts.items():
        _put(s3fs_client, f"cache-c/m/{k}", v)
    _put(s3fs_client, "cache-c/m/slide2.mrxs", b"other")  # a neighbour that is not part of it
    got = fetch_slide("s3://cache-c/m/slide.mrxs", cache_dir=str(tmp_path))
    root = Path(got.path).parent
    assert {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()} == set(parts)
    assert all((root / k).read_bytes() == v for k, v in parts.items())
    assert got.stats["files"] == 4 and got.stats["bytes"] == sum(len(v) for v in parts.values())
    got.close()
    with pytest.raises(SampleNotFoundError, match="MIRAX data folder .* is missing"):
        fetch_slide("s3://cache-c/m/slide2.mrxs", cache_dir=str(tmp_path))

    _put(s3fs_client, "cache-c/v/a.vms", b"[Virtual Microscope Specimen]\nNoJpegColumns=1\nImageFile=a.jpg\n"
                                         b"ImageFile(1,0)=a2.jpg\nMapFile=a_map.jpg\nOptimisationFile=a.opt\n")
    for name in ("a.jpg", "a2.jpg", "a_map.jpg", "a.opt"):
        _put(s3fs_client, f"cache-c/v/{name}", name.encode())
    got = fetch_slide("s3://cache-c/v/a.vms", cache_dir=str(tmp_path))
    assert sorted(p.name for p in Path(got.path).parent.iterdir()) == ["a.jpg", "a.opt", "a.vms", "a2.jpg", "a_map.jpg"]
    got.close()
    _put(s3fs_client, "cache-c/v/b.vms", b"[Virtual Microscope Specimen]\nImageFile=b.jpg\n")
    with pytest.raises(SampleNotFoundError, match=r"names 'b.jpg', which is missing"):
        fetch_slide("s3://cache-c/v/b.vms", cache_dir=str(tmp_path))
    _put(s3fs_client, "cache-c/v/c.vms", b"[Virtual Microscope Specimen]\nImageFile=../../etc/passwd\n")
    with pytest.raises(UnsupportedImageError, match="not a file beside it"):
        fetch_slide("s3://cache-c/v/c.vms", cache_dir=str(tmp_path))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # failures leave nothing behind


def test_lru_eviction_spares_open_slides(s3fs_client: Any, tmp_path: Path) -> None:
    uris = [_put(s3fs_client, f"cache-d/s{i}.svs", _blob(1000, i)) for i in range(4)]
    limit = 2500  # two slides fit
    a = fetch_slide(uris[0], cache_dir=str(tmp_path), cache_max_bytes=limit)  # kept open: pinned
    b = fetch_slide(uris[1], cache_dir=str(tmp_path), cache_max_bytes=limit)
    b.close()
    time.sleep(0.01)
    c = fetch_slide(uris[2], cache_dir=str(tmp_path), cache_max_bytes=limit)  # evicts b (a is open)
    c.close()
    assert Path(a.path).exists() and not Path(b.path).exists() and Path(c.path).exists()
    a.close()
    time.sleep(0.01)
    d = fetch_slide(uris[3], cache_dir=str(tmp_path), cache_max_bytes=limit)  # evicts a, the least recently used
    assert not Path(a.path).exists() and Path(c.path).exists() and Path(d.path).exists()
    d.close()
    with pytest.raises(InputError, match="above input.cache_max_bytes = 500"):
        fetch_slide(uris[0], cache_dir=str(tmp_path), cache_max_bytes=500)


def test_stale_temporary_folders_are_removed(s3fs_client: Any, tmp_path: Path) -> None:
    stale = tmp_path / "deadbeef.tmp-crashed"
    stale.mkdir()
    (stale / "part").write_bytes(b"x")
    old = time.time() - 2 * remote_cache._STALE_TMP_S
    os.utime(stale, (old, old))
    fresh = tmp_path / "cafe.tmp-fetching"
    fresh.mkdir()  # another process's fetch in progress
    fetch_slide(_put(s3fs_client, "cache-e/s.svs", b"abc"), cache_dir=str(tmp_path)).close()
    assert not stale.exists() and fresh.exists()


_FETCH = """
import json, sys
from slidescore.io.remote_cache import fetch_slide
got = fetch_slide(sys.argv[1], cache_dir=sys.argv[2])
print(json.dumps({"path": got.path, **got.stats}))
"""


@pytest.mark.slow
def test_processes_on_one_node_fetch_a_slide_once(s3fs_client: Any, tmp_path: Path) -> None:
    data = _blob(3_000_000, 9)
    uri = _put(s3fs_client, "cache-f/big.ndpi", data)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH, uri, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(3)]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert sorted(o["cache_hit"] for o in outs) == [False, True, True]  # one fetched, the others waited and read it
    assert len({o["path"] for o in outs}) == 1 and Path(outs[0]["path"]).read_bytes() == data


def test_an_unwritable_cache_folder_is_a_clear_error(s3fs_client: Any, tmp_path: Path) -> None:
    uri = _put(s3fs_client, "cache-g/s.svs", b"abc")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(InputError, match="input.cache_dir"):
        fetch_slide(uri, cache_dir=str(blocker / "cache"))
