"""The cluster entrypoint ``python -m jobs.score``: config and exit codes, and a real ``ray job submit``."""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from jobs.score import main
from slidescore.config import JobConfig
from slidescore.errors import ConfigError
from slidescore.io.storage import fingerprint
from slidescore.model import load_model
from slidescore.stages.plan import run_key_for
from tests.conftest import RAY, REPO, Head, head_get, textured_image, write_tiff


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("job")
    text = d / "notes.tif"
    text.write_text("this is not an image\n")
    return {
        "a": write_tiff(d / "a.tif", textured_image(300, 280, seed=1, fg_box=(40, 40, 200, 200)), mpp=0.5),
        "b": write_tiff(d / "b.tif", textured_image(260, 300, seed=2), mpp=0.5),
        "notes": text,
    }


def _job(tmp_path: Path, model_dir: Path, uris: list[Path] | list[str], *, manifest: bool = True, **sections: dict) -> Path:
    """A job YAML (written as JSON, which is YAML) whose samples come from a manifest file."""
    data: dict = {"model": {"name": str(model_dir)}, "output": {"uri": str(tmp_path / "out")},
                  "tiling": {"chunk_cells": 8}, "cluster": {"n_actors": 2, "num_cpus_per_actor": 0.5}}
    if manifest:
        m = tmp_path / "samples.txt"
        m.write_text("# samples of this job\n\n" + "".join(f"{u}   # sample {i}\n" for i, u in enumerate(uris)))
        data["samples"] = {"manifest": str(m)}
    else:
        data["samples"] = {"uris": [str(u) for u in uris]}
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps(data))
    return job


# -- config and entrypoint (no cluster) ----------------------------------------------------------
def test_manifest_lists_uris_after_the_listed_ones(tmp_path: Path) -> None:
    m = tmp_path / "m.txt"
    m.write_text("# header\n/data/a.tif\n\n  s3://bucket/b.svs   # the second\n/data/c d.tif\n")
    cfg = JobConfig.from_dict({"samples": {"uris": ["/x.tif"], "manifest": str(m)}})
    with pytest.raises(ConfigError, match=r"samples.manifest: .* line 5: expected one URI per line"):
        cfg.samples.list_uris()
    m.write_text("# header\n/data/a.tif\n\n  s3://bucket/b.svs   # the second\n")
    assert cfg.samples.list_uris() == ["/x.tif", "/data/a.tif", "s3://bucket/b.svs"]
    assert JobConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"cluster": {"n_actor": 2}}, "cluster.n_actor: unknown key"),
        ({"cluster": {"n_actors": 0}}, "cluster.n_actors: expected a positive integer"),
        ({"cluster": {"num_gpus_per_actor": 1.5}}, "cluster.num_gpus_per_actor: expected 0, a fraction"),
        ({"cluster": {"num_cpus_per_actor": 0}}, "cluster.num_cpus_per_actor: an actor must reserve"),
        ({"cluster": {"max_retries": -1}}, "cluster.max_retries: expected an integer >= 0"),
        ({"samples": {"uris": "/a.tif"}}, "samples.uris: expected a list"),
    ],
)
def test_cluster_and_samples_errors_name_the_dotted_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict(data)


def test_run_key_ignores_samples_and_cluster(images, random_model_dir: Path) -> None:
    model = load_model(str(random_model_dir))
    fp = fingerprint(str(images["a"]))
    base = JobConfig()
    other = base.replace(cluster={"n_actors": 8, "num_gpus_per_actor": 0.5}, samples={"uris": ["/x.tif"]})
    assert run_key_for(fp, model.checksum, model.card, base) == run_key_for(fp, model.checksum, model.card, other)
    assert run_key_for(fp, model.checksum, model.card, base) != run_key_for(fp, model.checksum, model.card, base.replace(tiling={"stride_px": 32}))


def test_dry_run_plans_every_sample_and_writes_nothing(tmp_path: Path, images, random_model_dir: Path, capsys) -> None:
    job = _job(tmp_path, random_model_dir, [images["a"], images["b"]])
    assert main(["--config", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to score  a: level 0 (0.5 µm/px, 300×280 px), 9 blocks (0 already done)" in out
    assert "to score  b:" in out and "dry run: 2 samples" in out
    assert not (tmp_path / "out").exists()
    job = _job(tmp_path, random_model_dir, [images["a"], images["notes"]], manifest=False)
    assert main(["--config", str(job), "--dry-run"]) == 1  # a sample that would fail
    assert "FAILED    notes: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_dry_run_takes_samples_from_a_prefix(tmp_path: Path, images, random_model_dir: Path, capsys) -> None:
    import shutil

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for sid in ("a", "b"):
        shutil.copy(images[sid], inbox / f"{sid}.tif")
    (inbox / "readme.txt").write_text("not an image")
    job = _job(tmp_path, random_model_dir, [], manifest=False, samples={"prefix": str(inbox)})
    assert main(["--config", str(job), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "to score  a:" in out and "to score  b:" in out and "readme" not in out
    job = _job(tmp_path, random_model_dir, [], manifest=False, samples={"prefix": str(tmp_path / "missing")})
    assert main(["--config", str(job), "--dry-run"]) == 2
    assert "samples.prefix: " in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"samples": {"manifest": "/nonexistent/samples.txt"}}, "samples.manifest: cannot read"),
        ({"samples": {"manifest": None, "uris": []}}, "samples: no samples to score"),
        ({"model": {"name": "/nonexistent/model"}}, "model.name: "),
        ({"cluster": {"num_gpus_per_actor": 1}, "model": {"device": "cpu"}}, "cluster.num_gpus_per_actor: 1.0 GPUs reserved"),
        ({"tiling": {"stride_px": 24}}, "tiling.stride_px: expected a positive int that divides patch_px=64"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, images, random_model_dir: Path, capsys, change: dict, message: str) -> None:
    job = _job(tmp_path, random_model_dir, [images["a"]], **change)
    assert main(["--config", str(job), "--dry-run"]) == 2
    assert message in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


# -- a real head (tests/conftest.py `ray_head`) and `ray job submit` --------------------------------
@pytest.fixture(scope="module")
def ray_head_options() -> dict:
    # no AWS_* in the head: a job that reads from S3 must get its endpoint and credentials in its
    # runtime env; 2 logical GPUs: each actor reserves one and must see only its own
    return {"num_cpus": 2, "num_gpus": 2, "pass_aws": False}


def _job_status(head: Head, submission_id: str) -> str:
    try:
        return head_get(head, f"/api/jobs/{submission_id}")["status"]
    except OSError:  # a busy 2-core machine can make the dashboard miss a poll; ask again
        return "UNKNOWN"


def _submit(head: Head, job: Path, submission_id: str, env_vars: dict[str, str] | None = None) -> tuple[str, str]:
    """``ray job submit --no-wait``, poll the job until it ends; (status, logs).

    ``env_vars`` go into the job's runtime env: its driver and its actors see them (storage endpoint
    and credentials, as a real deployment passes them or gets them from the pod's identity).
    """
    excludes = [".venv", ".git", "demo-output", "__pycache__", ".pytest_cache", "*.egg-info", ".ruff_cache", ".mypy_cache"]
    runtime_env: dict = {"excludes": excludes}
    if env_vars:
        runtime_env["env_vars"] = env_vars
    cmd = [str(RAY), "job", "submit", "--address", head.url, "--working-dir", str(REPO), "--runtime-env-json",
           json.dumps(runtime_env), "--submission-id", submission_id, "--no-wait", "--",
           "python", "-m", "jobs.score", "--config", str(job), "-q"]
    for _ in range(3):
        sub = subprocess.run(cmd, env=head.env, capture_output=True, text=True, timeout=180)
        said = sub.stdout + sub.stderr
        # right after start the head may not yet know the node's job agent ("No available agent …")
        if sub.returncode == 0 or "agent" not in said:
            break
        time.sleep(5)
    assert sub.returncode == 0, said[-4000:]
    deadline = time.monotonic() + 300
    while (status := _job_status(head, submission_id)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, f"job {submission_id} still {status} after 300 s"
        time.sleep(2)
    logs = subprocess.run([str(RAY), "job", "logs", "--address", head.url, submission_id], env=head.env,
                          capture_output=True, text=True, timeout=120)
    return status, logs.stdout + logs.stderr


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_ray_job_submit_scores_from_s3_then_skips(ray_head: Head, tmp_path: Path, images, random_model_dir: Path, s3fs_client,
                                                  s3_server: str) -> None:
    """The job reads its images from s3:// on the loopback S3 server; outputs stay on the local disk."""
    with pytest.raises(urllib.error.HTTPError) as e:  # token auth is really on
        urllib.request.urlopen(ray_head.url + "/api/jobs/", timeout=30)
    assert e.value.code == 401
    e.value.close()
    # the head advertises 2 logical GPUs: each actor reserves one and must see only its own
    # (CUDA_VISIBLE_DEVICES = its GPU id); without CUDA, model.device auto runs them on the CPU
    bucket = f"scans-{os.getpid()}"
    s3fs_client.mkdir(bucket)
    for sid in ("a", "b"):
        s3fs_client.put(str(images[sid]), f"{bucket}/2026-11-22/{sid}.tif")
    uris = [f"s3://{bucket}/2026-11-22/{sid}.tif" for sid in ("a", "b")]
    job = _job(tmp_path, random_model_dir, uris, cluster={"n_actors": 2, "num_cpus_per_actor": 0.5, "num_gpus_per_actor": 1})
    out = tmp_path / "out"
    # the head was started without them: the job gets the endpoint and credentials in its runtime env
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    assert aws["AWS_ENDPOINT_URL"] == s3_server and not any(k.startswith("AWS_") for k in ray_head.env)

    status, logs = _submit(ray_head, job, "slidescore-first", aws)
    assert status == "SUCCEEDED", logs
    assert "2/2 samples ok" in logs
    for sid in ("a", "b"):
        assert (out / sid / "probabilities.ome.zarr" / ".zattrs").exists()
        assert (out / sid / "_SUCCESS").exists()
    run = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in run["samples"]] == ["ok", "ok"] and run["runner"] == "ray"
    assert all(s["blocks"]["done"] == s["blocks"]["total"] > 0 for s in run["samples"])
    assert [s["uri"] for s in run["samples"]] == uris
    assert all(s["bytes_read"] > 0 and s["actor_seconds"] > 0 and s["n_actors"] >= 1 for s in run["samples"])
    pinning = run["cluster"]["actor_pinning"]
    assert pinning and all(len(p["gpu_ids"]) == 1 and p["cuda_visible_devices"] == p["gpu_ids"][0] for p in pinning)
    assert len({p["gpu_ids"][0] for p in pinning}) == len(pinning)  # never two actors on one GPU
    for sid, uri in zip(("a", "b"), uris, strict=True):
        sample_run = json.loads((out / sid / "run.json").read_text())
        assert sample_run["input"]["uri"] == uri and sample_run["input"]["etag"]
    success = {sid: (out / sid / "_SUCCESS").read_bytes() for sid in ("a", "b")}

    status, logs = _submit(ray_head, job, "slidescore-again", aws)
    assert status == "SUCCEEDED", logs
    assert "skipped  a: already complete" in logs and "skipped  b: already complete" in logs
    run = json.loads((out / "run.json").read_text())
    assert [s["status"] for s in run["samples"]] == ["skipped", "skipped"]
    assert run["cluster"]["actors_started"] == 0  # a no-op rerun loads no model on the cluster
    assert {sid: (out / sid / "_SUCCESS").read_bytes() for sid in ("a", "b")} == success
