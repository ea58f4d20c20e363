"""Hostile inputs through the command line (``python -m slidescore.cli score …`` in a subprocess).

Exit codes: 0 all samples ok, 1 some samples failed, 2 usage or config error. Whatever the input:
no Python traceback, one ``failures.jsonl`` row per failed sample naming it, the good sample beside
the bad ones finishes with ``_SUCCESS``, nothing is written outside the output folder, and no mosaic
holding non-finite probabilities is marked complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from slidescore.config import SAMPLE_ID_PATTERN
from slidescore.stages.layout import RESERVED
from tests.conftest import REPO
from tests.hostile.conftest import (
    JOB_YAML,
    Run,
    assert_complete_outputs_are_sane,
    assert_no_traceback,
    assert_one_line,
    failure_rows,
    run_cli,
    sample_folders,
    snapshot,
    write_bad_images,
    write_job,
)


def _score(tmp_path: Path, images: list[str | Path], *extra: str, job: str = JOB_YAML, out: str = "out",
           **kw) -> tuple[Run, Path]:
    """Score ``images`` into ``tmp_path/out`` from ``tmp_path``; check that nothing else under
    ``tmp_path`` changed (inputs untouched, no stray files in the working directory)."""
    cfg = write_job(tmp_path, job)
    before = snapshot(tmp_path, exclude=tmp_path / out)
    run = run_cli(["score", "-c", str(cfg), "-o", out, "-q", *extra, "--", *map(str, images)], tmp_path, **kw)
    after = snapshot(tmp_path, exclude=tmp_path / out)
    assert after == before, f"written outside the output folder: {sorted(set(after.items()) ^ set(before.items()))}"
    return run, tmp_path / out


def _score_here(tmp_path: Path, images: list[str | Path], *extra: str, capsys, monkeypatch, job: str = JOB_YAML,
                out: str = "out") -> tuple[Run, Path]:
    """Like :func:`_score`, through ``slidescore.cli.main`` in this process (torch is already
    imported here: seconds saved per case). For cases that stop before scoring; an exception
    escaping ``main`` (what would print a traceback) fails the test."""
    from slidescore.cli import main

    cfg = write_job(tmp_path, job)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path, exclude=tmp_path / out)
    capsys.readouterr()
    t0 = time.perf_counter()
    rc = main(["score", "-c", str(cfg), "-o", out, "-q", *extra, "--", *map(str, images)])
    seconds = time.perf_counter() - t0
    captured = capsys.readouterr()
    after = snapshot(tmp_path, exclude=tmp_path / out)
    assert after == before, f"written outside the output folder: {sorted(set(after.items()) ^ set(before.items()))}"
    return Run(rc, captured.out, captured.err, seconds), tmp_path / out


def _copy_images(good_images: dict[str, Path], folder: Path, names: dict[str, str] | None = None) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for key, src in good_images.items():
        dst = folder / (names or {}).get(key, src.name)
        shutil.copyfile(src, dst)
        out[key] = dst
    return out


def _marked_complete(folder: Path) -> bool:
    """A ``_SUCCESS`` holding a run key (an empty one, left by a crash, means "not finished")."""
    try:
        return bool(json.loads((folder / "_SUCCESS").read_text()).get("run_key"))
    except (OSError, ValueError, AttributeError):
        return False


def _no_success(out: Path) -> None:
    assert not list(out.rglob("_SUCCESS")), [str(p) for p in out.rglob("_SUCCESS")]


# -- broken models ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_runs(tmp_path_factory: pytest.TempPathFactory, good_images, hostile_models):
    """One CLI run per broken model over the two good images (a, then b), done once per module."""
    cache: dict[str, tuple[Run, Path]] = {}

    def get(name: str) -> tuple[Run, Path]:
        if name not in cache:
            d = tmp_path_factory.mktemp(f"model-{name}")
            imgs = _copy_images(good_images, d / "images")
            cache[name] = _score(d, [imgs["a"], imgs["b"]], "--model", str(hostile_models[name]))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["nan", "nan_one", "nan_dense"])
def test_nan_model_fails_every_sample_with_a_nan_message(model_runs, name: str) -> None:
    run, out = model_runs(name)
    assert_no_traceback(run)
    assert run.rc == 1, (run.rc, run.stderr[-2000:])
    rows = failure_rows(out)
    assert sorted(r["sample_id"] for r in rows) == ["a", "b"], rows
    for r in rows:
        assert_one_line(r["error"])
        assert "NaN" in r["error"] and r["error_type"] == "ModelOutputError", r
        assert f"FAILED  {r['sample_id']}: " in run.stderr
    _no_success(out)
    assert_complete_outputs_are_sane(out)


def test_nan_dense_model_is_not_blamed_on_the_dense_claim(model_runs) -> None:
    """A dense-capable network that returns NaN fails the dense self-check; the operator should read
    about NaN, not that the card's dense claim is wrong (the per-patch fallback then fails on NaN)."""
    run, _ = model_runs("nan_dense")
    assert "not fully convolutional" not in run.stderr, run.stderr[-2000:]


def test_model_raising_on_third_batch_fails_that_sample_and_the_next_is_scored(model_runs) -> None:
    run, out = model_runs("raise3")
    assert_no_traceback(run)
    assert run.rc == 1, (run.rc, run.stderr[-2000:])
    (row,) = failure_rows(out)
    assert row["sample_id"] == "a" and row["stage"] == "scoring", row
    assert_one_line(row["error"])
    assert "raise3" in row["error"] and "boom on call 3" in row["error"], row["error"]
    assert not (out / "a" / "_SUCCESS").exists()
    assert (out / "b" / "_SUCCESS").exists(), run.stderr[-2000:]
    assert re.search(r"^ok +b: ", run.stdout, re.M), run.stdout
    stderr_lines = [line for line in run.stderr.splitlines() if line.startswith("FAILED")]
    assert len(stderr_lines) == 1 and "boom on call 3" in stderr_lines[0], run.stderr[-2000:]
    assert_complete_outputs_are_sane(out)


def test_model_exception_message_is_short_and_names_the_error(model_runs) -> None:
    """The failure line of a model that raised is what a night operator reads: the model, the
    exception type and its message, not the TorchScript interpreter's serialized-code dump."""
    run, out = model_runs("raise3")
    (row,) = failure_rows(out)
    msg = row["error"]
    assert "RuntimeError" in msg and "boom on call 3" in msg, msg
    assert "Traceback" not in msg and "serialized code" not in msg, msg
    assert len(msg) <= 400, f"{len(msg)} characters: {msg}"


def test_model_with_wrong_output_shape(model_runs) -> None:
    run, out = model_runs("wrong_shape")
    assert_no_traceback(run)
    assert run.rc in (1, 2), (run.rc, run.stderr[-2000:])
    if run.rc == 2:  # the bad model dooms the run before anything is written
        assert "shape" in run.stderr and "wrong_shape" in run.stderr, run.stderr
        assert not sample_folders(out)
    else:  # every sample fails on its own
        rows = failure_rows(out)
        assert sorted(r["sample_id"] for r in rows) == ["a", "b"], rows
        for r in rows:
            assert_one_line(r["error"])
            assert "shape (16, 2)" in r["error"] and "wrong_shape" in r["error"], r["error"]
    _no_success(out)


# -- bad model cards: a bad model dooms the run (exit 2) ---------------------------------------------
@pytest.mark.parametrize(("name", "key"), [("card_network_stride_px", "network_stride_px"), ("card_std", "std"),
                                           ("card_classes", "classes")])
def test_bad_card_value_stops_the_run_naming_the_key(tmp_path: Path, good_images, hostile_models, name: str, key: str,
                                                    capsys, monkeypatch) -> None:
    run, out = _score_here(tmp_path, [good_images["a"]], "--model", str(hostile_models[name]), capsys=capsys, monkeypatch=monkeypatch)
    assert_no_traceback(run)
    assert run.rc == 2, (run.rc, run.stderr[-2000:])
    assert re.search(rf"card.*\b{key}\b", run.stderr), run.stderr
    assert not sample_folders(out)


# -- hostile file names -------------------------------------------------------------------------------
HOSTILE_NAMES = ["...tif", "..tif", "-rf.tif", "run.json.tif", "failures.jsonl.tif", "_SUCCESS.tif", "a b;$(x).tif",
                 "new\nline.tif", "ünï😀.tif", "good.tif"]


def test_hostile_file_names_give_safe_sample_folders(tmp_path: Path, good_images) -> None:
    imgs = tmp_path / "in"
    imgs.mkdir()
    for n in HOSTILE_NAMES:
        shutil.copyfile(good_images["a"], imgs / n)
    # relative names after "--", from the folder holding them (as a shell glob would pass them)
    run, out = _score(tmp_path, [f"in/{n}" for n in HOSTILE_NAMES])
    assert_no_traceback(run)
    assert run.rc == 0, (run.rc, run.stderr[-3000:])
    folders = sample_folders(out)
    assert len(folders) == len(HOSTILE_NAMES), [f.name for f in folders]
    for f in folders:
        assert f.parent == out and SAMPLE_ID_PATTERN.match(f.name) and f.name not in RESERVED, f.name
        assert (f / "_SUCCESS").exists(), f
    # the run-level records are intact: run.json is the run's (not a sample's), nothing else at the root
    root_files = {p.name for p in out.iterdir() if not p.is_dir()}
    assert root_files <= {"run.json", "index.html", "failures.jsonl"} and "run.json" in root_files, root_files
    record = json.loads((out / "run.json").read_text())
    rows = record["samples"]
    assert len(rows) == len(HOSTILE_NAMES) and all(r["status"] == "ok" for r in rows), rows
    assert sorted(r["uri"] for r in rows) == sorted(f"in/{n}" for n in HOSTILE_NAMES)
    assert sorted(r["sample_id"] for r in rows) == sorted(f.name for f in folders)
    assert "failures.jsonl" not in root_files
    assert_complete_outputs_are_sane(out)


@pytest.mark.parametrize("sid", ["../evil", "run.json", ".x", "a/b", "", "_SUCCESS"])
def test_hostile_explicit_sample_ids_stop_the_run(tmp_path: Path, good_images, sid: str, capsys, monkeypatch) -> None:
    run, out = _score_here(tmp_path, [], f"--sample={sid}={good_images['a']}", capsys=capsys, monkeypatch=monkeypatch)
    assert_no_traceback(run)
    assert run.rc == 2, (run.rc, run.stderr[-2000:])
    assert "sample" in run.stderr and repr(sid) in run.stderr, run.stderr
    assert not out.exists() or not any(out.iterdir())


# -- YAML -------------------------------------------------------------------------------------------
def _alias_bomb() -> str:
    lines = ["l0: &l0 [" + ", ".join(["0.5"] * 10) + "]"]
    lines += [f"l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    return "\n".join(lines) + "\nregions:\n  thresholds: *l8\n"


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        ("tiling:\n  chunk_cells: 8\nreport: {enabled: false}\ntiling:\n  stride_px: 16\n",
         ["'tiling'", "twice", "lines 1 and 4"]),
        (_alias_bomb(), ["alias"]),
        ("tiling: {chunk_cells: 8}\nmask:\n  mask_mpp: .nan\n", ["mask.mask_mpp", "finite"]),
    ],
    ids=["duplicate-keys", "alias-bomb", "nan-mask-mpp"],
)
@pytest.mark.timeout(60)
def test_hostile_yaml_exits_2_fast(tmp_path: Path, good_images, text: str, fragments: list[str], capsys, monkeypatch) -> None:
    run, out = _score_here(tmp_path, [good_images["a"]], job=text, capsys=capsys, monkeypatch=monkeypatch)
    assert_no_traceback(run)
    assert run.rc == 2, (run.rc, run.stderr[-2000:])
    for f in fragments:
        assert f in run.stderr, (f, run.stderr)
    assert run.seconds < 10, f"took {run.seconds:.1f} s"
    assert not out.exists() or not any(out.iterdir())


# -- corrupt state from an earlier crash --------------------------------------------------------------
@pytest.fixture(scope="module")
def crashed_rerun(tmp_path_factory: pytest.TempPathFactory, good_images):
    """Score ``a``; leave what a crash could (an empty ``_SUCCESS``, ``.lease`` and run-level
    ``run.json``, an empty block marker, a block whose marker is missing and whose chunk is empty, a
    torn last line in ``failures.jsonl``); rerun with ``a`` and an empty image."""
    from slidescore.io import mosaic as mz

    d = tmp_path_factory.mktemp("crash")
    imgs = _copy_images(good_images, d / "images")
    (d / "images" / "empty.tif").write_bytes(b"")
    first, out = _score(d, [imgs["a"]])
    assert first.rc == 0, first.stderr[-2000:]
    sample = out / "a"
    reference = mz.read_level(sample / "probabilities.ome.zarr", 0)
    (sample / "_SUCCESS").write_bytes(b"")
    (sample / ".lease").write_bytes(b"")
    (out / "run.json").write_bytes(b"")
    markers = sorted((sample / ".blocks").glob("*/*.json"))
    assert len(markers) == 4, markers
    markers[0].write_bytes(b"")  # block 0_0: an empty record
    markers[1].unlink()  # block 0_1: crashed between its chunk and its marker; the chunk half written
    chunk = sample / "probabilities.ome.zarr" / "0" / "0" / "0" / "1"
    assert chunk.exists()
    chunk.write_bytes(chunk.read_bytes()[:7])
    (out / "failures.jsonl").write_text('{"sample_id": "old", "error": "from an earlier run"}\n{"sample_id": "torn", "er')
    rerun, _ = _score(d, [imgs["a"], d / "images" / "empty.tif"])
    return rerun, out, reference


def test_rerun_after_a_crash_finishes_the_sample(crashed_rerun) -> None:
    from slidescore.io import mosaic as mz

    run, out, reference = crashed_rerun
    assert_no_traceback(run)
    assert run.rc == 1, (run.rc, run.stderr[-2000:])  # the empty image fails; the crashed sample finishes
    marker = json.loads((out / "a" / "_SUCCESS").read_text())
    assert marker["run_key"]
    again = mz.read_level(out / "a" / "probabilities.ome.zarr", 0)
    assert np.array_equal(np.isnan(again), np.isnan(reference)) and np.nanmax(np.abs(again - reference)) <= 1e-6
    sample_run = json.loads((out / "a" / "run.json").read_text())
    assert sample_run["blocks"]["total"] == 4 and sample_run["blocks"]["resumed"] == 2, sample_run["blocks"]
    record = json.loads((out / "run.json").read_text())
    assert {r["sample_id"]: r["status"] for r in record["samples"]} == {"a": "ok", "empty": "failed"}
    assert_complete_outputs_are_sane(out)


def test_failure_row_after_a_torn_failures_line_is_its_own_row(crashed_rerun) -> None:
    """A crash mid-append leaves failures.jsonl without its last newline; the next run's row must
    still be a line of its own (a reader of the file finds the failed sample)."""
    _, out, _ = crashed_rerun
    lines = (out / "failures.jsonl").read_text().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    assert any(r.get("sample_id") == "empty" for r in rows), lines


def test_rerun_of_a_finished_sample_reports_it_without_nan(crashed_rerun, tmp_path: Path) -> None:
    """Run once more (on a copy of the finished outputs): the sample is skipped, and its summary line
    must not read like a NaN result ("top peak nan")."""
    _, out, _ = crashed_rerun
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    image = out.parent / "images" / "a.tif"
    run = run_cli(["score", "-c", str(write_job(tmp_path)), "-o", "out", "-q", str(image)], tmp_path)
    assert_no_traceback(run)
    assert run.rc == 0, (run.rc, run.stderr[-2000:])
    (line,) = [x for x in run.stdout.splitlines() if x.startswith(("ok", "skipped"))]
    assert line.startswith("skipped a:") and "already complete" in line, line
    assert "nan" not in line.lower(), line


@pytest.fixture(scope="module")
def chunks_behind_markers(tmp_path_factory: pytest.TempPathFactory, good_images, random_model_dir: Path):
    """In this process (local runner): score a and b; then, as a power loss after the block markers
    but before the chunk data reached the disk could leave them, a's chunk (0, 1) is gone and b's is
    truncated, both with their block marker in place and an empty ``_SUCCESS``; rerun both."""
    from slidescore.config import JobConfig
    from slidescore.io import mosaic as mz
    from slidescore.model import load_model
    from slidescore.run.local import score_samples

    d = tmp_path_factory.mktemp("chunks")
    imgs = _copy_images(good_images, d / "images")
    out = d / "out"
    cfg = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "report": {"enabled": False}, "model": {"batch_size": 64}})
    model = load_model(str(random_model_dir))
    first = score_samples([str(imgs["a"]), str(imgs["b"])], cfg, str(out), model=model)
    assert [r.status for r in first] == ["ok", "ok"]
    reference = {k: mz.read_level(out / k / "probabilities.ome.zarr", 0) for k in ("a", "b")}
    for k in ("a", "b"):
        (out / k / "_SUCCESS").write_bytes(b"")
        assert len(list((out / k / ".blocks").glob("*/*.json"))) == 4
    (out / "a" / "probabilities.ome.zarr" / "0" / "0" / "0" / "1").unlink()
    chunk = out / "b" / "probabilities.ome.zarr" / "0" / "0" / "0" / "1"
    chunk.write_bytes(chunk.read_bytes()[:10])
    results = {r.sample_id: r for r in score_samples([str(imgs["a"]), str(imgs["b"])], cfg, str(out), model=model)}
    complete = {k: _marked_complete(out / k) for k in ("a", "b")}  # after the second run, before the third
    # the operator's way out, whatever the second run said: run again
    healed = {r.sample_id: r for r in score_samples([str(imgs["a"]), str(imgs["b"])], cfg, str(out), model=model)}
    return results, complete, reference, healed, out


def test_lost_chunk_behind_its_block_marker_is_not_marked_complete_with_holes(chunks_behind_markers) -> None:
    """Either the block is scored again (same mosaic) or the sample fails; never a mosaic marked
    complete with NaN (= "not scored") where its patches were scored."""
    from slidescore.io import mosaic as mz

    results, complete, reference, healed, out = chunks_behind_markers
    r = results["a"]
    if r.status == "failed":
        assert not complete["a"]
        assert_one_line(r.error)
        assert "run again" in r.error and "0_1" in r.error, r.error  # names the block and the way out
        assert healed["a"].status == "ok", healed["a"].error
        r = healed["a"]
    again = mz.read_level(out / "a" / "probabilities.ome.zarr", 0)
    lost = int((np.isnan(again) & ~np.isnan(reference["a"])).sum())
    assert lost == 0, f"sample a marked complete ({r.status}) with {lost} scored cells now NaN (its chunk was lost)"


def test_truncated_chunk_behind_its_block_marker_is_rescored_or_named(chunks_behind_markers) -> None:
    """Either the block is scored again (same mosaic), or the sample fails with a message that names
    the damaged chunk and the way out (--overwrite), not a bare codec error."""
    from slidescore.io import mosaic as mz

    results, complete, reference, healed, out = chunks_behind_markers
    r = results["b"]
    if r.status != "ok":
        assert r.status == "failed" and not complete["b"]
        assert_one_line(r.error)
        # names the damaged mosaic and block, and the way out (run again: the block is rescored)
        assert "probabilities.ome.zarr" in r.error and "0_1" in r.error and "run again" in r.error, r.error
        r = healed["b"]
        assert r.status == "ok", r.error
    again = mz.read_level(out / "b" / "probabilities.ome.zarr", 0)
    assert np.array_equal(np.isnan(again), np.isnan(reference["b"]))
    np.testing.assert_allclose(again, reference["b"], atol=1e-6)


# -- output locations -------------------------------------------------------------------------------
def test_output_that_is_an_existing_file(tmp_path: Path, good_images, capsys, monkeypatch) -> None:
    (tmp_path / "out").write_text("not a folder\n")
    run, _ = _score_here(tmp_path, [good_images["a"]], capsys=capsys, monkeypatch=monkeypatch)
    assert_no_traceback(run)
    assert run.rc == 2, (run.rc, run.stderr[-2000:])
    assert "error: output out" in run.stderr and "existing file" in run.stderr, run.stderr
    assert (tmp_path / "out").read_text() == "not a folder\n"


def test_output_under_a_file_fails_for_root_too(tmp_path: Path, good_images, capsys, monkeypatch) -> None:
    (tmp_path / "afile").write_text("x\n")
    run, _ = _score_here(tmp_path, [good_images["a"]], out="afile/sub", capsys=capsys, monkeypatch=monkeypatch)
    assert_no_traceback(run)
    assert run.rc == 2, (run.rc, run.stderr[-2000:])
    assert "afile/sub" in run.stderr and "cannot be written" in run.stderr, run.stderr
    assert (tmp_path / "afile").read_text() == "x\n"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into a chmod 0o555 folder anyway; test_output_under_a_file covers an unwritable output for root")
def test_read_only_output_folder(tmp_path: Path, good_images) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        cfg = write_job(tmp_path)
        run = run_cli(["score", "-c", str(cfg), "-o", "ro/out", "-q", str(good_images["a"])], tmp_path)
    finally:
        ro.chmod(0o755)
    assert_no_traceback(run)
    assert run.rc == 2, (run.rc, run.stderr[-2000:])
    assert "ro/out" in run.stderr, run.stderr


@pytest.mark.s3
def test_missing_s3_output_bucket(tmp_path: Path, good_images, s3_server: str, s3fs_client) -> None:
    run = run_cli(["score", "-c", str(write_job(tmp_path)), "-o", "s3://no-such-bucket-hostile/run1", "-q",
                   str(good_images["a"]), str(good_images["b"])], tmp_path, timeout=180)
    assert_no_traceback(run)
    assert run.rc in (1, 2), (run.rc, run.stderr[-2000:])
    assert "no-such-bucket-hostile" in run.stderr, run.stderr
    if run.rc == 1:  # per-sample failures: every sample, each with its line
        assert "FAILED  a:" in run.stderr and "FAILED  b:" in run.stderr, run.stderr
    assert not s3fs_client.exists("no-such-bucket-hostile")


def test_sample_folder_taken_by_a_file_fails_only_that_sample(tmp_path: Path, good_images) -> None:
    imgs = _copy_images(good_images, tmp_path / "images")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("someone's notes\n")
    run, out = _score(tmp_path, [imgs["a"], imgs["b"]])
    assert_no_traceback(run)
    assert run.rc == 1, (run.rc, run.stderr[-2000:])
    (row,) = failure_rows(out)
    assert row["sample_id"] == "a" and "out/a" in row["error"], row
    assert (out / "a").read_text() == "someone's notes\n"
    assert (out / "b" / "_SUCCESS").exists()


# -- corrupt images among good ones -------------------------------------------------------------------
def test_corrupt_images_fail_alone(tmp_path: Path, good_images) -> None:
    imgs = _copy_images(good_images, tmp_path / "images")
    bad = write_bad_images(tmp_path / "images", good_images["a"])
    os.mkfifo(tmp_path / "images" / "fifo.tif")  # a named pipe: opening it for reading would block
    (tmp_path / "images" / "zero.tif").symlink_to("/dev/zero")  # endless zeros
    (tmp_path / "images" / "dangling.tif").symlink_to(tmp_path / "nowhere.tif")
    bad.update({k: tmp_path / "images" / f"{k}.tif" for k in ("fifo", "zero", "dangling")})
    run, out = _score(tmp_path, [*bad.values(), imgs["a"]], timeout=120)
    assert_no_traceback(run)
    assert run.rc == 1, (run.rc, run.stderr[-2000:])
    rows = failure_rows(out)
    assert sorted(r["sample_id"] for r in rows) == sorted(bad), rows
    for r in rows:
        assert_one_line(r["error"])
        assert f"{r['sample_id']}.tif" in r["error"], r  # names the file
        assert r["uri"] == str(bad[r["sample_id"]])
        assert not (out / r["sample_id"] / "_SUCCESS").exists()
    assert (out / "a" / "_SUCCESS").exists()
    assert len([line for line in run.stderr.splitlines() if line.startswith("FAILED  ")]) == len(bad), run.stderr
    assert "WARNING tifffile" not in run.stderr, run.stderr  # one error per file, not the reading library's notes
    assert_complete_outputs_are_sane(out)


# -- a night-shift operator's own mistakes --------------------------------------------------------------
def test_windows_manifest_with_bom_and_crlf(tmp_path: Path, good_images) -> None:
    """A manifest saved by Windows Notepad (UTF-8 BOM, CRLF line ends, trailing blanks) plans like a Unix one."""
    m = tmp_path / "manifest.txt"
    m.write_bytes(("\ufeff# tonight's scans\r\n" f"{good_images['a']}\r\n\r\n" f"{good_images['b']}   # second\r\n"
                   f"smear-9: {good_images['a']} {good_images['b']} \r\n").encode())
    job = write_job(tmp_path, json.dumps({"model": {"name": "builtin:smearnet"}, "samples": {"manifest": str(m)},
                                          "tiling": {"chunk_cells": 8}, "output": {"uri": str(tmp_path / "out")}}))
    run = run_cli(["-c", str(job), "--dry-run"], REPO, module=[sys.executable, "-m", "jobs.score"])
    assert_no_traceback(run)
    assert run.rc == 0, (run.rc, run.stderr[-2000:])
    planned = re.findall(r"^to score +(\S+):", run.stdout, re.M)
    assert planned == ["a", "b", "smear-9"], run.stdout
    assert not (tmp_path / "out").exists()


def test_image_deleted_between_planning_and_scoring(tmp_path: Path, good_images, random_model_dir: Path, monkeypatch) -> None:
    """The file vanishes (moved by the scanner's sync) after its sample was planned: that sample
    fails with a message naming it; the next sample is scored."""
    import slidescore.run.local as local
    from slidescore.config import JobConfig
    from slidescore.model import load_model

    imgs = _copy_images(good_images, tmp_path / "images")
    real = local.plan_images

    def plan_then_delete(spec, *args, **kwargs):
        plans = real(spec, *args, **kwargs)
        if spec.sample_id == "a":
            os.remove(imgs["a"])
        return plans

    monkeypatch.setattr(local, "plan_images", plan_then_delete)
    cfg = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "report": {"enabled": False}})
    out = tmp_path / "out"
    results = local.score_samples([str(imgs["a"]), str(imgs["b"])], cfg, str(out), model=load_model(str(random_model_dir)))
    assert [r.status for r in results] == ["failed", "ok"], [(r.status, r.error) for r in results]
    (row,) = failure_rows(out)
    assert row["sample_id"] == "a" and row["stage"] == "scoring", row
    assert_one_line(row["error"])
    assert str(imgs["a"]) in row["error"] and "no such file" in row["error"].lower(), row["error"]
    assert "Traceback" not in row["error"]
    assert (out / "b" / "_SUCCESS").exists() and not (out / "a" / "_SUCCESS").exists()

