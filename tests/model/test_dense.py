"""Dense scoring: the ResNet-18-style built-in is dense-capable, the self-check catches a false
``dense`` claim and falls back, per-patch batches are bounded and skip background, CUDA options."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from slidescore.config import JobConfig
from slidescore.errors import ConfigError
from slidescore.model import load_model
from slidescore.model.architectures import (
    ARCHITECTURES,
    SmearNet,
    ValidResNet18,
    build_architecture,
)
from slidescore.model.card import ModelCard
from slidescore.model.scoring import DENSE_CHECK_TOLERANCE, PatchClassifier
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _randomise_batchnorm(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial eval-mode BatchNorm statistics, so the test covers them."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return net.eval()


def _card(name: str, patch_px: int, network_stride_px: int, dense: bool = True, **kw) -> ModelCard:
    return ModelCard(name=name, patch_px=patch_px, mpp=0.5, classes=("positive",), dense=dense,
                     network_stride_px=network_stride_px, **kw)


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return _randomise_batchnorm(ValidResNet18(width=8), seed=1)


def test_resnet_is_registered_and_maps_one_patch_to_one_output() -> None:
    assert ARCHITECTURES["resnet18_valid"] is ValidResNet18
    net = build_architecture("resnet18_valid", n_outputs=2, width=4).eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 224, 224)).shape == (1, 2, 1, 1)
        assert net(torch.zeros(1, 3, 224 + 112, 224 + 16)).shape == (1, 2, 8, 2)  # total stride 16
    assert not any(getattr(m, "padding", (0, 0)) not in ((0, 0), 0) for m in net.modules())  # no zero padding
    assert (ValidResNet18.patch_px, ValidResNet18.stride_px, 112 % ValidResNet18.stride_px) == (224, 16, 0)


def test_resnet_dense_equals_per_patch_at_stride_112(resnet: nn.Module) -> None:
    g = torch.Generator().manual_seed(2)
    block = torch.rand(1, 3, 224 + 112 * 2, 224 + 112, generator=g)
    with torch.no_grad():
        dense = resnet(block)[0, 0, ::7, ::7]  # stride 112 = 7 network strides
        patches = block.unfold(2, 224, 112).unfold(3, 224, 112)
        gy, gx = patches.shape[2:4]
        single = resnet(patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 224, 224)).reshape(gy, gx)
    assert dense.shape == (3, 2)
    assert single.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(dense, single, atol=1e-5, rtol=0)


def test_resnet_classifier_checks_and_uses_dense(resnet: nn.Module) -> None:
    clf = PatchClassifier(resnet, _card("resnet", 224, 16), device="cpu")
    pixels = np.random.default_rng(3).integers(0, 256, (224 + 112 * 2, 224 + 112, 3), np.uint8)
    valid = np.ones((3, 2), bool)
    auto = clf.score_block(pixels, valid, 112, mode="auto", batch_size=4)
    per_patch = clf.score_block(pixels, valid, 112, mode="per_patch", batch_size=4)
    assert clf.dense_checked and clf.dense_used
    assert clf.dense_max_diff is not None and clf.dense_max_diff <= 1e-5
    np.testing.assert_allclose(auto, per_patch, atol=1e-5, rtol=0)


@pytest.mark.parametrize("tile_px", [16, 48, 80, 10_000])
def test_dense_tiles_give_the_scores_of_one_pass(tile_px: int) -> None:
    """Dense passes over tiles (each with its own halo) equal one pass over the whole block, for
    tiles that divide the patch grid and tiles that leave a ragged last row and column."""
    one = load_model("builtin:smearnet", device="cpu", dense_tile_px=10_000)
    tiled = load_model("builtin:smearnet", device="cpu", dense_tile_px=tile_px)
    pixels = np.random.default_rng(5).integers(0, 256, (64 + 16 * 12, 64 + 16 * 9, 3), np.uint8)
    whole = one.score_dense(pixels, 16)
    assert whole.shape == (1, 13, 10) and whole.std() > 1e-3
    np.testing.assert_allclose(tiled.score_dense(pixels, 16), whole, atol=1e-5, rtol=0)


def test_resnet_scores_a_block_from_the_pixels_of_its_needed_tiles_only(resnet: nn.Module) -> None:
    """A fresh classifier's first block (the one-time dense check included) scored from only the tiles holding
    its valid patches (a corner island in the clipped last tile row and column) gets the bits of every tile."""
    s, p = 16, 224
    card = _card("resnet", p, 16)
    pixels = np.random.default_rng(8).integers(0, 256, ((25 - 1) * s + p, (24 - 1) * s + p, 3), np.uint8)
    valid = np.zeros((25, 24), bool)
    valid[15:22, 16:20] = True  # tiles of 4 + 13 = 17 patches: rows 0–16 | 17–24, columns 0–16 | 17–23
    whole = PatchClassifier(resnet, card, device="cpu", dense_tile_px=64).score_dense(pixels, s)
    clf = PatchClassifier(resnet, card, device="cpu", dense_tile_px=64)
    assert clf.patches_needed(valid, s) == (0, 0, 25, 24)  # the island lies in all four tiles
    valid[15:22, 16:20] = False
    valid[18:22, 18:20] = True
    a0, b0, a1, b1 = clf.patches_needed(valid, s)
    assert (a0, b0, a1, b1) == (17, 17, 25, 24)
    assert clf.patches_needed(valid, s, "per_patch") == (18, 18, 22, 20)
    part = pixels[a0 * s : (a1 - 1) * s + p, b0 * s : (b1 - 1) * s + p]
    got = clf.score_block(part, valid, s, mode="auto", batch_size=8, first=(a0, b0))
    assert clf.dense_checked and clf.dense_used
    assert np.array_equal(got[:, valid], whole[:, valid]) and np.isnan(got[:, ~valid]).all()


def test_dense_tile_px_is_a_model_option() -> None:
    cfg = JobConfig.from_dict({"model": {"dense_tile_px": 512}})
    assert cfg.model.runtime_options()["dense_tile_px"] == 512
    assert load_model("builtin:smearnet", **{**cfg.model.runtime_options(), "device": "cpu"}).dense_tile_px == 512
    assert load_model("builtin:smearnet", device="cpu").dense_tile_px == 1024
    with pytest.raises(ConfigError, match="dense_tile_px"):
        JobConfig.from_dict({"model": {"dense_tile_px": 0}})


def test_batchnorm_is_folded_for_scoring_and_gives_the_same_scores(resnet: nn.Module) -> None:
    """Scoring runs a copy with BatchNorm folded into the convolutions: same scores, module untouched."""
    from slidescore.model.scoring import fold_batchnorm

    x = torch.rand(2, 3, 224 + 112, 224 + 112, generator=torch.Generator().manual_seed(6))
    folded = fold_batchnorm(resnet)
    assert folded is not None and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in resnet.modules())  # the loaded module keeps its layers
    with torch.no_grad():
        torch.testing.assert_close(folded(x), resnet(x), atol=1e-5, rtol=1e-4)
    smear = load_model("builtin:smearnet", device="cpu")
    assert smear.scoring_info()["batchnorm_folded"] is True
    pixels = np.random.default_rng(7).integers(0, 256, (64 + 16 * 8, 64 + 16 * 8, 3), np.uint8)
    with torch.inference_mode():
        ref = torch.sigmoid(smear.module(smear._block_input(pixels)))[0].numpy()[:, ::1, ::1]
    np.testing.assert_allclose(smear.score_dense(pixels, 16), ref, atol=1e-5, rtol=0)
    assert fold_batchnorm(PaddedNet()) is None  # nothing to fold


class PaddedNet(nn.Module):
    """Looks dense (stem stride 4, 1 × 1 output on a 64-px patch) but pads with zeros: not dense."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 1, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(torch.relu(self.stem(x)))))


class GlobalPoolNet(nn.Module):
    """Fully convolutional up to a global pooling: a dense pass returns one value per block."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 4, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3), keepdim=True)


def _block(seed: int = 4, h: int = 64 + 16 * 6, w: int = 64 + 16 * 5) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    valid = np.ones(((h - 64) // 16 + 1, (w - 64) // 16 + 1), bool)
    valid[0, 0] = valid[-1, 2] = False
    return pixels, valid


@pytest.mark.parametrize("net_cls", [PaddedNet, GlobalPoolNet], ids=["zero_padding", "global_pool"])
def test_false_dense_claim_falls_back_to_per_patch_with_one_warning(net_cls: type[nn.Module], caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(5)
    stride = 4 if net_cls is PaddedNet else 16
    liar = PatchClassifier(net_cls(), _card("liar", 64, stride), device="cpu")
    honest = PatchClassifier(liar.module, _card("liar", 64, stride, dense=False), device="cpu")
    pixels, valid = _block()
    with caplog.at_level(logging.WARNING, logger="slidescore.model.scoring"):
        first = liar.score_block(pixels, valid, 16, mode="auto", batch_size=7)
        second = liar.score_block(pixels[16:], valid[1:], 16, mode="auto", batch_size=7)
    expected = honest.score_block(pixels, valid, 16, mode="auto", batch_size=7)
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(second, expected[:, 1:])
    assert np.isnan(first[0, 0, 0]) and np.isfinite(first[0, valid]).all()
    info = liar.scoring_info()
    assert info["dense_checked"] and info["dense_used"] is False
    assert info["dense_max_diff"] > DENSE_CHECK_TOLERANCE
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "'liar'" in warnings[0].getMessage() and "per patch" in warnings[0].getMessage()
    assert honest.scoring_info()["dense_checked"] is False  # a non-dense card is never checked


def test_forced_dense_with_a_false_claim_is_an_error() -> None:
    """Decision: ``mode: dense`` is a promise by the user; a failed check stops the job (ConfigError)
    instead of writing wrong maps or silently running slower than asked."""
    torch.manual_seed(6)
    liar = PatchClassifier(PaddedNet(), _card("liar", 64, 4), device="cpu")
    pixels, valid = _block()
    with pytest.raises(ConfigError, match=r"dense and per-patch scores differ.*use model.mode auto or per_patch"):
        liar.score_block(pixels, valid, 16, mode="dense", batch_size=16)


def test_builtin_smearnet_passes_the_check_and_run_json_records_it(tmp_path: Path) -> None:
    model = load_model("builtin:smearnet", device="cpu")
    img = textured_image(300, 280, seed=9)
    tif = write_tiff(tmp_path / "s.tif", img, mpp=0.5)
    cfg = JobConfig.from_dict({"output": {"uri": str(tmp_path / "out")}, "mask": {"method": "none"}})
    (res,) = score_samples([str(tif)], cfg, str(tmp_path / "out"), model=model)
    scoring = res.run["model"]["scoring"]
    assert scoring["dense_checked"] and scoring["dense_used"] and scoring["dense_max_diff"] <= 1e-5
    assert scoring["amp"] == "off" and scoring["device"] == "cpu"


class Recorder(nn.Module):
    """A patch classifier that remembers the batches it saw (mean intensity → probability)."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batches.append(x.detach().clone())
        return x.mean(dim=(1, 2, 3))[:, None]


def test_per_patch_batches_are_bounded_and_skip_background() -> None:
    rec = Recorder()
    clf = PatchClassifier(rec, ModelCard(name="rec", patch_px=64, mpp=0.5, classes=("x",), mean=(0, 0, 0), std=(1, 1, 1)),
                          device="cpu", outputs="probabilities")
    pixels, valid = _block(seed=7, h=64 + 16 * 20, w=64 + 16 * 17)
    valid[5:12, 3:9] = False
    out = clf.score_block(pixels, valid, 16, mode="auto", batch_size=50)
    sizes = [len(b) for b in rec.batches]
    assert max(sizes) <= 50 and sum(sizes) == valid.sum()  # background patches never reach the model
    ys, xs = np.nonzero(valid)
    expected = np.array([pixels[a * 16 : a * 16 + 64, b * 16 : b * 16 + 64].mean() / 255 for a, b in zip(ys, xs, strict=True)])
    np.testing.assert_allclose(out[0, ys, xs], expected, rtol=1e-5)
    assert np.isnan(out[0][~valid]).all()


def test_cuda_options_are_ignored_on_cpu_with_a_log_line(caplog: pytest.LogCaptureFixture, random_model_dir: Path) -> None:
    with caplog.at_level(logging.INFO, logger="slidescore.model.scoring"):
        clf = load_model(str(random_model_dir), device="cpu", amp="bf16", compile=True)
    info = clf.scoring_info()
    assert (info["amp"], info["channels_last"], info["compile"], info["pinned_memory"]) == ("off", True, False, False)
    assert any("ignored" in r.getMessage() and "amp" in r.getMessage() for r in caplog.records)
    pixels, valid = _block()
    plain = load_model(str(random_model_dir), device="cpu")
    np.testing.assert_array_equal(clf.score_block(pixels, valid, 16, mode="per_patch"),
                                  plain.score_block(pixels, valid, 16, mode="per_patch"))


@pytest.mark.parametrize("arch", ["smearnet", "resnet"])
def test_channels_last_scores_as_nchw_and_leaves_the_callers_module_alone(arch: str) -> None:
    """NHWC (the default) is a memory order, not a different function: same scores as NCHW, dense
    and per patch, and the module handed in keeps its own weights' layout."""
    torch.manual_seed(0)
    if arch == "smearnet":
        net, card, stride, shape = _randomise_batchnorm(SmearNet(), seed=2), _card("smear", 64, 16), 16, (64 + 16 * 9, 64 + 16 * 7)
    else:
        net, card, stride, shape = _randomise_batchnorm(ValidResNet18(width=8), seed=2), _card("resnet", 224, 16), 112, (224 + 112 * 2, 224 + 112)
    layouts = [p.stride() for p in net.parameters()]
    pixels = np.random.default_rng(5).integers(0, 256, (*shape, 3), np.uint8)
    valid = np.ones(((shape[0] - card.patch_px) // stride + 1, (shape[1] - card.patch_px) // stride + 1), bool)
    valid[0, 0] = False
    nhwc = PatchClassifier(net, card, device="cpu")
    nchw = PatchClassifier(copy.deepcopy(net), card, device="cpu", channels_last=False)
    assert nhwc.scoring_info()["channels_last"] and not nchw.scoring_info()["channels_last"]
    for mode in ("dense", "per_patch"):
        a = nhwc.score_block(pixels, valid, stride, mode=mode, batch_size=4)
        b = nchw.score_block(pixels, valid, stride, mode=mode, batch_size=4)
        assert np.isfinite(a[:, valid]).all() and np.isnan(a[:, ~valid]).all()
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert nhwc.dense_used
    assert [p.stride() for p in net.parameters()] == layouts
    with pytest.raises(ConfigError, match="model.channels_last"):
        JobConfig.from_dict({"model": {"channels_last": "yes"}})


def test_model_config_validates_the_cuda_options() -> None:
    cfg = JobConfig.from_dict({"model": {"amp": "bf16", "channels_last": True, "compile": True, "prefetch_blocks": 0}})
    assert cfg.model.runtime_options() == {"device": "auto", "amp": "bf16", "channels_last": True, "compile": True, "dense_tile_px": None}
    with pytest.raises(ConfigError, match="model.amp"):
        JobConfig.from_dict({"model": {"amp": "fp8"}})
    with pytest.raises(ConfigError, match="model.prefetch_blocks"):
        JobConfig.from_dict({"model": {"prefetch_blocks": -1}})
    auto = JobConfig.from_dict({}).model  # read ahead where it overlaps waiting: a GPU, or object storage
    assert (auto.prefetch_depth("cpu"), auto.prefetch_depth("cuda"), auto.prefetch_depth("cpu", remote_input=True)) == (0, 2, 2)
    assert JobConfig.from_dict({"model": {"prefetch_blocks": 3}}).model.prefetch_depth("cpu") == 3


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("amp", ["off", "bf16", "fp16"])
def test_cuda_dense_equals_per_patch_with_options(amp: str) -> None:
    torch.manual_seed(0)
    net = _randomise_batchnorm(ValidResNet18(width=16), seed=1)
    clf = PatchClassifier(net, _card("resnet", 224, 16), device="cuda", amp=amp, channels_last=True)
    pixels = np.random.default_rng(3).integers(0, 256, (224 + 112 * 3, 224 + 112 * 2, 3), np.uint8)
    valid = np.ones((4, 3), bool)
    dense = clf.score_block(pixels, valid, 112, mode="auto", batch_size=5)
    per_patch = clf.score_block(pixels, valid, 112, mode="per_patch", batch_size=5)
    assert clf.dense_used and clf.pin_memory and clf.scoring_info()["amp"] == amp
    tol = 1e-4 if amp == "off" else 3e-2  # half precision rounds differently in the two paths
    np.testing.assert_allclose(dense, per_patch, atol=tol, rtol=0)


@pytest.mark.gpu
@cuda
def test_cuda_compile_matches_eager(random_model_dir: Path) -> None:
    eager = load_model(str(random_model_dir), device="cuda")
    compiled = load_model(str(random_model_dir), device="cuda", compile=True)
    pixels, valid = _block()
    np.testing.assert_allclose(compiled.score_block(pixels, valid, 16), eager.score_block(pixels, valid, 16), atol=1e-5)
