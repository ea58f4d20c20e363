"""Read-ahead of blocks: same outputs with and without it, bounded, errors surface per sample."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.io.prefetch import prefetch
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.block import iter_block_pixels
from slidescore.stages.plan import plan_sample
from slidescore.stages.recipe import BlockRecipe
from tests.conftest import textured_image, write_tiff


def test_prefetch_keeps_order_and_reads_at_most_depth_ahead() -> None:
    lock = threading.Lock()
    started: list[int] = []

    def read(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.002)
        return i * i

    seen = []
    for i, result, seconds in prefetch(list(range(20)), read, depth=3, workers=2):
        time.sleep(0.005)  # the consumer is slower: read-ahead must stay bounded anyway
        with lock:
            assert len(started) <= i + 1 + 3
        seen.append((i, result))
        assert seconds is not None and seconds >= 0
    assert seen == [(i, i * i) for i in range(20)]
    assert [(i, r, s) for i, r, s in prefetch([1, 2], read, depth=0)] == [(1, None, None), (2, None, None)]


def test_prefetch_reraises_the_readers_error_at_its_item_and_stops() -> None:
    def read(i: int) -> int:
        if i == 3:
            raise OSError("bad tile 3")
        return i

    got = []
    with pytest.raises(OSError, match="bad tile 3"):
        for i, _, _ in prefetch(list(range(10)), read, depth=2):
            got.append(i)
    assert got == [0, 1, 2]


class CountingReader:
    """A real reader that records the boxes it decodes."""

    def __init__(self, uri: str) -> None:
        self.inner = open_image(uri)
        self.uri, self.levels, self.mpp, self.mpp_source = self.inner.uri, self.inner.levels, self.inner.mpp, self.inner.mpp_source
        self.n_channels, self.dtype = self.inner.n_channels, self.inner.dtype
        self.boxes: list[Box] = []

    def read(self, level: int, box: Box) -> np.ndarray:
        self.boxes.append(box)
        return self.inner.read(level, box)

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def slide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    img = textured_image(640, 560, seed=21, fg_box=(20, 30, 200, 220))  # foreground in the top-left blocks only
    return write_tiff(tmp_path_factory.mktemp("pf") / "slide.tif", img, mpp=0.5, compression="jpeg")


def _cfg(out: Path, depth: int, **mask) -> JobConfig:
    return JobConfig.from_dict({"output": {"uri": str(out)}, "tiling": {"chunk_cells": 8},
                                "mask": {"min_foreground_frac": 0.05, **mask}, "model": {"prefetch_blocks": depth}})


def test_blocks_without_foreground_are_not_read(tmp_path: Path, slide: Path, random_model_dir: Path) -> None:
    model = load_model(str(random_model_dir), device="cpu")
    plan = plan_sample(str(slide), _cfg(tmp_path, 2), model.card, model.checksum, str(tmp_path), dry_run=True)
    assert plan is not None
    reader = CountingReader(str(slide))
    try:
        items = list(iter_block_pixels(plan, plan.blocks, reader, BlockRecipe.for_job(model, _cfg(tmp_path, 2)), 2))
    finally:
        reader.close()
    with_fg = [b for b in plan.blocks if plan.valid[b.patches.y : b.patches.y1, b.patches.x : b.patches.x1].any()]
    assert 0 < len(with_fg) < len(plan.blocks)
    assert [b for b, _, _ in items] == list(plan.blocks)
    assert [b.key for b, px, _ in items if px is not None] == [b.key for b in with_fg]
    assert len(reader.boxes) == len(with_fg)  # one read per foreground block, none for the rest


@pytest.mark.parametrize("mask", ["brightfield", "none"])
def test_outputs_identical_with_and_without_prefetch(tmp_path: Path, slide: Path, random_model_dir: Path, mask: str) -> None:
    model = load_model(str(random_model_dir), device="cpu")
    maps, runs = [], []
    for depth in (0, 2):
        out = tmp_path / f"d{depth}"
        (res,) = score_samples([str(slide)], _cfg(out, depth, method=mask), str(out), model=model)
        assert res.status == "ok"
        maps.append(mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0))
        runs.append(res.run)
    np.testing.assert_array_equal(maps[0], maps[1])  # bit for bit, NaNs included
    assert runs[0]["run_key"] == runs[1]["run_key"]  # prefetching changes speed, never what comes out
    assert runs[0]["patches"] == runs[1]["patches"]
    assert runs[1]["timings_s"]["read_s"] > 0


def _corrupt_a_tile(path: Path, index: int) -> None:
    with tifffile.TiffFile(path) as t:
        offset, count = t.pages[0].dataoffsets[index], t.pages[0].databytecounts[index]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\xff" * (count // 2))


@pytest.mark.parametrize("depth", [0, 2])
def test_a_decode_error_in_a_read_ahead_block_is_the_samples_error(tmp_path: Path, slide: Path, random_model_dir: Path, depth: int) -> None:
    bad = tmp_path / "bad.tif"
    bad.write_bytes(slide.read_bytes())
    _corrupt_a_tile(bad, 40)  # a 64-px tile in the lower half: read by a later block, not the first
    model = load_model(str(random_model_dir), device="cpu")
    out = tmp_path / "out"
    good, broken = score_samples([str(slide), str(bad)], _cfg(out, depth, method="none"), str(out), model=model)
    assert good.status == "ok"
    assert broken.status == "failed" and broken.error_type == "UnsupportedImageError"
    assert "failed to decode level 0" in broken.error
    assert (out / "failures.jsonl").exists() and not (out / "bad" / "_SUCCESS").exists()
