"""Foreground detection and its resampling onto the cell grid."""

from __future__ import annotations

import numpy as np
import pytest

from slidescore.core.mask import cell_fractions, detect_foreground, patch_fractions, reduce_mean


def test_brightfield_background_is_bright_and_unsaturated() -> None:
    img = np.full((4, 4, 3), 236, np.uint8)
    img[0, 0] = (220, 120, 130)  # pink red cell: saturated
    img[1, 1] = (60, 40, 90)  # dark nucleus
    img[2, 2] = (250, 250, 250)  # glare: background
    fg = detect_foreground(img, "brightfield")
    assert fg[0, 0] and fg[1, 1] and not fg[2, 2] and fg.sum() == 2


def test_nodata_and_none() -> None:
    img = np.zeros((3, 3, 3), np.uint8)
    img[1, 1] = (5, 0, 0)
    assert detect_foreground(img, "nodata").sum() == 1
    assert detect_foreground(img, "none").all()


def test_cell_fractions_exact_area_overlap() -> None:
    fg = np.zeros((8, 8), np.float32)
    fg[:4, :2] = 1
    cells = cell_fractions(fg, 1.0, (4, 4), 2.0)  # each cell = 2×2 source pixels
    assert cells[0, 0] == pytest.approx(1.0) and cells[0, 1] == pytest.approx(0.0)
    # non-integer ratio: 3 source pixels per 2 cells; the edge cell past the image counts as background
    cells = cell_fractions(np.ones((3, 3), np.float32), 2.0, (5, 5), 1.5)
    assert cells[0, 0] == pytest.approx(1.0) and cells[4, 4] == pytest.approx(0.0)
    assert cells[2, 2] == pytest.approx(1.0)


def test_patch_fraction_is_mean_of_its_in_image_cells() -> None:
    cells = np.zeros((6, 6), np.float32)
    cells[0, 0] = 1
    pf = patch_fractions(cells, 2, (7, 7))  # the centred grid: patch a covers cells a − 1 … a
    assert pf[1, 1] == pytest.approx(0.25)  # cells (0..1, 0..1): all inside
    assert pf[0, 0] == pytest.approx(1.0)  # cell (0, 0) is its only in-image cell: the pad is not background
    assert pf[0, 1] == pytest.approx(0.5) and pf[2, 2] == 0
    assert pf[6, 6] == 0 and pf.shape == (7, 7)
    # independently: the mean over the in-image cells of each patch's k × k window
    rng = np.random.default_rng(2)
    cells = rng.random((9, 7)).astype(np.float32)
    k = 3
    pf = patch_fractions(cells, k, (9 + k - 1, 7 + k - 1))
    for a in range(pf.shape[0]):
        for b in range(pf.shape[1]):
            win = cells[max(0, a - k + 1) : a + 1, max(0, b - k + 1) : b + 1]
            assert pf[a, b] == pytest.approx(win.mean(), abs=1e-6)


def test_reduce_mean_handles_partial_blocks() -> None:
    a = np.ones((5, 5), bool)
    r = reduce_mean(a, 2)
    assert r.shape == (3, 3) and np.allclose(r, 1)
