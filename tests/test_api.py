"""``slidescore.score_array``: the job's result for an in-memory image, with any torch module."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import slidescore
from slidescore.config import JobConfig
from slidescore.core.tiling import PatchGrid
from slidescore.errors import ConfigError
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.model.architectures import SmearNet
from slidescore.run.local import score_samples
from slidescore.stages.plan import plan_sample
from tests.conftest import textured_image, write_tiff
from tests.test_blend import full_res_reference


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img = textured_image(300, 236, seed=11, fg_box=(40, 30, 170, 150))
    return write_tiff(tmp_path_factory.mktemp("api") / "slide.tif", img, mpp=0.5), img


@pytest.mark.parametrize("mask", ["none", "brightfield"])
def test_equals_the_jobs_mosaic_level_0(tmp_path: Path, slide, random_model_dir: Path, mask: str) -> None:
    tif, img = slide
    model = load_model(str(random_model_dir), device="cpu")
    cfg = JobConfig.from_dict({"output": {"uri": str(tmp_path)}, "mask": {"method": mask, "min_foreground_frac": 0.05},
                               "tiling": {"chunk_cells": 8}, "blending": {"weights": "gaussian"}})
    (res,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    job = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    plan = plan_sample(str(tif), cfg, model.card, model.checksum, str(tmp_path / "dry"), dry_run=True)
    assert plan is not None
    # other blocks than the job's (13 cells), same patches, same blend
    mine = slidescore.score_array(img, model, stride_px=16, weights="gaussian", valid=plan.valid, chunk_cells=13)
    assert mine.shape == job.shape == (1, 19, 15) and mine.dtype == np.float32
    assert np.array_equal(np.isnan(mine), np.isnan(job))
    assert (mask == "none") == (not np.isnan(job).any())
    np.testing.assert_allclose(mine, job, atol=1e-6, equal_nan=True)


def test_calibrated_prior_shifted_card_equals_the_jobs_mosaic(tmp_path: Path, slide, calibrated_model_dir: Path) -> None:
    """score_array applies the card's calibration and the config's prior shift before blending, as the job does."""
    from slidescore.config import DecisionConfig

    tif, img = slide
    model = load_model(str(calibrated_model_dir), device="cpu")
    decision = {"target_prevalence": [0.1]}
    cfg = JobConfig.from_dict({"output": {"uri": str(tmp_path)}, "mask": {"method": "none"}, "tiling": {"chunk_cells": 8},
                               "decision": decision, "report": {"enabled": False}})
    (res,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    assert res.status == "ok", res.error
    job = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    mine = slidescore.score_array(img, model, stride_px=16, chunk_cells=13, decision=DecisionConfig(target_prevalence=(0.1,)))
    np.testing.assert_allclose(mine, job, atol=1e-6)
    # the prior shift changes the map, and so does the card's calibration (what score_array once skipped)
    raw = slidescore.score_array(img, model, stride_px=16, chunk_cells=13, decision=DecisionConfig())
    assert np.abs(raw - job).max() > 1e-3
    temperature_only = slidescore.score_array(img, model, stride_px=16, chunk_cells=13)
    assert np.abs(temperature_only - raw).max() < 1e-7  # default decision = the card's calibration, no shift
    uncalibrated = load_model(str(calibrated_model_dir), device="cpu")
    uncalibrated.card = dataclasses.replace(uncalibrated.card, calibration={})  # the same network without the card's temperature
    plain = slidescore.score_array(img, uncalibrated, stride_px=16, chunk_cells=13)
    assert np.abs(plain - temperature_only).max() > 1e-3


class MeanRed(nn.Module):
    """(N, 3, P, P) in [0, 1] → (N, 2) probabilities: mean red and its complement."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x[:, 0].mean(dim=(1, 2))
        return torch.stack([r, 1 - r], dim=1)


def test_plain_module_equals_bruteforce_full_resolution_mean() -> None:
    img = textured_image(150, 170, seed=12)
    out = slidescore.score_array(img, MeanRed(), patch_px=32, stride_px=8, pad_value=255, device="cpu")
    grid = PatchGrid(150, 170, 32, 8)
    py, px = grid.patches_shape
    padded = np.full((150 + 64, 170 + 64, 3), 255, np.uint8)  # 32 px of pad on every side
    padded[32:182, 32:202] = img
    # the centred grid: patch a starts at (a − 3) · 8 (k = 4)
    red = np.array([[padded[32 + (a - 3) * 8 : 32 + (a - 3) * 8 + 32, 32 + (b - 3) * 8 : 32 + (b - 3) * 8 + 32, 0].mean() / 255
                     for b in range(px)] for a in range(py)])
    ref = full_res_reference(np.stack([red, 1 - red]), np.ones((py, px), bool), grid)
    up = np.repeat(np.repeat(out, 8, axis=1), 8, axis=2)[:, :150, :170]
    np.testing.assert_allclose(up, ref, atol=1e-5)
    # float images are taken in [0, 1]
    as_float = slidescore.score_array(img.astype(np.float64) / 255, MeanRed(), patch_px=32, stride_px=8, pad_value=1.0, device="cpu")
    np.testing.assert_allclose(as_float, out, atol=1e-6)


def test_dense_plain_module_equals_per_patch() -> None:
    torch.manual_seed(1)
    net = SmearNet(width=8)
    img = textured_image(200, 180, seed=13)
    kw = dict(patch_px=64, stride_px=16, outputs="logits", device="cpu", chunk_cells=6)
    dense = slidescore.score_array(img, net, dense=True, **kw)  # network stride from SmearNet.stride_px
    per_patch = slidescore.score_array(img, net, **kw)
    assert np.isfinite(dense).all() and dense.std() > 0
    np.testing.assert_allclose(dense, per_patch, atol=1e-5)


def test_bad_arguments_are_config_errors(random_model_dir: Path) -> None:
    img = textured_image(100, 100)
    model = load_model(str(random_model_dir), device="cpu")
    with pytest.raises(ConfigError, match="valid: expected the"):
        slidescore.score_array(img, model, stride_px=16, valid=np.ones((2, 2), bool))
    with pytest.raises(ConfigError, match="patch_px: required"):
        slidescore.score_array(img, MeanRed(), stride_px=16)
    with pytest.raises(ConfigError, match="stride_px=24 must be a positive divisor"):
        slidescore.score_array(img, model, stride_px=24)
    with pytest.raises(ConfigError, match="uint8"):
        slidescore.score_array(img.astype(np.int32), model, stride_px=16)


def test_import_slidescore_does_not_import_torch() -> None:
    code = "import sys, slidescore; assert 'torch' not in sys.modules; print(callable(slidescore.score_array))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
