"""Model cards are checked when read: a bad value in a card file fails the load with a
ModelLoadError naming the file, the key, what was expected and what was found."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest

from slidescore.errors import ConfigError, InputError, ModelLoadError
from slidescore.model import load_model
from slidescore.model.card import ModelCard
from slidescore.model.loading import builtin_dir, builtin_names
from tests.conftest import make_model_package

DELETE = object()


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("cards") / "good", seed=1)


def _write(package: Path, folder: Path, **changes: Any) -> Path:
    """A copy of ``package`` whose card.json has ``changes`` applied (DELETE removes a key)."""
    folder.mkdir()
    shutil.copy(package / "weights.pt", folder / "weights.pt")
    card = json.loads((package / "card.json").read_text())
    for key, value in changes.items():
        if value is DELETE:
            del card[key]
        else:
            card[key] = value
    (folder / "card.json").write_text(json.dumps(card))  # NaN / Infinity become JSON's NaN / Infinity literals
    return folder


def _load_error(folder: Path) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), device="cpu")
    return info.value


BAD_VALUES = [
    # (key, value, text expected in the message after "<key>: ")
    ("network_stride_px", 0, "network_stride_px: expected an int >= 1 (the network's total stride), got 0"),
    ("std", [0, 0, 0], "std[0]: expected a finite number > 0 (pixels are divided by it), got 0"),
    ("std", [0.25, 0, 0.25], "std[1]: expected a finite number > 0"),
    ("std", [0.25, float("inf"), 0.25], "std[1]: expected a finite number > 0 (pixels are divided by it), got inf"),
    ("std", [0.25, 0.25], "std: expected 3 values (one per channel of color_space RGB), got 2"),
    ("mean", [0.5, 0.5, float("nan")], "mean[2]: expected a finite number (pixels scaled to 0–1), got nan"),
    ("mean", [0.5, 0.5, 0.5, 0.5], "mean: expected 3 values (one per channel of color_space RGB), got 4"),
    ("mean", "0.5", "mean: expected a list of 3 values"),
    ("classes", "parasitized", "classes: expected a list of class names such as [\"parasitized\"], got 'parasitized'"),
    ("classes", [], "classes: expected at least one class name"),
    ("classes", ["a", 3], "classes[1]: expected a non-empty string, got 3"),
    ("classes", ["a", "a"], "classes: expected unique class names, got ['a'] more than once"),
    ("patch_px", 0, "patch_px: expected an int >= 1 (the edge of the square input patch, in pixels), got 0"),
    ("patch_px", -64, "patch_px: expected an int >= 1"),
    ("patch_px", 64.5, "patch_px: expected an int >= 1"),
    ("patch_px", True, "patch_px: expected an int >= 1"),
    ("mpp", 0, "mpp: expected a finite number > 0 (the µm per pixel the model was trained at), got 0"),
    ("mpp", float("nan"), "mpp: expected a finite number > 0"),
    ("mpp", "0.5", "mpp: expected a finite number > 0"),
    ("thresholds", [1.5], "thresholds[0]: expected a finite number in [0, 1], got 1.5"),
    ("thresholds", [-0.1], "thresholds[0]: expected a finite number in [0, 1], got -0.1"),
    ("thresholds", ["0.5"], "thresholds[0]: expected a finite number in [0, 1], got '0.5'"),
    ("thresholds", [0.5, 0.5], "thresholds: expected 1 decision thresholds (one per class), got 2"),
    ("head", "relu", "head: expected one of ['binary_sigmoid', 'softmax', 'multilabel_sigmoid'], got 'relu'"),
    ("head", "softmax", "head: softmax needs at least 2 classes"),
    ("color_space", "CMYK", "color_space: expected one of ['RGB', 'HSV', 'GRAY'], got 'CMYK'"),
    ("color_space", "GRAY", "mean: expected 1 values (one per channel of color_space GRAY), got 3"),
    ("dense", "yes", "dense: expected true or false, got 'yes'"),
    ("pad_value", 300, "pad_value: expected an int in [0, 255]"),
    ("colors", [[255, 0]], "colors[0]: expected [r, g, b] with ints in [0, 255], got [255, 0]"),
    ("colors", [[1, 2, 3], [4, 5, 6]], "colors: expected an empty list or 1 [r, g, b] colours (one per class)"),
    ("name", "", "name: expected a non-empty string naming the model"),
    ("version", 2, "version: expected a string, got 2"),
    ("arch_kwargs", "n_outputs=1", "arch_kwargs: expected a mapping of argument names to values"),
    ("training", [], "training: expected a mapping, got []"),
    ("input_conversion", [], "input_conversion: expected a mapping, got []"),
    ("calibration", "temperature", "calibration: expected a mapping such as"),
    ("calibration", {"method": "platt"}, "calibration.method: expected one of ['none', 'temperature', 'isotonic'], got 'platt'"),
    ("calibration", {"method": "temperature", "temperature": 0}, "calibration.temperature: expected a finite number > 0, got 0"),
    ("calibration", {"method": "isotonic", "isotonic": {"x": [[0, 1]], "y": [[0, 2]]}},
     "calibration.isotonic.y[0][1]: expected a finite number in [0, 1], got 2"),
    ("calibration", {"method": "isotonic", "isotonic": {"x": [[1, 0]], "y": [[0, 1]]}},
     "calibration.isotonic.x[0]: expected non-decreasing knots"),
    ("calibration", {"method": "isotonic"}, "calibration.isotonic: expected a mapping"),
    ("operating_points", [], "operating_points: expected a mapping of named operating points, got []"),
    ("operating_points", {"p90": 0.5}, "operating_points.p90: must be a mapping"),
    ("operating_points", {"p90": {"thresholds": [2]}}, "operating_points.p90.thresholds[0]: expected a finite number in [0, 1], got 2"),
    ("operating_points", {"p90": {}}, "operating_points.p90.thresholds: expected a list of 1 thresholds (one per class), got None"),
    ("operating_points", {"p90": {"thresholds": [0.5], "unit": "cells"}}, "operating_points.p90: unit must be one of"),
    ("operating_points", {"p90": {"thresholds": [0.5], "target": 90}}, "operating_points.p90.target: expected a finite number in [0, 1]"),
    ("training_prevalence", [0.0], "training_prevalence[0]: expected a finite number in (0, 1), got 0.0"),
    ("training_prevalence", [0.2, 0.3], "training_prevalence: expected 1 positive fractions (one per class)"),
]


@pytest.mark.parametrize(("key", "value", "expected"), BAD_VALUES, ids=[f"{k}={v!r}" for k, v, _ in BAD_VALUES])
def test_a_bad_card_value_fails_the_load_naming_file_key_and_value(package: Path, tmp_path: Path, key: str, value: Any,
                                                                   expected: str) -> None:
    folder = _write(package, tmp_path / "bad", **{key: value})
    err = _load_error(folder)
    card_path = str(folder / "card.json")
    assert str(err).startswith(f"model card {card_path}: "), str(err)
    assert expected in str(err), str(err)
    assert "fix this value in the card file" in str(err)
    assert isinstance(err, InputError) and err.context["path"] == card_path
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ModelLoadError and str(again) == str(err) and again.context == err.context


@pytest.mark.parametrize(("changes", "expected"), [
    ({"bogus": 1}, "bogus: unknown key (all unknown: ['bogus']); known keys are"),
    ({"classes": DELETE}, "classes: required key missing (missing: ['classes']"),
    ({"patch_px": DELETE, "mpp": DELETE}, "patch_px: required key missing (missing: ['patch_px', 'mpp']"),
])
def test_unknown_and_missing_keys_fail_the_load(package: Path, tmp_path: Path, changes: dict[str, Any], expected: str) -> None:
    err = _load_error(_write(package, tmp_path / "bad", **changes))
    assert expected in str(err) and str(tmp_path / "bad" / "card.json") in str(err), str(err)


@pytest.mark.parametrize(("text", "expected"), [
    ("[1, 2]", "(document): expected a JSON object with the keys ['name', 'patch_px', 'mpp', 'classes']"),
    ('{"name": ', "cannot be read as JSON"),
    (b"\xff\xfe{", "cannot be read as JSON"),
])
def test_a_card_that_is_no_json_object_fails_the_load(package: Path, tmp_path: Path, text: str | bytes, expected: str) -> None:
    folder = _write(package, tmp_path / "bad")
    if isinstance(text, bytes):
        (folder / "card.json").write_bytes(text)
    else:
        (folder / "card.json").write_text(text)
    err = _load_error(folder)
    assert expected in str(err) and str(folder / "card.json") in str(err), str(err)


def test_a_lone_weights_file_reads_its_card_beside_it_the_same_way(package: Path, tmp_path: Path) -> None:
    folder = _write(package, tmp_path / "bad", std=[0.25, 0.0, 0.25])
    (folder / "card.json").rename(folder / "weights.pt.card.json")
    err = _load_error(folder / "weights.pt")
    assert str(folder / "weights.pt.card.json") in str(err) and "std[1]: expected a finite number > 0" in str(err)


@pytest.mark.parametrize(("changes", "expected"), [
    ({"architecture": "nope"}, "card key architecture: unknown architecture 'nope'"),
    ({"arch_kwargs": {"n_outputs": 1, "width": 8, "depth": 3}}, "card key arch_kwargs: architecture 'smearnet' does not accept"),
    ({"arch_kwargs": {"n_outputs": 1, "width": -8}}, "card key arch_kwargs"),
    ({"arch_kwargs": {"n_outputs": 2, "width": 8}},
     "has 2 outputs, but the card lists 1 classes ['parasitized']; make arch_kwargs.n_outputs equal the number of classes"),
])
def test_an_architecture_the_card_cannot_build_fails_the_load(package: Path, tmp_path: Path, changes: dict[str, Any],
                                                              expected: str) -> None:
    err = _load_error(_write(package, tmp_path / "bad", **changes))
    assert expected in str(err), str(err)


def test_cards_built_in_code_raise_config_errors_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"model card 'm': std\[1\]: expected a finite number > 0 .*got 0"):
        ModelCard(name="m", patch_px=64, mpp=0.5, classes=("x",), std=(0.25, 0, 0.25))
    with pytest.raises(ConfigError, match=r"model card 'm': classes: expected a list of class names"):
        ModelCard.from_dict({"name": "m", "patch_px": 64, "mpp": 0.5, "classes": "x"})  # no source: the caller's data
    with pytest.raises(ConfigError, match=r"model card 'm': network_stride_px: expected an int >= 1"):
        ModelCard(name="m", patch_px=64, mpp=0.5, classes=("x",), network_stride_px=0)


def test_every_shipped_card_and_the_test_packages_are_valid(package: Path) -> None:
    assert builtin_names()
    for name in builtin_names():
        path = builtin_dir(name) / "card.json"
        card = ModelCard.from_dict(json.loads(path.read_text()), source=str(path))
        assert ModelCard.from_dict(card.to_dict(), source=str(path)) == card
    assert load_model(str(package), device="cpu").card.name == "good"
    softmax = make_model_package(package.parent / "softmax3", n_outputs=3, head="softmax")
    assert load_model(str(softmax), device="cpu").card.n_classes == 3
