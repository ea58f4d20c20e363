"""Three generated smears scored by the built-in model through pipeline.score_samples (shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slidescore.config import JobConfig
from slidescore.offline.demo import generate_smear
from slidescore.run.local import score_samples
from slidescore.stages.records import SampleResult


@pytest.fixture(scope="package")
def scored_batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SampleResult]]:
    root = tmp_path_factory.mktemp("batch")
    tifs = []
    for seed in (11, 12, 13):
        tif = root / "in" / f"smear-{seed}.tif"
        tif.parent.mkdir(exist_ok=True)
        generate_smear(tif, 1536, seed, progress=False)
        tifs.append(str(tif))
    out = root / "out"
    cfg = JobConfig().replace(output={"uri": str(out)}, tiling={"chunk_cells": 32})
    results = score_samples(tifs, cfg, str(out))
    assert [r.status for r in results] == ["ok"] * 3
    for r in results:  # the pipeline itself writes the report and records the call and the quality checks
        assert (Path(r.out_dir) / "report.html").stat().st_size > 10_000
        assert r.run["decision"]["sample_call"]["call"] in ("positive", "negative", "needs_review")
        assert {q["flag"] for q in r.run["quality"]} >= {"blank_fraction", "out_of_focus_fraction"}
    assert (out / "index.html").exists()
    return out, results
