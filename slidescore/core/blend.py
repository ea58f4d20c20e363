"""Blending overlapping patch scores into one value per output cell (pure numpy).

With ``patch_px = k · stride_px`` the blended map is a normalized convolution on the patch-score
grid (docs/architecture.md, invariant 4)::

    map = conv(scores · valid, W) / conv(valid, W)

with a k × k weight kernel ``W`` (uniform, gaussian or cosine) indexed by the position of the cell
inside the patch. Patches not scored (background) have ``valid = 0`` and contribute nothing; a cell
no valid patch covers is NaN ("not scored"), never a silent 0. With uniform weights every cell gets
the plain mean of the probabilities of the patches covering it, which is exactly the full-resolution
sum / count blend.
"""

from __future__ import annotations

import numpy as np


def patch_weights(k: int, kind: str = "uniform", sigma_frac: float = 0.125) -> np.ndarray:
    """The k × k weight of each cell position inside a patch.

    ``gaussian``: exp(−u²/2σ²) with u the distance of the cell centre from the patch centre and
    σ = ``sigma_frac`` · patch size (MONAI's default 0.125). ``cosine``: sin²(π (d + ½) / k), a
    Hann window sampled at cell centres (positive everywhere, so edge cells still count).
    """
    d = np.arange(k, dtype=np.float64) + 0.5
    if kind == "uniform":
        w = np.ones(k)
    elif kind == "gaussian":
        u = d / k - 0.5
        w = np.exp(-(u**2) / (2 * sigma_frac**2))
    elif kind == "cosine":
        w = np.sin(np.pi * d / k) ** 2
    else:
        raise ValueError(f"unknown blending weights {kind!r}; use uniform, gaussian or cosine")
    return np.outer(w, w)


def blend_scores(scores: np.ndarray, valid: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Blend a patch-score grid into cells, for the cells whose patches are all in the grid.

    Parameters
    ----------
    scores
        (C, Py, Px) patch probabilities on the patch grid (any value where ``valid`` is False).
    valid
        (Py, Px) bool, the patches that were scored.
    kernel
        (k, k) weights; ``kernel[dy, dx]`` weighs the cell at offset (dy, dx) inside a patch.

    Returns
    -------
    (C, Py − k + 1, Px − k + 1) float32: cell ``(i, j)`` combines patches ``(i + k − 1 − dy,
    j + k − 1 − dx)``. To blend cells near a border, pad the grid with ``valid = False`` patches
    (see :func:`blend_cells`). NaN where no valid patch covers the cell.
    """
    k = kernel.shape[0]
    c, py, px = scores.shape
    ny, nx = py - k + 1, px - k + 1
    w = valid.astype(np.float64)
    sv = np.where(valid[None], scores, 0.0).astype(np.float64)
    num = np.zeros((c, ny, nx))
    den = np.zeros((ny, nx))
    for dy in range(k):
        ys = slice(k - 1 - dy, k - 1 - dy + ny)
        for dx in range(k):
            xs = slice(k - 1 - dx, k - 1 - dx + nx)
            wt = kernel[dy, dx]
            num += wt * sv[:, ys, xs]
            den += wt * w[ys, xs]
    out = np.full((c, ny, nx), np.nan, dtype=np.float32)
    scored = den > 0
    out[:, scored] = (num[:, scored] / den[scored]).astype(np.float32)
    return out


def blend_cells(
    scores: np.ndarray,
    valid: np.ndarray,
    kernel: np.ndarray,
    patch_origin: tuple[int, int],
    cells: tuple[int, int, int, int],
) -> np.ndarray:
    """Blend the cells ``(y, x, h, w)`` from the patches ``patch_origin + [0, Py) × [0, Px)``.

    The patch range must contain every existing patch that touches the cells (a block's halo);
    patch indices outside it are treated as absent (image border). This is what a block calls: it
    needs nothing from its neighbours.
    """
    k = kernel.shape[0]
    cy, cx, ch, cw = cells
    a0, b0 = patch_origin
    c, py, px = scores.shape
    # Patches that can touch the cells: indices [cy − k + 1, cy + ch) along y, likewise x.
    gy0, gx0 = cy - k + 1, cx - k + 1
    gh, gw = ch + k - 1, cw + k - 1
    padded = np.zeros((c, gh, gw), dtype=np.float32)
    pvalid = np.zeros((gh, gw), dtype=bool)
    # Overlap of the given patch range with the needed range.
    y0, y1 = max(gy0, a0), min(gy0 + gh, a0 + py)
    x0, x1 = max(gx0, b0), min(gx0 + gw, b0 + px)
    if y1 > y0 and x1 > x0:
        padded[:, y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0] = scores[:, y0 - a0 : y1 - a0, x0 - b0 : x1 - b0]
        pvalid[y0 - gy0 : y1 - gy0, x0 - gx0 : x1 - gx0] = valid[y0 - a0 : y1 - a0, x0 - b0 : x1 - b0]
    return blend_scores(padded, pvalid, kernel)
