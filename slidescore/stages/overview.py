"""``overview.png``: a thumbnail of the sample with the probability overlay and region outlines.

What a person wants to see first: where the model fired. The thumbnail comes from the finest
source level at most ``max_px`` on its long side (or the coarsest level, if all are larger, read in
strips and decimated as they come, so memory stays at one strip), the overlay is the
first class's probability (transparent where low or not scored) in that class's colour from the
model card — the colour the mosaic, the report, QuPath, napari and the web viewer use — and the top
regions are drawn as numbered boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import imagecodecs
import numpy as np
from PIL import Image, ImageDraw

from slidescore.core.regions import Region
from slidescore.core.types import Box
from slidescore.io.base import SlideReader
from slidescore.io.outputs import write_bytes


def render_overview(
    reader: SlideReader,
    prob: np.ndarray,
    cell_px0: float,
    regions: Sequence[Region] | Callable[[], Sequence[Region]],
    path: str | Path,
    *,
    color: tuple[int, int, int] = (0, 150, 255),
    max_px: int = 1024,
    top: int = 20,
) -> None:
    """Write the overview PNG to ``path`` (local or URL). ``prob`` is one class's cell map (NaN = not scored).

    ``regions`` may be a function returning them, called only when the boxes are drawn: the
    thumbnail and its overlay can then be made while the regions are still being found.
    """
    levels = reader.levels
    fits = [lv for lv in levels if max(lv.height, lv.width) <= max_px]
    lv = max(fits, key=lambda v: v.width) if fits else min(levels, key=lambda v: v.width)
    step = max(1, int(np.ceil(max(lv.height, lv.width) / max_px)))
    # strips of the level, decimated as they come: memory stays at one strip even when no level is small
    strips = [np.asarray(reader.read(lv.index, Box(y, 0, min(2048, lv.height - y), lv.width)))[(-y) % step :: step, ::step]
              for y in range(0, lv.height, 2048)]
    thumb = np.concatenate(strips, axis=0) if len(strips) > 1 else strips[0]
    if thumb.shape[-1] == 1:
        thumb = np.repeat(thumb, 3, axis=-1)
    thumb = thumb[..., :3].astype(np.float32)
    if thumb.dtype != np.uint8 and thumb.max() > 255:
        thumb = thumb / thumb.max() * 255
    h, w = thumb.shape[:2]
    px0 = lv.downsample * step  # level-0 pixels per thumbnail pixel
    yy = np.minimum((np.arange(h) * px0 / cell_px0).astype(int), prob.shape[0] - 1)
    xx = np.minimum((np.arange(w) * px0 / cell_px0).astype(int), prob.shape[1] - 1)
    p = np.nan_to_num(prob[np.ix_(yy, xx)], nan=0.0)
    keep = 1 - np.clip((p.astype(np.float32) - 0.2) * np.float32(0.75 / 0.6), 0, 0.75)  # 1 - overlay opacity
    # thumb · keep + colour · (1 − keep), in place: colour + (thumb − colour) · keep
    c = np.asarray(color, np.float32)
    out = thumb  # a float copy of the pixels made above
    out -= c
    out *= keep[..., None]
    out += c
    img = Image.fromarray(np.clip(out, 0, 255, out=out).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for r in (regions() if callable(regions) else regions)[:top]:
        y, x, bh, bw = (v / px0 for v in r.bbox_px)
        pad = 3
        draw.rectangle([x - pad, y - pad, x + bw + pad, y + bh + pad], outline=(255, 200, 0), width=2)
        draw.text((x + bw + pad + 2, y - pad), str(r.rank), fill=(20, 20, 20))
    # fast zlib level: a tissue thumbnail barely compresses (a 1024-px smear: 2.5 MB at level 1 or 6),
    # while level 6 takes ~1.6x as long to write
    write_bytes(path, bytes(imagecodecs.png_encode(np.asarray(img), level=1)))  # local or a URL, atomically (io.outputs)
