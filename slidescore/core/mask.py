"""Foreground detection and per-patch foreground fractions (pure numpy/scipy).

The mask is computed once per sample at a low-resolution level and expressed as the foreground
fraction of every output cell, so it lives on the same cell grid as the probability map and never
depends on blocks. ``brightfield``: background is bright and unsaturated (smears, tissue);
``nodata``: background equals the no-data value in every channel (field images); ``none``:
everything is foreground. A patch's foreground fraction is the mean of its k × k cells.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import sparse

from slidescore.core.types import group_runs


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
        # the same tests in integers (no float copy of the image): (max − min) > s·max, r + g + b < 3·255·b;
        # on planes (one copy): element-wise operations on contiguous channels, not on every third byte
        r, g, b = np.moveaxis(rgb[..., :3], -1, 0).copy()
        mx = np.maximum(np.maximum(r, g), b).astype(np.int16)
        spread = mx - np.minimum(np.minimum(r, g), b)
        total = r.astype(np.int16)
        total += g
        total += b
        # an integer sum is below x exactly when it is below ⌈x⌉ (no float copy of the sums)
        return (spread > min_saturation * mx) | (total < min(max(math.ceil(3 * 255 * max_brightness), -1), 766))
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


def _overlap_matrix(n_dst: int, dst_px: float, n_src: int, src_px: float, *, dst0: int = 0, src0: int = 0,
                    src1: int | None = None) -> sparse.csr_matrix:
    """R[i, m] = |[i·dst, (i+1)·dst) ∩ [m·src, (m+1)·src)| / dst (fraction of dst covered).

    Rows ``dst0 … dst0 + n_dst − 1`` and source columns ``src0 … src1 − 1`` (default: all ``n_src``) of the
    whole matrix, each entry computed from the global indices, so a band of rows holds exactly the
    values, in the same order, that the whole matrix holds there.
    """
    src1 = n_src if src1 is None else src1
    rows, cols, vals = [], [], []
    for i in range(dst0, dst0 + n_dst):
        a, b = i * dst_px, (i + 1) * dst_px
        m0 = max(src0, int(a // src_px))
        m1 = min(n_src, src1, int(np.ceil(b / src_px)))
        for m in range(m0, m1):
            ov = min(b, (m + 1) * src_px) - max(a, m * src_px)
            if ov > 0:
                rows.append(i - dst0)
                cols.append(m - src0)
                vals.append(ov / dst_px)
    return sparse.csr_matrix((vals, (rows, cols)), shape=(n_dst, src1 - src0))


def cell_fractions(fraction: np.ndarray, src_px: float, cells_shape: tuple[int, int], cell_px: float) -> np.ndarray:
    """Resample a foreground-fraction image onto the cell grid by exact area overlap.

    ``src_px`` and ``cell_px`` are the pixel sizes of the source image and of one cell in a common
    unit (level-0 pixels). Parts of a cell outside the source image count as background.
    """
    out = CellFractions(fraction.shape, src_px, cells_shape, cell_px)
    out.add_rows(fraction)
    return out.result()


class CellFractions:
    """:func:`cell_fractions` fed band by band: source rows arrive top to bottom (:meth:`add_rows`),
    and each band of cell rows is computed as soon as all the source rows it overlaps are in.

    Memory: the (cells) result plus the source rows of one band of cells, never the whole source.
    The values are those of :func:`cell_fractions` over the whole image bit for bit: every cell sums
    the same overlap weights over the same source pixels in the same order.
    """

    def __init__(self, src_shape: tuple[int, int], src_px: float, cells_shape: tuple[int, int], cell_px: float) -> None:
        self.src_shape, self.src_px, self.cells_shape, self.cell_px = src_shape, src_px, cells_shape, cell_px
        self.rx = _overlap_matrix(cells_shape[1], cell_px, src_shape[1], src_px)
        self._rx_csc: sparse.csc_matrix | None = None
        self.out = np.zeros(cells_shape, np.float32)
        self.rows: list[np.ndarray] = []  # source rows not yet used up, from self.row0
        self.row0 = 0
        self.next_cell = 0

    def _src_rows(self, i0: int, i1: int) -> tuple[int, int]:
        """Source rows that cell rows [i0, i1) overlap."""
        return int(i0 * self.cell_px // self.src_px), min(self.src_shape[0], int(np.ceil(i1 * self.cell_px / self.src_px)))

    def add_rows(self, rows: np.ndarray) -> None:
        """The next source rows (top to bottom); computes every cell row they complete."""
        self.rows.append(np.asarray(rows))
        have = self.row0 + sum(len(r) for r in self.rows)
        last = have >= self.src_shape[0]
        i1 = self.next_cell
        while i1 < self.cells_shape[0] and (last or self._src_rows(i1, i1 + 1)[1] <= have):
            i1 += 1
        if i1 == self.next_cell:
            return
        i0 = self.next_cell
        m0, m1 = self._src_rows(i0, i1)
        m1 = max(m0, m1)
        src = np.concatenate(self.rows, axis=0) if len(self.rows) > 1 else self.rows[0]
        band = src[m0 - self.row0 : m1 - self.row0]
        self._compute(i0, i1, m0, m1, band)
        self.next_cell = i1
        keep = self._src_rows(i1, i1 + 1)[0] if i1 < self.cells_shape[0] else self.row0 + len(src)
        self.rows = [src[keep - self.row0 :]]
        self.row0 = keep

    def _compute(self, i0: int, i1: int, m0: int, m1: int, band: np.ndarray) -> None:
        """Cell rows [i0, i1) from their source rows [m0, m1) (``band``).

        Only the cell columns that overlap a source column with foreground are computed: the others are
        sums of zeros (the zeros they were created as). A computed cell sums the same overlap weights over
        the same source pixels in the same order as the whole product, so the values are bit for bit
        equal, and a sparse slide's empty bands cost one ``any`` each.
        """
        hot = np.flatnonzero(band.any(axis=0)) if band.size else np.empty(0, np.intp)
        if not hot.size:
            return
        ry = _overlap_matrix(i1 - i0, self.cell_px, self.src_shape[0], self.src_px, dst0=i0, src0=m0, src1=m1)
        if 2 * hot.size > band.shape[1]:  # mostly foreground: the whole product
            vals = ry @ (self.rx @ band.astype(np.float64).T).T
            self.out[i0:i1] = np.clip(np.asarray(vals, dtype=np.float32), 0.0, 1.0)
            return
        if self._rx_csc is None:
            self._rx_csc = self.rx.tocsc()
        cells = np.zeros(self.cells_shape[1], bool)
        cells[self._rx_csc[:, hot].indices] = True  # the cells those source columns overlap
        for a, b in group_runs(cells):  # each island's columns apart
            rx = self.rx[a:b]
            c0, c1 = int(rx.indices.min()), int(rx.indices.max()) + 1
            vals = ry @ (rx[:, c0:c1] @ band[:, c0:c1].astype(np.float64).T).T
            self.out[i0:i1, a:b] = np.clip(np.asarray(vals, dtype=np.float32), 0.0, 1.0)

    def result(self) -> np.ndarray:
        """The (cells) foreground fractions; every source row must have been added."""
        if self.next_cell < self.cells_shape[0]:
            raise ValueError(f"cell fractions: rows {self.next_cell}… of {self.cells_shape[0]} are incomplete "
                             f"({self.row0 + sum(len(r) for r in self.rows)} of {self.src_shape[0]} source rows added)")
        return self.out


def patch_fractions(cell_frac: np.ndarray, k: int, patches_shape: tuple[int, int], *, band_rows: int = 256) -> np.ndarray:
    """Foreground fraction of every patch position of the centred grid: the mean of its in-image cells.

    Patch ``a`` covers cells ``[a − k + 1, a]`` (:class:`~slidescore.core.tiling.PatchGrid`); cells outside
    the image are padding, not background, so they count in neither the sum nor the number of cells.

    Sums come from an integral image of the zero-padded cells, built ``band_rows`` patch rows at a
    time (the column sums carried from band to band), so memory beyond the (float32) result is a few
    bands, whatever the canvas; the values are those of the whole-canvas integral image bit for bit.
    """
    py, px = patches_shape
    m = k - 1
    ch, cw = cell_frac.shape
    need_y, need_x = py + m, px + m
    h, w = min(ch, need_y - m), min(cw, need_x - m)
    # in-image cells of each patch row / column: exact integers, as the integral of ones gave them
    ny = np.array([min(a + k, m + h) - max(a, m) for a in range(py)], np.float64).clip(0)
    nx = np.array([min(b + k, m + w) - max(b, m) for b in range(px)], np.float64).clip(0)
    out = np.empty((py, px), np.float32)
    carry = np.zeros(need_x)  # column sums of the padded cells above the next row
    integral = np.zeros((1, need_x + 1))  # rows [i0, …) of the integral image; row 0 is zero
    i0 = 0
    made = 0  # padded rows summed so far
    for a0 in range(0, py, band_rows):
        a1 = min(py, a0 + band_rows)
        upto = a1 + k - 1  # integral rows a0 … a1 + k − 1 are needed: padded rows up to upto − 1
        lo, hi = max(made, m), min(upto, m + h)
        if hi > lo and cell_frac[lo - m : hi - m, :w].any():
            pad = np.zeros((upto - made, need_x))
            pad[lo - made : hi - made, m : m + w] = cell_frac[lo - m : hi - m, :w]
            col = np.cumsum(np.concatenate([carry[None], pad]), axis=0)[1:]
            carry = col[-1]
            rows = np.zeros((len(col), need_x + 1))
            rows[:, 1:] = col.cumsum(1)
        else:  # rows without foreground add zeros: every new integral row is the one above, bit for bit
            rows = np.zeros((upto - made, need_x + 1))
            rows[:, 1:] = carry.cumsum()
        integral = np.concatenate([integral[a0 - i0 :], rows])
        i0, made = a0, upto
        c0, c1 = max(0, a0 - m), min(h, a1)  # the cells this band's patches cover
        if not (c1 > c0 and cell_frac[c0:c1, :w].any()):  # equal integral rows: every total is exactly 0
            out[a0:a1] = 0.0
            continue
        lo_rows, hi_rows = integral[: a1 - a0], integral[k : k + a1 - a0]
        total = (hi_rows[:, k : k + px] - lo_rows[:, k : k + px] - hi_rows[:, :px] + lo_rows[:, :px])
        count = np.outer(ny[a0:a1], nx)
        out[a0:a1] = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    return out
