"""Samples of several images (fields of one smear): one mosaic per image, regions ranked together."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ConfigError
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.layout import MOSAIC
from tests.conftest import textured_image, write_tiff
from tests.io.test_s3_output import check_qupath_geojson


def _cfg(out: Path | str, **sections: dict) -> JobConfig:
    base: dict = {"output": {"uri": str(out)}, "mask": {"min_foreground_frac": 0.05}, "tiling": {"chunk_cells": 8},
                  "regions": {"thresholds": [0.45]}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return JobConfig.from_dict(base)


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fields")
    out = {
        "f1": write_tiff(d / "field1.tif", textured_image(300, 280, seed=11, fg_box=(40, 30, 220, 200)), mpp=0.5),
        "f2": write_tiff(d / "field2.tif", textured_image(260, 300, seed=12, fg_box=(20, 60, 200, 200)), mpp=0.5),
    }
    (d / "notes.tif").write_text("this is not an image\n")
    out["text"] = d / "notes.tif"
    return out


@pytest.fixture(scope="module")
def singles(tmp_path_factory: pytest.TempPathFactory, fields, random_model_dir: Path) -> dict[str, object]:
    """Each field scored alone as a one-image sample (the reference)."""
    out = tmp_path_factory.mktemp("singles")
    res = score_samples([str(fields["f1"]), str(fields["f2"])], _cfg(out), str(out), model=load_model(str(random_model_dir)))
    assert [r.status for r in res] == ["ok", "ok"]
    return {"f1": res[0], "f2": res[1]}


def test_layout_mosaics_and_regions_ranked_across_images(tmp_path: Path, fields, singles, random_model_dir: Path) -> None:
    spec = SampleSpec("smear-1", (str(fields["f1"]), str(fields["f2"])))
    (res,) = score_samples([spec], _cfg(tmp_path), str(tmp_path), model=load_model(str(random_model_dir)))
    assert res.status == "ok", res.error
    out = tmp_path / "smear-1"
    assert Path(res.out_dir) == out and res.images == list(spec.uris)
    # one mosaic (and mask, overview, per-image GeoJSON) per image; none at the sample level
    for iid in ("field1", "field2"):
        for name in (MOSAIC, "mask.ome.zarr", "overview.png", "regions.geojson"):
            assert (out / "images" / iid / name).exists(), name
    assert not (out / MOSAIC).exists()
    for name in ("regions.json", "regions.csv", "regions.geojson", "run.json", "_SUCCESS"):
        assert (out / name).exists(), name
    # each image's mosaic is exactly what scoring that image alone gives
    for key, iid in (("f1", "field1"), ("f2", "field2")):
        ref = mz.read_level(Path(singles[key].out_dir) / MOSAIC, 0)
        got = mz.read_level(out / "images" / iid / MOSAIC, 0)
        np.testing.assert_array_equal(got, ref)
    # ONE region list, ranked across both images, every region carrying its image
    doc = json.loads((out / "regions.json").read_text())
    regs = doc["regions"]
    alone = {k: singles[k].run["regions"]["total"] for k in ("f1", "f2")}
    assert alone["f1"] > 0 and alone["f2"] > 0
    assert doc["n_regions_total"] == alone["f1"] + alone["f2"] == len(regs)
    assert [r["rank"] for r in regs] == list(range(1, len(regs) + 1))
    peaks = [r["peak_probability"] for r in regs]
    assert peaks == sorted(peaks, reverse=True)
    assert {r["image"] for r in regs} == set(spec.uris)
    assert doc["images"] == [{"image_id": "field1", "uri": spec.uris[0]}, {"image_id": "field2", "uri": spec.uris[1]}]
    # the regions of one image are those it has alone (same boxes), with the sample's ranks
    for key, uri in (("f1", spec.uris[0]), ("f2", spec.uris[1])):
        mine = sorted(tuple(r["bbox_px"]) for r in regs if r["image"] == uri)
        assert mine == sorted(tuple(r.bbox_px) for r in singles[key].regions)
    csv_lines = (out / "regions.csv").read_text().splitlines()
    assert len(csv_lines) == len(regs) + 1 and "image" in csv_lines[0].split(",")
    gj = json.loads((out / "regions.geojson").read_text())
    check_qupath_geojson(gj, regs)
    assert [f["properties"]["image"] for f in gj["features"]] == [r["image"] for r in regs]
    per_image = json.loads((out / "images" / "field2" / "regions.geojson").read_text())
    assert len(per_image["features"]) == alone["f2"]
    # run.json: every image with its fingerprint, level and counts; totals over the images
    run = json.loads((out / "run.json").read_text())
    assert [img["image_id"] for img in run["images"]] == ["field1", "field2"]
    for img, uri in zip(run["images"], spec.uris, strict=True):
        assert img["input"]["uri"] == uri and img["input"]["size_bytes"] == Path(uri).stat().st_size
        assert img["input"]["level"] == 0 and img["input"]["mpp0"] == pytest.approx(0.5)
    assert run["input"]["images"] == list(spec.uris)
    assert run["patches"]["scored"] == sum(singles[k].run["patches"]["scored"] for k in ("f1", "f2"))
    assert run["blocks"]["total"] == sum(singles[k].run["blocks"]["total"] for k in ("f1", "f2"))
    assert run["regions"]["total"] == len(regs)


def test_run_key_covers_all_images_and_resume_is_per_image(tmp_path: Path, fields, random_model_dir: Path) -> None:
    model = load_model(str(random_model_dir))
    f2 = tmp_path / "field2.tif"
    f2.write_bytes(fields["f2"].read_bytes())
    spec = SampleSpec("s", (str(fields["f1"]), str(f2)))
    cfg = _cfg(tmp_path / "out")
    (first,) = score_samples([spec], cfg, cfg.output.uri, model=model)
    out = Path(first.out_dir)
    before = (out / "regions.geojson").read_bytes()
    (again,) = score_samples([spec], cfg, cfg.output.uri, model=model)
    assert again.status == "skipped" and (out / "regions.geojson").read_bytes() == before
    # interrupted run: no completion marker, one block marker of the second image lost
    clean = mz.read_level(out / "images" / "field2" / MOSAIC, 0)
    (out / "_SUCCESS").unlink()
    markers = sorted((out / "images").rglob(".blocks/*/*.json"))
    lost = next(m for m in markers if "field2" in m.parts)
    lost.unlink()
    (res,) = score_samples([spec], cfg, cfg.output.uri, model=model)
    assert res.status == "ok" and res.run["blocks"]["resumed"] == len(markers) - 1
    np.testing.assert_array_equal(mz.read_level(out / "images" / "field2" / MOSAIC, 0), clean)
    assert (out / "regions.geojson").read_bytes() == before
    # changing ONE image changes the sample's run key: finished results are not silently reused
    write_tiff(f2, textured_image(260, 300, seed=99, fg_box=(20, 60, 200, 200)), mpp=0.5)
    (changed,) = score_samples([spec], cfg, cfg.output.uri, model=model)
    assert changed.status == "failed" and "different run" in changed.error
    (redo,) = score_samples([spec], cfg.replace(output={"overwrite": True}), cfg.output.uri, model=model)
    assert redo.status == "ok" and redo.run["run_key"] != first.run["run_key"] and redo.run["blocks"]["resumed"] == 0


def test_bad_image_fails_its_sample_naming_the_image(tmp_path: Path, fields, random_model_dir: Path) -> None:
    bad = SampleSpec("smear-bad", (str(fields["f1"]), str(fields["text"])))
    missing = SampleSpec("smear-missing", (str(fields["f2"]), str(tmp_path / "nope.tif")))
    results = score_samples([bad, str(fields["f2"]), missing], _cfg(tmp_path), str(tmp_path), model=load_model(str(random_model_dir)))
    assert [r.status for r in results] == ["failed", "ok", "failed"]
    assert "smear-bad" in results[0].error and "image 'notes'" in results[0].error and "notes.tif" in results[0].error
    assert "smear-missing" in results[2].error and "image 'nope'" in results[2].error and "not found" in results[2].error
    assert results[2].error_type == "SampleNotFoundError"
    rows = [json.loads(line) for line in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert [r["sample_id"] for r in rows] == ["smear-bad", "smear-missing"]
    assert rows[0]["images"] == list(bad.uris)
    assert not (tmp_path / "smear-bad" / "_SUCCESS").exists()
    run = json.loads((tmp_path / "run.json").read_text())
    assert [s["status"] for s in run["samples"]] == ["failed", "ok", "failed"]


def test_manifest_groups_config_and_cli(tmp_path: Path, fields, random_model_dir: Path, capsys) -> None:
    from slidescore.cli import main

    f1, f2 = str(fields["f1"]), str(fields["f2"])
    manifest = tmp_path / "samples.txt"
    manifest.write_text(f"# fields of one smear per line\n{f1}\nsmear-7: {f1} {f2}  # two fields\nsolo: {f2}\n")
    cfg = JobConfig.from_dict({"samples": {"manifest": str(manifest), "uris": [f2], "groups": {"smear-8": [f2, f1]}}})
    assert cfg.samples.list_samples() == [f2, f1, SampleSpec("smear-7", (f1, f2)), SampleSpec("solo", (f2,)),
                                          SampleSpec("smear-8", (f2, f1))]
    assert JobConfig.from_dict(cfg.to_dict()) == cfg  # groups round-trip through the YAML form
    with pytest.raises(ConfigError, match="list_samples"):
        cfg.samples.list_uris()
    bad_lines = {"x y: a.tif": "one URI per line", "smear-9:": "lists no image", "../up: a.tif b.tif": "sample id"}
    for line, message in bad_lines.items():
        manifest.write_text(line + "\n")
        with pytest.raises(ConfigError, match=message):
            cfg.samples.list_samples()
    with pytest.raises(ConfigError, match="samples.groups"):
        JobConfig.from_dict({"samples": {"groups": {"s": []}}})
    with pytest.raises(ConfigError, match="samples.groups"):
        JobConfig.from_dict({"samples": {"groups": ["a.tif"]}})
    # the CLI: --sample ID=URI1,URI2 next to plain images
    (tmp_path / "job.yaml").write_text(f"model: {{name: {random_model_dir}}}\ntiling: {{chunk_cells: 8}}\n")
    out = tmp_path / "out"
    rc = main(["score", "--config", str(tmp_path / "job.yaml"), "-o", str(out), "-q", "--sample", f"smear-7={f1},{f2}", f2])
    assert rc == 0, capsys.readouterr()
    assert (out / "smear-7" / "images" / "field1" / MOSAIC).exists() and (out / "smear-7" / "_SUCCESS").exists()
    assert (out / "field2" / MOSAIC).exists()  # the plain image keeps the one-image layout
    assert main(["score", "-o", str(out), "--sample", "smear-7"]) == 2
    assert "ID=URI1,URI2" in capsys.readouterr().err
