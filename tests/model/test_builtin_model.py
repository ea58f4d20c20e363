"""Tests of the shipped smearnet weights and card, and of the helpers of its training script."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import slidescore.offline.train_builtin as tb
from slidescore.model.architectures import SmearNet, build_architecture
from slidescore.model.card import ModelCard
from slidescore.offline import synthetic as syn

BUILTIN = tb.DEFAULT_OUT


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return ModelCard.from_dict(json.loads((BUILTIN / "card.json").read_text()))


@pytest.fixture(scope="module")
def model(card: ModelCard) -> torch.nn.Module:
    net = build_architecture(card.architecture, **card.arch_kwargs)
    state = torch.load(BUILTIN / "weights.pt", map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net.eval()


def _norm(card: ModelCard) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(card.mean, np.float32), np.asarray(card.std, np.float32)


def test_card_describes_a_dense_smearnet(card: ModelCard, model: torch.nn.Module) -> None:
    assert isinstance(model, SmearNet)
    assert (card.name, card.patch_px, card.mpp, card.classes) == (
        "smearnet",
        64,
        0.5,
        ("parasitized",),
    )
    assert (
        card.head == "binary_sigmoid"
        and card.dense
        and card.network_stride_px == SmearNet.stride_px
    )
    assert 0.0 < card.thresholds[0] < 1.0 and 200 <= card.pad_value <= 255
    assert all(0 < m < 1 for m in card.mean) and all(0 < s < 1 for s in card.std)
    assert card.metrics["val_auc"] >= 0.98
    assert ModelCard.from_dict(card.to_dict()) == card


def test_dense_output_equals_per_patch_output(model: torch.nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    block = torch.rand(1, 3, 64 + 16 * 5, 64 + 16 * 4, generator=g) * 4 - 2
    with torch.no_grad():
        dense = model(block)[0, 0]
        patches = block.unfold(2, 64, 16).unfold(3, 64, 16)  # (1, 3, gy, gx, 64, 64)
        gy, gx = patches.shape[2:4]
        batch = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 64, 64)
        single = model(batch).reshape(gy, gx)
    assert dense.shape == (6, 5)
    torch.testing.assert_close(dense, single, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def small_smear() -> tuple[syn.SmearLayout, np.ndarray]:
    layout = syn.plan_smear(syn.SmearSpec(2048, 2048, seed=4242, parasitemia=0.03))
    return layout, syn.render_image(layout, downsample=2)  # the model's 0.5 µm/px


@pytest.mark.parametrize("jpeg", [False, True], ids=["rendered", "jpeg90"])
def test_scores_patches_with_parasites_higher(
    card: ModelCard,
    model: torch.nn.Module,
    small_smear: tuple[syn.SmearLayout, np.ndarray],
    jpeg: bool,
) -> None:
    layout, img = small_smear
    if jpeg:  # as read from a JPEG-tiled pyramid (what `slidescore demo` writes)
        img = tb.jpeg_roundtrip(img, quality=90, subsampling=2)
    probs = tb.dense_probabilities(model, img, *_norm(card))
    dots = syn.parasite_positions(layout) / 2
    pos, near = tb.patch_labels(dots, img.shape[:2])
    g = 16 * np.arange(probs.shape[0])
    g = g[g < pos.shape[0]]
    pos, near, p = pos[np.ix_(g, g)], near[np.ix_(g, g)], probs[: len(g), : len(g)]
    labelled = (pos > 0) | (near == 0)
    assert (pos > 0).sum() > 50
    auc = tb.auc_roc(p[labelled], (pos > 0)[labelled])
    assert auc > 0.95
    # and it does not fire on the hard negatives: platelets and white cells far from any parasite
    for centres in (layout.platelet_centers, layout.wbc_centers):
        c = (
            np.floor(centres / 2 / 16).astype(int) - 2
        )  # the patch whose centre cell holds the object
        ok = (c >= 0).all(1) & (c < len(g)).all(1)
        c = c[ok]
        clean = near[c[:, 0], c[:, 1]] == 0
        assert (p[c[clean, 0], c[clean, 1]] < card.thresholds[0]).mean() > 0.95


def test_auc_roc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(size=300), 1)  # with ties
    y = rng.uniform(size=300) < 0.3 + 0.2 * (s > 0)
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    assert tb.auc_roc(s, y) == pytest.approx(brute, abs=1e-12)


def test_patch_labels_follow_the_margin_rule() -> None:
    pos, near = tb.patch_labels(np.array([[100.5, 200.5]]), (400, 400))
    # origin 64 (y): dot at 36.5 px inside; origin 96: dot at 4.5 (inside, margin 4); origin 97: 3.5
    assert pos[64, 160] == 1 and pos[96, 196] == 1 and pos[97, 196] == 0 and near[97, 196] == 1
    assert pos[41, 160] == 1 and pos[40, 160] == 0 and near[40, 160] == 1  # 59.5 inside, 60.5 not
    assert near[33, 160] == 1 and near[32, 160] == 0  # more than 4 px past the far edge: negative


@pytest.mark.parametrize("jpeg", [False, True], ids=["rendered", "jpeg90"])
def test_region_recall_on_a_default_smear(
    card: ModelCard, model: torch.nn.Module, jpeg: bool
) -> None:
    """The scorer's procedure: 4 × 4 overlapping patches averaged per cell, threshold, components."""
    layout = syn.plan_smear(syn.SmearSpec(4096, 4096, seed=5151))
    img = syn.render_image(layout, downsample=2)
    if jpeg:
        img = tb.jpeg_roundtrip(img, quality=90, subsampling=2)
    cells = tb.blend_cells(tb.dense_probabilities(model, img, *_norm(card)))
    r = tb.region_check(cells, syn.parasite_positions(layout) / 2, card.thresholds[0])
    assert r["n_parasites"] > 50
    assert r["recall"] >= 0.9 and r["false_regions"] <= 0.1 * r["n_regions"]
