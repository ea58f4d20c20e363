"""The quality survey measures the coarse level once and cuts it per block, and a block with tissue is read
only around the tiles the survey finds it in (#16): the tiles measured are bit for bit what measuring the
whole block gave (its Laplacian included), on images whose sizes are not multiples of anything."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from slidescore.core.mask import detect_foreground
from slidescore.core.types import Box
from slidescore.io import open_image
from slidescore.report.quality import (
    QualityThresholds,
    TileStats,
    _blank_tiles,
    _gray,
    _survey,
    measure_tiles,
    quality_level,
)
from tests.conftest import textured_image, write_tiff


def _old_tile_stats(rgb: np.ndarray, tile_px: int, *, min_saturation: float = 0.08, max_brightness: float = 0.85) -> TileStats:
    """tile_stats as it was (float32 sums of everything, the Laplacian always): the reference."""
    h, w = rgb.shape[:2]
    fg = detect_foreground(rgb, "brightfield", min_saturation=min_saturation, max_brightness=max_brightness)
    gray = _gray(rgb)  # the one line changed: a matrix product's rounding depended on the array's shape
    lap = ndimage.laplace(gray, mode="reflect")
    th, tw = -(-h // tile_px), -(-w // tile_px)

    def tiles(a: np.ndarray, fill: float = 0.0) -> np.ndarray:
        pad = np.full((th * tile_px, tw * tile_px, *a.shape[2:]), fill, np.float32)
        pad[:h, :w] = a
        return pad.reshape(th, tile_px, tw, tile_px, *a.shape[2:]).swapaxes(1, 2).reshape(th * tw, tile_px * tile_px, *a.shape[2:])

    valid = tiles(np.ones((h, w), np.float32))
    n = valid.sum(axis=1)
    lap_t = tiles(lap)
    mean_lap = lap_t.sum(axis=1) / n
    lap_var = (lap_t**2).sum(axis=1) / n - mean_lap**2
    return TileStats(
        n_px=n,
        fg_frac=tiles(fg.astype(np.float32)).sum(axis=1) / n,
        gray=tiles(gray).sum(axis=1) / n,
        lap_var=np.maximum(lap_var, 0),
        rgb_mean=tiles(rgb[..., :3].astype(np.float32)).sum(axis=1) / n[:, None],
        level=0,
        level_mpp=0.0,
    )


PARTIAL: list[bool] = []  # per block with tissue: whether only part of it counts as measured


def _measure_block_by_block(reader, mpp0: float, th: QualityThresholds, block_px: int, max_ratio: int) -> TileStats:
    """The old tile_stats on every block's own slice of the coarse level and on whole blocks, with the
    rule of which tiles count as measured applied afterwards."""
    lvl = quality_level(reader, mpp0, th.quality_mpp)
    info = reader.levels[lvl]
    step = max(th.tile_px, block_px // th.tile_px * th.tile_px)
    coarse, r = _survey(reader, lvl, th.tile_px, step, max_ratio)
    parts = []
    for y in range(0, info.height, step):
        for x in range(0, info.width, step):
            box = Box(y, x, min(step, info.height - y), min(step, info.width - x))
            cy, cx, ch, cw = y // r, x // r, -(-box.h // r), -(-box.w // r)
            stats = _old_tile_stats(coarse[cy : cy + ch, cx : cx + cw], th.tile_px // r)
            if not (stats.fg_frac >= th.blank_tile_fg / 2).any():
                parts.append(_blank_tiles(stats, box, th.tile_px))
                continue
            pix = np.asarray(reader.read(lvl, box))[..., :3]
            whole = _old_tile_stats(pix, th.tile_px)  # every tile of the block measured, as before
            # the rule now: tiles more than one tile away from any the survey finds tissue in are blank by it
            t = th.tile_px
            ty, tx = -(-box.h // t), -(-box.w // t)
            hot = (stats.fg_frac >= th.blank_tile_fg / 2).reshape(ty, tx)
            near = ndimage.binary_dilation(hot, np.ones((3, 3), bool))
            rows, cols = np.nonzero(near)
            keep = np.zeros((ty, tx), bool)
            keep[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True  # the bounding box of the ring
            blank = _blank_tiles(stats, box, t)
            fields = {k: np.where(keep.ravel()[:, None] if k == "rgb_mean" else keep.ravel(), getattr(whole, k), getattr(blank, k))
                      for k in ("n_px", "fg_frac", "gray", "lap_var", "rgb_mean")}
            parts.append(TileStats(**fields, level=0, level_mpp=0.0))
            PARTIAL.append(not keep.all())
    return TileStats.concat(parts, lvl, mpp0 * info.downsample)


@pytest.mark.parametrize("block_px", [128, 512])
@pytest.mark.parametrize("shape", [(2000, 2320), (2048, 2048), (1104, 720)])
def test_survey_grid_equals_the_block_by_block_survey(tmp_path: Path, shape: tuple[int, int], block_px: int) -> None:
    h, w = shape
    img = np.full((h, w, 3), 233, np.uint8)
    img[h // 3 : h // 3 + 150, w // 5 : w // 5 + 170] = textured_image(150, 170, seed=3)
    img[h - 90 :, w - 60 :] = textured_image(90, 60, seed=4)  # tissue in the partial edge tiles
    img[40:100, w // 2 : w // 2 + 40] = 30  # a dark pen mark
    path = write_tiff(tmp_path / "s.tif", img, mpp=0.25, n_levels=5, compression="zlib", tile_px=128)
    th = QualityThresholds()
    reader = open_image(str(path))
    try:
        assert _survey(reader, 2, th.tile_px, block_px, 16) is not None  # levels of exact ratios: the survey runs
        new = measure_tiles(reader, 0.25, th, block_px=block_px)
        PARTIAL.clear()
        old = _measure_block_by_block(reader, 0.25, th, block_px, 16)
    finally:
        reader.close()
    assert len(new.n_px) == len(old.n_px) >= 15
    for key in ("n_px", "fg_frac", "gray", "lap_var", "rgb_mean"):
        assert np.array_equal(getattr(new, key), getattr(old, key)), key
    assert (new.fg_frac > 0).any() and (new.fg_frac == 0).any()  # both kinds of block were met
    # 2 × 2 tiles a block: the ring is the whole block; 8 × 8 with the tissue in one corner: only part of it
    assert any(PARTIAL) == (block_px == 512 and shape == (2000, 2320))


def test_a_survey_level_rounded_down_still_finds_tissue_at_its_edge(tmp_path: Path) -> None:
    """Pyramids that halve odd sizes down lose the last partial pixel at the coarse level; tissue there is
    still measured (the edge blocks are read whole at the quality level)."""
    import tifffile

    h, w = 2000, 2312  # 500 × 578 at 1 µm/px; its 4× coarser level, rounded down, is 125 × 144 (not 145)
    img = np.full((h, w, 3), 233, np.uint8)
    img[:, w - 10 :] = (120, 40, 160)  # stained tissue in the last 2.5 px at 1 µm/px: inside the lost column
    path = tmp_path / "floor.tif"
    with tifffile.TiffWriter(path) as tw:
        opts = {"tile": (128, 128), "compression": "zlib", "photometric": "rgb", "resolutionunit": "CENTIMETER"}
        tw.write(img, subifds=4, resolution=(1e4 / 0.25, 1e4 / 0.25), **opts)
        for k in range(1, 5):
            ds = 2**k
            tw.write(img[::ds, ::ds][: h // ds, : w // ds], subfiletype=1, resolution=(1e4 / (0.25 * ds),) * 2, **opts)
    reader = open_image(str(path))
    try:
        assert [lv.width for lv in reader.levels] == [2312, 1156, 578, 289, 144]
        th = QualityThresholds()
        assert _survey(reader, 2, th.tile_px, 512, 16) is not None  # the rounded-down level is used for the survey
        new = measure_tiles(reader, 0.25, th, block_px=512)
        full = measure_tiles(reader, 0.25, th, block_px=512, max_survey_ratio=1)  # no survey: every tile measured
    finally:
        reader.close()
    right = []  # per tile, in the order measure_tiles lists them (block by block, row-major in each): last column?
    for y in range(0, 500, 512):
        for x in range(0, 578, 512):
            bh, bw = min(512, 500 - y), min(512, 578 - x)
            right += [x + (j + 1) * 64 >= 578 for _ in range(-(-bh // 64)) for j in range(-(-bw // 64))]
    assert (full.fg_frac[right] > 0).all()
    assert np.array_equal(new.fg_frac[right], full.fg_frac[right]) and np.array_equal(new.n_px, full.n_px)
