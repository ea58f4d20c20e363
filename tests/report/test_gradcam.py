"""The report's explanation (integrated gradients) peaks on what drove the score.

Planted targets: a red square for a hand-built network whose only feature is redness, and ring-form
parasites of generated smears (:mod:`slidescore.offline.synthetic`) for the built-in SmearNet, at
many offsets in the crop; then the peaks the report records for its top regions, against the
smears' truth files. Grad-CAM at SmearNet's last spatial layer, shown before, rang the parasite
(peak 10–15 px off, the parasite colder than a ring around it): see :mod:`slidescore.report.gradcam`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slidescore.core.types import Box
from slidescore.model import load_model
from slidescore.model.card import ModelCard
from slidescore.model.scoring import PatchClassifier
from slidescore.offline.synthetic import SmearSpec, parasite_positions, plan_smear, render_region
from slidescore.report.gradcam import METHOD, explain_crop, patch_read_box
from slidescore.report.html import EXPLANATION


class RedSquareNet(nn.Module):
    """Fires on saturated red: a 1×1 'redness' conv, a 3×3 smoothing conv, global max pool, a 1×1 head."""

    def __init__(self) -> None:
        super().__init__()
        self.red = nn.Conv2d(3, 1, 1)
        self.smooth = nn.Conv2d(1, 1, 3)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Conv2d(1, 1, 1)
        self.relu1, self.relu2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)
        with torch.no_grad():
            # inputs are normalised to [-2, 2] (mean 0.5, std 0.25): red (2, -2, -2) → 6 - 4 = 2; white, grey, blue → < 0
            self.red.weight.copy_(torch.tensor([1.0, -1.0, -1.0]).view(1, 3, 1, 1))
            self.red.bias.fill_(-4.0)
            self.smooth.weight.fill_(1 / 9)
            self.smooth.bias.zero_()
            self.head.weight.fill_(3.0)
            self.head.bias.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.relu2(self.smooth(self.relu1(self.red(x))))))


def _model(dense: bool) -> PatchClassifier:
    card = ModelCard(name="red-square", patch_px=64, mpp=0.5, classes=("red",), dense=dense, pad_value=255)
    return PatchClassifier(RedSquareNet(), card, device="cpu")


def _crop(square: tuple[int, int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    img = rng.integers(150, 256, (160, 192, 3)).astype(np.uint8)  # pale random texture, no strong red
    img[..., 0] = np.minimum(img[..., 0], img[..., 1])  # never redder than green
    img[20:40, 150:170] = (40, 40, 200)  # a blue distractor
    y, x, s = square
    img[y : y + s, x : x + s] = (230, 10, 10)
    return img


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("square", [(100, 30, 16), (12, 90, 12)])
def test_peak_lies_inside_the_red_square(dense: bool, square: tuple[int, int, int]) -> None:
    model = _model(dense)
    crop = _crop(square)
    res = explain_crop(model, crop, 0)
    assert res.method == METHOD == EXPLANATION == "integrated gradients"
    assert res.heat is not None and res.heat.shape == crop.shape[:2] and res.heat.max() == pytest.approx(1.0)
    y, x, s = square
    assert res.peak_px is not None
    py, px = res.peak_px
    assert (py, px) == np.unravel_index(int(np.argmax(res.heat)), res.heat.shape)
    assert y <= py < y + s and x <= px < x + s, (py, px)
    inside = res.heat[y : y + s, x : x + s].mean()
    outside = np.delete(res.heat, np.s_[max(0, y - 8) : y + s + 8], axis=0).mean()
    assert inside > 5 * outside  # the map is concentrated on the feature, not merely peaked there
    assert res.heat[20:40, 150:170].max() < 0.05  # the blue distractor raised nothing


def test_moving_the_square_moves_the_peak_and_the_model_is_left_as_it_was() -> None:
    model = _model(False)
    relus = [m for m in model.module.modules() if isinstance(m, nn.ReLU)]
    params = {n: p.detach().clone() for n, p in model.module.named_parameters()}
    peaks = []
    for square in [(20, 20, 16), (110, 150, 16)]:
        res = explain_crop(model, _crop(square, seed=1), 0)
        assert res.peak_px is not None
        peaks.append(res.peak_px)
    assert 20 <= peaks[0][0] < 36 and 110 <= peaks[1][0] < 126
    assert all(r.inplace for r in relus) and not model.module.training
    assert not model.module._forward_hooks and not any(m._backward_hooks for m in model.module.modules())
    for n, p in model.module.named_parameters():  # no gradient left on the weights, the weights untouched
        assert p.grad is None and torch.equal(p, params[n])


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # users still ship TorchScript
def test_torchscript_models_are_explained_too() -> None:
    model = _model(False)
    model.module = torch.jit.script(RedSquareNet())  # no hooks needed: only the input's gradient
    res = explain_crop(model, _crop((100, 30, 16)), 0)
    assert res.heat is not None and not res.note and res.peak_px is not None
    assert 100 <= res.peak_px[0] < 116 and 30 <= res.peak_px[1] < 46


def test_nothing_above_background_says_so() -> None:
    model = _model(True)
    grey = np.full((96, 96, 3), 200, np.uint8)  # no red anywhere: the score is the background's
    res = explain_crop(model, grey, 0)
    assert res.heat is not None and not res.heat.any() and res.peak_px is None and "nothing" in res.note


def test_the_read_box_holds_every_patch_of_the_scoring_grid_that_covers_the_crop() -> None:
    # grid origins at multiples of 16 from the level's origin; 64-px patches
    assert patch_read_box(Box(100, 200, 96, 96), (2048, 2048), 64, 16) == Box(48, 144, 208, 208)
    assert patch_read_box(Box(96, 192, 96, 96), (2048, 2048), 64, 16) == Box(48, 144, 192, 192)
    assert patch_read_box(Box(0, 0, 96, 96), (2048, 2048), 64, 16) == Box(-48, -48, 192, 192)  # the centred grid's first patches
    assert patch_read_box(Box(1944, 1944, 96, 96), (2040, 2040), 64, 16) == Box(1888, 1888, 208, 208)  # past the edge


# ---------------------------------------------------------------------------------------------
# planted parasites, built-in SmearNet (0.5 µm/px): 1 parasite radius ≈ 6 px

CROP = 96  # the report's smallest crop (192 level-0 px at 0.25 µm/px) at the scoring level
OFFSETS = [(4, 4), (4, 91), (91, 4), (91, 91), (48, 48), (4, 48), (48, 4), (91, 48), (48, 91), (25, 70)]


def _planted_crops() -> list[tuple[np.ndarray, Box, tuple[float, float]]]:
    """(read box pixels, crop inside them, parasite in crop coordinates) for one parasite per offset."""
    spec = SmearSpec(height_px=4096, width_px=4096, mpp=0.25, seed=31, parasitemia=0.02)
    layout = plan_smear(spec)
    dots = parasite_positions(layout) / 2  # level-0 → scoring level (downsample 2)
    level = (2048, 2048)
    out, k = [], 0
    for oy, ox in OFFSETS:
        while True:
            py, px = dots[k]
            k += 1
            crop = Box(int(py) - oy, int(px) - ox, CROP, CROP)
            inside = crop.y >= 0 and crop.x >= 0 and crop.y1 <= level[0] and crop.x1 <= level[1]
            alone = not any(crop.y - 8 <= q[0] < crop.y1 + 8 and crop.x - 8 <= q[1] < crop.x1 + 8
                            for j, q in enumerate(dots) if j != k - 1)
            if inside and alone:
                break
        rb = patch_read_box(crop, level, 64, 16)
        pix = render_region(layout, rb.y, rb.x, rb.h, rb.w, downsample=2)
        out.append((pix, Box(crop.y - rb.y, crop.x - rb.x, CROP, CROP), (py - crop.y, px - crop.x)))
    return out


def test_the_peak_falls_on_a_planted_parasite_wherever_it_lies_in_the_crop() -> None:
    model = load_model("builtin:smearnet", device="cpu")
    yy, xx = np.mgrid[:CROP, :CROP] + 0.5
    dists, ratios = [], []
    for pix, inner, (ty, tx) in _planted_crops():
        res = explain_crop(model, pix, 0, inner=inner, stride_px=16)
        assert res.heat is not None and res.heat.shape == (CROP, CROP) and res.peak_px is not None
        dists.append(float(np.hypot(res.peak_px[0] + 0.5 - ty, res.peak_px[1] + 0.5 - tx)))
        d = np.hypot(yy - ty, xx - tx)
        ratios.append(float(res.heat[d <= 3].mean() / res.heat[(d > 8) & (d <= 16)].mean()))
        # completeness: the attributions add up to how far the score rose above empty background's (16 steps: ±15 %)
        gain = res.score - res.baseline_score
        assert gain > 1 and res.attribution_sum == pytest.approx(gain, rel=0.15)
    print(f"peak distances (px at 0.5 µm/px): {np.round(dists, 1).tolist()}; heat at parasite / ring 8-16 px: "
          f"{np.round(ratios, 1).tolist()}")
    assert max(dists) <= 6.0, dists  # on the parasite (one radius), at every offset: corners, edges, centre
    assert min(ratios) > 5, ratios  # hot on the parasite, cold around it: no ring


@pytest.mark.slow
def test_the_report_records_peaks_on_the_parasites_of_its_top_regions(scored_batch) -> None:
    _, results = scored_batch
    dists = []
    for res in results:
        truth = np.array(json.loads(Path(res.uri).with_suffix(".truth.json").read_text())["parasites"])  # level-0 (y, x)
        report = res.run["report"]
        assert report["gradcam"] == EXPLANATION and report["gradcam_model"] == "passed in"
        for reg in report["regions"]:
            y, x, h, w = reg["crop_box_px"]
            py, px = reg["gradcam_peak_px"]
            assert 0 <= py < h and 0 <= px < w
            if not ((truth[:, 0] >= y) & (truth[:, 0] < y + h) & (truth[:, 1] >= x) & (truth[:, 1] < x + w)).any():
                continue  # a region without a parasite (a false positive): nothing planted to hit
            dists.append(float(np.hypot(truth[:, 0] - (y + py + 0.5), truth[:, 1] - (x + px + 0.5)).min()))
    dists_a = np.array(dists)
    print(f"report peaks to the nearest parasite (level-0 px at 0.25 µm/px): {np.round(np.sort(dists_a), 1).tolist()}")
    assert len(dists_a) >= 10
    # level-0 px are 0.25 µm: 12 px is one parasite radius; a crop may also hold a mimic the model fires on
    assert np.median(dists_a) <= 3 and (dists_a <= 12).mean() >= 0.8, dists
