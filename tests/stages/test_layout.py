"""Sample ids taken from file names obey the explicit-id rule; nothing is written outside the output root."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from slidescore.config import SAMPLE_ID_PATTERN, JobConfig
from slidescore.errors import ConfigError
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.layout import RESERVED, image_ids, sample_dir, sample_id_for
from slidescore.stages.plan import resolve_samples
from tests.conftest import textured_image, write_tiff


@pytest.mark.parametrize("name, expected", [
    ("slide.svs", "slide"), ("a b.ome.tiff", "a_b"), ("...tif", "sample"), ("..tif", "sample"), (".tif", "sample"),
    ("-rf.tif", "sample_rf"), ("run.json.tif", "sample_run.json"), ("failures.jsonl.tif", "sample_failures.jsonl"),
    ("_SUCCESS.tif", "sample__SUCCESS"), (".hidden.tif", "sample_hidden"), ("images.tif", "sample_images"),
    ("é.tif", "sample"), ("x/../../etc.tif", "etc"),
])
def test_ids_from_file_names_are_safe_folder_names(name: str, expected: str) -> None:
    sid = sample_id_for(f"/data/{name}")
    assert sid == expected
    assert SAMPLE_ID_PATTERN.match(sid) and sid not in RESERVED and "/" not in sid and sid not in (".", "..")


def test_colliding_safe_ids_are_made_unique() -> None:
    specs = resolve_samples(["/a/..tif", "/b/...tif", "/c/sample.tif", "/d/-rf.tif"])
    ids = [s.sample_id for s in specs]
    assert len(set(ids)) == 4 and all(SAMPLE_ID_PATTERN.match(str(i)) for i in ids)
    assert image_ids(["/x/..tif", "/y/..tif"]) == ["sample", "sample-2"]


@pytest.mark.parametrize("bad", ["..", ".", "", "-rf", "a/b", "run.json", "failures.jsonl", "_SUCCESS"])
def test_sample_dir_refuses_ids_that_leave_or_shadow_the_root(bad: str) -> None:
    with pytest.raises(ConfigError, match="cannot name an output folder"):
        sample_dir("/out", bad)


def test_hostile_file_names_write_only_under_the_output_root(tmp_path: Path, random_model_dir: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    good = write_tiff(src / "good.tif", textured_image(160, 160, seed=3), mpp=0.5)
    names = ["...tif", "..tif", "-rf.tif", "run.json.tif"]
    for n in names:
        shutil.copy(good, src / n)
    out = tmp_path / "work" / "out"
    before = {p for p in tmp_path.rglob("*")}
    cfg = JobConfig.from_dict({"output": {"uri": str(out)}, "mask": {"method": "none"}, "tiling": {"chunk_cells": 8},
                               "report": {"enabled": False}})
    results = score_samples([str(src / n) for n in names], cfg, str(out), model=load_model(str(random_model_dir), device="cpu"))
    assert [r.status for r in results] == ["ok"] * 4, [r.error for r in results]
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(out in p.parents or p == out or p in out.parents for p in new), sorted(map(str, new))
    assert not any(p.parent == out.parent and p != out for p in new)  # nothing beside the output folder
    ids = sorted(r.sample_id for r in results)
    assert all((out / i / "_SUCCESS").is_file() for i in ids)
    import json

    run = json.loads((out / "run.json").read_text())  # the run-level record is not replaced by a sample's
    assert run["runner"] == "local" and sorted(s["sample_id"] for s in run["samples"]) == ids
