"""Model outputs are checked per batch: a module that returns NaN/inf, the wrong shape, or
probabilities outside [0, 1], or that raises in its forward, fails the sample with a
ModelOutputError naming the model and what came out (never a silent map of NaN)."""

from __future__ import annotations

import logging
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from slidescore.errors import InputError, ModelLoadError, ModelOutputError
from slidescore.model.loading import classifier_from_module
from slidescore.model.scoring import PROBABILITY_TOLERANCE

P, S = 16, 8  # patch edge and scoring stride (px)
GRID = (9, 10)  # patch grid of the test block


def _block(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, w = P + S * (GRID[0] - 1), P + S * (GRID[1] - 1)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.ones(GRID, bool)


class MeanProb(nn.Module):
    """Fully convolutional, dense-capable (stride S): the mean intensity of each patch (0–1), as K
    channels; ``fault`` then spoils the output."""

    def __init__(self, k: int = 1, fault: str = "", every: int = 3) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(P, stride=S)
        self.k, self.fault, self.every, self.calls = k, fault, every, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        out = self.pool(x).mean(1, keepdim=True).repeat(1, self.k, 1, 1)  # (N, K, h, w)
        if self.fault == "nan":  # every ``every``-th patch (or dense map position)
            out.view(-1)[:: self.every] = float("nan")
        elif self.fault == "inf":
            out.view(-1)[:1] = float("inf")
        elif self.fault == "above_one":
            out = out * 2 + 0.5
        elif self.fault == "rounding":
            out = out.clamp(0, 1) + PROBABILITY_TOLERANCE / 2
        elif self.fault == "extra_class":
            out = torch.cat([out, out], 1)
        elif self.fault == "flat":
            out = out.flatten()
        elif self.fault == "tuple":
            return (out, out)  # type: ignore[return-value]
        elif self.fault == "raise_on_3rd" and self.calls == 3:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return out


def _clf(module: nn.Module, *, dense: bool = False, outputs: str = "probabilities", n_classes: int | None = 1):
    return classifier_from_module(module, patch_px=P, n_channels=3, n_classes=n_classes, dense=dense,
                                  network_stride_px=S if dense else 1, outputs=outputs, device="cpu", name="faulty")


def _score_error(module: nn.Module, *, mode: str = "per_patch", dense: bool = False, outputs: str = "probabilities",
                 batch_size: int = 256) -> ModelOutputError:
    pixels, valid = _block()
    clf = _clf(module, dense=dense, outputs=outputs)
    with pytest.raises(ModelOutputError) as info:
        clf.score_block(pixels, valid, S, mode=mode, batch_size=batch_size)
    err = info.value
    assert isinstance(err, InputError)  # the sample fails; the run goes on
    assert "model 'faulty'" in str(err)
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is ModelOutputError and str(again) == str(err) and again.context == err.context
    return err


def test_a_healthy_module_scores_in_both_modes_and_matches() -> None:
    pixels, valid = _block()
    valid[0, :3] = False
    per_patch = _clf(MeanProb()).score_block(pixels, valid, S, mode="per_patch")
    dense = _clf(MeanProb(), dense=True).score_block(pixels, valid, S, mode="dense")
    assert np.isnan(per_patch[0, 0, :3]).all() and np.isfinite(per_patch[:, valid]).all()
    np.testing.assert_allclose(dense[:, valid], per_patch[:, valid], atol=1e-5)
    assert ((per_patch[:, valid] >= 0) & (per_patch[:, valid] <= 1)).all()


def test_nan_for_some_patches_names_how_many_per_batch() -> None:
    err = _score_error(MeanProb(fault="nan", every=3), batch_size=30)
    assert str(err) == ("model 'faulty' returned NaN for 10 of 30 patches in a batch; the model is broken or its "
                        "input normalisation (card mean/std) is wrong")
    assert err.context["nan"] == 10 and err.context["total"] == 30


def test_nan_in_the_dense_map_is_refused_in_dense_mode() -> None:
    err = _score_error(MeanProb(fault="nan", every=4), mode="dense", dense=True)
    assert "returned NaN for 23 of 90 positions of its dense output map (9×10) for a block" in str(err)


def test_nan_in_the_dense_map_falls_back_to_per_patch_in_auto_mode_which_is_refused_too(
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="slidescore.model.scoring"):
        err = _score_error(MeanProb(fault="nan"), mode="auto", dense=True)
    assert "patches in a batch" in str(err)  # the per-patch pass failed too: the model is broken
    assert "the dense pass failed the dense check" in caplog.text


def test_inf_is_refused() -> None:
    err = _score_error(MeanProb(fault="inf"))
    assert "returned ±inf for 1 of 90 patches in a batch" in str(err)


@pytest.mark.parametrize("mode", ["per_patch", "dense"])
def test_probabilities_above_one_are_refused_with_the_fix(mode: str) -> None:
    err = _score_error(MeanProb(fault="above_one"), mode=mode, dense=mode == "dense")
    assert "returned values in [" in str(err) and "expected probabilities in [0, 1]" in str(err)
    assert "outputs='logits'" in str(err)


def test_the_same_values_as_logits_are_fine() -> None:
    pixels, valid = _block()
    out = _clf(MeanProb(fault="above_one"), outputs="logits").score_block(pixels, valid, S, mode="per_patch")
    assert np.isfinite(out).all() and (out > 0.5).all() and (out < 1).all()  # sigmoid of values in [0.5, 2.5]


def test_rounding_above_one_is_clipped_not_refused() -> None:
    pixels, valid = _block()
    for mode, dense in (("per_patch", False), ("dense", True)):
        out = _clf(MeanProb(fault="rounding"), dense=dense).score_block(pixels, valid, S, mode=mode)
        assert out.max() <= 1.0 and out.min() >= 0.0


@pytest.mark.parametrize(("fault", "mode", "expected"), [
    ("extra_class", "per_patch", "returned outputs of shape (90, 2, 1, 1) for a batch of 90 patches; expected (90, 1) "
                                 "or (90, 1, h, w): one score per class of its card, which lists 1 (['class_0'])"),
    ("extra_class", "dense", "returned outputs of shape (1, 2, 9, 10) for a block in one dense pass; expected (1, 1, h, w)"),
    ("flat", "per_patch", "returned outputs of shape (90,) for a batch of 90 patches; expected (90, 1) or (90, 1, h, w)"),
    ("tuple", "per_patch", "returned a tuple for a batch of 90 patches; expected a tensor of shape (90, 1) or (90, 1, h, w)"),
])
def test_outputs_of_the_wrong_shape_are_refused(fault: str, mode: str, expected: str) -> None:
    err = _score_error(MeanProb(fault=fault), mode=mode, dense=mode == "dense")
    assert expected in str(err), str(err)


def test_an_error_in_the_forward_surfaces_with_the_model_and_the_original_text() -> None:
    module = MeanProb(fault="raise_on_3rd")
    err = _score_error(module, batch_size=20)  # 90 patches: 5 batches, the 3rd raises
    assert module.calls == 3
    assert str(err) == ("model 'faulty' raised RuntimeError while scoring a batch of 20 patches: "
                        "CUDA error: an illegal memory access was encountered")
    assert isinstance(err.__cause__, RuntimeError)


def test_a_module_that_fails_its_class_probe_is_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match=r"model 'faulty' raised RuntimeError on one blank 3×16×16 patch"):
        _clf(_Raising(), n_classes=None)
    with pytest.raises(ModelLoadError, match=r"model 'faulty' returned \(1,\) for one patch; expected a tensor"):
        _clf(MeanProb(fault="flat"), n_classes=None)


class _Raising(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")
