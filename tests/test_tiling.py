"""Geometry of the global patch grid and of block ownership."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slidescore.core.tiling import PatchGrid, choose_level, plan_blocks


@settings(max_examples=60, deadline=None)
@given(h=st.integers(16, 700), w=st.integers(16, 700), k=st.sampled_from([1, 2, 4]), s=st.sampled_from([4, 8, 16]))
def test_every_pixel_is_covered_and_grid_covers_exactly_the_cells(h: int, w: int, k: int, s: int) -> None:
    p = k * s
    if h < p or w < p:
        with pytest.raises(ValueError, match="smaller than one"):
            PatchGrid(h, w, p, s)
        return
    g = PatchGrid(h, w, p, s)
    cover = np.zeros((h, w), int)
    py, px = g.patches_shape
    for a in range(py):
        for b in range(px):
            box = g.patch_box(a, b)
            assert box.y % s == 0 and box.x % s == 0  # origins on the global grid
            assert box.y < h and box.x < w  # every patch starts inside the image
            cover[box.y : box.y1, box.x : box.x1] += 1
    assert cover.min() >= 1
    # the last patch reaches the border but never overshoots by a whole stride
    assert (py - 1) * s + p >= h > (py - 1) * s + p - s
    assert py + k - 1 == g.cells_shape[0] and px + k - 1 == g.cells_shape[1]


@settings(max_examples=40, deadline=None)
@given(h=st.integers(64, 900), w=st.integers(64, 900), chunk=st.integers(1, 20), bc=st.integers(1, 3))
def test_blocks_partition_cells_and_carry_every_touching_patch(h: int, w: int, chunk: int, bc: int) -> None:
    g = PatchGrid(h, w, 64, 16)
    owner = np.full(g.cells_shape, -1)
    for blk in plan_blocks(g, chunk, bc):
        c = blk.cells
        assert c.y % chunk == 0 and c.x % chunk == 0  # chunk-aligned: never shares a chunk
        assert (owner[c.y : c.y1, c.x : c.x1] == -1).all()
        owner[c.y : c.y1, c.x : c.x1] = blk.index
        # every patch touching the block's cells is inside its patch range
        py, px = g.patches_shape
        for a in range(max(0, c.y - 3), min(py, c.y1)):
            assert blk.patches.y <= a < blk.patches.y1
        rb = blk.read
        assert rb.y == blk.patches.y * 16 and rb.h == (blk.patches.h - 1) * 16 + 64
    assert (owner >= 0).all()


def test_stride_must_divide_patch() -> None:
    with pytest.raises(ValueError, match="divisor"):
        PatchGrid(100, 100, 64, 24)


def test_choose_level_prefers_match_within_tolerance() -> None:
    assert choose_level([0.25, 0.5, 1.0], 0.5, 0.1) == (1, 1.0)
    assert choose_level([0.25, 0.52, 1.0], 0.5, 0.1) == (1, 1.0)
    level, scale = choose_level([0.25, 1.0], 0.5, 0.1)
    assert level == 0 and scale == pytest.approx(0.5)
