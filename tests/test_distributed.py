"""Scoring on a local Ray cluster equals scoring in one process, whatever the pool, the faults or the restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import tifffile

from slidescore.config import JobConfig, SampleSpec
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.run.ray import FaultInjection, RunAborted, score_samples_ray
from slidescore.stages.layout import MOSAIC
from tests.conftest import textured_image, write_tiff

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    # s3_server first: Ray's worker processes inherit the environment of ray.init, and the S3-output
    # test needs them to see AWS_ENDPOINT_URL (the loopback S3 server) like the driver does
    with pytest.MonkeyPatch.context() as mp:
        # Ray 2.60 turns token auth on for a new local cluster when RAY_AUTH_MODE is unset, and writes
        # ~/.ray/auth_token, which then also turns it on for every later `ray start --head` of this user.
        # A cluster inside the test process needs no auth: say so explicitly and leave no token behind.
        mp.setenv("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("dist")
    imgs = {
        "slide": write_tiff(d / "slide.tif", textured_image(600, 520, seed=5, fg_box=(90, 60, 380, 300)), mpp=0.5),
        "b": write_tiff(d / "b.tif", textured_image(300, 280, seed=1, fg_box=(40, 40, 200, 200)), mpp=0.5),
        "c": write_tiff(d / "c.tif", textured_image(260, 300, seed=2), mpp=0.5),
    }
    # a corrupt tile in the middle of level 0; the mask reads only level 1, so planning succeeds and a block fails
    bad = write_tiff(d / "corrupt.tif", textured_image(300, 280, seed=7), mpp=0.5, n_levels=2)
    with tifffile.TiffFile(bad) as t:
        page = t.pages[0]
        tile = 2 * (-(-page.shape[1] // page.tilewidth)) + 2  # tile row 2, column 2
        offset, size = page.dataoffsets[tile], page.databytecounts[tile]
    with open(bad, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)
    imgs["corrupt"] = bad
    text = d / "notes.tif"
    text.write_text("this is not an image\n")
    imgs["text"] = text
    return imgs


def _cfg(out: Path, model_dir: Path, chunk: int = 16, **cluster) -> JobConfig:
    return JobConfig.from_dict({
        "model": {"name": str(model_dir)},
        "output": {"uri": str(out)},
        "mask": {"min_foreground_frac": 0.05},
        "tiling": {"chunk_cells": chunk},
        "cluster": {"num_cpus_per_actor": 0.5, **cluster},
    })


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, images, random_model_dir: Path):
    """Single-process mosaics (the ground truth), per chunk size and sample."""
    model = load_model(str(random_model_dir))
    cache: dict[tuple[int, str], np.ndarray] = {}

    def get(chunk: int, name: str) -> np.ndarray:
        if (chunk, name) not in cache:
            out = tmp_path_factory.mktemp(f"ref{chunk}")
            (res,) = score_samples([str(images[name])], _cfg(out, random_model_dir, chunk), str(out), model=model)
            cache[chunk, name] = _mosaic(res.out_dir)
        return cache[chunk, name]

    return get


def _mosaic(out_dir: str | Path) -> np.ndarray:
    return mz.read_level(Path(out_dir) / MOSAIC, 0)


def _assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.shape == b.shape
    assert np.array_equal(np.isnan(a), np.isnan(b))
    assert np.nanmax(np.abs(a - b)) <= 1e-6


def _run_record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def test_calibrated_prior_shifted_card_equals_single_process_and_score_array(ray_cluster, tmp_path: Path, images,
                                                                               calibrated_model_dir: Path) -> None:
    """The Ray actors apply the card's calibration and the prior shift in the same block recipe as the
    local runner and score_array: three entry points, one map."""
    import slidescore
    from slidescore.config import DecisionConfig
    from slidescore.stages.plan import plan_sample

    cfg = _cfg(tmp_path / "ray", calibrated_model_dir, 8).replace(decision={"target_prevalence": [0.2]}, report={"enabled": False})
    (res,) = score_samples_ray([str(images["b"])], cfg, str(tmp_path / "ray"), n_actors=2, progress=False)
    assert res.status == "ok", res.error
    model = load_model(str(calibrated_model_dir), device="cpu")
    local_cfg = cfg.replace(output={"uri": str(tmp_path / "local")})
    (loc,) = score_samples([str(images["b"])], local_cfg, str(tmp_path / "local"), model=model)
    _assert_same(_mosaic(res.out_dir), _mosaic(loc.out_dir))
    plan = plan_sample(str(images["b"]), cfg, model.card, model.checksum, str(tmp_path / "dry"), dry_run=True)
    assert plan is not None
    pixels = tifffile.imread(images["b"])
    mine = slidescore.score_array(pixels, model, stride_px=16, valid=plan.valid, chunk_cells=8,
                                  decision=DecisionConfig(target_prevalence=(0.2,)))
    _assert_same(mine, _mosaic(res.out_dir))
    assert res.run["decision"]["calibration"] == {"method": "temperature", "temperature": 1.7}


# Together with the tests below, which also compare with the single-process reference (1 actor ×
# chunk 8: resume; 2 × 8: faults; 2 × 16: several samples), this covers 1, 2 and 4 actors × chunks
# of 8 and 16 cells; each pool start costs seconds (a process importing torch), so no run is repeated.
@pytest.mark.parametrize(("n_actors", "chunk"), [(1, 16), (4, 8), (4, 16)])
def test_mosaic_equals_single_process(ray_cluster, tmp_path: Path, images, random_model_dir: Path, reference, n_actors: int, chunk: int) -> None:
    cfg = _cfg(tmp_path, random_model_dir, chunk)
    (res,) = score_samples_ray([str(images["slide"])], cfg, str(tmp_path), n_actors=n_actors, progress=False)
    assert res.status == "ok" and (Path(res.out_dir) / "_SUCCESS").exists()
    _assert_same(_mosaic(res.out_dir), reference(chunk, "slide"))
    run = _run_record(tmp_path)
    (rec,) = run["samples"]
    n_blocks = (5 * 5) if chunk == 8 else (3 * 3)  # 38×33 cells
    assert rec["blocks"] == {"total": n_blocks, "done": n_blocks, "resumed": 0}
    assert rec["patches_scored"] == res.run["patches"]["scored"] > 0
    assert 1 <= rec["n_actors"] == len(rec["actors"]) <= n_actors and run["cluster"]["n_actors"] == n_actors
    assert run["runner"] == "ray" and run["cluster"]["actors_replaced"] == 0
    # observability: decoded bytes of the read boxes (block + halo, clipped to the image; only blocks
    # with foreground are read), and the actors' task time
    assert 3 * 300 * 380 <= rec["bytes_read"] <= 3 * 600 * 520 * 4  # at least the foreground box, at most a few times the image
    assert rec["actor_seconds"] > 0


def test_model_is_shipped_once_and_actors_start_before_planning(ray_cluster, tmp_path: Path, images, random_model_dir: Path,
                                                                reference) -> None:
    """The actors build the model from the bytes the driver put into the object store: its files may
    be gone by the time they load it. They are started before the model is read and the first sample
    planned; a rerun of finished samples starts none."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(random_model_dir, model)
    gone: list[bool] = []

    def remove_model(driver) -> None:  # the bytes are in the object store; the actors are starting, none has loaded
        assert driver.t_pool is not None and driver.model_ref is not None and not any(s.ready for s in driver.slots)
        shutil.rmtree(model)
        gone.append(True)

    out = tmp_path / "out"
    cfg = _cfg(out, model, 16, n_actors=2)
    results = score_samples_ray([str(images["slide"]), str(images["b"])], cfg, str(out), progress=False,
                                fault=FaultInjection(on_model_shipped=remove_model))
    assert gone and [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    _assert_same(_mosaic(results[0].out_dir), reference(16, "slide"))
    _assert_same(_mosaic(results[1].out_dir), reference(16, "b"))
    run = _run_record(out)
    weights = [f for f in random_model_dir.iterdir() if f.name != "card.json" and f.is_file()]
    assert run["cluster"]["model_shipped_bytes"] in {f.stat().st_size for f in weights}
    assert run["cluster"]["actors_started"] == 2 and len(run["cluster"]["actor_pinning"]) == 2
    t = run["cluster"]["timings"]
    assert t["pool_start"] <= t["model_ready"] <= t["first_plan"] <= t["first_task"] <= t["done"]
    # a rerun of the finished samples (the model put back: the driver reads it again) starts no actor
    shutil.copytree(random_model_dir, model)
    again = score_samples_ray([str(images["slide"]), str(images["b"])], cfg, str(out), progress=False)
    assert [r.status for r in again] == ["skipped", "skipped"]
    assert _run_record(out)["cluster"]["actors_started"] == 0


def test_several_samples_share_the_pool_and_bad_ones_fail_alone(ray_cluster, tmp_path: Path, images, random_model_dir: Path, reference) -> None:
    """Through the job entrypoint: a sample that fails in planning and one that fails in a block."""
    from jobs.score import main

    order = ["slide", "text", "b", "corrupt", "c"]
    manifest = tmp_path / "samples.txt"
    manifest.write_text("# one URI per line\n" + "".join(f"{images[n]}  # {n}\n" for n in order[1:]) + "\n")
    job = tmp_path / "job.yaml"
    out = tmp_path / "out"
    job.write_text(json.dumps({**_cfg(out, random_model_dir).to_dict(),
                               "samples": {"uris": [str(images["slide"])], "manifest": str(manifest)},
                               "cluster": {"n_actors": 2, "num_cpus_per_actor": 0.5}}))
    assert main(["--config", str(job), "-q"]) == 1  # some samples failed, the others finished
    run = _run_record(out)
    status = {s["sample_id"]: s["status"] for s in run["samples"]}
    assert status == {"slide": "ok", "notes": "failed", "b": "ok", "corrupt": "failed", "c": "ok"}
    failures = {f["sample_id"]: f for f in map(json.loads, (out / "failures.jsonl").read_text().splitlines())}
    assert set(failures) == {"notes", "corrupt"}
    assert failures["corrupt"]["error_type"] == "UnsupportedImageError" and "failed to decode" in failures["corrupt"]["error"]
    assert "not a readable TIFF" in failures["notes"]["error"]
    assert not (out / "corrupt" / "_SUCCESS").exists()
    for name in ("slide", "b", "c"):
        assert (out / name / "_SUCCESS").exists()
        _assert_same(_mosaic(out / name), reference(16, name))


def test_crashed_actor_and_transient_errors_leave_output_identical(ray_cluster, tmp_path: Path, images, random_model_dir: Path, reference) -> None:
    # every first actor raises a transient storage error on its first task and dies (os._exit) on its
    # second; the driver retries the first, replaces the dead actor and resubmits its in-flight blocks
    cfg = _cfg(tmp_path, random_model_dir, chunk=8, n_actors=2, max_in_flight_per_actor=2)
    fault = FaultInjection(transient_errors=1, crash_on_task=2)
    results = score_samples_ray([str(images["slide"]), str(images["b"])], cfg, str(tmp_path), progress=False, fault=fault)
    assert [r.status for r in results] == ["ok", "ok"]
    _assert_same(_mosaic(results[0].out_dir), reference(8, "slide"))
    _assert_same(_mosaic(results[1].out_dir), reference(8, "b"))
    run = _run_record(tmp_path)
    assert run["cluster"]["actors_replaced"] >= 1
    assert run["cluster"]["actors_started"] == 2 + run["cluster"]["actors_replaced"]
    assert sum(s["retries"] for s in run["samples"]) >= 2  # at least one transient retry and one resubmission
    assert any("." in a for s in run["samples"] for a in s["actors"])  # a replacement actor did some blocks


def test_retries_are_bounded(ray_cluster, tmp_path: Path, images, random_model_dir: Path) -> None:
    cfg = _cfg(tmp_path, random_model_dir, n_actors=1, max_retries=0)
    (res,) = score_samples_ray([str(images["b"])], cfg, str(tmp_path), progress=False, fault=FaultInjection(transient_errors=1))
    assert res.status == "failed" and res.error_type == "TransientStorageError"
    (failure,) = map(json.loads, (tmp_path / "failures.jsonl").read_text().splitlines())
    assert failure["sample_id"] == "b"


def test_aborted_run_resumes_only_missing_blocks(ray_cluster, tmp_path: Path, images, random_model_dir: Path, reference) -> None:
    cfg = _cfg(tmp_path, random_model_dir, chunk=8, n_actors=1, max_in_flight_per_actor=1)
    with pytest.raises(RunAborted):
        score_samples_ray([str(images["slide"])], cfg, str(tmp_path), progress=False, fault=FaultInjection(abort_after_blocks=6))
    sample = tmp_path / "slide"
    assert not (sample / "_SUCCESS").exists()
    done = len(list((sample / ".blocks").rglob("*.json")))  # blocks with foreground write a marker; empty ones cost nothing
    total = 25
    assert 0 < done < total
    (res,) = score_samples_ray([str(images["slide"])], cfg, str(tmp_path), progress=False)
    assert res.status == "ok"
    (rec,) = _run_record(tmp_path)["samples"]
    assert rec["blocks"] == {"total": total, "done": total, "resumed": done}  # only the missing blocks were scored
    assert res.run["blocks"]["resumed"] == done
    _assert_same(_mosaic(res.out_dir), reference(8, "slide"))


@pytest.mark.s3
def test_multi_image_samples_written_to_s3(ray_cluster, s3fs_client, tmp_path: Path, images, random_model_dir: Path, reference) -> None:
    """Block tasks per image, regions ranked across the images, every output on S3; a bad image fails its sample."""
    bucket = f"ray-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(bucket)
    s3fs_client.put(str(images["slide"]), f"{bucket}/in/slide.tif")
    out = f"s3://{bucket}/out"
    smear = SampleSpec("smear", (f"s3://{bucket}/in/slide.tif", str(images["b"])))
    bad = SampleSpec("bad", (str(images["c"]), str(images["corrupt"])))  # the corrupt tile fails in a block
    cfg = _cfg(Path("unused"), random_model_dir, 16, n_actors=2).replace(output={"uri": out})
    results = score_samples_ray([smear, str(images["c"]), bad], cfg, out, progress=False)
    assert [r.status for r in results] == ["ok", "ok", "failed"]
    assert "image 'corrupt'" in results[2].error and results[2].error_type == "UnsupportedImageError"
    _assert_same(mz.read_level(f"{out}/smear/images/slide/{MOSAIC}", 0), reference(16, "slide"))
    _assert_same(mz.read_level(f"{out}/smear/images/b/{MOSAIC}", 0), reference(16, "b"))
    _assert_same(mz.read_level(f"{out}/c/{MOSAIC}", 0), reference(16, "c"))
    assert s3fs_client.exists(f"{bucket}/out/smear/_SUCCESS") and not s3fs_client.exists(f"{bucket}/out/bad/_SUCCESS")
    doc = json.loads(s3fs_client.cat(f"{bucket}/out/smear/regions.json"))
    assert {r["image"] for r in doc["regions"]} <= set(smear.uris)
    assert [r["rank"] for r in doc["regions"]] == list(range(1, len(doc["regions"]) + 1))
    run = json.loads(s3fs_client.cat(f"{bucket}/out/run.json"))
    rec = {s["sample_id"]: s for s in run["samples"]}
    assert rec["smear"]["blocks"]["total"] == rec["smear"]["blocks"]["done"] == 9 + 4  # 38×33 and 19×18 cells, 16-cell chunks
    sample_run = json.loads(s3fs_client.cat(f"{bucket}/out/smear/run.json"))
    assert [i["image_id"] for i in sample_run["images"]] == ["slide", "b"]
    assert sample_run["patches"]["scored"] == rec["smear"]["patches_scored"] > 0
    # the driver finishes with its own copy of the model: Grad-CAM uses it, nothing is loaded again
    assert [i["gradcam_model"] for i in sample_run["report"]["images"]] == ["passed in", "passed in"]
    (failure,) = [json.loads(line) for line in s3fs_client.cat(f"{bucket}/out/failures.jsonl").decode().splitlines()]
    assert failure["sample_id"] == "bad" and failure["images"] == list(bad.uris)


# -- node loss: a real multi-node cluster (ray.cluster_utils), in a child process -----------------
def node_loss_child(image: str, model_dir: str, out: str) -> None:
    """Run in a fresh interpreter (no other Ray session): two nodes, the worker node removed mid-run."""
    import os

    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    # notice a dead node within a few seconds, not the default ~30 s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False,
        "_system_config": {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4},
    })
    worker = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    removed: list[int] = []

    def remove_worker(driver) -> None:
        """Once the actor on the worker node has blocks in flight, remove that node (like a lost VM)."""
        if removed:
            return
        # first: let both actors finish starting (torch import), so the worker node's actor surely gets blocks
        for slot in driver.slots:
            if slot.ready_ref is not None:
                ray.get(slot.ready_ref, timeout=120)
        for slot in driver.slots:
            if slot.ready and slot.in_flight and ray.get(slot.actor.info.remote())["node_id"] == worker.node_id:
                removed.append(driver.blocks_done)
                cluster.remove_node(worker, allow_graceful=False)
                return

    try:
        # two actors of 1 CPU on a 1 + 1 CPU cluster: one lands on each node, so one is on the worker
        cfg = _cfg(Path(out), Path(model_dir), chunk=8, n_actors=2, num_cpus_per_actor=1, max_in_flight_per_actor=2)
        placed = {n["NodeID"]: n["Resources"].get("CPU") for n in ray.nodes() if n["Alive"]}
        assert len(placed) == 2, placed
        (res,) = score_samples_ray([image], cfg, out, progress=False, fault=FaultInjection(on_blocks_done=remove_worker))
        assert res.status == "ok", res.error
        assert removed, "the run ended before the worker node was removed"
        deadline = time.monotonic() + 30  # the GCS marks the node dead after its missed health checks
        while len([n for n in ray.nodes() if n["Alive"]]) != 1:
            assert time.monotonic() < deadline, "the removed node is still alive after 30 s"
            time.sleep(0.5)
        Path(out, "node_loss.json").write_text(json.dumps({"removed_after_blocks": removed[0], "worker_node": worker.node_id}))
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_node_loss_mid_run_leaves_output_identical(tmp_path: Path, images, random_model_dir: Path, reference) -> None:
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    code = "import sys; from tests.test_distributed import node_loss_child; node_loss_child(*sys.argv[1:])"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "disabled"
    repo = Path(__file__).resolve().parent.parent
    proc = subprocess.run([sys.executable, "-c", code, str(images["slide"]), str(random_model_dir), str(out)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    _assert_same(_mosaic(out / "slide"), reference(8, "slide"))
    assert (out / "slide" / "_SUCCESS").exists()
    run = _run_record(out)
    (rec,) = run["samples"]
    assert rec["blocks"] == {"total": 25, "done": 25, "resumed": 0}
    assert run["cluster"]["actors_replaced"] >= 1  # the actor on the removed node was lost and replaced
    assert rec["retries"] >= 1 and rec["n_actors"] >= 2  # its in-flight blocks were resubmitted to the other actor


def test_progress_counts_the_blocks_with_foreground(ray_cluster, tmp_path: Path, images, random_model_dir: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """Both runners' progress bars count the blocks with tissue (#16): a sparse slide's empty blocks cost
    nothing and do not make the bar jump or look stuck."""
    from slidescore.stages.plan import plan_sample

    cfg = _cfg(tmp_path / "ray", random_model_dir, 8).replace(report={"enabled": False})
    model = load_model(str(random_model_dir))
    plan = plan_sample(str(images["slide"]), cfg, model.card, model.checksum, str(tmp_path / "dry"), dry_run=True)
    n_all, n_fg = len(plan.blocks), sum(plan.block_has_foreground(b) for b in plan.blocks)
    assert 0 < n_fg < n_all and plan.blocks_with_foreground == n_fg
    # one process: a recording bar
    bars: list[dict[str, int]] = []

    class Bar:
        def __init__(self, total: int, _patches: int) -> None:
            bars.append({"total": total, "done": 0})

        def update(self, n: int) -> None:
            bars[-1]["done"] += n

        def set_postfix(self, **_: object) -> None: ...

        def close(self) -> None: ...

    local_cfg = cfg.replace(output={"uri": str(tmp_path / "local")})
    (loc,) = score_samples([str(images["slide"])], local_cfg, str(tmp_path / "local"), model=model, progress=Bar)
    assert loc.status == "ok" and bars == [{"total": n_fg, "done": n_fg}]
    # on Ray: tqdm's own bar on stderr
    capfd.readouterr()
    (res,) = score_samples_ray([str(images["slide"])], cfg, str(tmp_path / "ray"), n_actors=1, progress=True)
    assert res.status == "ok", res.error
    err = capfd.readouterr().err  # not a terminal: tqdm draws the bar when it opens (its total), then every 15 s
    assert f"/{n_fg} [" in err and f"/{n_all} [" not in err
