"""The warm actor pool across Ray jobs (``cluster.keep_warm_s``), on a real local Ray cluster.

A later job takes over the actors an earlier job left warm, and scores exactly what one process
scores, with the model of *its* config; a pool actor that died is replaced; a pool of another
code version is never taken and makes room; a leased actor serves one job; idle actors exit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from slidescore.config import JobConfig
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.run.ray import ScoringActor, pool, score_samples_ray
from slidescore.stages.layout import MOSAIC
from tests.conftest import textured_image, write_tiff

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # as tests/test_distributed.py: no token left in ~/.ray
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()  # a local cluster: its detached actors go with it


@pytest.fixture
def empty_pool(ray_cluster):
    """No pool actor left over from another test."""
    def clear() -> None:
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["namespace"] == pool.NAMESPACE:
                ray.kill(ray.get_actor(entry["name"], namespace=pool.NAMESPACE), no_restart=True)
        _wait_for(lambda: not _pool_names(), "the pool to empty")

    clear()
    yield
    clear()


def _pool_names() -> list[str]:
    return sorted(e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == pool.NAMESPACE)


def _wait_for(cond, what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pool")
    return write_tiff(d / "slide.tif", textured_image(300, 280, seed=1, fg_box=(40, 40, 200, 200)), mpp=0.5)


def _cfg(out: Path, model_dir: Path, **cluster) -> JobConfig:
    return JobConfig.from_dict({"model": {"name": str(model_dir)}, "output": {"uri": str(out)}, "mask": {"min_foreground_frac": 0.05},
                                "tiling": {"chunk_cells": 16}, "report": {"enabled": False},
                                "cluster": {"num_cpus_per_actor": 0.5, "n_actors": 2, **cluster}})


def _reference(tmp: Path, slide: Path, model_dir: Path) -> np.ndarray:
    out = tmp / f"ref-{model_dir.name}"
    (res,) = score_samples([str(slide)], _cfg(out, model_dir), str(out), model=load_model(str(model_dir)))
    return mz.read_level(Path(res.out_dir) / MOSAIC, 0)


def _job(tmp: Path, name: str, slide: Path, model_dir: Path, **cluster) -> tuple[np.ndarray, dict]:
    out = tmp / name
    (res,) = score_samples_ray([str(slide)], _cfg(out, model_dir, **cluster), str(out), progress=False)
    assert res.status == "ok", res.error
    return mz.read_level(Path(res.out_dir) / MOSAIC, 0), json.loads((out / "run.json").read_text())


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= 1e-6


def test_next_job_takes_the_warm_actors_with_its_own_model_and_replaces_a_dead_one(
        empty_pool, tmp_path: Path, slide: Path, random_model_dir: Path, calibrated_model_dir: Path) -> None:
    ref = _reference(tmp_path, slide, random_model_dir)
    first, run1 = _job(tmp_path, "cold", slide, random_model_dir, keep_warm_s=60)
    c1 = run1["cluster"]
    assert c1["actors_started"] == 2 and c1["actors_warm"] == 0
    names = _pool_names()
    assert len(names) == 2 and all(n.startswith("sc-") for n in names)  # left warm, not killed
    _assert_same(first, ref)

    second, run2 = _job(tmp_path, "warm", slide, random_model_dir, keep_warm_s=60)
    c2 = run2["cluster"]
    assert c2["actors_started"] == 0 and c2["actors_warm"] == 2
    # the same processes (the first job may have ended before its second actor was up: it waited and left it warm)
    assert {a["pid"] for a in c1["actor_pinning"]} <= {a["pid"] for a in c2["actor_pinning"]}
    assert [a["jobs"] for a in c2["actor_pinning"]] == [2, 2]
    _assert_same(second, ref)

    # another model: the same warm processes, but they build and score this job's model
    other, run3 = _job(tmp_path, "other-model", slide, calibrated_model_dir, keep_warm_s=60)
    assert run3["cluster"]["actors_warm"] == 2 and run3["model"]["sha256"] != run2["model"]["sha256"]
    _assert_same(other, _reference(tmp_path, slide, calibrated_model_dir))
    assert not np.array_equal(np.nan_to_num(other), np.nan_to_num(ref))

    # a pool actor that died is replaced by a new pool actor under a free name
    ray.kill(pool.lookup(names[0]), no_restart=True)
    _wait_for(lambda: pool.lookup(names[0]) is None, "the killed actor's name to be freed")
    again, run4 = _job(tmp_path, "after-death", slide, random_model_dir, keep_warm_s=60)
    assert run4["cluster"]["actors_warm"] == 1 and run4["cluster"]["actors_started"] == 1
    assert len(_pool_names()) == 2
    _assert_same(again, ref)


def test_pool_of_another_code_version_is_never_taken_and_makes_room(empty_pool, tmp_path: Path, slide: Path,
                                                                     random_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, random_model_dir)
    ours = pool.pool_prefix(0.5, 0, "cpu")
    stale_name = "sc-000000000000-" + ours.split("-")[2] + "-0"  # same kind, other code
    stale = ScoringActor.options(name=stale_name, namespace=pool.NAMESPACE, lifetime="detached",  # type: ignore[attr-defined]
                                 num_cpus=0.5).remote(cfg, "cpu", keep_warm_s=600)
    # the actor checks the code fingerprint itself, whatever its name says
    assert ray.get(stale.acquire.remote("t", None, "f" * 64)).startswith("another code version")
    assert ray.get(stale.acquire.remote("t", None, pool.code_fingerprint())) == ""
    assert ray.get(stale.release.remote("t"))
    # an idle pool of this code but another kind (1.5 CPUs) would leave too little room for this job's actors
    other_kind = ours.rsplit("-", 2)[0] + "-ffffffffffff-0"
    wide = ScoringActor.options(name=other_kind, namespace=pool.NAMESPACE, lifetime="detached",  # type: ignore[attr-defined]
                                num_cpus=1.5).remote(cfg, "cpu", keep_warm_s=600)
    assert ray.get(wide.acquire.remote("t", None, pool.code_fingerprint())) == "" and ray.get(wide.release.remote("t"))
    out, run = _job(tmp_path, "new-code", slide, random_model_dir, keep_warm_s=60)
    assert run["cluster"]["actors_warm"] == 0 and run["cluster"]["actors_started"] == 2
    _wait_for(lambda: pool.lookup(stale_name) is None and pool.lookup(other_kind) is None, "the idle pools to retire")
    assert len(_pool_names()) == 2 and all(n.startswith(ours) for n in _pool_names())


def test_a_leased_actor_serves_one_job_and_a_late_request_never_takes_it(empty_pool, tmp_path: Path,
                                                                         random_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, random_model_dir)
    actor = ScoringActor.options(name="sc-lease-test-0", namespace=pool.NAMESPACE, lifetime="detached",  # type: ignore[attr-defined]
                                 num_cpus=0.5).remote(cfg, "cpu", keep_warm_s=600)
    fp = pool.code_fingerprint()
    assert ray.get(actor.acquire.remote("job-a", None, fp)) == ""
    assert ray.get(actor.acquire.remote("job-b", None, fp)) == "leased by another job"
    assert ray.get(actor.load.remote([None, None], cfg, "job-b")) == {"refused": "leased by another job"}
    assert ray.get(actor.acquire.remote("job-c", None, "f" * 64)).startswith("another code version")
    assert ray.get(actor.load.remote([None, None], cfg, "job-c"))["refused"].startswith("another code version")
    with pytest.raises(ray.exceptions.RayTaskError, match="no longer leased"):
        ray.get(actor.score.remote(None, [], "job-b"))
    assert not ray.get(actor.release.remote("job-b")) and ray.get(actor.release.remote("job-a"))
    assert ray.get(actor.acquire.remote("job-b", time.time() - 1, fp)).startswith("asked too late")
    assert ray.get(actor.acquire.remote("job-b", time.time() + 60, fp)) == ""


def test_idle_pool_actors_exit_and_free_their_resources(empty_pool, tmp_path: Path, slide: Path,
                                                        random_model_dir: Path) -> None:
    _job(tmp_path, "short", slide, random_model_dir, keep_warm_s=1.0)
    t_end = time.monotonic()
    assert len(_pool_names()) == 2
    _wait_for(lambda: not _pool_names(), "the idle pool actors to exit", timeout_s=15)
    assert time.monotonic() - t_end >= 0.5  # not at once: after about keep_warm_s
    _wait_for(lambda: ray.available_resources().get("CPU", 0) == 2, "their CPUs to be free again")
