"""Geometry of the global patch grid and the plan of output-chunk-aligned blocks (pure numpy).

One grid per image level (docs/architecture.md, invariant 1), centred on the cells: with
``k = patch_px / stride_px`` and ``s = stride_px``, patch index ``a`` along an axis has its origin at
``(a − k + 1) · s`` and covers output cells ``a − k + 1 … a``; indices run over ``cells + k − 1``
positions, so every output cell is covered by exactly ``k`` patch positions along each axis, at the
image edges as in the interior. Output cell ``i`` covers level pixels ``[i·s, (i+1)·s)``.

Border policy: the parts of a patch outside the image are filled with the model's ``pad_value``
(background) by the readers. A patch position is scored when the foreground fraction of its
in-image cells reaches ``mask.min_foreground_frac`` (:func:`slidescore.core.mask.patch_fractions`).
Why centred: with patches only from origin 0, cells near the edges were covered by fewer patches,
and a normalised blend over fewer patches (all holding the same object) inflated edge regions. The
grid never depends on blocks, workers or order. Images smaller than one patch are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from slidescore.core.types import Block, Box


@dataclass(frozen=True)
class PatchGrid:
    """The patch grid of one image level."""

    height_px: int
    width_px: int
    patch_px: int
    stride_px: int

    def __post_init__(self) -> None:
        if self.stride_px <= 0 or self.patch_px % self.stride_px:
            raise ValueError(
                f"stride_px={self.stride_px} must be a positive divisor of patch_px={self.patch_px}"
            )
        if self.height_px < self.patch_px or self.width_px < self.patch_px:
            raise ValueError(
                f"image of {self.height_px}×{self.width_px} px is smaller than one "
                f"{self.patch_px}×{self.patch_px} patch"
            )

    @property
    def k(self) -> int:
        """Patches per cell along an axis in the interior (patch_px / stride_px)."""
        return self.patch_px // self.stride_px

    @property
    def cells_shape(self) -> tuple[int, int]:
        """Shape of the output map, in cells."""
        return (-(-self.height_px // self.stride_px), -(-self.width_px // self.stride_px))

    @property
    def margin(self) -> int:
        """Patch positions before the first cell (and after the last): ``k − 1`` along each axis."""
        return self.k - 1

    @property
    def patches_shape(self) -> tuple[int, int]:
        """Number of patch positions along (y, x): ``cells + k − 1`` (a centred grid, see the module docstring)."""
        ch, cw = self.cells_shape
        return (ch + self.margin, cw + self.margin)

    @property
    def n_patches(self) -> int:
        py, px = self.patches_shape
        return py * px

    def first_cell(self, a: int) -> int:
        """The first cell patch index ``a`` covers (negative for the patches that start before the image)."""
        return a - self.margin

    def patch_box(self, a: int, b: int) -> Box:
        """Level-pixel box of patch (a, b) (may extend past any edge; readers pad it)."""
        s = self.stride_px
        return Box(self.first_cell(a) * s, self.first_cell(b) * s, self.patch_px, self.patch_px)

    def patches_touching(self, cells: Box) -> Box:
        """Range of patch indices whose patches cover at least one cell of ``cells``.

        Patch ``a`` covers cells ``[a − k + 1, a]``, so the patches of cells ``[c0, c1)`` are ``[c0, c1 + k − 1)``.
        """
        py, px = self.patches_shape
        a0, b0 = max(0, cells.y), max(0, cells.x)
        a1, b1 = min(py, cells.y1 + self.margin), min(px, cells.x1 + self.margin)
        return Box(a0, b0, a1 - a0, b1 - b0)

    def owned_patches(self, cells: Box) -> Box:
        """The patches a block of ``cells`` counts as its own, so that counts over blocks add up: patch ``a``
        belongs to the block holding cell ``max(a − k + 1, 0)`` (patches starting before the image, to the first)."""
        m = self.margin
        y0 = 0 if cells.y == 0 else cells.y + m
        x0 = 0 if cells.x == 0 else cells.x + m
        return Box(y0, x0, cells.y1 + m - y0, cells.x1 + m - x0)

    def covered_cells(self, valid: np.ndarray) -> np.ndarray:
        """(cells_h, cells_w) bool: the cells at least one ``valid`` patch covers (patch (a, b) covers
        cells [a − k + 1, a] × [b − k + 1, b]). With positive blending weights these, and only these, get a value."""
        k = self.k
        ch, cw = self.cells_shape
        py, px = valid.shape
        v = np.zeros((ch + k, cw + k), np.int64)
        v[1 : 1 + py, 1 : 1 + px] = valid
        c = v.cumsum(0).cumsum(1)
        # cell i: valid patches a in [i, i + k − 1] — a box sum of the integral image (shifted by one)
        box = c[k : k + ch, k : k + cw] - c[:ch, k : k + cw] - c[k : k + ch, :cw] + c[:ch, :cw]
        return box > 0

    def read_box(self, patches: Box) -> Box:
        """Level-pixel box containing every patch of a patch-index range (may start before the image)."""
        s = self.stride_px
        return Box(self.first_cell(patches.y) * s, self.first_cell(patches.x) * s,
                   (patches.h - 1) * s + self.patch_px, (patches.w - 1) * s + self.patch_px)


def plan_blocks(grid: PatchGrid, chunk_cells: int, block_chunks: int = 1) -> list[Block]:
    """Cut the output map into blocks of ``block_chunks``² whole chunks (block ownership).

    Every output chunk belongs to exactly one block; each block carries the patch range and the
    read box (with halo) it needs to compute all of its cells alone.
    """
    if chunk_cells <= 0 or block_chunks <= 0:
        raise ValueError("chunk_cells and block_chunks must be positive")
    edge = chunk_cells * block_chunks
    ny, nx = grid.cells_shape
    blocks: list[Block] = []
    for row, y in enumerate(range(0, ny, edge)):
        for col, x in enumerate(range(0, nx, edge)):
            cells = Box(y, x, min(edge, ny - y), min(edge, nx - x))
            patches = grid.patches_touching(cells)
            blocks.append(Block(len(blocks), row, col, cells, patches, grid.read_box(patches)))
    return blocks


def iter_chunks(shape: tuple[int, int], chunk: int) -> Iterator[Box]:
    """Chunk boxes of a 2-D array, row-major."""
    for y in range(0, shape[0], chunk):
        for x in range(0, shape[1], chunk):
            yield Box(y, x, min(chunk, shape[0] - y), min(chunk, shape[1] - x))


def choose_level(level_mpps: list[float], target_mpp: float, tolerance: float) -> tuple[int, float]:
    """Pick the pyramid level to score at and the extra resampling factor it needs.

    Returns ``(level, scale)``: read ``level`` and resize it by ``scale`` (1.0 when the level is
    within ``tolerance`` of ``target_mpp``). Prefers the coarsest level not coarser than the target
    (downsampling loses less than upsampling).
    """
    best = None
    for i, mpp in enumerate(level_mpps):
        if abs(mpp / target_mpp - 1) <= tolerance and (best is None or abs(mpp - target_mpp) < abs(level_mpps[best] - target_mpp)):
            best = i
    if best is not None:
        return best, 1.0
    finer = [i for i, mpp in enumerate(level_mpps) if mpp < target_mpp]
    i = max(finer, key=lambda j: level_mpps[j]) if finer else min(range(len(level_mpps)), key=lambda j: level_mpps[j])
    return i, level_mpps[i] / target_mpp


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def level_count(shape: tuple[int, int], chunk: int) -> int:
    """Number of 2× pyramid levels until the map fits in one chunk."""
    return 1 + max(0, math.ceil(math.log2(max(1, max(shape) / chunk))))
