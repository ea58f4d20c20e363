"""Hostile inputs through the Ray runner (``score_samples_ray`` and the ``jobs.score`` entrypoint) on
the shared local Ray cluster fixture of tests/test_distributed.py: a broken model fails the samples
it scores, one line each in ``failures.jsonl``, and the next sample is scored; hostile file names
and corrupt images fail alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slidescore.config import SAMPLE_ID_PATTERN, JobConfig
from slidescore.run.ray import score_samples_ray
from slidescore.stages.layout import RESERVED
from tests.hostile.conftest import (
    TRACEBACK,
    assert_complete_outputs_are_sane,
    assert_one_line,
    failure_rows,
    write_bad_images,
)
from tests.test_distributed import ray_cluster  # noqa: F401 — the shared local Ray cluster (module scope)

pytestmark = pytest.mark.ray


def _cfg(out: Path, model: Path, **cluster) -> JobConfig:
    return JobConfig.from_dict({
        "model": {"name": str(model), "batch_size": 16},
        "output": {"uri": str(out)},
        "tiling": {"chunk_cells": 8},
        "report": {"enabled": False},
        "cluster": {"num_cpus_per_actor": 0.5, **cluster},
    })


def test_model_raising_on_third_batch_fails_that_sample_and_the_next_is_scored(ray_cluster, tmp_path: Path,  # noqa: F811
                                                                               good_images, hostile_models) -> None:
    # one actor: its copy of the model counts its calls; call 3 is in sample a's first block
    cfg = _cfg(tmp_path, hostile_models["raise3"], n_actors=1)
    results = score_samples_ray([str(good_images["a"]), str(good_images["b"])], cfg, str(tmp_path), progress=False)
    assert [(r.sample_id, r.status) for r in results] == [("a", "failed"), ("b", "ok")], [(r.sample_id, r.error) for r in results]
    (row,) = failure_rows(tmp_path)
    assert row["sample_id"] == "a" and row["stage"] == "scoring", row
    assert_one_line(row["error"])
    assert "boom on call 3" in row["error"] and TRACEBACK not in row["error"], row["error"]
    assert not (tmp_path / "a" / "_SUCCESS").exists() and (tmp_path / "b" / "_SUCCESS").exists()
    run = json.loads((tmp_path / "run.json").read_text())
    assert {s["sample_id"]: s["status"] for s in run["samples"]} == {"a": "failed", "b": "ok"}
    assert_complete_outputs_are_sane(tmp_path)


def test_nan_model_fails_every_sample(ray_cluster, tmp_path: Path, good_images, hostile_models) -> None:  # noqa: F811
    cfg = _cfg(tmp_path, hostile_models["nan_one"], n_actors=2)
    results = score_samples_ray([str(good_images["a"]), str(good_images["b"])], cfg, str(tmp_path), progress=False)
    assert [r.status for r in results] == ["failed", "failed"], [(r.sample_id, r.status) for r in results]
    rows = failure_rows(tmp_path)
    assert sorted(r["sample_id"] for r in rows) == ["a", "b"], rows
    for r in rows:
        assert_one_line(r["error"])
        assert "NaN" in r["error"] and r["error_type"] == "ModelOutputError", r
    assert not list(tmp_path.rglob("_SUCCESS"))


def test_job_entrypoint_with_hostile_names_and_corrupt_images(ray_cluster, tmp_path: Path, good_images,  # noqa: F811
                                                              random_model_dir: Path, capfd) -> None:
    """``jobs.score`` (in this process, on the shared cluster): a manifest of hostile file names,
    corrupt images and a good one; exit 1, the good and the hostile-named ones finish."""
    from jobs.score import main

    d = tmp_path / "in"
    bad = write_bad_images(d, good_images["a"])
    names = ["..tif", "-rf.tif", "run.json.tif", "good.tif"]
    for n in names:
        shutil.copyfile(good_images["b"], d / n)
    manifest = tmp_path / "samples.txt"
    manifest.write_text("".join(f"{d / n}\n" for n in names) + "".join(f"{p}\n" for p in bad.values()))
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(json.dumps({**_cfg(out, random_model_dir).to_dict(), "samples": {"manifest": str(manifest)},
                               "cluster": {"n_actors": 2, "num_cpus_per_actor": 0.5}}))
    rc = main(["--config", str(job), "-q"])
    captured = capfd.readouterr()
    assert TRACEBACK not in captured.err and TRACEBACK not in captured.out, captured.err[-4000:]
    assert rc == 1, captured.err[-2000:]
    rows = failure_rows(out)
    assert sorted(r["sample_id"] for r in rows) == sorted(bad), rows
    for r in rows:
        assert_one_line(r["error"])
        assert r["uri"] == str(bad[r["sample_id"]]) and f"{r['sample_id']}.tif" in r["error"], r
    record = json.loads((out / "run.json").read_text())
    ok = [s["sample_id"] for s in record["samples"] if s["status"] == "ok"]
    assert len(ok) == len(names), record["samples"]
    for sid in ok:
        assert SAMPLE_ID_PATTERN.match(sid) and sid not in RESERVED, sid
        assert (out / sid / "_SUCCESS").exists()
    assert {p.name for p in out.iterdir() if not p.is_dir()} <= {"run.json", "failures.jsonl", "index.html"}
    assert_complete_outputs_are_sane(out)
