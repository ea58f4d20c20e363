"""The command line: exit codes, clear per-sample errors, other samples finish, nothing lost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slidescore.cli import main
from tests.conftest import textured_image, write_tiff


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    good = write_tiff(d / "good.tif", textured_image(300, 280, seed=1, fg_box=(40, 40, 200, 200)), mpp=0.5)
    good2 = write_tiff(d / "good2.tif", textured_image(260, 300, seed=2), mpp=0.5)
    small = write_tiff(d / "tiny.tif", textured_image(40, 40, seed=3), mpp=0.5)
    nores = write_tiff(d / "nores.tif", textured_image(200, 200, seed=4), mpp=None)
    text = d / "notes.tif"
    text.write_text("this is not an image\n")
    empty = d / "empty.tif"
    empty.write_bytes(b"")
    return {"good": good, "good2": good2, "small": small, "nores": nores, "text": text, "empty": empty, "dir": d}


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def test_bad_samples_fail_alone_with_clear_messages(tmp_path: Path, images, random_model_dir: Path, capsys) -> None:
    out = tmp_path / "out"
    argv = ["score", str(images["good"]), str(images["dir"] / "missing.tif"), str(images["text"]), str(images["small"]),
            str(images["empty"]), str(images["nores"]), str(images["good2"]), "--model", str(random_model_dir), "-o", str(out), "-q"]
    rc, stdout, stderr = _run(argv, capsys)
    assert rc == 1
    assert "5/7" not in stdout and "2/7 samples ok" in stdout
    assert (out / "good" / "_SUCCESS").exists() and (out / "good2" / "_SUCCESS").exists()
    failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    by_id = {f["sample_id"]: f for f in failures}
    assert set(by_id) == {"missing", "notes", "tiny", "empty", "nores"}
    assert "no such file" in by_id["missing"]["error"] and by_id["missing"]["error_type"] == "SampleNotFoundError"
    assert "not a readable TIFF" in by_id["notes"]["error"]
    assert "smaller than one 64×64 patch" in by_id["tiny"]["error"] and "'tiny'" in by_id["tiny"]["error"]
    assert "empty (0 bytes)" in by_id["empty"]["error"]
    assert "input.mpp" in by_id["nores"]["error"] and by_id["nores"]["error_type"] == "ResolutionError"
    assert "FAILED  tiny" in stderr
    for f in failures:  # no half-written outputs for failed samples
        assert not (out / f["sample_id"] / "_SUCCESS").exists()


def test_failed_rerun_does_not_touch_finished_outputs(tmp_path: Path, images, random_model_dir: Path, capsys) -> None:
    out = tmp_path / "out"
    rc, _, _ = _run(["score", str(images["good"]), "--model", str(random_model_dir), "-o", str(out), "-q"], capsys)
    assert rc == 0
    snapshot = {p: p.read_bytes() for p in (out / "good").rglob("*") if p.is_file()}
    rc, _, _ = _run(["score", str(images["good"]), str(images["text"]), "--model", str(random_model_dir), "-o", str(out), "-q"], capsys)
    assert rc == 1
    assert {p: p.read_bytes() for p in (out / "good").rglob("*") if p.is_file()} == snapshot


def test_mpp_override_rescues_image_without_resolution(tmp_path: Path, images, random_model_dir: Path, capsys) -> None:
    rc, stdout, _ = _run(["score", str(images["nores"]), "--mpp", "0.5", "--model", str(random_model_dir), "-o", str(tmp_path), "-q"], capsys)
    assert rc == 0, stdout
    run = json.loads((tmp_path / "nores" / "run.json").read_text())
    assert run["input"]["mpp_source"] == "config:input.mpp"


@pytest.mark.parametrize(
    ("yaml_text", "extra", "message"),
    [
        ("tiling: {stride_px: 24}\n", [], "tiling.stride_px: expected a positive int that divides patch_px=64"),
        ("tiling: [oops\n", [], "not valid YAML"),
        ("blending: {weights: boxcar}\n", [], "blending.weights"),
        ("", ["--model", "builtin:nosuchmodel"], "unknown built-in model 'builtin:nosuchmodel'"),
        ("", ["--model", "/nonexistent/model.pt"], "neither a built-in model"),
    ],
)
def test_usage_errors_exit_2(tmp_path: Path, images, random_model_dir: Path, capsys, yaml_text: str, extra: list[str], message: str) -> None:
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml_text)
    model = [] if extra else ["--model", str(random_model_dir)]
    rc, _, err = _run(["score", str(images["good"]), "-c", str(cfg), "-o", str(tmp_path / "o"), "-q", *model, *extra], capsys)
    assert rc == 2
    assert message in err
    assert not (tmp_path / "o" / "good").exists()  # nothing started


def test_console_script_runs(tmp_path: Path, images, random_model_dir: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "slidescore.cli", "score", str(images["good2"]), "--model", str(random_model_dir), "-o", str(tmp_path), "-q"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "1/1 samples ok" in proc.stdout
    regions = json.loads((tmp_path / "good2" / "regions.json").read_text())
    assert regions["sample_id"] == "good2"
    assert np.isfinite(json.loads((tmp_path / "good2" / "run.json").read_text())["timings_s"]["total_s"])
