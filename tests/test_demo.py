"""The embedded default: a generated smear scored by the built-in model finds the planted parasites."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tifffile

from slidescore.offline.demo import run_demo


@pytest.mark.slow
def test_demo_reports_recall_of_planted_parasites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = run_demo(size_px=4096, out_root=str(tmp_path), seed=3, progress=False)
    out = capsys.readouterr().out
    assert rc == 0, out
    tif = next(tmp_path.glob("demo-smear-*.tif"))
    with tifffile.TiffFile(tif) as t:  # a real pyramidal JPEG-tiled TIFF with resolution tags
        assert t.pages[0].is_tiled and t.pages[0].compression == 7
        assert len(t.series[0].levels) == 3
    sample = next(p for p in tmp_path.iterdir() if p.is_dir())
    demo = json.loads((sample / "demo.json").read_text())
    assert "planted-parasite recall among reported regions" in out
    assert demo["n_parasites"] >= 10
    assert demo["recall"] >= 0.9
    # the regions are mostly real: no flood of false positives
    assert demo["regions_with_parasite"] >= 0.7 * demo["n_regions"]
    run = json.loads((sample / "run.json").read_text())
    assert run["input"]["level"] == 1 and run["input"]["level_mpp"] == pytest.approx(0.5)
    assert 0 < run["patches"]["skipped_background"] < run["patches"]["total"]
