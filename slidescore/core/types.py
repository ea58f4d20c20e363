"""Small value types shared by every layer: boxes, pyramid levels, blocks.

Axis order is always (y, x); a :class:`Box` is ``(y, x, h, w)`` in the pixels of the level it
belongs to. Conversion from readers' (x, y) conventions happens once, in ``slidescore.io``.
"""

from __future__ import annotations

from dataclasses import dataclass


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
