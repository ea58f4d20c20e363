"""Blending: normalized convolution on the patch grid equals the full-resolution mean blend."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slidescore.core.blend import blend_cells, blend_scores, patch_weights
from slidescore.core.tiling import PatchGrid, plan_blocks


def full_res_reference(scores: np.ndarray, valid: np.ndarray, grid: PatchGrid, weights: np.ndarray | None = None) -> np.ndarray:
    """The seed's blend: per pixel, weighted sum of covering patch probabilities / sum of weights."""
    h, w = grid.height_px, grid.width_px
    s, p = grid.stride_px, grid.patch_px
    c = scores.shape[0]
    num = np.zeros((c, h + 2 * p, w + 2 * p))  # p px of room on every side
    den = np.zeros((h + 2 * p, w + 2 * p))
    wpx = np.ones((p, p)) if weights is None else np.kron(weights, np.ones((s, s)))
    for a in range(valid.shape[0]):
        for b in range(valid.shape[1]):
            if valid[a, b]:
                box = grid.patch_box(a, b)  # the centred grid: may start before the image
                y, x = p + box.y, p + box.x
                num[:, y : y + p, x : x + p] += scores[:, a, b, None, None] * wpx
                den[y : y + p, x : x + p] += wpx
    with np.errstate(invalid="ignore"):
        return (num / den)[:, p : p + h, p : p + w]


@settings(max_examples=25, deadline=None)
@given(h=st.integers(64, 300), w=st.integers(64, 300), seed=st.integers(0, 1000), kind=st.sampled_from(["uniform", "gaussian", "cosine"]))
def test_blend_equals_full_resolution_reference(h: int, w: int, seed: int, kind: str) -> None:
    grid = PatchGrid(h, w, 64, 16)
    rng = np.random.default_rng(seed)
    py, px = grid.patches_shape
    scores = rng.random((2, py, px)).astype(np.float32)
    valid = rng.random((py, px)) > 0.3
    kernel = patch_weights(grid.k, kind)
    ny, nx = grid.cells_shape
    cells = blend_cells(scores, valid, kernel, (-grid.margin, -grid.margin), (0, 0, ny, nx))
    ref = full_res_reference(scores, valid, grid, kernel)
    # every pixel of a cell has the same reference value, and it equals the cell value
    up = np.repeat(np.repeat(cells, 16, axis=1), 16, axis=2)[:, :h, :w]
    np.testing.assert_allclose(up, ref, atol=1e-6, equal_nan=True)
    assert np.isnan(cells).sum() == np.isnan(ref[:, ::16, ::16]).sum()


def test_constant_scores_blend_to_constant_where_scored_and_nan_elsewhere() -> None:
    grid = PatchGrid(200, 260, 64, 16)
    py, px = grid.patches_shape
    scores = np.full((1, py, px), 0.37, np.float32)
    valid = np.ones((py, px), bool)
    valid[:, :6] = False  # a background strip: patch columns 0–5 (covering cells up to column 5) never scored
    for kind in ("uniform", "gaussian", "cosine"):
        out = blend_cells(scores, valid, patch_weights(4, kind), (-3, -3), (0, 0, *grid.cells_shape))
        scored = ~np.isnan(out[0])
        assert np.allclose(out[0][scored], 0.37, atol=1e-7)
        assert not scored[:, :3].any() and scored[:, 3:].all()  # column 6 covers cells 3–6


def test_blocks_blend_alone_to_the_same_map() -> None:
    grid = PatchGrid(517, 389, 64, 16)
    rng = np.random.default_rng(1)
    scores = rng.random((1, *grid.patches_shape)).astype(np.float32)
    valid = rng.random(grid.patches_shape) > 0.2
    kernel = patch_weights(4, "gaussian")
    whole = blend_cells(scores, valid, kernel, (-3, -3), (0, 0, *grid.cells_shape))
    stitched = np.full_like(whole, -1)
    for blk in plan_blocks(grid, chunk_cells=5, block_chunks=1):
        p, c = blk.patches, blk.cells
        part = blend_cells(scores[:, p.y : p.y1, p.x : p.x1], valid[p.y : p.y1, p.x : p.x1], kernel, (p.y - 3, p.x - 3),
                           (c.y, c.x, c.h, c.w))
        stitched[:, c.y : c.y1, c.x : c.x1] = part
    np.testing.assert_allclose(stitched, whole, atol=1e-6, equal_nan=True)


def test_weights_shapes() -> None:
    g = patch_weights(4, "gaussian")
    assert g.shape == (4, 4) and np.allclose(g, g.T) and g[1, 1] > g[0, 0] > 0
    c = patch_weights(4, "cosine")
    assert c.min() > 0
    with pytest.raises(ValueError):
        patch_weights(4, "box")


def test_blend_scores_valid_mode_shape() -> None:
    out = blend_scores(np.ones((3, 10, 12), np.float32), np.ones((10, 12), bool), np.ones((4, 4)))
    assert out.shape == (3, 7, 9)
