"""Data-quality flags of a sample: what in the input could make its scores untrustworthy.

Measured on tiles of ``tile_px`` pixels of one low-resolution level (the coarsest at or finer than
``quality_mpp`` µm/px), read block by block so memory stays bounded whatever the image size, and
only where a survey of a coarser level finds tissue (:func:`measure_tiles`), so the cost follows the
foreground, not the canvas:

* ``blank_fraction`` — tiles with almost no foreground (brightfield rule of :mod:`slidescore.core.mask`);
* ``dark_fraction`` — tiles whose mean brightness is below ``dark_gray`` (pen, folds, off-slide);
* ``out_of_focus_fraction`` — foreground tiles whose variance of the Laplacian of brightness is
  below ``focus_min_laplacian_var`` (blur removes the high frequencies the Laplacian measures);
* ``stain_shift`` — how far the mean colour of foreground tiles is from the model's training data,
  in the card's normalisation units (``max_c |mean_c − card.mean_c| / card.std_c``); skipped for
  cards with the generic normalisation (0.5 ± 0.25), which carry no training statistics;
* ``background_brightness`` — mean brightness of blank tiles (dim illumination, no white balance);
* ``mpp_overridden`` — the resolution came from the config, not the image's metadata.

Every check is returned, raised or not, as a :class:`~slidescore.stages.records.QualityFlag`
(``{flag, value, threshold, raised, message}`` in run.json), so run.json and the report show what
was checked and never hide a problem.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from slidescore.core.mask import detect_foreground
from slidescore.core.types import Box
from slidescore.io import SlideReader
from slidescore.stages.records import QualityFlag, SampleRecord

_LUMA = np.array([0.299, 0.587, 0.114], np.float32)
_GENERIC_NORM = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


@dataclass(frozen=True)
class QualityThresholds:
    """Limits of the checks (defaults measured on the synthetic smears and their blurred copies)."""

    quality_mpp: float = 1.0
    tile_px: int = 64
    blank_tile_fg: float = 0.02
    dark_gray: float = 60.0
    focus_tile_fg: float = 0.5
    focus_min_laplacian_var: float = 150.0
    max_blank_fraction: float = 0.9
    max_dark_fraction: float = 0.05
    max_out_of_focus_fraction: float = 0.25
    max_stain_shift: float = 1.0
    min_background_gray: float = 170.0


@dataclass
class TileStats:
    """Per-tile measurements (1-D arrays, one entry per tile)."""

    n_px: np.ndarray
    fg_frac: np.ndarray
    gray: np.ndarray
    lap_var: np.ndarray
    rgb_mean: np.ndarray  # (n, 3), 0–255
    level: int
    level_mpp: float

    @staticmethod
    def concat(parts: list[TileStats], level: int, level_mpp: float) -> TileStats:
        def cat(key: str) -> np.ndarray:
            return np.concatenate([getattr(p, key) for p in parts])

        return TileStats(cat("n_px"), cat("fg_frac"), cat("gray"), cat("lap_var"), cat("rgb_mean"), level=level, level_mpp=level_mpp)


def _gray(rgb: np.ndarray) -> np.ndarray:
    """Brightness (ITU-R 601 luma) per pixel in float32, pixel by pixel: the same value for a pixel whatever
    the array around it (a matrix product's rounding depends on the array's shape and alignment)."""
    gray = rgb[..., 0].astype(np.float32) * _LUMA[0]
    gray += rgb[..., 1].astype(np.float32) * _LUMA[1]
    gray += rgb[..., 2].astype(np.float32) * _LUMA[2]
    return gray


def tile_stats(rgb: np.ndarray, tile_px: int, *, min_saturation: float = 0.08, max_brightness: float = 0.85,
               focus: bool = True, crop: tuple[int, int, int, int] | None = None) -> TileStats:
    """Measure the tiles of one (h, w, 3) uint8 block; partial tiles at the edge measure what they have.

    Counts and colour sums are whole numbers, summed exactly in integers; brightness is summed per tile
    in float32. ``focus=False`` skips the Laplacian (``lap_var`` is 0): what a survey of blank tiles needs.
    ``crop`` (top, left, h, w): measure that part of ``rgb``, whose pixels around it only feed the Laplacian.
    """
    gray = _gray(rgb)
    lap = ndimage.laplace(gray, mode="reflect") if focus else None
    if crop is not None:
        top, left, ch, cw = crop
        rgb, gray = rgb[top : top + ch, left : left + cw], gray[top : top + ch, left : left + cw]
        lap = lap[top : top + ch, left : left + cw] if lap is not None else None
    h, w = rgb.shape[:2]
    fg = detect_foreground(rgb, "brightfield", min_saturation=min_saturation, max_brightness=max_brightness)
    th, tw = -(-h // tile_px), -(-w // tile_px)

    def tiles(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
        pad = np.full((th * tile_px, tw * tile_px, *a.shape[2:]), fill, np.float32)
        pad[:h, :w] = a
        return pad.reshape(th, tile_px, tw, tile_px, *a.shape[2:]).swapaxes(1, 2).reshape(th * tw, tile_px * tile_px, *a.shape[2:])

    def counts(a: np.ndarray) -> np.ndarray:  # exact per-tile sums of small whole numbers, as float32
        pad = np.zeros((th * tile_px, tw * tile_px, *a.shape[2:]), a.dtype)
        pad[:h, :w] = a
        rows = pad.reshape(th, tile_px, -1).sum(axis=1, dtype=np.uint32)  # a tile's rows first: whole-row vector adds
        sums = rows.reshape(th, tw, tile_px, *a.shape[2:]).sum(axis=2, dtype=np.int64)
        return sums.reshape(th * tw, *a.shape[2:]).astype(np.float32)

    n = np.outer(np.minimum(tile_px, h - np.arange(th) * tile_px), np.minimum(tile_px, w - np.arange(tw) * tile_px))
    n = n.astype(np.float32).ravel()
    if lap is not None:
        lap_t = tiles(lap)
        mean_lap = lap_t.sum(axis=1) / n
        lap_var = np.maximum((lap_t**2).sum(axis=1) / n - mean_lap**2, 0)
    else:
        lap_var = np.zeros(th * tw, np.float32)
    return TileStats(
        n_px=n,
        fg_frac=counts(fg) / n,
        gray=tiles(gray).sum(axis=1) / n,
        lap_var=lap_var,
        rgb_mean=counts(rgb[..., :3]) / n[:, None],
        level=0,
        level_mpp=0.0,
    )


def quality_level(reader: SlideReader, mpp0: float, quality_mpp: float) -> int:
    """The coarsest level at or finer than ``quality_mpp`` (the finest level if all are coarser)."""
    mpps = [mpp0 * lv.downsample for lv in reader.levels]
    fine_enough = [i for i, m in enumerate(mpps) if m <= quality_mpp * 1.01]
    return max(fine_enough, key=lambda i: mpps[i]) if fine_enough else int(np.argmin(mpps))


def measure_tiles(reader: SlideReader, mpp0: float, th: QualityThresholds | None = None, *, block_px: int = 1024,
                  max_survey_ratio: int = 16) -> TileStats:
    """Tile statistics of the image at the quality level, read in ``block_px`` squares where there is tissue.

    A survey of a coarser level (up to ``max_survey_ratio``× coarser, one read of a few megapixels)
    says which tiles may not be blank; only those, with a ring of one tile around them, are read at the
    quality level. The other tiles are blank by the survey (less than half of ``blank_tile_fg`` foreground at
    the coarse level) and not dark: they enter the statistics with their area and the brightness the
    survey measured. A sparse slide therefore costs in proportion to its tissue; an image without a
    coarse enough level is read whole at the quality level, as before.
    """
    th = th or QualityThresholds()
    lvl = quality_level(reader, mpp0, th.quality_mpp)
    info = reader.levels[lvl]
    step = max(th.tile_px, block_px // th.tile_px * th.tile_px)  # blocks hold whole tiles
    survey = _survey(reader, lvl, th.tile_px, step, max_survey_ratio)
    grid = _SurveyGrid(survey[0], survey[1], th.tile_px, info.height, info.width, step) if survey is not None else None
    parts = []
    for y in range(0, info.height, step):
        for x in range(0, info.width, step):
            box = Box(y, x, min(step, info.height - y), min(step, info.width - x))
            if grid is not None:
                stats = grid.block(box)
                if len(stats.n_px) == -(-box.h // th.tile_px) * -(-box.w // th.tile_px):  # else: read the whole block
                    hot = stats.fg_frac >= th.blank_tile_fg / 2
                    # blank by the survey: not read again; else only its tiles that may hold tissue
                    parts.append(_measure_hot_tiles(reader, lvl, box, stats, hot, th) if hot.any() else
                                 _blank_tiles(stats, box, th.tile_px))
                    continue
            parts.append(tile_stats(_read_rgb(reader, lvl, box), th.tile_px))
    return TileStats.concat(parts, lvl, mpp0 * info.downsample)


def _read_rgb(reader: SlideReader, lvl: int, box: Box) -> np.ndarray:
    pix = np.asarray(reader.read(lvl, box))
    if pix.shape[-1] == 1:
        pix = np.repeat(pix, 3, axis=-1)
    return pix[..., :3].astype(np.uint8, copy=False)


def _measure_hot_tiles(reader: SlideReader, lvl: int, box: Box, coarse: TileStats, hot: np.ndarray,
                       th: QualityThresholds) -> TileStats:
    """The tiles of a block that the survey finds tissue in, and a ring of one tile around them, measured at
    the quality level (read with a one-pixel margin inside the block, so each tile's Laplacian is the one the
    whole block gives); the block's other tiles are blank by the survey, as a blank block's are."""
    t = th.tile_px
    ty, tx = -(-box.h // t), -(-box.w // t)
    rows, cols = np.nonzero(hot.reshape(ty, tx))
    r0, r1 = max(0, int(rows.min()) - 1), min(ty, int(rows.max()) + 2)
    c0, c1 = max(0, int(cols.min()) - 1), min(tx, int(cols.max()) + 2)
    y0, y1, x0, x1 = r0 * t, min(box.h, r1 * t), c0 * t, min(box.w, c1 * t)
    my0, mx0, my1, mx1 = min(1, y0), min(1, x0), min(1, box.h - y1), min(1, box.w - x1)
    pix = _read_rgb(reader, lvl, Box(box.y + y0 - my0, box.x + x0 - mx0, y1 - y0 + my0 + my1, x1 - x0 + mx0 + mx1))
    part = tile_stats(pix, t, crop=(my0, mx0, y1 - y0, x1 - x0))
    blank = _blank_tiles(coarse, box, t)
    idx = (np.arange(r0, r1)[:, None] * tx + np.arange(c0, c1)[None, :]).ravel()
    fields = {}
    for key in ("n_px", "fg_frac", "gray", "lap_var", "rgb_mean"):
        fields[key] = getattr(blank, key).copy()  # (blank tiles share one array of zeros)
        fields[key][idx] = getattr(part, key)
    return TileStats(**fields, level=0, level_mpp=0.0)


def _survey(reader: SlideReader, lvl: int, tile_px: int, step: int, max_ratio: int) -> tuple[np.ndarray, int] | None:
    """The coarsest level ``r``× coarser than ``lvl`` (r a power of two, 4 ≤ r ≤ ``max_ratio``, dividing the
    tile and block sizes) read whole as RGB, with ``r``; ``None`` when there is none.

    A level is ``r``× coarser when its size is that of ``lvl`` divided by ``r``, rounded either way (pyramids
    halve odd sizes up or down, so its downsample is only about ``r``: 25,000 px → 1,563 px is 15.995×); its
    pixel ``i`` then covers pixels ``[i·r, (i + 1)·r)`` of ``lvl``. A level rounded down lacks the last
    partial pixel: blocks at that edge are read whole at the quality level (:func:`measure_tiles`)."""
    q = reader.levels[lvl]
    best = None
    for lv in reader.levels:
        r = int(round(lv.downsample / q.downsample))
        if r < 4 or r > max_ratio or r & (r - 1) or tile_px % r or step % r:
            continue
        if lv.height not in (q.height // r, -(-q.height // r)) or lv.width not in (q.width // r, -(-q.width // r)):
            continue
        if best is None or r > best[1]:
            best = (lv.index, r)
    if best is None:
        return None
    lv = reader.levels[best[0]]
    pix = np.asarray(reader.read(lv.index, Box(0, 0, lv.height, lv.width)))
    if pix.shape[-1] == 1:
        pix = np.repeat(pix, 3, axis=-1)
    return pix[..., :3].astype(np.uint8, copy=False), best[1]


class _SurveyGrid:
    """The survey's tile statistics, measured once over the whole coarse image and cut per block.

    The coarse image is cropped to the extent the quality level's blocks cover (``⌈h / r⌉ × ⌈w / r⌉``), so
    every block's coarse tiles are whole tiles of this one grid (blocks hold whole tiles, ``r`` divides the
    tile): a block's statistics are bit for bit those of :func:`tile_stats` on its own slice of the coarse
    image (every tile sums the same pixels in the same order), at one pass over the survey instead of one
    call per block — a sparse giant slide has hundreds of blank blocks.
    """

    def __init__(self, coarse: np.ndarray, r: int, tile_px: int, height: int, width: int, step: int) -> None:
        self.r, self.tc = r, tile_px // r
        coarse = coarse[: -(-height // r), : -(-width // r)]
        self.shape = coarse.shape[:2]
        self.ty, self.tx = -(-self.shape[0] // self.tc), -(-self.shape[1] // self.tc)
        band = step // r  # one row of blocks at a time: temporaries of a band, not of the whole survey
        # blank tiles need no sharpness (focus off)
        parts = [tile_stats(coarse[y : y + band], self.tc, focus=False) for y in range(0, self.shape[0], band)]
        self.stats = TileStats.concat(parts, 0, 0.0)

    def block(self, box: Box) -> TileStats:
        """The coarse tiles of ``box`` (quality-level pixels), row-major, as :func:`tile_stats` of its slice gives them."""
        cy, cx = box.y // self.r, box.x // self.r
        y1 = min(self.shape[0], cy + -(-box.h // self.r))
        x1 = min(self.shape[1], cx + -(-box.w // self.r))
        rows = np.arange(cy // self.tc, -(-y1 // self.tc))
        cols = np.arange(cx // self.tc, -(-x1 // self.tc))
        idx = (rows[:, None] * self.tx + cols[None, :]).ravel()
        s = self.stats
        return TileStats(s.n_px[idx], s.fg_frac[idx], s.gray[idx], s.lap_var[idx], s.rgb_mean[idx], level=0, level_mpp=0.0)


def _blank_tiles(coarse: TileStats, box: Box, tile_px: int) -> TileStats:
    """The tiles of ``box`` (quality-level pixels) as blank, from their survey statistics: the area of each tile at
    the quality level, no foreground, the surveyed brightness and colour, no measured sharpness."""
    ty, tx = -(-box.h // tile_px), -(-box.w // tile_px)
    hs = np.minimum(tile_px, box.h - np.arange(ty) * tile_px)
    ws = np.minimum(tile_px, box.w - np.arange(tx) * tile_px)
    n_px = np.outer(hs, ws).astype(np.float32).ravel()
    n = len(n_px)
    if len(coarse.gray) != n:  # the coarse level rounds its size differently: one brightness for the block
        gray = np.full(n, float(np.average(coarse.gray, weights=coarse.n_px)), np.float32)
        rgb = np.tile(np.average(coarse.rgb_mean, axis=0, weights=coarse.n_px).astype(np.float32), (n, 1))
    else:
        gray, rgb = coarse.gray, coarse.rgb_mean
    zeros = np.zeros(n, np.float32)
    return TileStats(n_px, zeros, gray, zeros, rgb, level=0, level_mpp=0.0)


def _flag(flag: str, value: float | str | None, threshold: float | str | None, raised: bool, message: str) -> QualityFlag:
    return QualityFlag(flag=flag, value=value, threshold=threshold, raised=bool(raised), message=message)


def quality_flags(stats: TileStats, run: SampleRecord | Mapping[str, Any], card: Any,
                  th: QualityThresholds | None = None) -> list[QualityFlag]:
    """Evaluate every check on measured tiles and the run record (of one image); one flag per check."""
    th = th or QualityThresholds()
    w = stats.n_px / max(1.0, float(stats.n_px.sum()))  # partial edge tiles weigh less
    blank = stats.fg_frac < th.blank_tile_fg
    dark = stats.gray < th.dark_gray
    focus_tiles = (stats.fg_frac >= th.focus_tile_fg) & ~dark
    where = f"at level {stats.level} ({stats.level_mpp:.3g} µm/px), {th.tile_px}-px tiles"
    flags = []

    v = float(w[blank].sum())
    flags.append(_flag("blank_fraction", round(v, 4), th.max_blank_fraction, v > th.max_blank_fraction,
                       f"{v:.1%} of the image is blank {where}; "
                       + ("check the scan (empty slide, wrong focus plane) or the mask settings" if v > th.max_blank_fraction else "ok")))
    v = float(w[dark].sum())
    flags.append(_flag("dark_fraction", round(v, 4), th.max_dark_fraction, v > th.max_dark_fraction,
                       f"{v:.1%} of the image is dark (mean brightness < {th.dark_gray:g}/255) {where}; "
                       + ("pen marks, folds, bubbles or off-slide areas may be scored" if v > th.max_dark_fraction else "ok")))
    if focus_tiles.any():
        blurred = focus_tiles & (stats.lap_var < th.focus_min_laplacian_var)
        v = float(w[blurred].sum() / w[focus_tiles].sum())
        flags.append(_flag("out_of_focus_fraction", round(v, 4), th.max_out_of_focus_fraction, v > th.max_out_of_focus_fraction,
                           f"{v:.1%} of foreground tiles look out of focus (variance of the Laplacian < "
                           f"{th.focus_min_laplacian_var:g}; median {float(np.median(stats.lap_var[focus_tiles])):.3g}) {where}; "
                           + ("rescan the blurred areas or treat their scores with caution" if v > th.max_out_of_focus_fraction else "ok")))
    else:
        flags.append(_flag("out_of_focus_fraction", None, th.max_out_of_focus_fraction, False,
                           f"not measured: no tile is at least {th.focus_tile_fg:.0%} foreground {where}"))

    mean, std = tuple(card.mean), tuple(card.std)
    fg_tiles = stats.fg_frac >= th.focus_tile_fg
    if len(mean) != 3 or (mean, std) == _GENERIC_NORM:
        flags.append(_flag("stain_shift", None, th.max_stain_shift, False,
                           "not measured: the model card carries no training colour statistics (generic 0.5 ± 0.25 normalisation)"))
    elif not fg_tiles.any():
        flags.append(_flag("stain_shift", None, th.max_stain_shift, False, f"not measured: no foreground tiles {where}"))
    else:
        rgb = (stats.rgb_mean[fg_tiles] * w[fg_tiles, None]).sum(axis=0) / w[fg_tiles].sum() / 255.0
        z = np.abs(rgb - np.asarray(mean)) / np.asarray(std)
        v = float(z.max())
        flags.append(_flag("stain_shift", round(v, 3), th.max_stain_shift, v > th.max_stain_shift,
                           f"foreground mean RGB {tuple(round(float(c) * 255) for c in rgb)} vs the model's training mean "
                           f"{tuple(round(c * 255) for c in mean)}: {v:.2f} training standard deviations (largest channel); "
                           + ("unusual stain or brightness for this model: check staining, scanner colour profile, or recalibrate"
                              if v > th.max_stain_shift else "ok")))
    if blank.any():
        v = float((stats.gray[blank] * w[blank]).sum() / w[blank].sum())
        flags.append(_flag("background_brightness", round(v, 1), th.min_background_gray, v < th.min_background_gray,
                           f"blank areas have mean brightness {v:.0f}/255; "
                           + ("dim illumination or missing white balance: the mask and the model may misjudge the sample"
                              if v < th.min_background_gray else "ok")))
    else:
        flags.append(_flag("background_brightness", None, th.min_background_gray, False, f"not measured: no blank tiles {where}"))

    inp = SampleRecord.of(run).image_input
    src = str(inp.mpp_source)
    overridden = src.startswith("config")
    mpp0 = inp.mpp0
    flags.append(_flag("mpp_overridden", src, "config", overridden,
                       f"resolution {mpp0} µm/px taken from {src or 'unknown'}; "
                       + ("the image's own metadata was missing or overridden — verify the scanner's µm/px"
                          if overridden else "read from the image metadata")))
    return flags


def check_quality(reader: SlideReader, run: SampleRecord, card: Any, th: QualityThresholds | None = None) -> list[QualityFlag]:
    """Measure the image behind ``reader`` and evaluate every check (see the module docstring)."""
    mpp0 = float(run.image_input.mpp0 or reader.mpp or 1.0)
    return quality_flags(measure_tiles(reader, mpp0, th), run, card, th)


def sample_quality(reader: SlideReader, run: SampleRecord | Mapping[str, Any], card: Any,
                   th: QualityThresholds | None = None) -> list[dict[str, Any]]:
    """:func:`check_quality` as run.json records it (one dict per check); ``run`` may be a run.json's dict."""
    return [f.to_dict() for f in check_quality(reader, SampleRecord.of(run), card, th)]
