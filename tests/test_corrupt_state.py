"""Corrupt state tolerated: unreadable markers are absent, small writes are atomic, and a sample
folder being written by one run is never rewritten by a run of another run key (the lease)."""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import InputError
from slidescore.io import mosaic as mz
from slidescore.io.outputs import create_exclusive, write_bytes
from slidescore.model import load_model
from slidescore.run import lifecycle
from slidescore.run.local import score_image, score_samples
from slidescore.stages.lease import LEASE, Lease, acquire_lease, release_lease, renew_lease
from slidescore.stages.plan import dry_run_rows, plan_images
from slidescore.stages.recipe import BlockRecipe
from slidescore.stages.records import model_info
from tests.conftest import textured_image, write_tiff

MOSAIC = "probabilities.ome.zarr"


def _cfg(out: Path | str, **sections: dict) -> JobConfig:
    base: dict[str, Any] = {"output": {"uri": str(out)}, "mask": {"min_foreground_frac": 0.05}, "tiling": {"chunk_cells": 16}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return JobConfig.from_dict(base)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = textured_image(600, 520, seed=5, fg_box=(90, 60, 380, 300))
    return write_tiff(tmp_path_factory.mktemp("img") / "slide.tif", img, mpp=0.5)


@pytest.fixture(scope="module")
def model_a(random_model_dir: Path) -> Any:
    return load_model(str(random_model_dir))


@pytest.fixture(scope="module")
def model_b(constant_model_dir: Path) -> Any:
    return load_model(str(constant_model_dir))


def _tree(folder: Path) -> dict[str, bytes]:
    """Every file under a folder, by relative path (what a run wrote, byte for byte)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _lease_doc(run_key: str, *, expires_in_s: float, host: str = "other-host", pid: int = 4242) -> bytes:
    def iso(t: float) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))

    now = time.time()
    return json.dumps({"run_key": run_key, "host": host, "pid": pid, "token": "t" * 32, "acquired": iso(now - 60),
                       "renewed": iso(now - 60), "expires": iso(now + expires_in_s)}).encode()


# -- 1. unreadable markers are absent ----------------------------------------------------------------
@pytest.mark.parametrize("garbage", [b"", b"{\"run_key\": \"abc", b"\xff\xfe\x00binary", b"[]", b"{}"],
                         ids=["empty", "truncated", "binary", "list", "no-key"])
def test_unreadable_success_means_not_finished(tmp_path: Path, slide: Path, model_a: Any, garbage: bytes,
                                               caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tmp_path)
    (first,) = score_samples([str(slide)], cfg, str(tmp_path), model=model_a)
    out = Path(first.out_dir)
    clean = mz.read_level(out / MOSAIC, 0)
    (out / "_SUCCESS").write_bytes(garbage)  # a crash of an older version, a truncated copy
    with caplog.at_level(logging.WARNING):
        (again,) = score_samples([str(slide)], cfg, str(tmp_path), model=model_a)
    assert again.status == "ok", again.error  # redone (resumed: every block's record is there), not skipped, no crash
    # every block with foreground resumed from its record (blocks without foreground have none: nothing to do)
    assert again.run["blocks"]["resumed"] == len(list((out / ".blocks").rglob("*.json"))) > 0
    assert json.loads((out / "_SUCCESS").read_text())["run_key"] == first.run["run_key"]
    np.testing.assert_array_equal(mz.read_level(out / MOSAIC, 0), clean)
    assert any("completion marker" in r.getMessage() and "unreadable" in r.getMessage() for r in caplog.records)
    assert all(r.levelno == logging.WARNING for r in caplog.records if "unreadable" in r.getMessage())


def test_unreadable_success_of_a_finished_sample_is_not_a_different_run(tmp_path: Path, slide: Path, model_a: Any,
                                                                         model_b: Any) -> None:
    """An unreadable marker names no run: once the lease allows it (the run that wrote the folder is
    long gone: its lease expired), a run of another model redoes the sample, no --overwrite needed."""
    (first,) = score_samples([str(slide)], _cfg(tmp_path), str(tmp_path), model=model_a)
    out = Path(first.out_dir)
    (out / "_SUCCESS").write_bytes(b"")
    (out / LEASE).write_bytes(_lease_doc(first.run["run_key"], expires_in_s=-1))
    (other,) = score_samples([str(slide)], _cfg(tmp_path), str(tmp_path), model=model_b)
    assert other.status == "ok", other.error
    assert other.run["blocks"]["resumed"] == 0
    prob = mz.read_level(out / MOSAIC, 0)
    np.testing.assert_allclose(prob[~np.isnan(prob)], 0.7, atol=1e-6)


@pytest.mark.parametrize("garbage", [b"", b"\xff\xfe\x00binary", b"not a key\n"], ids=["empty", "binary", "text"])
def test_garbage_run_key_is_no_crash(tmp_path: Path, slide: Path, model_a: Any, garbage: bytes) -> None:
    cfg = _cfg(tmp_path)
    one = SampleSpec("one", (str(slide),))
    two = SampleSpec("two", (str(slide), str(slide)))
    first = score_samples([one, two], cfg, str(tmp_path), model=model_a)
    assert [r.status for r in first] == ["ok", "ok"]
    clean = mz.read_level(tmp_path / "one" / MOSAIC, 0)
    for sid in ("one", "two"):  # interrupted runs whose key files were lost
        (tmp_path / sid / "_SUCCESS").unlink()
        (tmp_path / sid / ".run_key").write_bytes(garbage)
    again = score_samples([one, two], cfg, str(tmp_path), model=model_a)
    assert [r.status for r in again] == ["ok", "ok"], [r.error for r in again]
    assert again[0].run["blocks"]["resumed"] == 0  # not known to be this run's: written afresh
    np.testing.assert_array_equal(mz.read_level(tmp_path / "one" / MOSAIC, 0), clean)
    for iid in ("slide", "slide-2"):
        np.testing.assert_array_equal(mz.read_level(tmp_path / "two" / "images" / iid / MOSAIC, 0), clean)
    for res in again:
        assert (tmp_path / res.sample_id / ".run_key").read_text().strip() == res.run["run_key"]


def test_empty_block_marker_is_redone(tmp_path: Path, slide: Path, model_a: Any) -> None:
    cfg = _cfg(tmp_path)
    (first,) = score_samples([str(slide)], cfg, str(tmp_path), model=model_a)
    out = Path(first.out_dir)
    clean = mz.read_level(out / MOSAIC, 0)
    (out / "_SUCCESS").unlink()
    markers = sorted((out / ".blocks").rglob("*.json"))
    assert 2 < len(markers) <= first.run["blocks"]["total"]  # one per block with foreground
    markers[1].write_bytes(b"")  # half-written by a crash
    (res,) = score_samples([str(slide)], cfg, str(tmp_path), model=model_a)
    assert res.status == "ok" and res.run["blocks"]["resumed"] == len(markers) - 1
    assert json.loads(markers[1].read_text())["key"]  # rewritten whole
    np.testing.assert_array_equal(mz.read_level(out / MOSAIC, 0), clean)


# -- 2. atomic small writes ---------------------------------------------------------------------------
def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    """Run ``fn(i)`` in ``n`` threads released together; each result, or the exception it raised."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as e:  # noqa: BLE001 — the test inspects what each thread got
            results[i] = e

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_threads_writing_one_file_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "marker.json"
    payloads = [json.dumps({"writer": i, "pad": "x" * 20000}).encode() for i in range(6)]

    def write_many(i: int) -> None:
        for _ in range(40):
            write_bytes(str(target), payloads[i])

    assert _race(6, write_many) == [None] * 6  # one temp file per call: no thread renames another's away
    assert target.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["marker.json"]  # no temporary file left


def test_a_failed_write_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="No space"):
        write_bytes(str(tmp_path / "_SUCCESS"), b"{}")
    assert list(tmp_path.iterdir()) == []


def test_create_exclusive_has_one_winner(tmp_path: Path) -> None:
    for round_ in range(5):
        target = tmp_path / f"r{round_}" / ".lease"
        got = _race(8, lambda i, t=target: create_exclusive(str(t), f"writer {i}".encode()))
        assert sorted(got) == [False] * 7 + [True]
        assert target.read_bytes() == f"writer {got.index(True)}".encode()
        assert [p.name for p in target.parent.iterdir()] == [".lease"]


# -- 3. the lease -------------------------------------------------------------------------------------
def test_lease_race_between_threads_has_one_winner(tmp_path: Path) -> None:
    for round_ in range(5):
        folder = str(tmp_path / f"s{round_}")
        got = _race(8, lambda i, f=folder: acquire_lease(f, f"key{i:02d}"))
        winners = [g for g in got if isinstance(g, Lease)]
        assert len(winners) == 1, got
        assert all(isinstance(g, InputError) and "is being written by another run" in str(g) for g in got if g is not winners[0])
        assert Lease.from_bytes((Path(folder) / LEASE).read_bytes()) == winners[0]


def test_expired_lease_race_has_one_winner(tmp_path: Path) -> None:
    for round_ in range(5):
        folder = tmp_path / f"s{round_}"
        folder.mkdir()
        (folder / LEASE).write_bytes(_lease_doc("crashedrun", expires_in_s=-10))
        got = _race(6, lambda i, f=str(folder): acquire_lease(f, f"key{i:02d}"))
        winners = [g for g in got if isinstance(g, Lease)]
        assert len(winners) == 1, got
        assert Lease.from_bytes((folder / LEASE).read_bytes()) == winners[0]
        assert sorted(p.name for p in folder.iterdir()) == sorted([LEASE, f"{LEASE}.lock"])  # no temporary file left


def test_lease_is_reentrant_renewable_and_releasable(tmp_path: Path) -> None:
    folder = str(tmp_path / "s")
    first = acquire_lease(folder, "keya", ttl_s=60)
    again = acquire_lease(folder, "keya", ttl_s=3600)  # same run key: re-entrant, renewed
    assert again.acquired == first.acquired and again.expires > first.expires and again.token != first.token
    with pytest.raises(InputError, match="being written by another run"):
        acquire_lease(folder, "keyb")
    # keya's lease expires; keyb takes over; keya may not renew it any more (nor mark its sample complete)
    (Path(folder) / LEASE).write_bytes(_lease_doc("keya", expires_in_s=-1))
    acquire_lease(folder, "keyb")
    with pytest.raises(InputError, match="taken over"):
        renew_lease(folder, "keya")
    assert renew_lease(folder, "keyb").run_key == "keyb"
    # a released lease (the sample failed) is free at once
    assert not release_lease(folder, "keya") and release_lease(folder, "keyb")
    assert acquire_lease(folder, "keyc").run_key == "keyc"


def test_second_run_of_another_model_is_refused_while_the_first_writes(tmp_path: Path, slide: Path, model_a: Any,
                                                                       model_b: Any) -> None:
    """The issue's case: two runs on one sample folder with different models. The first has planned
    (lease taken, mosaic created) and scored its blocks but not finished; the second — with or
    without --overwrite, and its dry run — is refused and changes nothing; the first then finishes
    with the mosaic a run alone would have written."""
    out = tmp_path / "out"
    cfg = _cfg(out)
    spec = SampleSpec("slide", (str(slide),))
    (plan,) = plan_images(spec, cfg, model_a.card, model_a.checksum, str(out))
    records = score_image(plan, model_a, BlockRecipe.for_job(model_a, cfg), cfg)
    folder = out / "slide"
    before = _tree(folder)
    assert LEASE in before and f"{MOSAIC}/.zgroup" in before

    for overwrite in (False, True):
        (second,) = score_samples([spec], cfg.replace(output={"overwrite": overwrite}), str(out), model=model_b)
        assert second.status == "failed" and second.error_type == "InputError"
        msg = second.error
        assert f"sample 'slide': {folder} is being written by another run (run key {plan.run_key}, host " in msg
        assert f"pid {os.getpid()}, since " in msg
        assert f"wait for it, or if it crashed remove {folder / LEASE} (or wait until " in msg
    (row,) = dry_run_rows([spec], cfg, model_b.card, model_b.checksum, str(out))
    assert row["status"] == "failed" and "being written by another run" in row["error"]
    assert _tree(folder) == before  # untouched, byte for byte

    done = lifecycle.finish_sample([plan], [records], cfg, model_info(model_a), model_a.card, time.perf_counter(), model=model_a)
    assert done.status == "ok"
    (alone,) = score_samples([spec], _cfg(tmp_path / "alone"), str(tmp_path / "alone"), model=model_a)
    np.testing.assert_array_equal(mz.read_level(folder / MOSAIC, 0), mz.read_level(Path(alone.out_dir) / MOSAIC, 0))
    # finished: its lease no longer holds the folder — the second run may now --overwrite it
    (redo,) = score_samples([spec], cfg.replace(output={"overwrite": True}), str(out), model=model_b)
    assert redo.status == "ok", redo.error
    prob = mz.read_level(folder / MOSAIC, 0)
    np.testing.assert_allclose(prob[~np.isnan(prob)], 0.7, atol=1e-6)


def test_live_lease_of_another_run_refuses_a_sample_of_several_images(tmp_path: Path, slide: Path, model_a: Any) -> None:
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / LEASE).write_bytes(_lease_doc("otherrun", expires_in_s=3600))
    lease_before = (folder / LEASE).read_bytes()
    spec = SampleSpec("two", (str(slide), str(slide)))
    ok_spec = SampleSpec("one", (str(slide),))
    res = score_samples([spec, ok_spec], _cfg(tmp_path), str(tmp_path), model=model_a)
    assert [r.status for r in res] == ["failed", "ok"]
    assert "run key otherrun, host other-host, pid 4242" in res[0].error
    assert sorted(p.name for p in folder.iterdir()) == [LEASE] and (folder / LEASE).read_bytes() == lease_before


@pytest.mark.parametrize("state", ["expired", "released", "unreadable"])
def test_expired_lease_is_taken_over(tmp_path: Path, slide: Path, model_a: Any, state: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "slide"
    folder.mkdir()
    doc = {"expired": _lease_doc("crashedrun", expires_in_s=-5),
           "released": json.dumps({**json.loads(_lease_doc("failedrun", expires_in_s=3600)), "released": True}).encode(),
           "unreadable": b""}[state]
    (folder / LEASE).write_bytes(doc)
    with caplog.at_level(logging.WARNING):
        (res,) = score_samples([str(slide)], _cfg(tmp_path), str(tmp_path), model=model_a)
    assert res.status == "ok", res.error
    lease = Lease.from_bytes((folder / LEASE).read_bytes())  # ours (released once the sample is finished, or not)
    assert lease.run_key == res.run["run_key"] and lease.pid == os.getpid()
    assert any(r.levelno == logging.WARNING and ("taking over" in r.getMessage() or "unreadable" in r.getMessage())
               for r in caplog.records)


def test_a_sample_failing_after_taking_the_lease_releases_it(tmp_path: Path, slide: Path, model_a: Any, model_b: Any,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing more is written there: a run of another key (the model fixed) may take the folder at once."""
    import slidescore.stages.plan as plan_mod

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(plan_mod.mz, "create_mosaic", broken)
        (res,) = score_samples([str(slide)], _cfg(tmp_path), str(tmp_path), model=model_a)
    assert res.status == "failed" and "No space" in res.error
    assert Lease.from_bytes((tmp_path / "slide" / LEASE).read_bytes()).released
    (other,) = score_samples([str(slide)], _cfg(tmp_path), str(tmp_path), model=model_b)
    assert other.status == "ok", other.error


def test_dry_run_takes_no_lease(tmp_path: Path, slide: Path, model_a: Any) -> None:
    (row,) = dry_run_rows([SampleSpec("slide", (str(slide),))], _cfg(tmp_path), model_a.card, model_a.checksum, str(tmp_path))
    assert row["status"] == "to score"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.s3
def test_s3_lease_is_create_if_absent(s3fs_client, tmp_path: Path, slide: Path, model_a: Any) -> None:
    """On S3 the lease is a conditional PUT (If-None-Match: *; takeover If-Match): one winner of a race."""
    bucket = f"lease-{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(bucket)
    root = f"s3://{bucket}/out"
    got = _race(6, lambda i: acquire_lease(f"{root}/raced", f"key{i:02d}"))
    winners = [g for g in got if isinstance(g, Lease)]
    assert len(winners) == 1, got
    assert all("is being written by another run" in str(g) for g in got if g is not winners[0])
    assert Lease.from_bytes(s3fs_client.cat(f"{bucket}/out/raced/{LEASE}")) == winners[0]
    # an expired lease: exactly one of the racers takes it over
    s3fs_client.pipe(f"{bucket}/out/expired/{LEASE}", _lease_doc("crashedrun", expires_in_s=-5))
    got = _race(6, lambda i: acquire_lease(f"{root}/expired", f"key{i:02d}"))
    assert len([g for g in got if isinstance(g, Lease)]) == 1, got
    # a run writing to S3 is refused while another run's live lease holds the folder, and writes nothing there
    s3fs_client.pipe(f"{bucket}/out/slide/{LEASE}", _lease_doc("otherrun", expires_in_s=3600))
    s3fs_client.invalidate_cache()
    (res,) = score_samples([str(slide)], _cfg(root), root, model=model_a)
    assert res.status == "failed" and "run key otherrun" in res.error and f"{root}/slide/{LEASE}" in res.error
    assert s3fs_client.find(f"{bucket}/out/slide") == [f"{bucket}/out/slide/{LEASE}"]
