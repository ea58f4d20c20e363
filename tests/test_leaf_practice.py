"""The coffee-leaf practice as a test (issue 20, item 4).

The practice scored 64-px tiles at stride 16 only inside a leaf mask another model produced, kept a
tile when at least half of it was inside, averaged the overlapping tiles' scores per full-resolution
pixel (sum / count) and thresholded the average into a segmentation. Here the same image and an
external mask (at half resolution, as a segmentation model would give it) go through slidescore —
the ROI rasterised onto the cells (:mod:`slidescore.core.roi`), ``mask.min_inside_frac: 0.5``,
uniform blending — once through :func:`slidescore.score_array` and once as a job with ``--roi``
(local runner, TIFF image, PNG mask), and both are compared with a brute-force reference written the
way the practice did it. Equality is exact: the model's score is a tile's mean intensity quantised to
a dyadic fraction, so every sum is exact in floating point whatever the summation order.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from slidescore.api import score_array
from slidescore.config import JobConfig, SampleSpec
from slidescore.core.mask import patch_fractions
from slidescore.core.roi import raster_cell_fractions
from slidescore.core.tiling import PatchGrid
from slidescore.io.mosaic import read_level
from slidescore.model.loading import classifier_from_module
from slidescore.run.local import score_samples
from tests.conftest import write_tiff

TILE, STRIDE, THRESHOLD = 64, 16, 0.5
H, W = 320, 384


class MeanIntensity(torch.nn.Module):
    """Score = the tile's mean red intensity, S / (64² · 256) with S the integer sum of its 0–255 values:
    a dyadic fraction (exact in float32), the same however the tile is batched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.round(x[:, 0].double().sum(dim=(1, 2)) * 255.0)  # x is pixel / 255: recover the integer sum
        return (s / (x.shape[-1] * x.shape[-2] * 256.0)).float()[:, None]


def leaf_scene() -> tuple[np.ndarray, np.ndarray]:
    """An RGB image (seeded noise, brighter on the 'leaf') and the leaf mask at half resolution."""
    rng = np.random.default_rng(20)
    yy, xx = np.mgrid[0:H // 2, 0:W // 2]
    # an ellipse with a notch, at least 64 px (32 mask px) from every edge: no patch reaching past the
    # image is half inside, so the practice's tiles (origins from 0, fully inside) are all there are
    leaf = (((yy - 80) / 44.0) ** 2 + ((xx - 96) / 54.0) ** 2 <= 1.0) & ~((yy > 70) & (yy < 90) & (xx > 120))
    full = np.kron(leaf, np.ones((2, 2), bool))
    img = rng.integers(0, 120, (H, W, 3), dtype=np.uint8)
    img[full] += rng.integers(60, 136, (int(full.sum()), 3), dtype=np.uint8)
    return img, leaf


def practice_reference(img: np.ndarray, mask_half: np.ndarray, model: torch.nn.Module) -> np.ndarray:
    """The practice, brute force: every tile position, kept when ≥ half inside the full-resolution mask,
    its score added to every pixel it covers; the average is sum / count (NaN where no tile counted)."""
    mask = np.kron(mask_half, np.ones((2, 2), np.uint8)).astype(np.float64)  # the mask at the image's resolution
    total = np.zeros(img.shape[:2], np.float64)
    count = np.zeros(img.shape[:2], np.float64)
    with torch.no_grad():
        for y in range(0, img.shape[0] - TILE + 1, STRIDE):
            for x in range(0, img.shape[1] - TILE + 1, STRIDE):
                if mask[y : y + TILE, x : x + TILE].mean() < 0.5:
                    continue
                tile = torch.from_numpy(img[y : y + TILE, x : x + TILE].transpose(2, 0, 1)[None].astype(np.float32) / 255)
                total[y : y + TILE, x : x + TILE] += float(model(tile)[0, 0])
                count[y : y + TILE, x : x + TILE] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


def at_cells(full: np.ndarray) -> np.ndarray:
    """The full-resolution average on the stride cells (invariant 3), checking it is constant in each cell."""
    cells = full.reshape(H // STRIDE, STRIDE, W // STRIDE, STRIDE).transpose(0, 2, 1, 3).reshape(H // STRIDE, W // STRIDE, -1)
    first = cells[..., :1]
    assert np.array_equal(np.isnan(cells), np.broadcast_to(np.isnan(first), cells.shape))
    assert np.array_equal(np.nan_to_num(cells, nan=-1), np.nan_to_num(np.broadcast_to(first, cells.shape), nan=-1))
    return first[..., 0]


@pytest.fixture(scope="module")
def scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img, leaf = leaf_scene()
    ref = at_cells(practice_reference(img, leaf.astype(np.uint8), MeanIntensity()))
    return img, leaf, ref


def test_reference_is_not_trivial(scene: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    _, leaf, ref = scene
    scored = np.isfinite(ref)
    assert 100 < scored.sum() < ref.size - 100  # some cells scored, many not
    assert 0 < (ref[scored] >= THRESHOLD).mean() < 1  # the threshold splits the scored cells


def test_score_array_with_the_roi_equals_the_practice(scene: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    img, leaf, ref = scene
    grid = PatchGrid(H, W, TILE, STRIDE)
    inside = raster_cell_fractions(leaf, (2.0, 2.0), grid.cells_shape, float(STRIDE))  # the half-resolution mask, exact area
    valid = patch_fractions(inside, grid.k, grid.patches_shape) >= 0.5
    out = score_array(img, MeanIntensity(), patch_px=TILE, stride_px=STRIDE, weights="uniform", valid=valid, device="cpu")
    np.testing.assert_array_equal(out[0], ref.astype(np.float32))  # the map is float32: sum / count rounded once
    np.testing.assert_array_equal(out[0] >= THRESHOLD, ref >= THRESHOLD)  # the segmentation (NaN: outside both)


def test_job_with_roi_mask_equals_the_practice(scene: tuple[np.ndarray, np.ndarray, np.ndarray], tmp_path: Path) -> None:
    from PIL import Image

    img, leaf, ref = scene
    image = write_tiff(tmp_path / "leaf.tif", img, mpp=1.0)  # the wrapped module's card is at 1 µm/px
    Image.fromarray(leaf.astype(np.uint8) * 255).save(tmp_path / "leaf_mask.png")
    cfg = JobConfig.from_dict({
        "tiling": {"stride_px": STRIDE}, "blending": {"weights": "uniform"},
        "mask": {"method": "none", "min_inside_frac": 0.5, "roi_mode": "replace"},
        "regions": {"thresholds": [THRESHOLD]}, "report": {"enabled": False}, "model": {"device": "cpu"},
    })
    model = classifier_from_module(MeanIntensity(), patch_px=TILE, n_channels=3, n_classes=1, device="cpu", name="mean-intensity")
    spec = SampleSpec("leaf", (str(image),), roi=str(tmp_path / "leaf_mask.png"))
    [result] = score_samples([spec], cfg, str(tmp_path / "out"), model=model)
    assert result.status == "ok", result.error
    mosaic = tmp_path / "out" / "leaf" / "probabilities.ome.zarr"
    prob = read_level(str(mosaic), 0)
    np.testing.assert_array_equal(prob[0], ref.astype(np.float32))
    labels = np.asarray(zarr.open_group(str(mosaic), mode="r")["labels/suspect/0"][...])
    np.testing.assert_array_equal(labels > 0, ref >= THRESHOLD)  # the segmentation; NaN (not scored) is below
    run = json.loads((tmp_path / "out" / "leaf" / "run.json").read_text())
    roi = run["input"]["roi"]
    assert roi["kind"] == "mask" and roi["uri"].endswith("leaf_mask.png") and roi["rasterised"] == "exact area overlap"
    assert roi["inside_area_um2"] == pytest.approx(leaf.sum() * 4.0)  # mask px = 2×2 level-0 px of 1 µm
    grid = PatchGrid(H, W, TILE, STRIDE)
    assert run["patches"]["scored"] == int(np.count_nonzero(patch_fractions(
        raster_cell_fractions(leaf, (2.0, 2.0), grid.cells_shape, float(STRIDE)), grid.k, grid.patches_shape) >= 0.5))
