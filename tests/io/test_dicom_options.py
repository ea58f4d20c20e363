"""``input.dicom``: which optical path and focal plane of a multi-plane DICOM WSI series is scored.

The series are made by ``wsidicomizer`` from two TIFFs of different pixels and merged into one series
with two optical paths, or two focal planes (:func:`tests.io.dicom_fixtures.merge_planes`); lossless,
so the plane scored is recognised by its mosaic: equal to the one of the TIFF it was made from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from slidescore.cli import main
from slidescore.config import JobConfig
from slidescore.config.sections import DicomInputConfig
from slidescore.errors import ConfigError
from slidescore.io import mosaic as mz
from slidescore.io.dicom_web import import_wsidicom
from slidescore.model.card import ModelCard
from slidescore.stages.limits import drop_default_reader, reader_options
from slidescore.stages.plan import run_key_for
from tests.conftest import textured_image
from tests.io.dicom_fixtures import merge_planes, source_tiff, wsidicomize

import_wsidicom()  # before wsidicomizer imports it: pydicom 3 deprecation warnings at import time

SCORE_CFG: dict[str, Any] = {"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}, "report": {"enabled": False}}


@pytest.fixture(scope="module")
def planes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two TIFFs of different pixels, and DICOM series holding both: as optical paths '0' and '1',
    and as focal planes 0 and 2 µm."""
    root = tmp_path_factory.mktemp("planes")
    a = textured_image(192, 256, seed=11, fg_box=(20, 20, 150, 200))
    b = textured_image(192, 256, seed=12, fg_box=(40, 60, 120, 160))
    assert not np.array_equal(a, b)
    ta, tb = source_tiff(a, root / "a.tif", n_levels=2), source_tiff(b, root / "b.tif", n_levels=2)
    sa = wsidicomize(ta, root / "sa", encoding="jpeg2000-lossless")
    sb = wsidicomize(tb, root / "sb", encoding="jpeg2000-lossless")
    return {"a": ta, "b": tb, "paths": merge_planes(sa, sb, root / "paths", optical_path="1"),
            "focus": merge_planes(sa, sb, root / "focus", z_um=2.0)}


def _config(tmp_path: Path, name: str, **dicom: Any) -> str:
    cfg = json.loads(json.dumps(SCORE_CFG))
    if dicom:
        cfg["input"] = {"dicom": dicom}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _score(args: list[str], out: Path, model: Path) -> int:
    return main(["score", *args, "--model", str(model), "--output", str(out), "--quiet"])


def _mosaic(out: Path, sample_id: str) -> np.ndarray:
    return mz.read_level(out / sample_id / "probabilities.ome.zarr", 0)


def _input_record(out: Path, sample_id: str) -> dict[str, Any]:
    run = json.loads((out / sample_id / "run.json").read_text())
    return run["input"]


# -- configuration ---------------------------------------------------------------------------------
def test_config_section_is_strict() -> None:
    cfg = JobConfig.from_dict({"input": {"dicom": {"optical_path": "1", "focal_plane": 2}}})
    assert cfg.input.dicom == DicomInputConfig("1", 2.0) and not cfg.input.dicom.is_default()
    assert JobConfig.from_dict({"input": {"dicom": None}}).input.dicom.is_default()
    bad = [({"plane": 1}, r"input\.dicom\.plane: unknown key"),
           ({"optical_path": 1}, r"input\.dicom\.optical_path: expected a string"),
           ({"optical_path": "  "}, r"input\.dicom\.optical_path: expected an optical path identifier"),
           ({"focal_plane": float("nan")}, r"input\.dicom\.focal_plane: expected a finite number"),
           ({"focal_plane": "near"}, r"input\.dicom\.focal_plane: expected a number"),
           ("first", r"input\.dicom: expected a mapping")]
    for value, match in bad:
        with pytest.raises(ConfigError, match=match):
            JobConfig.from_dict({"input": {"dicom": value}})


def test_run_key_holds_the_plane_only_when_set(random_model_dir: Path) -> None:
    card = ModelCard.from_dict(json.loads((random_model_dir / "card.json").read_text()))
    fp = {"uri": "/x/series", "size_bytes": 1}
    default = JobConfig()
    section = default.to_dict()["input"]
    drop_default_reader(section)
    # the default leaves the input section exactly as before input.dicom (and input.backend) existed
    assert set(section) == {"mpp", "mpp_tolerance", "conversion", "cache_dir", "cache_max_bytes"}
    assert "dicom" not in reader_options(default)
    keys = {run_key_for(fp, "m", card, c) for c in (default, default.replace(input={"dicom": {"optical_path": None}}))}
    assert len(keys) == 1
    key = keys.pop()
    path1 = default.replace(input={"dicom": {"optical_path": "1"}})
    z2 = default.replace(input={"dicom": {"focal_plane": 2.0}})
    assert len({key, run_key_for(fp, "m", card, path1), run_key_for(fp, "m", card, z2)}) == 3
    opts = reader_options(path1)["dicom"]
    assert (opts.optical_path, opts.focal_plane) == ("1", None)


# -- end to end through `slidescore score` on a folder ---------------------------------------------
@pytest.mark.slow
def test_score_reads_the_plane_asked_for(planes: dict[str, Path], tmp_path: Path, random_model_dir: Path) -> None:
    out = tmp_path / "out"
    default = _config(tmp_path, "default")
    assert _score([str(planes["a"]), str(planes["b"]), str(planes["paths"]), "--config", default], out / "d",
                  random_model_dir) == 0
    want_a, want_b = _mosaic(out / "d", "a"), _mosaic(out / "d", "b")
    assert np.isfinite(want_a).all() and not np.array_equal(want_a, want_b)
    np.testing.assert_array_equal(_mosaic(out / "d", "paths"), want_a)  # default: the first optical path
    assert "dicom" not in _input_record(out / "d", "paths")

    assert _score([str(planes["paths"]), "--config", _config(tmp_path, "p1", optical_path="1")], out / "p1",
                  random_model_dir) == 0
    np.testing.assert_array_equal(_mosaic(out / "p1", "paths"), want_b)
    assert _input_record(out / "p1", "paths")["dicom"] == {"optical_path": "1", "focal_plane": None}

    assert _score([str(planes["focus"]), "--config", _config(tmp_path, "z0")], out / "z0", random_model_dir) == 0
    np.testing.assert_array_equal(_mosaic(out / "z0", "focus"), want_a)  # default: the plane nearest 0 µm
    assert _score([str(planes["focus"]), "--config", _config(tmp_path, "z2", focal_plane=2)], out / "z2",
                  random_model_dir) == 0
    np.testing.assert_array_equal(_mosaic(out / "z2", "focus"), want_b)
    assert _input_record(out / "z2", "focus")["dicom"] == {"optical_path": None, "focal_plane": 2.0}
    # another plane is another run: not "already complete" from the default's outputs
    assert (out / "z0" / "focus" / "_SUCCESS").read_text() != (out / "z2" / "focus" / "_SUCCESS").read_text()


def test_unknown_plane_fails_its_sample_naming_the_ones_there(planes: dict[str, Path], tmp_path: Path,
                                                              random_model_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    code = _score([str(planes["a"]), str(planes["paths"]), "--config", _config(tmp_path, "p7", optical_path="7")], out,
                  random_model_dir)
    assert code == 1  # some samples failed; the TIFF (not DICOM: input.dicom does not apply) is scored
    assert (out / "a" / "_SUCCESS").exists() and not (out / "paths" / "_SUCCESS").exists()
    (row,) = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert row["sample_id"] == "paths" and row["error_type"] == "UnsupportedImageError"
    for text in (row["error"], capsys.readouterr().err):
        assert "no optical path '7'" in text and "['0', '1']" in text and "input.dicom.optical_path" in text
        assert "Traceback" not in text
    assert _score([str(planes["focus"]), "--config", _config(tmp_path, "z5", focal_plane=5.5)], tmp_path / "z",
                  random_model_dir) == 1
    (row,) = [json.loads(line) for line in (tmp_path / "z" / "failures.jsonl").read_text().splitlines()]
    assert "no focal plane at 5.5 µm" in row["error"] and "[0.0, 2.0] µm" in row["error"]
