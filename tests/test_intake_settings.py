"""Intake passes a manifest sample's own settings (``roi=``, ``backend=``) on to the job it submits,
and computes the run key the job will write: ``score_command`` → ``--sample "ID=URI roi=… backend=…"``
→ :func:`slidescore.cli.parse_sample_arg` (the job's and ``slidescore score``'s parser) → the same
sample, planned and scored with the same key."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from jobs.score import build_parser as job_parser
from slidescore.cli import main, parse_sample_arg
from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ConfigError
from slidescore.intake import IntakeConfig, find_samples, sample_run_key, score_command
from slidescore.intake.poll import batch_command
from slidescore.model import load_model
from slidescore.stages.plan import plan_images
from tests.conftest import textured_image, write_tiff

SCORE_CFG = {"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}, "report": {"enabled": False}}


def _roi(path: Path, x0: int, y0: int, x1: int, y1: int) -> Path:
    ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": {"objectType": "annotation"}}]}))
    return path


def _manifest_samples(tmp_path: Path, text: str) -> list[SampleSpec]:
    manifest = tmp_path / "manifest.txt"
    manifest.write_text(text)
    return find_samples(IntakeConfig.from_dict({"manifest": str(manifest), "output": str(tmp_path / "out")})).samples


def _sample_arg(cmd: list[str]) -> str:
    args = job_parser().parse_args(shlex.split(shlex.join(cmd))[3:])  # as the Ray job / RayJob entrypoint runs it
    (arg,) = args.sample
    return arg


def test_manifest_settings_reach_the_job_command(tmp_path: Path) -> None:
    samples = _manifest_samples(tmp_path, "\n".join([
        "s3://in/a.tif roi=s3://in/a.geojson",  # a one-image sample named after its file, with an ROI
        "b: /in/b.mrxs backend=openslide",
        "c: /in/c.tif roi=/rois/c,1.png backend=tifffile",  # a ',' in the ROI's path is no URI separator
        "/in/plain.tif",
        "d: /in/d1.tif /in/d2.tif backend=tifffile",
    ]))
    by_id = {s.sample_id: s for s in samples}
    assert by_id["a"].roi == "s3://in/a.geojson" and by_id["b"].backend == "openslide"
    for sid, sample in by_id.items():
        cmd = score_command(sample, "job.yaml", "s3://out")
        if sid == "plain":  # nothing of its own: as before
            assert cmd[-2:] == ["--uri", "/in/plain.tif"]
            continue
        spec = parse_sample_arg(_sample_arg(cmd))
        assert (spec.sample_id, spec.uris, spec.roi, spec.backend) == (sid, sample.uris, sample.roi, sample.backend)
    assert _sample_arg(score_command(by_id["c"], "j", "o")) == "c=/in/c.tif roi=/rois/c,1.png backend=tifffile"
    # a batch keeps each sample's settings with its own --sample
    cmd = batch_command([by_id["a"], by_id["plain"], by_id["b"]], "job.yaml", "s3://out")
    args = job_parser().parse_args(cmd[3:])
    assert args.uri == ["/in/plain.tif"]
    assert [parse_sample_arg(a) for a in args.sample] == [SampleSpec("a", ("s3://in/a.tif",), roi="s3://in/a.geojson"),
                                                           SampleSpec("b", ("/in/b.mrxs",), backend="openslide")]


def test_sample_arg_refuses_bad_settings() -> None:
    assert parse_sample_arg("s=/a.tif,/b.tif") == SampleSpec("s", ("/a.tif", "/b.tif"))
    assert parse_sample_arg("s=/a.tif, /b.tif") == SampleSpec("s", ("/a.tif", "/b.tif"))  # as before: spaces after commas
    for text, match in [("s=/a.tif backend=bioformats", r"backend=bioformats is not a reader; expected one of"),
                        ("s=/a.tif,/b.tif roi=/r.geojson", r"roi= applies to one image; sample 's' has 2"),
                        ("s=/a.tif roi=/r.geojson roi=/q.geojson", r"at most one roi=PATH and one backend=NAME"),
                        ("s=/a.tif roi=", r"at most one roi=PATH"),
                        ("roi=/r.geojson", r"expected ID=URI1,URI2")]:
        with pytest.raises(ConfigError, match=match):
            parse_sample_arg(text)


def test_intake_key_is_the_jobs_with_roi_and_backend(tmp_path: Path, random_model_dir: Path) -> None:
    """The poller's key of a manifest sample with roi= and backend= is the key the job plans it with,
    and the key ``slidescore score`` writes into ``_SUCCESS`` scoring that ``--sample``; the ROI's
    content is in it (another ROI: another key), and run.json records both settings."""
    img = write_tiff(tmp_path / "slide.tif", textured_image(256, 320, seed=3, fg_box=(16, 16, 220, 280)))
    roi = _roi(tmp_path / "roi.geojson", 32, 32, 224, 192)
    other = _roi(tmp_path / "other.geojson", 32, 32, 224, 160)
    (sample,) = _manifest_samples(tmp_path, f"s1: {img} roi={roi} backend=tifffile\n")
    job = {**SCORE_CFG, "model": {"name": str(random_model_dir)}}  # the job config both sides read
    model, job_cfg = load_model(str(random_model_dir)), JobConfig.from_dict(job)
    key = sample_run_key(sample, model.checksum, model.card, job_cfg)
    spec = parse_sample_arg(_sample_arg(score_command(sample, "job.yaml", str(tmp_path / "out"))))
    plans = plan_images(spec, job_cfg, model.card, model.checksum, str(tmp_path / "plan"), dry_run=True)
    assert plans is not None and [p.run_key for p in plans] == [key]
    assert plans[0].roi is not None and plans[0].open_options["backend"] == "tifffile"
    bare = SampleSpec("s1", (str(img),))
    assert key != sample_run_key(bare, model.checksum, model.card, job_cfg)
    assert key != sample_run_key(SampleSpec("s1", (str(img),), roi=str(other)), model.checksum, model.card, job_cfg)
    # the job config's mask.roi and input.backend stand in for a sample without them, on both sides
    cfg_roi = job_cfg.replace(mask={"roi": str(roi)}, input={"backend": "tifffile"})
    assert sample_run_key(bare, model.checksum, model.card, cfg_roi) == key
    assert sample_run_key(bare, model.checksum, model.card, job_cfg.replace(mask={"roi": str(roi)})) != key

    config = tmp_path / "job.yaml"
    config.write_text(json.dumps(job))
    out = tmp_path / "out"
    assert main(["score", "--sample", _sample_arg(score_command(sample, str(config), str(out))), "--config", str(config),
                 "--output", str(out), "--quiet"]) == 0
    assert json.loads((out / "s1" / "_SUCCESS").read_text())["run_key"] == key
    record = json.loads((out / "s1" / "run.json").read_text())["input"]
    assert record["backend"] == "tifffile" and record["roi"]["sha256"] and record["roi"]["kind"] == "geojson"


def test_score_backend_option(tmp_path: Path, random_model_dir: Path) -> None:
    """``slidescore score --backend NAME`` sets input.backend (the reader of every image given)."""
    img = write_tiff(tmp_path / "a.tif", textured_image(128, 160, seed=4))
    out = tmp_path / "out"
    base = ["score", str(img), "--model", str(random_model_dir), "--output", str(out), "--quiet"]
    assert main([*base, "--backend", "tifffile"]) == 0
    assert json.loads((out / "a" / "run.json").read_text())["input"]["backend"] == "tifffile"
    with pytest.raises(SystemExit):  # argparse: not a reader
        main([*base, "--backend", "bioformats"])
