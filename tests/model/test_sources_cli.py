"""Each model source scores a synthetic smear end to end from the CLI as its PyTorch twin does.

``slidescore score --model SOURCE`` on a generated 1024² smear (0.25 µm/px, pyramid): the level-0
probabilities equal the twin's within 1e-5 and the regions are identical (ranks, cells, boxes,
areas; probabilities within 1e-5). Twins: the built-in SmearNet package for its safetensors, ONNX and
``torch.export`` copies; for a WSInfer-zoo folder (TorchScript, patches of 96 px at 0.25 µm/px
resized to 64), the same weights as a state-dict package whose card is the one the WSInfer config
becomes (64 px at 0.375 µm/px): both read the smear through the same resampled level, once per
block, not once per patch. The Ray runner gives the same mosaic for an ONNX file and a ``.pt2`` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray
import torch
import zarr

from slidescore.cli import main
from slidescore.config import JobConfig
from slidescore.model.loading import resolve_model
from slidescore.offline.demo import generate_smear
from slidescore.run.ray import score_samples_ray
from tests.model import sources_fixtures as fx

pytestmark = pytest.mark.slow
TOL = 1e-5


@pytest.fixture(scope="module")
def smear(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("smear") / "smear.tif"
    generate_smear(path, 1024, seed=11, progress=False)
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Per-patch scoring everywhere (ONNX and fixed-size programs are per patch); explanations off (they are
    per-patch integrated gradients for such models: minutes on CPU)."""
    path = tmp_path_factory.mktemp("cfg") / "job.yaml"
    path.write_text("model:\n  mode: per_patch\nreport:\n  gradcam: false\n")
    return path


def _score(smear: Path, model: str, out: Path, config: Path | None, capsys: pytest.CaptureFixture[str]) -> Path:
    argv = ["score", str(smear), "--model", model, "-o", str(out), "-q"] + (["-c", str(config)] if config else [])
    rc = main(argv)
    text = capsys.readouterr()
    assert rc == 0, text
    return out / smear.stem


def _outputs(sample: Path) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    prob = np.asarray(zarr.open_group(str(sample / "probabilities.ome.zarr"), mode="r")["0"][:])
    regions = json.loads((sample / "regions.json").read_text())["regions"]
    run = json.loads((sample / "run.json").read_text())
    return prob, regions, run


def _assert_same(got: Path, want: Path) -> None:
    p, r, _ = _outputs(got)
    q, s, _ = _outputs(want)
    assert np.array_equal(np.isnan(p), np.isnan(q)) and np.isfinite(q).sum() > 500
    assert np.nanmax(np.abs(p - q)) <= TOL
    assert len(r) == len(s) >= 3
    for a, b in zip(r, s, strict=True):
        for key in ("rank", "class_index", "n_cells", "area_um2", "bbox_px", "peak_px"):
            assert a[key] == b[key], key
        assert abs(a["peak_probability"] - b["peak_probability"]) <= TOL


@pytest.fixture(scope="module")
def twin(smear: Path, config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The built-in SmearNet's outputs for the smear (scored per patch)."""
    out = tmp_path_factory.mktemp("twin")
    assert main(["score", str(smear), "--model", "builtin:smearnet", "-o", str(out), "-q", "-c", str(config)]) == 0
    return out / smear.stem


@pytest.fixture(scope="module")
def smearnet_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SmearNet as an ONNX file (torch's dynamo exporter) with its card beside it, a .pt2 package, a safetensors package."""
    d = tmp_path_factory.mktemp("smearnet-sources")
    net, card = fx.smearnet(), fx.smearnet_card()
    onnx_file = fx.export_onnx(net, d / "smearnet.onnx", dynamo=True)
    fx.write_card(card, d / "smearnet.card.json")
    pt2 = d / "pt2-package"
    pt2.mkdir()
    fx.export_program(net, pt2 / "model.pt2")
    fx.write_card(card, pt2 / "card.json")
    return {"onnx": onnx_file, "pt2": pt2, "safetensors": fx.safetensors_package(net, d / "st-package", card)}


def test_onnx_pt2_and_safetensors_score_the_smear_as_the_builtin_model(smear: Path, config: Path, twin: Path, tmp_path: Path,
                                                                        smearnet_files: dict[str, Path],
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    for name, model in smearnet_files.items():
        sample = _score(smear, str(model), tmp_path / name, config, capsys)
        _assert_same(sample, twin)
        assert _outputs(sample)[2]["model"]["sha256"] == resolve_model(str(model)).checksum  # the file scored


def test_onnx_report_says_why_there_is_no_explanation(smear: Path, tmp_path: Path, smearnet_files: dict[str, Path],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """With explanations on (the default), an ONNX model's report is written without them, saying why."""
    sample = _score(smear, str(smearnet_files["onnx"]), tmp_path / "out", None, capsys)
    assert (sample / "_SUCCESS").exists()
    assert "gives no gradients" in (sample / "report.html").read_text()


def test_a_wsinfer_folder_scores_at_the_resolution_its_resize_implies(smear: Path, config: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    net = fx.smearnet()
    builtin = fx.smearnet_card()
    folder = fx.wsinfer_folder(net, tmp_path / "wsinfer-smear", fx.wsinfer_config(
        96, 0.25, 64, ["parasitized"], list(builtin.mean), list(builtin.std)))
    card = resolve_model(str(folder)).card
    assert (card.patch_px, card.mpp, card.head, card.dense) == (64, 0.25 * 96 / 64, "binary_sigmoid", False)
    twin = tmp_path / "twin-package"  # the same weights and card, as a state dict of the built-in architecture
    twin.mkdir()
    torch.save(net.state_dict(), twin / "weights.pt")
    (twin / "card.json").write_text(json.dumps({**card.to_dict(), "architecture": "smearnet"}))
    got = _score(smear, str(folder), tmp_path / "wsinfer", config, capsys)
    want = _score(smear, str(twin), tmp_path / "twin", config, capsys)
    _assert_same(got, want)
    image = _outputs(got)[2]["input"]
    # 0.375 µm/px is no level of the smear: it is read from level 0 resampled once per read box, not per patch
    assert abs(image["level_mpp"] - 0.375) < 1e-9 and image["resampled_from_level"] == 0, image
    assert image["conversion"]["resample_method"] == "area average"


@pytest.fixture(scope="module")
def ray_cluster():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # a cluster inside the test process, no token left behind
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield
        finally:
            ray.shutdown()


@pytest.mark.ray
def test_on_ray_onnx_with_a_config_card_and_a_pt2_package_equal_the_builtin_model(ray_cluster, smear: Path, twin: Path,
                                                                                  smearnet_files: dict[str, Path],
                                                                                  tmp_path: Path) -> None:
    """The model's bytes reach the actors through the object store (an onnxruntime session is rebuilt
    from them); the ONNX file's card comes from the config (``model.card``), so driver and actors use it."""
    lone = fx.copy_with(smearnet_files["onnx"], tmp_path / "models" / "net.onnx")  # no card beside it
    card = fx.write_card(fx.smearnet_card(), tmp_path / "cards.json")
    ref = _outputs(twin)[0]
    for name, model, card_file in (("onnx", lone, card), ("pt2", smearnet_files["pt2"], None)):
        out = tmp_path / name
        cfg = JobConfig.from_dict({"model": {"name": str(model), "card": card_file and str(card_file), "mode": "per_patch"},
                                   "output": {"uri": str(out)}, "report": {"gradcam": False}, "tiling": {"chunk_cells": 16},
                                   "cluster": {"num_cpus_per_actor": 0.5}})
        (res,) = score_samples_ray([str(smear)], cfg, str(out), n_actors=2, progress=False)
        assert res.status == "ok", (name, res)
        got = _outputs(Path(res.out_dir))[0]
        assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.nanmax(np.abs(got - ref)) <= TOL, name
