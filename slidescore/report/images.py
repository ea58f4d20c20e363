"""Pictures for the report: thumbnail with overlay and outlines, region crops, heat maps, data URIs.

Pure numpy + Pillow on pixels a :class:`~slidescore.io.SlideReader` returns. Coordinates follow
the rest of slidescore: boxes are ``(y, x, h, w)`` in level-0 pixels, the probability map has one
value per output cell of ``cell_px0`` level-0 pixels (NaN = not scored). Every picture is returned
as an (h, w, 3) uint8 array; :func:`data_uri` turns one into an inline ``data:`` URI, so the
report needs no side files.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from slidescore.core.regions import Region
from slidescore.core.types import Box
from slidescore.io import SlideReader

OUTLINE_RGB = (255, 200, 0)  # thresholded-area outline, region boxes and peak markers: amber reads on pink and on the class colours


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """(h, w, c) pixels of any of 1/3/4 channels → (h, w, 3) uint8."""
    if pixels.shape[-1] == 1:
        pixels = np.repeat(pixels, 3, axis=-1)
    return np.ascontiguousarray(pixels[..., :3]).astype(np.uint8, copy=False)


def thumbnail(reader: SlideReader, max_px: int = 1024) -> tuple[np.ndarray, float]:
    """The whole image at most ``max_px`` on its long side; returns (rgb, level-0 px per thumb px)."""
    levels = reader.levels
    fits = [lv for lv in levels if max(lv.height, lv.width) <= max_px]
    lv = max(fits, key=lambda v: v.width) if fits else min(levels, key=lambda v: v.width)
    step = max(1, int(np.ceil(max(lv.height, lv.width) / max_px)))
    rows = []
    for y in range(0, lv.height, 2048):  # strips keep peak memory at one strip of the level
        h = min(2048, lv.height - y)
        rows.append(np.asarray(reader.read(lv.index, Box(y, 0, h, lv.width)))[(-y) % step :: step, ::step])
    return to_rgb(np.concatenate(rows, axis=0)), lv.downsample * step


def cells_at(prob: np.ndarray, shape: tuple[int, int], px0: float, cell_px0: float, origin_px0: tuple[float, float] = (0, 0)) -> np.ndarray:
    """Sample a cell map (NaN kept) at every pixel of a picture of ``shape``.

    Picture pixel (i, j) covers level-0 pixels from ``origin + (i, j) · px0``; its value is the cell
    containing that pixel's centre (cells outside the map are NaN).
    """
    h, w = shape
    yy = np.floor((origin_px0[0] + (np.arange(h) + 0.5) * px0) / cell_px0).astype(int)
    xx = np.floor((origin_px0[1] + (np.arange(w) + 0.5) * px0) / cell_px0).astype(int)
    oky = (yy >= 0) & (yy < prob.shape[0])
    okx = (xx >= 0) & (xx < prob.shape[1])
    out = prob[np.ix_(np.clip(yy, 0, prob.shape[0] - 1), np.clip(xx, 0, prob.shape[1] - 1))].astype(np.float32)
    out[~oky, :] = np.nan
    out[:, ~okx] = np.nan
    return out


def overlay(rgb: np.ndarray, p: np.ndarray, color: tuple[int, int, int], *, low: float = 0.2, high: float = 0.8,
            opacity: float = 0.75) -> np.ndarray:
    """Tint ``rgb`` with ``color`` in proportion to the per-pixel probability ``p`` (NaN = none)."""
    alpha = np.clip((np.nan_to_num(p, nan=0.0) - low) / (high - low), 0, 1)[..., None] * opacity
    out = rgb.astype(np.float32) * (1 - alpha) + np.asarray(color, np.float32) * alpha
    return np.clip(out, 0, 255).astype(np.uint8)


def outline(rgb: np.ndarray, above: np.ndarray, color: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """Draw the boundary pixels of the boolean mask ``above`` onto a copy of ``rgb``."""
    edge = above & ~ndimage.binary_erosion(above, border_value=0)
    out = rgb.copy()
    out[edge] = color
    return out


FONTS = ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "DejaVuSans-Bold.ttf", "/Library/Fonts/Arial Bold.ttf")
LABEL_PX = 16  # rank numbers and scale-bar labels: text height in picture pixels (>= 14 px, outlined)


def font(size: int = LABEL_PX) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """DejaVu Sans Bold at ``size`` px where installed (it has µ), else Pillow's bundled scalable font (the 11-px
    bitmap font where FreeType is missing)."""
    for path in FONTS:
        try:
            return ImageFont.truetype(path, size)
        except (OSError, ImportError):
            continue
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def draw_boxes(rgb: np.ndarray, regions: list[Region], px0: float, origin_px0: tuple[float, float] = (0, 0),
               color: tuple[int, int, int] = OUTLINE_RGB, labels: bool = True, label_px: int = LABEL_PX) -> np.ndarray:
    """Numbered region boxes (level-0 ``bbox_px``) drawn on a picture at ``px0`` level-0 px per px.

    Rank numbers are ``label_px`` high, black with a white outline, so they read on any background."""
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    f = font(label_px)
    for r in regions:
        y, x, h, w = r.bbox_px
        y0, x0 = (y - origin_px0[0]) / px0, (x - origin_px0[1]) / px0
        y1, x1 = y0 + h / px0, x0 + w / px0
        pad = 2
        draw.rectangle([x0 - pad, y0 - pad, x1 + pad, y1 + pad], outline=color, width=2)
        if labels:
            text = str(r.rank)
            tw = draw.textlength(text, font=f)
            tx = x1 + pad + 3 if x1 + pad + 3 + tw < img.width else max(0.0, x0 - pad - 3 - tw)
            ty = min(max(0.0, y0 - pad), max(0.0, img.height - label_px - 4))
            draw.text((tx, ty), text, fill=(0, 0, 0), font=f, stroke_width=2, stroke_fill=(255, 255, 255))
    return np.asarray(img)


def nice_length(target: float) -> float:
    """The round number (1, 2 or 5 × 10^k) at or below ``target`` (> 0)."""
    k = np.floor(np.log10(target))
    for m in (5.0, 2.0, 1.0):
        if m * 10**k <= target:
            return float(m * 10**k)
    return float(10**k)


def scale_bar(rgb: np.ndarray, um_per_px: float, *, frac: float = 0.2, label_px: int = LABEL_PX,
              margin: int = 10) -> tuple[np.ndarray, dict[str, float]]:
    """A scale bar (a round number of µm, about ``frac`` of the width) in the bottom-left corner.

    The bar is black, 4 px thick, on a white backing with its label above it. Returns the picture
    and the bar: ``{"um", "px", "row", "x0"}`` (``row``: a pixel row through the bar)."""
    h, w = rgb.shape[:2]
    um = nice_length(max(um_per_px, frac * w * um_per_px))
    px = max(1, int(round(um / um_per_px)))
    # field images (metres per pixel) get m and km, not millions of mm
    label = (f"{um:g} µm" if um < 1000 else f"{um / 1e3:g} mm" if um < 1e6 else f"{um / 1e6:g} m" if um < 1e9
             else f"{um / 1e9:g} km")
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    f = font(label_px)
    tw = draw.textlength(label, font=f)
    x0, y1 = margin, h - margin
    y0 = y1 - 4
    draw.rectangle([x0 - 4, y0 - label_px - 10, x0 + max(px, tw) + 4, y1 + 4], fill=(255, 255, 255))
    draw.rectangle([x0, y0, x0 + px - 1, y1 - 1], fill=(0, 0, 0))
    draw.text((x0, y0 - label_px - 5), label, fill=(0, 0, 0), font=f)
    return np.asarray(img), {"um": um, "px": float(px), "row": float(y0 + 2), "x0": float(x0)}


def peak_marker(rgb: np.ndarray, yx: tuple[float, float], *, radius: int = 14, color: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
    """One marker on a point: an open ring (amber inside a dark line) with four short ticks, its centre left clear."""
    img = Image.fromarray(rgb)
    draw = ImageDraw.Draw(img)
    y, x = yx
    for width, col, rr in ((5, (0, 0, 0), radius), (3, color, radius)):
        draw.ellipse([x - rr, y - rr, x + rr, y + rr], outline=col, width=width)
    for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        a, b = radius + 2, radius + 8
        draw.line([x + dx * a, y + dy * a, x + dx * b, y + dy * b], fill=color, width=3)
    return np.asarray(img)


def magnify(rgb: np.ndarray, factor: int) -> np.ndarray:
    """``rgb`` enlarged ``factor`` times (bicubic: chromatin dots stay round and visible)."""
    h, w = rgb.shape[:2]
    return np.asarray(Image.fromarray(rgb).resize((w * factor, h * factor), Image.Resampling.BICUBIC))


def crop_box(region: Region, image_hw: tuple[int, int], *, min_px: int = 192, max_px: int = 512, margin_px: int = 32) -> Box:
    """The level-0 box shown for a region: its bounding box plus a margin, at least ``min_px`` and
    at most ``max_px`` on a side (centred on the peak when the region is larger), inside the image."""
    y, x, h, w = region.bbox_px
    size_h = int(np.clip(h + 2 * margin_px, min_px, max_px))
    size_w = int(np.clip(w + 2 * margin_px, min_px, max_px))
    cy = region.peak_px[0] if h + 2 * margin_px > max_px else y + h / 2
    cx = region.peak_px[1] if w + 2 * margin_px > max_px else x + w / 2
    hh, ww = image_hw
    size_h, size_w = min(size_h, hh), min(size_w, ww)
    y0 = int(np.clip(round(cy - size_h / 2), 0, hh - size_h))
    x0 = int(np.clip(round(cx - size_w / 2), 0, ww - size_w))
    return Box(y0, x0, size_h, size_w)


def heat_rgb(v: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → a perceptually ordered dark-blue → red → yellow ramp (uint8 RGB)."""
    v = np.clip(np.nan_to_num(v, nan=0.0), 0, 1)
    r = np.clip(2.0 * v, 0, 1)
    g = np.clip(2.0 * v - 0.8, 0, 1)
    b = np.clip(0.5 - np.abs(v - 0.25) * 2, 0, 1) + np.clip(v - 0.9, 0, 1) * 5
    return (np.stack([r, g, np.clip(b, 0, 1)], axis=-1) * 255).astype(np.uint8)


def heat_on(rgb: np.ndarray, v: np.ndarray, opacity: float = 0.6) -> np.ndarray:
    """A heat map blended over a picture (weight grows with the value, so cold areas stay visible)."""
    a = (np.clip(np.nan_to_num(v, nan=0.0), 0, 1) * opacity)[..., None]
    return np.clip(rgb.astype(np.float32) * (1 - a) + heat_rgb(v).astype(np.float32) * a, 0, 255).astype(np.uint8)


def resize(rgb: np.ndarray, shape: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Resize an RGB or single-channel float picture to (h, w)."""
    h, w = shape
    if rgb.dtype == np.uint8:
        res = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
        return np.asarray(Image.fromarray(rgb).resize((w, h), res))
    img = Image.fromarray(np.ascontiguousarray(rgb, np.float32))  # float32 → mode "F"
    return np.asarray(img.resize((w, h), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR), np.float32)


def data_uri(rgb: np.ndarray, fmt: str = "JPEG", quality: int = 85) -> str:
    """Encode a picture as an inline ``data:image/…;base64,`` URI (JPEG for photographs, PNG for flat art)."""
    buf = io.BytesIO()
    img = Image.fromarray(rgb)
    if fmt.upper() == "JPEG":
        img.save(buf, format="JPEG", quality=quality, optimize=True)
        mime = "jpeg"
    else:
        img.save(buf, format="PNG", optimize=True)
        mime = "png"
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")
