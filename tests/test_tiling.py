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
    cover = np.zeros((h + 2 * p, w + 2 * p), int)  # room for the patches that start before the image
    py, px = g.patches_shape
    for a in range(py):
        for b in range(px):
            box = g.patch_box(a, b)
            assert box.y % s == 0 and box.x % s == 0  # origins on the global grid
            assert box.y1 > 0 and box.x1 > 0 and box.y < h and box.x < w  # every patch overlaps the image
            cover[p + box.y : p + box.y1, p + box.x : p + box.x1] += 1
    inner = cover[p : p + h, p : p + w]
    assert inner.min() >= 1
    # centred: every cell is covered by exactly k positions per axis, at the edges as in the interior
    per_cell = inner[::s, ::s]
    assert (per_cell == k * k).all(), np.unique(per_cell)
    assert py == g.cells_shape[0] + k - 1 and px == g.cells_shape[1] + k - 1
    assert g.patch_box(0, 0).y == -(k - 1) * s and g.patch_box(py - 1, 0).y == (g.cells_shape[0] - 1) * s


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
        for a in range(py):  # patch a covers cells [a − 3, a]: inside the range iff it touches the block
            touches = a - 3 < c.y1 and a >= c.y
            assert touches == (blk.patches.y <= a < blk.patches.y1), (a, c)
        rb = blk.read
        assert rb.y == (blk.patches.y - 3) * 16 and rb.h == (blk.patches.h - 1) * 16 + 64
    assert (owner >= 0).all()


def test_stride_must_divide_patch() -> None:
    with pytest.raises(ValueError, match="divisor"):
        PatchGrid(100, 100, 64, 24)


def test_choose_level_prefers_match_within_tolerance() -> None:
    assert choose_level([0.25, 0.5, 1.0], 0.5, 0.1) == (1, 1.0)
    assert choose_level([0.25, 0.52, 1.0], 0.5, 0.1) == (1, 1.0)
    level, scale = choose_level([0.25, 1.0], 0.5, 0.1)
    assert level == 0 and scale == pytest.approx(0.5)
