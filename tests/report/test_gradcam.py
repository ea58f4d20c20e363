"""Grad-CAM on a hand-built network whose only discriminative feature is a red square."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from slidescore.model.card import ModelCard
from slidescore.model.scoring import PatchClassifier
from slidescore.report.gradcam import explain_crop, find_target_layer


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
def test_cam_peak_lies_inside_the_red_square(dense: bool, square: tuple[int, int, int]) -> None:
    model = _model(dense)
    crop = _crop(square)
    res = explain_crop(model, crop, 0)
    assert res.cam is not None and res.cam.shape == crop.shape[:2]
    assert res.layer == "smooth"  # last conv with a >= 4×4 output on one patch
    y, x, s = square
    py, px = np.unravel_index(int(np.argmax(res.cam)), res.cam.shape)
    assert y <= py < y + s and x <= px < x + s, (py, px)
    inside = res.cam[y : y + s, x : x + s].mean()
    outside = np.delete(res.cam, np.s_[max(0, y - 8) : y + s + 8], axis=0).mean()
    assert inside > 5 * outside  # the map is concentrated on the feature, not merely peaked there
    assert res.guided is not None and res.method == "guided Grad-CAM"
    gy, gx = np.unravel_index(int(np.argmax(res.guided)), res.guided.shape)
    assert y - 2 <= gy < y + s + 2 and x - 2 <= gx < x + s + 2


def test_moving_the_square_moves_the_cam_and_the_model_is_left_as_it_was() -> None:
    model = _model(False)
    relus = [m for m in model.module.modules() if isinstance(m, nn.ReLU)]
    peaks = []
    for square in [(20, 20, 16), (110, 150, 16)]:
        res = explain_crop(model, _crop(square, seed=1), 0)
        assert res.cam is not None
        peaks.append(np.unravel_index(int(np.argmax(res.cam)), res.cam.shape))
    assert peaks[0] != peaks[1]
    assert all(r.inplace for r in relus)  # in-place flags restored
    assert not model.module._forward_hooks and not any(m._backward_hooks for m in model.module.modules())


def test_target_layer_of_the_builtin_smearnet() -> None:
    from slidescore.model.architectures import SmearNet

    # 64 → 16 → 14 → 12 → pool 6 → 4 → pool 2 → 1: the 4×4 conv is the last one still spatial
    assert find_target_layer(SmearNet(), 64, 3) == "features.8"


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # users still ship TorchScript
def test_torchscript_models_get_no_map_and_say_why() -> None:
    model = _model(False)
    model.module = torch.jit.script(RedSquareNet())
    res = explain_crop(model, _crop((100, 30, 16)), 0)
    assert res.cam is None and "TorchScript" in res.note
