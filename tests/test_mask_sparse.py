"""Cell fractions of a sparse mask: only the cell columns beside foreground are computed, bit for bit what
the whole product gives (#16: a sparse slide's empty mask bands cost one ``any`` each)."""

from __future__ import annotations

import numpy as np
import pytest

from slidescore.core.mask import CellFractions, _overlap_matrix


def _whole_product(frac: np.ndarray, src_px: float, cells_shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """The cell fractions as one product over the whole image (the computation before banding and skipping)."""
    rx = _overlap_matrix(cells_shape[1], cell_px, frac.shape[1], src_px)
    ry = _overlap_matrix(cells_shape[0], cell_px, frac.shape[0], src_px)
    return np.clip(np.asarray(ry @ (rx @ frac.astype(np.float64).T).T, dtype=np.float32), 0.0, 1.0)


@pytest.mark.parametrize(("src_px", "cell_px", "band"), [(16.0, 16.0, 64), (16.0, 24.0, 37), (8.0, 32.0, 100), (12.0, 5.0, 50)])
def test_sparse_bands_equal_the_whole_product(src_px: float, cell_px: float, band: int) -> None:
    rng = np.random.default_rng(int(src_px * cell_px))
    h, w = 400, 530
    frac = np.zeros((h, w), np.float32)
    frac[30:60, 400:460] = rng.random((30, 60))  # islands of foreground in empty bands and columns
    frac[200:205, 3:9] = 1.0
    frac[390:400, 520:530] = rng.random((10, 10))  # at the far edges
    frac[250:300] = rng.random((50, w)) > 0.3  # a band that is mostly foreground: the whole-product branch
    cells = (int(np.ceil(h * src_px / cell_px)), int(np.ceil(w * src_px / cell_px)))
    out = CellFractions(frac.shape, src_px, cells, cell_px)
    for y in range(0, h, band):
        out.add_rows(frac[y : y + band])
    got = out.result()
    want = _whole_product(frac, src_px, cells, cell_px)
    assert got.dtype == np.float32 and np.array_equal(got, want)
    assert (got > 0).sum() > 50 and (got == 0).sum() > 50


def test_an_empty_mask_is_all_zero_cells() -> None:
    out = CellFractions((300, 300), 16.0, (150, 150), 32.0)
    out.add_rows(np.zeros((300, 300), np.float32))
    assert not out.result().any()


@pytest.mark.parametrize(("k", "band_rows"), [(2, 7), (4, 16), (3, 256), (1, 5)])
def test_patch_fractions_skip_empty_bands_bit_for_bit(k: int, band_rows: int) -> None:
    from slidescore.core.mask import patch_fractions
    from tests.stages.test_sparse import _old_patch_fractions  # the whole-canvas integral images

    rng = np.random.default_rng(k * band_rows)
    cells = np.zeros((300, 170), np.float32)
    cells[40:47, 100:130] = rng.random((7, 30))  # islands between long empty bands
    cells[150, 3] = 1.0
    cells[290:, 160:] = rng.random((10, 10))  # touching the bottom-right edge
    shape = (300 + k - 1, 170 + k - 1)
    got = patch_fractions(cells, k, shape, band_rows=band_rows)
    assert np.array_equal(got, _old_patch_fractions(cells, k, shape))
    assert (got > 0).sum() > 100 and (got == 0).sum() > 1000


@pytest.fixture(scope="module")
def every_colour() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    v = np.arange(2**24, dtype=np.uint32)
    rgb = np.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    x = rgb.astype(np.int32)
    return rgb, x.max(axis=-1).astype(np.float64), x.min(axis=-1).astype(np.float64), x.sum(axis=-1).astype(np.float64)


@pytest.mark.parametrize(("min_saturation", "max_brightness"), [(0.08, 0.85), (1.0, 0.0), (0.05, 2.0)])
def test_brightfield_rule_on_every_colour(every_colour: tuple[np.ndarray, ...], min_saturation: float,
                                          max_brightness: float) -> None:
    """The integer, planar brightfield rule agrees with its definition in floats on all 2²⁴ colours."""
    from slidescore.core.mask import detect_foreground

    rgb, mx, mn, total = every_colour
    got = detect_foreground(rgb, "brightfield", min_saturation=min_saturation, max_brightness=max_brightness)
    assert np.array_equal(got, (mx - mn > min_saturation * mx) | (total < 3 * 255 * max_brightness))


def test_group_runs() -> None:
    from slidescore.core.types import group_runs

    flags = np.zeros(23, bool)
    flags[[0, 1, 7, 8, 9, 15, 22]] = True
    assert group_runs(flags) == [(0, 2), (7, 10), (15, 16), (22, 23)]
    assert group_runs(flags, 4) == [(0, 4), (5, 6)]  # groups of 4: 0–3 hold a True, 4 none, 5 (the short last one) does
    assert group_runs(np.zeros(5, bool), 2) == [] and group_runs(np.ones(5, bool), 2) == [(0, 3)]
