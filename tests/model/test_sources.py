"""Every model source scores as its PyTorch twin: the same network run in PyTorch, within 1e-5.

Sources, each written at test time by its own tool (tests/model/sources_fixtures.py): ONNX (dynamic
batch; fixed batch; NHWC input; a network ending in its own softmax), ``torch.export`` programs
(dynamic and fixed batch), safetensors packages, WSInfer-zoo folders (TorchScript). The
networks: the built-in SmearNet and a padded ResNet-style classifier. The twin is the network
wrapped in a :class:`PatchClassifier` with the same card and scored per patch.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slidescore.config import JobConfig
from slidescore.errors import ConfigError, ModelLoadError, ModelOutputError
from slidescore.model.loading import ModelFiles, load_files, load_model, resolve_model
from slidescore.model.scoring import PatchClassifier
from slidescore.model.sources import ExportedModule, OnnxModule
from slidescore.stages.plan import run_key_for
from tests.model import sources_fixtures as fx

STRIDE = 16
TOL = 1e-5


@pytest.fixture(scope="module")
def block() -> tuple[np.ndarray, np.ndarray]:
    """A 256-px block of textured pixels (13 × 13 patch positions) and a ragged valid mask."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    pixels[:96, :96] = 235  # some background too
    valid = rng.random((13, 13)) > 0.25
    return pixels, valid


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every source of both networks, with its card where the source wants one."""
    d = tmp_path_factory.mktemp("sources")
    smear, res = fx.smearnet(), fx.resnet()
    out: dict[str, Path] = {}
    # SmearNet: an ONNX file with <stem>.card.json, a package folder (model.onnx + card.json), .pt2, safetensors
    out["smearnet-onnx"] = fx.export_onnx(smear, d / "smearnet.onnx")  # the dynamo exporter: test_sources_cli.py
    fx.write_card(fx.smearnet_card(), d / "smearnet.card.json")
    pkg = d / "smearnet-onnx-pkg"
    fx.copy_with(out["smearnet-onnx"], pkg / "model.onnx")
    fx.write_card(fx.smearnet_card(), pkg / "card.json")
    out["smearnet-onnx-pkg"] = pkg
    out["smearnet-pt2"] = fx.export_program(smear, d / "smearnet.pt2")
    fx.write_card(fx.smearnet_card(), d / "smearnet.pt2.card.json")
    out["smearnet-safetensors"] = fx.safetensors_package(smear, d / "smearnet-st", fx.smearnet_card())
    # the padded ResNet: ONNX (dynamic batch; fixed batch 4; NHWC; own softmax), .pt2, a WSInfer folder
    out["resnet-onnx"] = fx.export_onnx(res, d / "resnet.onnx")
    fx.write_card(fx.resnet_card(), d / "resnet.onnx.card.json")
    out["resnet-onnx-batch4"] = fx.export_onnx(res, d / "resnet4.onnx", fixed_batch=4)
    fx.write_card(fx.resnet_card(), d / "resnet4.card.json")
    out["resnet-onnx-nhwc"] = fx.export_onnx(fx.NHWCInput(res), d / "resnet-nhwc.onnx", nhwc=True)
    fx.write_card(fx.resnet_card(input_layout="nhwc"), d / "resnet-nhwc.card.json")
    out["resnet-onnx-probs"] = fx.export_onnx(fx.Softmaxed(res), d / "resnet-probs.onnx")
    fx.write_card(fx.resnet_card(outputs="probabilities"), d / "resnet-probs.card.json")
    out["resnet-pt2"] = fx.export_program(res, d / "resnet.pt2")
    out["resnet-pt2-batch4"] = fx.export_program(res, d / "resnet4.pt2", fixed_batch=4)
    fx.write_card(fx.resnet_card(), d / "card.json")  # the card.json beside a lone file
    card = fx.resnet_card()
    out["resnet-wsinfer"] = fx.wsinfer_folder(res, d / "resnet-wsinfer", fx.wsinfer_config(
        64, 0.5, None, list(card.classes), list(card.mean), list(card.std)))
    return out


def _twin(name: str) -> PatchClassifier:
    """The PyTorch network behind a source, with its card (WSInfer's card: pad_value 255)."""
    if name.startswith("smearnet"):
        return load_model("builtin:smearnet", device="cpu")
    card = fx.resnet_card(pad_value=255, name="resnet-wsinfer") if name.endswith("wsinfer") else fx.resnet_card()
    return PatchClassifier(fx.resnet(), card, device="cpu")


SOURCES = ["smearnet-onnx", "smearnet-onnx-pkg", "smearnet-pt2", "smearnet-safetensors", "resnet-onnx",
           "resnet-onnx-batch4", "resnet-onnx-nhwc", "resnet-onnx-probs", "resnet-pt2", "resnet-pt2-batch4",
           "resnet-wsinfer"]
KINDS = {"onnx": OnnxModule, "pt2": ExportedModule}


@pytest.mark.parametrize("name", SOURCES)
def test_every_source_scores_as_its_pytorch_twin(name: str, files: dict[str, Path], block: tuple[np.ndarray, np.ndarray]) -> None:
    pixels, valid = block
    model = load_model(str(files[name]), device="cpu")
    twin = _twin(name)
    assert model.card.classes == twin.card.classes and model.card.patch_px == twin.card.patch_px
    want = twin.score_block(pixels, valid, STRIDE, mode="per_patch")
    got = model.score_block(pixels, valid, STRIDE, mode="auto", batch_size=5)  # 5: batches that are no multiple of 4
    assert np.array_equal(np.isnan(got), np.isnan(want)) and np.isnan(got).any()
    assert np.nanmax(np.abs(got - want)) <= TOL
    assert np.nanmax(want) - np.nanmin(want) > 1e-3  # the scores vary: equality means something
    kind = name.split("-")[1]
    if kind in KINDS:
        assert isinstance(model.module, KINDS[kind])
        assert not model.card.dense  # ONNX and a fixed-size program: per patch
    if name.endswith("probs"):
        assert model.outputs == "probabilities"


def test_a_classifier_rebuilds_from_bytes_in_another_process(files: dict[str, Path], block: tuple[np.ndarray, np.ndarray],
                                                              tmp_path: Path) -> None:
    """ModelFiles with the bytes read pickle; the ONNX / exported modules pickle too (sessions rebuilt)."""
    pixels, valid = block
    for name in ("resnet-onnx", "smearnet-pt2", "smearnet-safetensors", "resnet-wsinfer"):
        src = files[name]
        resolved = resolve_model(str(src)).with_data()
        want = load_model(str(src), device="cpu").score_block(pixels, valid, STRIDE)
        moved = tmp_path / name
        src.rename(moved)  # the rebuilt model must not need the file
        try:
            again = load_files(pickle.loads(pickle.dumps(resolved)), device="cpu")
        finally:
            moved.rename(src)
        assert isinstance(resolved, ModelFiles) and again.checksum == resolved.checksum
        np.testing.assert_array_equal(again.score_block(pixels, valid, STRIDE), want)
    for name in ("resnet-onnx", "smearnet-pt2"):
        module = load_model(str(files[name]), device="cpu").module
        x = torch.rand(3, 3, 64, 64)
        torch.testing.assert_close(pickle.loads(pickle.dumps(module))(x), module(x), rtol=0, atol=0)


def test_a_changed_model_file_is_a_new_run_key(files: dict[str, Path], tmp_path: Path) -> None:
    src = fx.copy_with(files["resnet-onnx"], tmp_path / "m.onnx")
    fx.write_card(fx.resnet_card(), tmp_path / "m.card.json")
    cfg = JobConfig()
    fp = {"uri": "/x.tif", "size": 1, "mtime": 0}
    before = resolve_model(str(src))
    fx.export_onnx(fx.resnet(seed=1), src)  # other weights, same card
    after = resolve_model(str(src))
    assert before.card == after.card and before.checksum != after.checksum
    assert run_key_for(fp, before.checksum, before.card, cfg) != run_key_for(fp, after.checksum, after.card, cfg)
    # the card counts too: another threshold, same file
    fx.write_card(fx.resnet_card(thresholds=[0.5, 0.7]), tmp_path / "m.card.json")
    changed = resolve_model(str(src))
    assert changed.checksum == after.checksum
    assert run_key_for(fp, after.checksum, after.card, cfg) != run_key_for(fp, changed.checksum, changed.card, cfg)


def test_the_card_can_come_from_the_config(files: dict[str, Path], tmp_path: Path) -> None:
    lone = fx.copy_with(files["resnet-onnx"], tmp_path / "lone" / "net.onnx")
    with pytest.raises(ModelLoadError, match="no model card found; put net.onnx.card.json, net.card.json or card.json"):
        load_model(str(lone), device="cpu")
    card = fx.write_card(fx.resnet_card(name="from-config"), tmp_path / "elsewhere.json")
    cfg = JobConfig.from_dict({"model": {"name": str(lone), "card": str(card)}})
    model = load_model(cfg.model.name, **{**cfg.model.runtime_options(), "device": "cpu"})
    assert model.card.name == "from-config" and isinstance(model.module, OnnxModule)
    with pytest.raises(ConfigError, match="model.card: .* is not a file"):
        load_model(str(lone), card=str(tmp_path / "missing.json"), device="cpu")


# -- hostile files -------------------------------------------------------------------------------
def _error(path: Path, kind: type[Exception] = ModelLoadError) -> str:
    with pytest.raises(kind) as info:
        load_model(str(path), device="cpu")
    return str(info.value)


def test_onnx_whose_input_contradicts_the_card_is_refused(files: dict[str, Path], tmp_path: Path) -> None:
    net = fx.export_onnx(fx.resnet(), tmp_path / "big.onnx", size=96)
    fx.write_card(fx.resnet_card(), tmp_path / "big.card.json")
    text = _error(net)
    assert str(net) in text and "(3, 96, 96)" in text and "(3, 64, 64)" in text and "patch_px" in text
    nhwc = fx.copy_with(files["resnet-onnx-nhwc"], tmp_path / "nhwc.onnx")
    fx.write_card(fx.resnet_card(), tmp_path / "nhwc.card.json")  # the card forgets input_layout: nhwc
    assert "set input_layout: nhwc in the card" in _error(nhwc)


def test_onnx_that_is_no_onnx_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07not a protobuf graph at all")
    fx.write_card(fx.resnet_card(), tmp_path / "bad.card.json")
    text = _error(bad)
    assert str(bad) in text and "onnxruntime cannot load it" in text


@pytest.mark.parametrize(("wrap", "n_classes", "expected"), [
    (fx.NaNAfter, 2, "returned NaN for 5 of 5 patches"),
    (None, 3, "returned outputs of shape (5, 3)"),
])
def test_bad_onnx_outputs_fail_the_sample_naming_the_model(tmp_path: Path, block: tuple[np.ndarray, np.ndarray],
                                                           wrap: Callable[[Any], Any] | None, n_classes: int, expected: str) -> None:
    net = fx.resnet(n_classes=n_classes)
    path = fx.export_onnx(wrap(net) if wrap else net, tmp_path / "broken.onnx")
    fx.write_card(fx.resnet_card(name="broken-net"), tmp_path / "broken.card.json")
    model = load_model(str(path), device="cpu")
    pixels, valid = block
    with pytest.raises(ModelOutputError) as info:
        model.score_block(pixels, valid, STRIDE, batch_size=5)
    assert "'broken-net'" in str(info.value) and expected in str(info.value), str(info.value)


def _rewrite_zip(src: Path, dest: Path, change: Callable[[str, bytes], bytes | None]) -> Path:
    with zipfile.ZipFile(src) as z, zipfile.ZipFile(dest, "w") as out:
        for n in z.namelist():
            data = change(n, z.read(n))
            if data is not None:
                out.writestr(n, data)
    fx.write_card(fx.smearnet_card(), dest.with_name(dest.name + ".card.json"))
    return dest


class Payload:
    """Unpickling this would run code (``__reduce__``); the safe loaders must refuse it."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (print, ("pickled code ran",))


def test_pt2_archives_that_would_unpickle_are_refused_before_loading(files: dict[str, Path], tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src = files["smearnet-pt2"]

    def pickled_weight(n: str, data: bytes) -> bytes:
        if not n.endswith("_weights_config.json"):
            return data
        doc = json.loads(data)
        first = next(iter(doc["config"]))
        doc["config"][first]["use_pickle"] = True
        return json.dumps(doc).encode()

    def payload_inputs(n: str, data: bytes) -> bytes:
        if "/data/sample_inputs/" not in n:
            return data
        buf = io.BytesIO()
        torch.save({"x": Payload()}, buf)
        return buf.getvalue()

    def legacy(n: str, data: bytes) -> bytes | None:
        return None if n.endswith("/archive_format") else data

    for change, expected in ((pickled_weight, "would unpickle tensor 'features.0.weight'"),
                             (payload_inputs, "would unpickle sample inputs that the safe loader refuses"),
                             (legacy, "would unpickle an archive of the pre-2.8 layout")):
        bad = _rewrite_zip(src, tmp_path / f"{change.__name__}.pt2", change)
        text = _error(bad)
        assert str(bad) in text and expected in text, text
    assert "pickled code ran" not in capsys.readouterr().out


def test_a_pickled_payload_in_a_weights_file_is_refused(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    torch.save({"features.0.weight": Payload()}, pkg / "weights.pt")
    fx.write_card(fx.smearnet_card(), pkg / "card.json")
    text = _error(pkg)
    assert str(pkg / "weights.pt") in text and "cannot be loaded" in text
    (pkg / "weights.pt").unlink()
    (pkg / "weights.safetensors").write_bytes(b"\xff" * 64)  # no valid header
    text = _error(pkg)
    assert str(pkg / "weights.safetensors") in text and "cannot be loaded" in text


def test_safetensors_weights_that_do_not_fit_the_architecture_are_refused(tmp_path: Path) -> None:
    net = fx.smearnet()
    pkg = fx.safetensors_package(net, tmp_path / "pkg", dataclasses.replace(fx.smearnet_card(), arch_kwargs={"width": 16}))
    assert "weights do not fit architecture 'smearnet'" in _error(pkg)


def test_a_folder_that_is_no_model_says_what_it_needs(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    text = _error(tmp_path / "empty")
    assert "neither a model package (card.json + one of" in text and "WSInfer-zoo folder (config.json + torchscript_model.pt)" in text


def test_safetensors_without_an_architecture_in_the_card_say_what_to_set(tmp_path: Path) -> None:
    pkg = fx.safetensors_package(fx.smearnet(), tmp_path / "pkg", dataclasses.replace(fx.smearnet_card(), architecture=None))
    text = _error(pkg)
    assert "a safetensors file holds weights only" in text and "set the card's architecture (one of [" in text
