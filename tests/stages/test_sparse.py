"""Cost follows the tissue (#16): a sparse slide gives exactly what the whole-canvas computation gives,
while blocks without foreground are neither read, scored, written nor marked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy import sparse

from slidescore.config import JobConfig, SampleSpec
from slidescore.core.blend import blend_cells
from slidescore.core.mask import _overlap_matrix, detect_foreground, patch_fractions, reduce_mean
from slidescore.core.types import Box
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.model.scoring import dense_tiles
from slidescore.report.quality import measure_tiles
from slidescore.run.local import score_samples
from slidescore.stages.block import score_blocks
from slidescore.stages.plan import compute_cell_foreground, open_for_plan, plan_images
from slidescore.stages.recipe import BlockRecipe
from tests.conftest import textured_image, write_tiff

ISLANDS = [(96, 160, 120, 150), (1100, 300, 90, 170), (700, 1300, 160, 110), (1800, 1750, 140, 140)]  # level-0 (y, x, h, w)


@pytest.fixture(scope="module")
def sparse_slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2048² px at 0.25 µm/px, levels down to 4 µm/px, four small islands of texture."""
    img = np.full((2048, 2048, 3), 235, np.uint8)
    for i, (y, x, h, w) in enumerate(ISLANDS):
        img[y : y + h, x : x + w] = textured_image(h, w, seed=40 + i)
    return write_tiff(tmp_path_factory.mktemp("sparse") / "sparse.tif", img, mpp=0.25, n_levels=5, compression="zlib",
                      tile_px=128)


@pytest.fixture(scope="module")
def model(random_model_dir: Path) -> Any:
    # dense tiles of 128 px: 8 cells + 3 patches of halo = 11 patches a side, a whole block of 8 cells (11 × 11
    # patches) in one pass; test_blocks_read_only_what_their_valid_patches_are_scored_from cuts blocks into tiles
    return load_model(str(random_model_dir), device="cpu", dense_tile_px=128)


def _cfg(out: Path, **tiling: Any) -> JobConfig:
    return JobConfig.from_dict({"output": {"uri": str(out)}, "tiling": {"chunk_cells": 8, **tiling},
                                "report": {"enabled": False}, "mask": {"min_foreground_frac": 0.05}})


@pytest.fixture(scope="module")
def clean_run(sparse_slide: Path, model: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One whole run of the sparse slide: what a resumed or disturbed run must reproduce."""
    out = tmp_path_factory.mktemp("clean")
    (res,) = score_samples([str(sparse_slide)], _cfg(out), str(out), model=model)
    assert res.status == "ok", res.error
    return res


class CountingReader:
    """A real reader (of the plan's image) that records the boxes it decodes."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.boxes = inner, []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, level: int, box: Box) -> np.ndarray:
        self.boxes.append((level, box))
        return self.inner.read(level, box)


def _old_cell_foreground(reader: Any, cfg: JobConfig, mpp0: float, grid: Any, level_downsample: float) -> np.ndarray:
    """compute_cell_foreground as it was: the whole mask level reduced, then one overlap product."""
    mcfg = cfg.mask
    mpps = [mpp0 * lv.downsample for lv in reader.levels]
    lvl = max([i for i, m in enumerate(mpps) if m <= mcfg.mask_mpp * 1.01], key=lambda i: mpps[i])
    info = reader.levels[lvl]
    factor = max(1, int(mcfg.mask_mpp / mpps[lvl] + 1e-6))
    strip = factor * max(1, 2048 // factor)
    parts = []
    for y in range(0, info.height, strip):
        rows = [reduce_mean(detect_foreground(reader.read(lvl, Box(y, x, min(strip, info.height - y), min(strip, info.width - x))),
                                              "brightfield", min_saturation=mcfg.min_saturation,
                                              max_brightness=mcfg.max_brightness), factor)
                for x in range(0, info.width, strip)]
        parts.append(np.concatenate(rows, axis=1))
    frac = np.concatenate(parts, axis=0)
    src, cell = info.downsample * factor, grid.stride_px * level_downsample
    ry = _overlap_matrix(grid.cells_shape[0], cell, frac.shape[0], src)
    rx = _overlap_matrix(grid.cells_shape[1], cell, frac.shape[1], src)
    return np.clip(np.asarray(ry @ (rx @ frac.astype(np.float64).T).T, dtype=np.float32), 0.0, 1.0)


def _old_patch_fractions(cell_frac: np.ndarray, k: int, shape: tuple[int, int]) -> np.ndarray:
    """patch_fractions as it was: whole-canvas float64 integral images."""
    py, px = shape
    m = k - 1
    frac = np.zeros((py + m, px + m))
    inside = np.zeros((py + m, px + m))
    h, w = min(cell_frac.shape[0], py), min(cell_frac.shape[1], px)
    frac[m : m + h, m : m + w] = cell_frac[:h, :w]
    inside[m : m + h, m : m + w] = 1.0

    def box_sums(a: np.ndarray) -> np.ndarray:
        integral = np.zeros((py + m + 1, px + m + 1))
        integral[1:, 1:] = a.cumsum(0).cumsum(1)
        return (integral[k:, k:] - integral[:-k, k:] - integral[k:, :-k] + integral[:-k, :-k])[:py, :px]

    total, count = box_sums(frac), box_sums(inside)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0).astype(np.float32)


def test_mask_in_strips_equals_the_whole_canvas_mask(sparse_slide: Path, model: Any, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    (plan,) = plan_images(SampleSpec("s", (str(sparse_slide),)), cfg, model.card, model.checksum, str(tmp_path), dry_run=True)
    reader = open_for_plan(plan)
    try:
        for stride in (16, 8):  # 8: cells of 4 level-0 px... and a mask level of 16 px: bands of several cells
            grid = type(plan.grid)(plan.grid.height_px, plan.grid.width_px, plan.grid.patch_px, stride)
            new = compute_cell_foreground(reader, cfg, plan.mpp0, grid, plan.level_downsample)
            old = _old_cell_foreground(reader, cfg, plan.mpp0, grid, plan.level_downsample)
            assert new.dtype == np.float32 and np.array_equal(new, old)
            assert 0 < (new > 0).mean() < 0.2  # sparse: a few islands
            pf = patch_fractions(new, grid.k, grid.patches_shape, band_rows=7)
            assert pf.dtype == np.float32 and np.array_equal(pf, _old_patch_fractions(old, grid.k, grid.patches_shape))
    finally:
        reader.close()


def test_dense_tiles_skip_only_tiles_without_valid_patches() -> None:
    valid = np.zeros((11, 10), bool)
    valid[5, 9] = valid[0, 0] = True
    assert dense_tiles((11, 10), 4) == [(a, b) for a in (0, 4, 8) for b in (0, 4, 8)]
    assert dense_tiles((11, 10), 4, valid) == [(0, 0), (4, 8)]


def _reference_block(plan: Any, block: Any, reader: Any, recipe: BlockRecipe, model: Any) -> np.ndarray:
    """A block's cells computed the old way: every dense tile of the whole read box scored."""
    p = block.patches
    valid = plan.valid[p.y : p.y1, p.x : p.x1]
    pixels = recipe.read(reader, plan.level, block.read)
    scores = model.score_dense(pixels, recipe.stride_px)  # no valid: every tile, as before
    assert not np.isnan(scores).any()
    scores[:, ~valid] = np.nan
    probs = recipe.policy.transform(scores)
    m = recipe.kernel.shape[0] - 1
    c = block.cells
    return blend_cells(probs, valid, recipe.kernel, (p.y - m, p.x - m), (c.y, c.x, c.h, c.w))


def test_sparse_blocks_equal_the_old_computation_and_empty_blocks_cost_nothing(sparse_slide: Path, model: Any,
                                                                               tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    (plan,) = plan_images(SampleSpec("s", (str(sparse_slide),)), cfg, model.card, model.checksum, str(tmp_path))
    recipe = BlockRecipe.for_job(model, cfg)
    fg = [b for b in plan.blocks if plan.block_has_foreground(b)]
    assert 0 < len(fg) < len(plan.blocks) // 3
    reader = CountingReader(open_for_plan(plan))
    try:
        records = list(score_blocks(plan, plan.blocks, reader, recipe, depth=2))
    finally:
        reader.close()
    assert model.dense_used  # the dense path (with tiles skipped) was the one checked and used
    # pixels were read for the foreground blocks only, once each
    h, w = plan.level_shape
    assert sorted((lvl, repr(b)) for lvl, b in reader.boxes) == sorted((plan.level, repr(b.read.clip(h, w))) for b in fg)
    markers = sorted(p.name for p in Path(plan.blocks_dir).glob("*.json"))
    assert markers == sorted(f"{b.key}.json" for b in fg)  # completion records for the foreground blocks only
    chunks = {p.relative_to(Path(plan.mosaic_path) / "0" / "0").as_posix()
              for p in (Path(plan.mosaic_path) / "0" / "0").rglob("*") if p.is_file()}
    assert chunks <= {f"{b.row}/{b.col}" for b in fg} and chunks  # no chunk of a block without foreground
    by_key = {r.key: r for r in records}
    for b in plan.blocks:
        if b not in fg:
            r = by_key[b.key]
            assert (r.patches_scored, r.patch_evaluations, r.seconds_read, r.seconds_score) == (0, 0, 0.0, 0.0)
    # owned patch counts add up over blocks, as before
    assert sum(r.patches_scored for r in records) == int(plan.valid.sum())
    assert sum(r.patches_scored + r.patches_skipped for r in records) == plan.grid.n_patches
    # every block's cells equal the old computation bit for bit (absent chunks read as "not scored")
    level0 = mz.read_level(plan.mosaic_path, 0)
    ref = np.full_like(level0, np.nan)
    plain = open_for_plan(plan)
    try:
        for b in fg:
            ref[:, b.cells.y : b.cells.y1, b.cells.x : b.cells.x1] = _reference_block(plan, b, plain, recipe, model)
    finally:
        plain.close()
    assert np.array_equal(level0, ref, equal_nan=True)
    assert np.isfinite(level0).any()


def test_sparse_run_resumes_to_equal_outputs(sparse_slide: Path, model: Any, clean_run: Any, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _cfg(out)
    first = clean_run
    shutil.copytree(Path(first.out_dir).parent, out)
    sample = out / Path(first.out_dir).name
    clean = {p: p.read_bytes() for z in ("probabilities.ome.zarr", "mask.ome.zarr") for p in (sample / z).rglob("*")
             if p.is_file()}
    clean_level0 = mz.read_level(sample / "probabilities.ome.zarr", 0)
    regions = json.loads((sample / "regions.json").read_text())
    markers = sorted((sample / ".blocks").rglob("*.json"))
    assert 0 < len(markers) < first.run["blocks"]["total"]
    # a run killed after some blocks: no completion marker, the pyramid not built, half the blocks not done
    (sample / "_SUCCESS").unlink()
    for lvl in range(1, 4):
        shutil.rmtree(sample / "probabilities.ome.zarr" / str(lvl) / "0", ignore_errors=True)
    for m in markers[::2]:  # these blocks never ran: neither their chunks nor their records exist
        m.unlink()
        row, col = m.stem.split("_")
        for chunk in (sample / "probabilities.ome.zarr" / "0" / "0" / row / col,
                      sample / "probabilities.ome.zarr" / "labels" / "suspect" / "0" / row / col):
            chunk.unlink(missing_ok=True)
    (again,) = score_samples([str(sparse_slide)], cfg, str(out), model=model)
    assert again.status == "ok", again.error
    assert again.run["blocks"]["resumed"] == len(markers) - len(markers[::2])
    assert np.array_equal(mz.read_level(sample / "probabilities.ome.zarr", 0), clean_level0, equal_nan=True)
    assert json.loads((sample / "regions.json").read_text()) == regions
    for key in ("patches", "area"):
        assert again.run[key] == first.run[key]
    assert again.run["blocks"]["without_foreground"] == first.run["blocks"]["without_foreground"]
    now = {p for z in ("probabilities.ome.zarr", "mask.ome.zarr") for p in (sample / z).rglob("*") if p.is_file()}
    assert now == set(clean)  # the same chunks exist (none for blocks without foreground) …
    for p, data in clean.items():  # … every chunk of every level, the labels and the mask byte for byte
        assert p.read_bytes() == data, p


def test_finish_reads_only_foreground_blocks(sparse_slide: Path, model: Any, clean_run: Any, tmp_path: Path) -> None:
    """Finishing assembles level 0 from the plan's foreground blocks: a garbage chunk where no block has
    foreground is never read (it would not decode), and the outputs equal a clean run's."""
    clean = clean_run
    out = tmp_path / "out"
    cfg = _cfg(out)
    (plan,) = plan_images(SampleSpec("sparse", (str(sparse_slide),)), cfg, model.card, model.checksum, str(out))
    empty = next(b for b in plan.blocks if not plan.block_has_foreground(b))
    stray = Path(plan.mosaic_path) / "0" / "0" / str(empty.row) / str(empty.col)
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"not a chunk")
    (res,) = score_samples([str(sparse_slide)], cfg, str(out), model=model)
    assert res.status == "ok", res.error
    assert json.loads((Path(res.out_dir) / "regions.json").read_text())["regions"] == \
        json.loads((Path(clean.out_dir) / "regions.json").read_text())["regions"]
    for key in ("patches", "area", "blocks"):
        assert res.run[key] == clean.run[key]


def test_quality_survey_reads_only_tissue_and_agrees(sparse_slide: Path) -> None:
    reader = open_image(str(sparse_slide))
    counting = CountingReader(reader)
    try:
        surveyed = measure_tiles(counting, 0.25, block_px=128)
        full = measure_tiles(reader, 0.25, block_px=128, max_survey_ratio=1)  # no survey: the whole level, as before
    finally:
        reader.close()
    q = [b for lvl, b in counting.boxes if lvl == surveyed.level]
    assert 0 < len(q) < 16 // 2  # of the 4 × 4 blocks of the 512² level at 1 µm/px, only those with tissue
    assert len(surveyed.n_px) == len(full.n_px)
    assert np.array_equal(surveyed.n_px, full.n_px) and np.array_equal(surveyed.fg_frac, full.fg_frac)
    np.testing.assert_allclose(surveyed.gray, full.gray, atol=1.0)  # background: uniform, the same at any level


def test_sparse_csr_rows_are_the_whole_matrix_rows() -> None:
    """The banded overlap matrix holds exactly the whole matrix's entries there (what the banded mask relies on)."""
    whole = _overlap_matrix(40, 3.0, 61, 2.0)
    band = _overlap_matrix(9, 3.0, 61, 2.0, dst0=13, src0=19, src1=35)
    assert isinstance(band, sparse.csr_matrix)
    assert np.array_equal(band.toarray(), whole.toarray()[13:22, 19:35])


@pytest.mark.parametrize("mode", ["dense", "per_patch"])
def test_score_block_on_sparse_patches_equals_the_whole_block(model: Any, mode: str) -> None:
    """Dense: only the tiles holding valid patches run; per patch: only the valid patches' bounding box is
    normalised — the scores are bit for bit those of the whole block (every tile / the whole box)."""
    rng = np.random.default_rng(7)
    s, p = 16, model.card.patch_px
    pixels = rng.integers(0, 256, ((20 - 1) * s + p, (23 - 1) * s + p, 3), dtype=np.uint8)  # 20 × 23 patches
    valid = np.zeros((20, 23), bool)
    valid[9:12, 14:17] = valid[2, 3] = True
    if mode == "dense":
        model.score_block(pixels, valid, s, mode="dense")  # the one-time dense check, out of the way
        whole = model.score_dense(pixels, s)  # every tile, as before
    else:
        ys, xs = np.nonzero(valid)
        whole = np.full((model.card.n_classes, *valid.shape), np.nan, np.float32)
        whole[:, ys, xs] = model._score_grid(pixels, ys, xs, s, 256).T  # the whole block normalised, as before
    got = model.score_block(pixels, valid, s, mode=mode)
    assert np.array_equal(got[:, valid], whole[:, valid]) and np.isnan(got[:, ~valid]).all()


def _anchored_union(valid: np.ndarray, n: int) -> tuple[int, int, int, int]:
    """(a0, b0, a1, b1): the bounding patches of the block-anchored n × n tiles (the last row and column
    clipped to the block) that hold a valid patch — computed here without slidescore's tiling code."""
    py, px = valid.shape
    rows = sorted({a // n for a in np.nonzero(valid)[0]})
    cols = sorted({b // n for b in np.nonzero(valid)[1]})
    return int(rows[0]) * n, int(cols[0]) * n, min(py, int(rows[-1] + 1) * n), min(px, int(cols[-1] + 1) * n)


@pytest.mark.parametrize("mode", ["dense", "per_patch"])
def test_blocks_read_only_what_their_valid_patches_are_scored_from(sparse_slide: Path, random_model_dir: Path,
                                                                   tmp_path: Path, mode: str) -> None:
    """Tiles of 5 patches (a block's 11 patches: tiles at 0 and 5, and a clipped last tile of 1): each block
    reads only the tiles holding a valid patch (dense) or the valid patches' bounding box (per patch), the
    one-time dense check runs on such a part, and every block's cells equal the whole read box's, bit for bit."""
    model = load_model(str(random_model_dir), device="cpu", dense_tile_px=32)  # fresh: its dense check is ahead
    n = 32 // 16 + 64 // 16 - 1
    cfg = _cfg(tmp_path)
    (plan,) = plan_images(SampleSpec("s", (str(sparse_slide),)), cfg, model.card, model.checksum, str(tmp_path))
    recipe = BlockRecipe.create(model, cfg.tiling.stride_px, mode=mode)
    fg = [b for b in plan.blocks if plan.block_has_foreground(b)]
    reader = CountingReader(open_for_plan(plan))
    try:
        list(score_blocks(plan, plan.blocks, reader, recipe, depth=2))
    finally:
        reader.close()
    assert model.dense_checked is (mode == "dense") and model.dense_used is (True if mode == "dense" else None)
    h, w = plan.level_shape
    s, p = recipe.stride_px, model.card.patch_px
    expected = []
    for b in fg:
        valid = plan.valid[b.patches.y : b.patches.y1, b.patches.x : b.patches.x1]
        if mode == "dense":
            a0, b0, a1, b1 = _anchored_union(valid, n)
        else:
            ys, xs = np.nonzero(valid)
            a0, b0, a1, b1 = int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1
        box = Box(b.read.y + a0 * s, b.read.x + b0 * s, (a1 - a0 - 1) * s + p, (b1 - b0 - 1) * s + p)
        assert b.read.y <= box.y and box.y1 <= b.read.y1 and b.read.x <= box.x and box.x1 <= b.read.x1
        expected.append((plan.level, repr(box.clip(h, w))))
    assert sorted((lvl, repr(bx)) for lvl, bx in reader.boxes) == sorted(expected)  # once per block, that part only
    read_px = sum(bx.h * bx.w for _, bx in reader.boxes)
    assert read_px < 0.8 * sum(b.read.clip(h, w).h * b.read.clip(h, w).w for b in fg)
    # islands straddle tiles and reach the clipped last tile row / column of some blocks
    zones = set()
    for b in fg:
        ys, xs = np.nonzero(plan.valid[b.patches.y : b.patches.y1, b.patches.x : b.patches.x1])
        zones |= {(a // n, c // n) for a, c in zip(ys, xs, strict=True)}
    assert {z for z in zones if 2 in z} and len(zones) >= 4
    level0 = mz.read_level(plan.mosaic_path, 0)
    ref = np.full_like(level0, np.nan)
    plain = open_for_plan(plan)
    try:
        for b in fg:
            if mode == "dense":
                cells = _reference_block(plan, b, plain, recipe, model)
            else:  # the whole read box's patches one by one, as before
                pv = plan.valid[b.patches.y : b.patches.y1, b.patches.x : b.patches.x1]
                ys, xs = np.nonzero(pv)
                scores = np.full((model.card.n_classes, *pv.shape), np.nan, np.float32)
                scores[:, ys, xs] = model._score_grid(recipe.read(plain, plan.level, b.read), ys, xs, s, 256).T
                m = recipe.kernel.shape[0] - 1
                c = b.cells
                cells = blend_cells(recipe.policy.transform(scores), pv, recipe.kernel, (b.patches.y - m, b.patches.x - m),
                                    (c.y, c.x, c.h, c.w))
            ref[:, b.cells.y : b.cells.y1, b.cells.x : b.cells.x1] = cells
    finally:
        plain.close()
    assert np.array_equal(level0, ref, equal_nan=True) and np.isfinite(level0).any()


VALID_LAYOUTS = {
    "island across the interior tile corner": [(slice(6, 10), slice(5, 9))],
    "island into the clipped last row and column": [(slice(12, 16), slice(13, 17))],
    "only the clipped corner": [(slice(15, 17), slice(16, 18))],
    "only the last patch": [(16, 17)],
    "two islands, two zones": [(slice(0, 2), slice(0, 3)), (slice(14, 17), slice(3, 5))],
    # inside one tile, off its corner: a tile of the same shape moved onto the island changes one of its
    # patches by 1 ulp with this model (a pass's rounding depends on where in it a patch lies)
    "island inside one tile": [(slice(3, 9), slice(1, 6))],
}


@pytest.mark.parametrize("layout", sorted(VALID_LAYOUTS))
def test_score_block_on_the_needed_pixels_only_equals_every_tile(random_model_dir: Path, layout: str) -> None:
    """A block of 17 × 18 patches in tiles of 7 (zones: 0–13 in whole tiles, 14–16 / 14–17 clipped): scored from
    only the pixels :meth:`patches_needed` names, the valid patches get the bits of every tile of the whole box."""
    model = load_model(str(random_model_dir), device="cpu", dense_tile_px=64)
    s, p, n = 16, 64, 64 // 16 + 3
    rng = np.random.default_rng(11)
    pixels = rng.integers(0, 256, ((17 - 1) * s + p, (18 - 1) * s + p, 3), dtype=np.uint8)
    valid = np.zeros((17, 18), bool)
    for ys, xs in VALID_LAYOUTS[layout]:
        valid[ys, xs] = True
    model.score_block(pixels, valid, s, mode="dense")  # the one-time check, out of the way
    whole = model.score_dense(pixels, s)  # every tile of the whole box
    a0, b0, a1, b1 = model.patches_needed(valid, s)
    assert (a0, b0, a1, b1) == _anchored_union(valid, n)
    part = pixels[a0 * s : (a1 - 1) * s + p, b0 * s : (b1 - 1) * s + p].copy()
    got = model.score_block(part, valid, s, mode="dense", first=(a0, b0))
    assert np.array_equal(got[:, valid], whole[:, valid]) and np.isnan(got[:, ~valid]).all()
    if (a1 - a0) * (b1 - b0) < valid.size:  # too few pixels for the tiles: an error, not a wrong map
        with pytest.raises(ValueError, match="do not hold patches"):
            model.score_block(part[s:], valid, s, mode="dense", first=(a0, b0))
    per_patch = model.score_block(part, valid, s, mode="per_patch", first=(a0, b0))
    ys, xs = np.nonzero(valid)
    assert np.array_equal(per_patch[:, ys, xs].T, model._score_grid(pixels, ys, xs, s, 256))  # the whole box, as before
