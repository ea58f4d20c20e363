"""WSInfer-zoo ``config.json`` → model card: the spec-1.0 fields, the resize folded into the resolution,
and one clear error (file, key, expectation) for configs that do not follow the spec."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from slidescore.errors import ModelLoadError
from slidescore.model.loading import load_model, resolve_model
from slidescore.model.wsinfer import card_from_wsinfer
from tests.model import sources_fixtures as fx

# the configuration of WSInfer-zoo's breast-tumor-resnet34.tcga-brca (wsinfer's own test suite)
BREAST: dict[str, Any] = {
    "spec_version": "1.0", "architecture": "resnet34", "num_classes": 2, "class_names": ["Other", "Tumor"],
    "patch_size_pixels": 350, "spacing_um_px": 0.25,
    "transform": [{"name": "Resize", "arguments": {"size": 224}}, {"name": "ToTensor"},
                  {"name": "Normalize", "arguments": {"mean": [0.7238, 0.5716, 0.6779], "std": [0.112, 0.1459, 0.1089]}}],
}


def test_a_zoo_config_becomes_the_card_of_what_the_network_sees() -> None:
    card = card_from_wsinfer(BREAST, source="config.json", name="breast-tumor")
    # 350 px at 0.25 µm/px = 87.5 µm, seen by the network as 224 px
    assert card.patch_px == 224 and card.mpp == pytest.approx(87.5 / 224)
    assert card.classes == ("Other", "Tumor") and card.head == "softmax" and card.thresholds == (0.5, 0.5)
    assert card.mean == (0.7238, 0.5716, 0.6779) and card.std == (0.112, 0.1459, 0.1089)
    assert not card.dense and card.color_space == "RGB" and card.outputs == "logits"
    one = copy.deepcopy(BREAST) | {"num_classes": 1, "class_names": ["lymphocytes"], "transform": [{"name": "ToTensor"}]}
    card = card_from_wsinfer(one, source="config.json", name="lymph")
    assert (card.head, card.patch_px, card.mpp, card.mean, card.std) == ("binary_sigmoid", 350, 0.25, (0.0,) * 3, (1.0,) * 3)


def _changed(path: str, value: Any) -> dict[str, Any]:
    doc = copy.deepcopy(BREAST)
    *parents, last = path.split(".")
    node: Any = doc
    for p in parents:
        node = node[int(p)] if p.isdigit() else node[p]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return doc


@pytest.mark.parametrize(("path", "value", "expected"), [
    ("spec_version", "2.0", "spec_version: expected one of ['1.0']"),
    ("num_classes", KeyError, "num_classes: required key missing"),
    ("num_classes", 3, "class_names: expected 3 non-empty class names"),
    ("patch_size_pixels", 0, "patch_size_pixels: expected an int >= 1"),
    ("spacing_um_px", -0.5, "spacing_um_px: expected a finite number > 0"),
    ("transform.0.arguments", {"size": [224, 300]}, "transform[0].arguments.size: expected one edge in pixels"),
    ("transform.0.name", "RandomCrop", "transform[0]: expected {name: one of ['Resize', 'ToTensor', 'Normalize']"),
    ("transform.2.arguments", {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0, 0.2]}, "transform[2].arguments.std: expected 3 finite numbers > 0"),
    ("transform.1", {"name": "Resize", "arguments": {"size": 64}}, "transform: expected a ToTensor step"),
])
def test_a_config_off_the_spec_is_refused_naming_file_and_key(tmp_path: Path, path: str, value: Any, expected: str) -> None:
    folder = fx.wsinfer_folder(fx.resnet(), tmp_path / "zoo", _changed(path, value))
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), device="cpu")
    text = str(info.value)
    assert text.startswith(f"WSInfer config {folder / 'config.json'}: ") and expected in text, text


def test_a_zoo_folder_needs_its_torchscript_file(tmp_path: Path) -> None:
    folder = tmp_path / "zoo"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(BREAST))
    with pytest.raises(ModelLoadError, match="no torchscript_model.pt beside config.json"):
        resolve_model(str(folder))
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="WSInfer config .*config.json: cannot be read as JSON"):
        resolve_model(str(folder))


def test_a_damaged_torchscript_file_is_named(tmp_path: Path) -> None:
    folder = fx.wsinfer_folder(fx.resnet(), tmp_path / "zoo", BREAST)
    (folder / "torchscript_model.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ModelLoadError) as info:
        load_model(str(folder), device="cpu")
    assert str(folder / "torchscript_model.pt") in str(info.value) and "TorchScript archive cannot be loaded" in str(info.value)
