"""Small value types shared by every layer: boxes, pyramid levels, blocks.

Axis order is always (y, x); a :class:`Box` is ``(y, x, h, w)`` in the pixels of the level it
belongs to. Conversion from readers' (x, y) conventions happens once, in ``slidescore.io``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """An axis-aligned rectangle ``[y, y + h) × [x, x + w)``."""

    y: int
    x: int
    h: int
    w: int

    @property
    def y1(self) -> int:
        return self.y + self.h

    @property
    def x1(self) -> int:
        return self.x + self.w

    def clip(self, height: int, width: int) -> Box:
        """The part of the box inside ``[0, height) × [0, width)`` (may be empty)."""
        y0, x0 = max(self.y, 0), max(self.x, 0)
        y1, x1 = min(self.y1, height), min(self.x1, width)
        return Box(y0, x0, max(0, y1 - y0), max(0, x1 - x0))

    @property
    def empty(self) -> bool:
        return self.h <= 0 or self.w <= 0


@dataclass(frozen=True)
class LevelInfo:
    """One pyramid level: its shape and its downsample factor relative to level 0."""

    index: int
    height: int
    width: int
    downsample: float


@dataclass(frozen=True)
class Block:
    """A unit of work: the output cells it owns and the patches it must score.

    ``cells`` is in output-cell coordinates (one cell = ``stride_px`` level pixels) and is aligned
    to the mosaic chunks, so no other block writes those chunks. ``patches`` is the range of
    patch-grid indices whose patches touch ``cells``; ``read`` is the level-pixel box that contains
    all of them (it may extend past the image, where the reader pads).
    """

    index: int
    row: int
    col: int
    cells: Box
    patches: Box
    read: Box

    @property
    def key(self) -> str:
        return f"{self.row}_{self.col}"


def group_runs(flags: np.ndarray | np.bool_, size: int = 1) -> list[tuple[int, int]]:
    """Runs ``[g0, g1)`` of consecutive groups of ``size`` entries of a 1-D bool array that hold a True (the
    last group may be short): the columns, chunks or tiles a sparse slide's work is confined to."""
    flags = np.atleast_1d(np.asarray(flags, bool))
    idx = np.flatnonzero(np.pad(flags, (0, -len(flags) % size)).reshape(-1, size).any(axis=1))
    if not idx.size:
        return []
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts, ends = idx[np.r_[0, breaks + 1]], idx[np.r_[breaks, len(idx) - 1]] + 1
    return list(zip(starts.tolist(), ends.tolist(), strict=True))
