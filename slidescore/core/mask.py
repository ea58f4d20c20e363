"""Foreground detection and per-patch foreground fractions (pure numpy/scipy).

The mask is computed once per sample at a low-resolution level and expressed as the foreground
fraction of every output cell, so it lives on the same cell grid as the probability map and never
depends on blocks. ``brightfield``: background is bright and unsaturated (smears, tissue);
``nodata``: background equals the no-data value in every channel (field images); ``none``:
everything is foreground. A patch's foreground fraction is the mean of its k × k cells.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse


def detect_foreground(
    rgb: np.ndarray,
    method: str,
    *,
    min_saturation: float = 0.08,
    max_brightness: float = 0.85,
    nodata_value: float = 0.0,
) -> np.ndarray:
    """Boolean foreground of an (h, w, c) image.

    ``brightfield`` calls a pixel foreground when it is saturated (``(max − min) / max >
    min_saturation``) or dark (mean brightness < ``max_brightness`` of full scale).
    """
    if method == "none":
        return np.ones(rgb.shape[:2], dtype=bool)
    if method == "nodata":
        return np.any(rgb != nodata_value, axis=-1)
    if method != "brightfield":
        raise ValueError(f"unknown mask method {method!r}")
    if rgb.dtype == np.uint8 and rgb.shape[-1] >= 3:
        # the same tests in integers (no float copy of the image): (max − min) > s·max, r + g + b < 3·255·b
        r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]  # channel by channel: reductions over a size-3 axis are slow
        mx = np.maximum(np.maximum(r, g), b).astype(np.int16)
        spread = mx - np.minimum(np.minimum(r, g), b)
        total = r.astype(np.int16) + g + b
        return (spread > min_saturation * mx) | (total < 3 * 255 * max_brightness)
    full = 255.0 if rgb.dtype == np.uint8 else float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0
    x = rgb[..., :3].astype(np.float32) / full
    if x.shape[-1] == 1:
        return x[..., 0] < max_brightness
    mx = x.max(axis=-1)
    mn = x.min(axis=-1)
    sat = (mx - mn) / np.maximum(mx, 1e-6)
    return (sat > min_saturation) | (x.mean(axis=-1) < max_brightness)


def reduce_mean(mask: np.ndarray, factor: int) -> np.ndarray:
    """Area-average a 2-D array by an integer factor (a partial last block averages what it has)."""
    if factor == 1:
        return mask.astype(np.float32)
    h, w = mask.shape
    hh, ww = -(-h // factor) * factor, -(-w // factor) * factor
    total = np.zeros((hh, ww), np.float32)
    count = np.zeros((hh, ww), np.float32)
    total[:h, :w] = mask
    count[:h, :w] = 1
    t = total.reshape(hh // factor, factor, ww // factor, factor).sum(axis=(1, 3))
    n = count.reshape(hh // factor, factor, ww // factor, factor).sum(axis=(1, 3))
    return t / np.maximum(n, 1)


def _overlap_matrix(n_dst: int, dst_px: float, n_src: int, src_px: float) -> sparse.csr_matrix:
    """R[i, m] = |[i·dst, (i+1)·dst) ∩ [m·src, (m+1)·src)| / dst (fraction of dst covered)."""
    rows, cols, vals = [], [], []
    for i in range(n_dst):
        a, b = i * dst_px, (i + 1) * dst_px
        m0 = int(a // src_px)
        m1 = min(n_src, int(np.ceil(b / src_px)))
        for m in range(m0, m1):
            ov = min(b, (m + 1) * src_px) - max(a, m * src_px)
            if ov > 0:
                rows.append(i)
                cols.append(m)
                vals.append(ov / dst_px)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_dst, n_src))


def cell_fractions(fraction: np.ndarray, src_px: float, cells_shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Resample a foreground-fraction image onto the cell grid by exact area overlap.

    ``src_px`` and ``cell_px`` are the pixel sizes of the source image and of one cell in a common
    unit (level-0 pixels). Parts of a cell outside the source image count as background.
    """
    ry = _overlap_matrix(cells_shape[0], cell_px, fraction.shape[0], src_px)
    rx = _overlap_matrix(cells_shape[1], cell_px, fraction.shape[1], src_px)
    out = ry @ (rx @ fraction.astype(np.float64).T).T
    return np.clip(np.asarray(out, dtype=np.float32), 0.0, 1.0)


def patch_fractions(cell_frac: np.ndarray, k: int, patches_shape: tuple[int, int]) -> np.ndarray:
    """Foreground fraction of every patch position of the centred grid: the mean of its in-image cells.

    Patch ``a`` covers cells ``[a − k + 1, a]`` (:class:`~slidescore.core.tiling.PatchGrid`); cells outside
    the image are padding, not background, so they count in neither the sum nor the number of cells.
    """
    py, px = patches_shape
    m = k - 1
    ch, cw = cell_frac.shape
    need_y, need_x = py + m, px + m
    frac = np.zeros((need_y, need_x), np.float64)
    inside = np.zeros((need_y, need_x), np.float64)
    h, w = min(ch, need_y - m), min(cw, need_x - m)
    frac[m : m + h, m : m + w] = cell_frac[:h, :w]
    inside[m : m + h, m : m + w] = 1.0

    def box_sums(a: np.ndarray) -> np.ndarray:
        integral = np.zeros((need_y + 1, need_x + 1))
        integral[1:, 1:] = a.cumsum(0).cumsum(1)
        return (integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k])[:py, :px]

    total, count = box_sums(frac), box_sums(inside)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0).astype(np.float32)
