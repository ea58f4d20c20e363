"""Three generated smears scored by the built-in model through pipeline.score_samples (shared)."""

from __future__ import annotations

from pathlib import Path

import pytest

from slidescore.config import JobConfig
from slidescore.demo import generate_smear
from slidescore.pipeline import SampleResult, score_samples


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
    return out, results
