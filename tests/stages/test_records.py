"""A sample's run.json is the serialisation of its typed record (SampleRecord), in today's layout.

Samples of one image and of several are scored by the local runner; their run.json must have
exactly the layout the report pages, the CLI and users read (same keys, same order), equal the
record the job built (``SampleResult.run`` is ``record.to_dict()``), and read back into the record
without loss. An older run.json (entries missing) must read with defaults, not fail.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from slidescore.config import JobConfig, SampleSpec
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.records import (
    DecisionRecord,
    ImageRecord,
    ImageReport,
    InputRecord,
    OutputsRecord,
    PerImageOutputs,
    QualityFlag,
    RegionCrop,
    SampleInput,
    SampleRecord,
    SampleReport,
)
from tests.conftest import textured_image, write_tiff

# The layout run.json had before it was typed (written by the dict-building code), key by key in
# order; None: a leaf, or an open mapping whose keys belong to another layer (config, model card,
# the model's scoring options, io's pixel conversion, decide's per-class figures). Lists: their
# first element.
_INPUT = {k: None for k in ("uri", "size_bytes", "mtime", "mpp0", "mpp_source", "level", "level_mpp", "level_shape",
                            "conversion", "resampled_from_level", "resample_scale", "georeference")}
_MODEL = {k: None for k in ("source", "sha256", "card", "device", "scoring")}
_GRID = {k: None for k in ("patch_px", "stride_px", "cells_shape", "patches_shape", "border_policy")}
_PATCHES = {k: None for k in ("total", "scored", "skipped_background", "evaluated_with_halo")}
_BLOCKS = {k: None for k in ("total", "resumed", "without_foreground")}
_IMAGE_TIMINGS = {k: None for k in ("open_s", "mask_s", "read_s", "score_s", "write_s")}
_DECISION = {"operating_point": None, "operating_point_unit": None, "thresholds": {"parasitized": None},
             "calibration": {"method": None, "temperature": None}, "training_prevalence": None, "target_prevalence": None,
             "prior_shift": None, "unit_figures": None,
             "sample_call": {"call": None, "operating_point": None, "per_class": None}}
_QUALITY = {k: None for k in ("flag", "value", "threshold", "raised", "message")}
_IMAGE_REPORT = {"html": None, "tiles_geojson": None, "top_k": None, "top_peak_probability": None, "call": None,
                 "gradcam": None, "gradcam_model": None, "regions": [{"rank": None, "crop_box_px": None}], "seconds": None}
_TAIL = {"thresholds": {"parasitized": None}, "decision": _DECISION, "regions": {"total": None, "written": None},
         "timings_s": {**_IMAGE_TIMINGS, "pyramid_s": None, "regions_s": None, "total_s": None},
         "throughput": {"patches_per_s": None, "megapixels_per_s": None}}
_HEAD = {"sample_id": None, "run_key": None, "slidescore_version": None, "code_version": None}

ONE_IMAGE = {
    **_HEAD, "input": _INPUT, "model": _MODEL, "config": None,
    "grid": _GRID, "patches": _PATCHES, "blocks": _BLOCKS,
    "area": {"scored_cells": None, "cell_um": None, "discarded_fraction": None}, **_TAIL,
    "outputs": {k: None for k in ("mosaic", "mask", "labels", "regions", "overview", "report", "tiles")},
    "quality": [_QUALITY], "report": _IMAGE_REPORT,
}
SEVERAL_IMAGES = {
    **_HEAD, "input": {"images": None, "n_images": None}, "model": _MODEL, "config": None,
    "images": [{"image_id": None, "folder": None, "input": _INPUT, "grid": _GRID, "patches": _PATCHES, "blocks": _BLOCKS,
                "area": {"scored_cells": None, "cell_um": None, "discarded_fraction": None}, "timings_s": _IMAGE_TIMINGS}],
    "grid": {"patch_px": None, "stride_px": None, "border_policy": None}, "patches": _PATCHES, "blocks": _BLOCKS,
    "area": {"scored_cells": None, "discarded_fraction": None}, **_TAIL,
    "outputs": {"regions": None, "per_image": {k: None for k in ("folder", "mosaic", "mask", "labels", "regions", "overview",
                                                                "report", "tiles")}, "report": None},
    "quality": [{**_QUALITY, "image": None}],
    "report": {"html": None, "top_k": None, "top_peak_probability": None, "call": None, "image_pages": None,
               "regions_without_crops": None, "seconds": None, "images": [{**_IMAGE_REPORT, "image_id": None}]},
}


def _paths(spec: Any, prefix: str = "") -> list[str]:
    """Key paths of a layout spec, in order (lists: their first element)."""
    out: list[str] = []
    if isinstance(spec, list):
        return _paths(spec[0], f"{prefix}[0]")
    for k, v in spec.items():
        out.append(f"{prefix}.{k}" if prefix else k)
        if v is not None:
            out += _paths(v, out[-1])
    return out


def _doc_paths(doc: Any, spec: Any, prefix: str = "") -> list[str]:
    """Key paths of a run.json, in its order, not descending where the spec has an open mapping."""
    out: list[str] = []
    if isinstance(doc, list):
        return _doc_paths(doc[0], spec[0] if isinstance(spec, list) else None, f"{prefix}[0]") if doc else []
    for k, v in doc.items():
        out.append(f"{prefix}.{k}" if prefix else k)
        sub = spec.get(k) if isinstance(spec, dict) else None
        if sub is not None and isinstance(v, dict | list):
            out += _doc_paths(v, sub, out[-1])
    return out


def _cfg(out: Path) -> JobConfig:
    return JobConfig.from_dict({"output": {"uri": str(out)}, "mask": {"min_foreground_frac": 0.05}, "tiling": {"chunk_cells": 8},
                                "regions": {"thresholds": [0.45]}, "report": {"gradcam": False}})


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> dict[str, Any]:
    d = tmp_path_factory.mktemp("records")
    f1 = write_tiff(d / "field1.tif", textured_image(300, 280, seed=11, fg_box=(40, 30, 220, 200)), mpp=0.5)
    f2 = write_tiff(d / "field2.tif", textured_image(260, 300, seed=12, fg_box=(20, 60, 200, 200)), mpp=0.5)
    out = d / "out"
    one, several = score_samples([str(f1), SampleSpec("smear", (str(f1), str(f2)))], _cfg(out), str(out),
                                 model=load_model(str(random_model_dir)))
    assert (one.status, several.status) == ("ok", "ok"), (one.error, several.error)
    return {"one": one, "several": several}


@pytest.mark.parametrize("name, layout", [("one", ONE_IMAGE), ("several", SEVERAL_IMAGES)])
def test_run_json_has_the_layout_it_had_and_is_the_records_serialisation(scored, name: str, layout: dict) -> None:
    res = scored[name]
    doc = json.loads((Path(res.out_dir) / "run.json").read_text())
    assert _doc_paths(doc, layout) == _paths(layout)
    # what the job's record serialised to is what was written (SampleResult.run = record.to_dict())
    assert json.loads(json.dumps(res.run)) == doc
    # and it reads back into the record without loss
    rec = SampleRecord.from_dict(doc)
    assert rec.to_dict() == doc
    assert SampleRecord.from_dict(rec.to_dict()) == rec


def test_the_records_read_by_attribute(scored) -> None:
    one = SampleRecord.from_dict(scored["one"].run)
    several = SampleRecord.from_dict(scored["several"].run)
    assert isinstance(one.input, InputRecord) and one.images is None and isinstance(one.report, ImageReport)
    assert isinstance(several.input, SampleInput) and several.input.n_images == 2 and isinstance(several.report, SampleReport)
    assert several.images is not None and [img.image_id for img in several.images] == ["field1", "field2"]
    assert [img.folder for img in several.images] == ["images/field1", "images/field2"]
    # field1 alone and as the first image of the sample: the same input, grid and counts
    first = several.images[0]
    assert (first.input, first.grid, first.patches, first.blocks, first.area) == (one.input, one.grid, one.patches, one.blocks, one.area)
    assert one.input.mtime is not None and one.input.etag is None and one.input.level_shape == [300, 280]
    # the sample's totals are the images' sums
    assert several.patches.scored == sum(img.patches.scored for img in several.images) > 0
    assert several.blocks.total == sum(img.blocks.total for img in several.images)
    assert several.area.scored_cells == sum(img.area.scored_cells for img in several.images)
    assert several.grid.cells_shape is None and several.area.cell_um is None
    assert one.regions is not None and several.regions is not None and one.regions.total >= 1
    assert one.decision is not None and one.decision.sample_call is not None
    assert one.decision.sample_call.call in ("positive", "negative", "needs_review")
    assert one.outputs.report == "report.html" and one.outputs.tiles == "tiles.geojson" and one.outputs.per_image is None
    assert several.outputs.per_image is not None and several.outputs.per_image.tiles == "tiles.geojson"
    assert one.quality and {q.flag for q in one.quality} >= {"blank_fraction", "mpp_overridden"}
    assert several.quality and {q.image for q in several.quality} == {"field1", "field2"}
    assert isinstance(several.report, SampleReport) and [r.image_id for r in several.report.images] == ["field1", "field2"]
    # one image's view, as its report page sees it
    view = several.for_image(1)
    assert view.sample_id == "smear/field2" and view.image_input == several.images[1].input
    assert view.decision == several.decision and view.timings_s.total_s is None
    with pytest.raises(ValueError, match="2 images"):
        _ = several.image_input
    assert one.for_image(0) is one


def test_an_older_run_json_reads_with_defaults(scored) -> None:
    doc = json.loads(json.dumps(scored["one"].run))
    for key in ("quality", "report", "decision", "regions", "area", "timings_s", "throughput", "code_version"):
        doc.pop(key)
    doc["input"] = {"uri": doc["input"]["uri"], "mpp0": doc["input"]["mpp0"]}
    doc["model"].pop("scoring")
    doc["outputs"] = {"mosaic": "probabilities.ome.zarr"}
    rec = SampleRecord.from_dict(doc)
    assert rec.quality is None and rec.report is None and rec.decision is None and rec.regions is None
    assert rec.image_input.level_mpp is None and rec.image_input.conversion is None and rec.model.scoring is None
    assert rec.timings_s.total_s is None and rec.code_version == "" and rec.outputs.regions == []
    out = rec.to_dict()
    assert "quality" not in out and "report" not in out and out["decision"] is None
    assert SampleRecord.from_dict({}).to_dict()["sample_id"] == ""  # an empty record reads too


def test_optional_entries_are_left_out_not_null() -> None:
    assert "gradcam_peak_px" not in RegionCrop(1, [0, 0, 8, 8]).to_dict()
    assert RegionCrop(1, [0, 0, 8, 8], [3, 4]).to_dict() == {"rank": 1, "crop_box_px": [0, 0, 8, 8], "gradcam_peak_px": [3, 4]}
    assert "image" not in QualityFlag("dark_fraction", 0.0, 0.05, False, "ok").to_dict()
    assert list(InputRecord(uri="s3://b/k.tif", size_bytes=3, etag="abc").to_dict())[:4] == ["uri", "size_bytes", "etag", "mpp0"]
    assert "image_id" not in ImageRecord().to_dict()
    one = OutputsRecord(mosaic="m", mask="k", labels="l", regions=["r"], overview="o")
    one.add_report("report.html", "tiles.geojson")
    assert list(one.to_dict()) == ["mosaic", "mask", "labels", "regions", "overview", "report", "tiles"]
    several = OutputsRecord(regions=["r"], per_image=PerImageOutputs("f", "m", "k", "l", "r", "o"))
    several.add_report("report.html", "tiles.geojson")
    assert list(several.to_dict()) == ["regions", "per_image", "report"]
    assert several.to_dict()["per_image"]["tiles"] == "tiles.geojson"


def test_a_hand_made_decision_keeps_its_own_entries() -> None:
    made = {"call": "positive", "sensitivity": 0.95, "n_cells": 350}
    dec = DecisionRecord.from_dict(made)
    assert dec.sample_call is None and dec.extra == made and dec.to_dict() == made
    assert SampleRecord.from_dict({"decision": {}}).decision is None  # an empty decision: not computed
