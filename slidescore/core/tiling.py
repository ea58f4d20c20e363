"""Geometry of the global patch grid and the plan of output-chunk-aligned blocks (pure numpy).

One grid per image level (docs/architecture.md, invariant 1): patch ``a`` along an axis has its origin at
``a · stride_px`` and covers output cells ``a … a + k − 1`` where ``k = patch_px / stride_px``.
Output cell ``i`` covers level pixels ``[i·s, (i+1)·s)``.

Border policy: patch origins run from 0 while the previous patch has not yet reached the image
edge, so the last patch may extend past the bottom/right edge (by at most ``stride_px − 1``
pixels: ``ceil((H − P) / s) · s − (H − P)``); readers fill that part with the model's ``pad_value`` (background). Every image pixel is
covered by at least one patch, cells near the top/left edge by fewer patches than interior ones,
and the grid never depends on blocks, workers or order. Images smaller than one patch are refused.
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
    def patches_shape(self) -> tuple[int, int]:
        """Number of patch origins along (y, x)."""

        def n(size: int) -> int:
            return -(-(size - self.patch_px) // self.stride_px) + 1

        return (n(self.height_px), n(self.width_px))

    @property
    def n_patches(self) -> int:
        py, px = self.patches_shape
        return py * px

    def patch_box(self, a: int, b: int) -> Box:
        """Level-pixel box of patch (a, b) (may extend past the bottom/right edge)."""
        return Box(a * self.stride_px, b * self.stride_px, self.patch_px, self.patch_px)

    def patches_touching(self, cells: Box) -> Box:
        """Range of patch indices whose patches cover at least one cell of ``cells``."""
        py, px = self.patches_shape
        a0 = max(0, cells.y - self.k + 1)
        b0 = max(0, cells.x - self.k + 1)
        a1 = min(py, cells.y1)
        b1 = min(px, cells.x1)
        return Box(a0, b0, a1 - a0, b1 - b0)

    def covered_cells(self, valid: np.ndarray) -> np.ndarray:
        """(cells_h, cells_w) bool: the cells at least one ``valid`` patch covers (patch (a, b) covers
        cells [a, a + k) × [b, b + k)). With positive blending weights these, and only these, get a value."""
        k = self.k
        ch, cw = self.cells_shape
        py, px = valid.shape
        v = np.zeros((ch + k, cw + k), np.int64)
        v[k : k + min(py, ch), k : k + min(px, cw)] = valid[:ch, :cw]
        c = v.cumsum(0).cumsum(1)
        # number of valid origins in [i − k + 1, i] × [j − k + 1, j]: a box sum of the padded integral image
        box = c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]
        return box > 0

    def read_box(self, patches: Box) -> Box:
        """Level-pixel box containing every patch of a patch-index range."""
        s = self.stride_px
        return Box(patches.y * s, patches.x * s, (patches.h - 1) * s + self.patch_px, (patches.w - 1) * s + self.patch_px)


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
