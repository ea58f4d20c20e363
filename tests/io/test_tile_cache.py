"""Announced reads decode each shared tile once and give exactly the pixels of unannounced reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidescore.config import JobConfig
from slidescore.core.tiling import PatchGrid, plan_blocks
from slidescore.core.types import Box
from slidescore.errors import UnsupportedImageError
from slidescore.io import open_image
from slidescore.io.adapt import AdaptedReader, open_adapted
from slidescore.io.base import expect_reads, read_padded
from slidescore.io.tiff import TiffReader, TileCache
from slidescore.stages.input_plan import plan_input
from tests.conftest import textured_image, write_tiff


def tiles_of(box: Box, t: int) -> set[tuple[int, int]]:
    return {(ty, tx) for ty in range(box.y // t, -(-box.y1 // t)) for tx in range(box.x // t, -(-box.x1 // t))}


@pytest.mark.parametrize("order", ["row-major", "shuffled"])
def test_block_reads_decode_every_tile_once(tmp_path: Path, order: str) -> None:
    img = textured_image(1000, 1100, seed=3)
    path = write_tiff(tmp_path / "t.tif", img, mpp=0.5, n_levels=1, tile_px=128)
    grid = PatchGrid(1000, 1100, 64, 16)
    boxes = [b.read.clip(1000, 1100) for b in plan_blocks(grid, 16)]  # 256-px blocks, 48-px halo on each side
    if order == "shuffled":
        boxes = [boxes[i] for i in np.random.default_rng(0).permutation(len(boxes))]
    reader = open_image(str(path))
    assert isinstance(reader, TiffReader)
    try:
        reader.expect(0, boxes)
        for box in boxes:
            np.testing.assert_array_equal(reader.read(0, box), img[box.y : box.y1, box.x : box.x1])
        touched = set().union(*(tiles_of(b, 128) for b in boxes))
        shared = sum(len(tiles_of(b, 128)) for b in boxes) - len(touched)
        assert shared > 0  # the halos do share tiles
        assert reader.tile_cache.decoded == len(touched)  # each decoded once, whatever the order
        assert reader.tile_cache.hits == shared
        assert len(reader.tile_cache) == 0 and reader.tile_cache.nbytes == 0  # nothing kept past its last read
        # an unannounced read is served as before, and does not disturb the cache
        np.testing.assert_array_equal(reader.read(0, Box(5, 7, 300, 301)), img[5:305, 7:308])
        assert len(reader.tile_cache) == 0
    finally:
        reader.close()


def test_cache_bound_only_costs_decodes(tmp_path: Path) -> None:
    img = textured_image(768, 768, seed=4)
    path = write_tiff(tmp_path / "t.tif", img, mpp=0.5, n_levels=1, tile_px=128)
    boxes = [Box(y, x, 200, 200) for y in range(0, 568, 150) for x in range(0, 568, 150)]
    reader = open_image(str(path))
    assert isinstance(reader, TiffReader)
    try:
        reader.tile_cache = TileCache(max_bytes=2 * 128 * 128 * 3)  # room for two tiles
        reader.expect(0, boxes)
        for box in boxes:
            np.testing.assert_array_equal(reader.read(0, box), img[box.y : box.y1, box.x : box.x1])
            assert reader.tile_cache.nbytes <= 2 * 128 * 128 * 3
    finally:
        reader.close()


def test_virtual_level_forwards_its_source_boxes(tmp_path: Path) -> None:
    """A resampled (virtual) level announces the source boxes it reads: same pixels, tiles decoded once."""
    img = textured_image(1024, 1024, seed=5)
    path = write_tiff(tmp_path / "fine.tif", img, mpp=0.25, n_levels=1, tile_px=128)
    cfg = JobConfig.from_dict({"output": {"uri": str(tmp_path / "o")}})
    from slidescore.model import load_model

    card = load_model("builtin:smearnet").card  # 0.5 µm/px: the 0.25 µm/px image is averaged 2 × 2
    raw = open_image(str(path))
    try:
        recipe = plan_input(raw, card, cfg.input, "fine", 0.25)
    finally:
        raw.close()
    plain, ahead = open_adapted(str(path), recipe), open_adapted(str(path), recipe)
    try:
        assert isinstance(ahead, AdaptedReader) and isinstance(plain, AdaptedReader)
        lvl = ahead.virtual_level
        assert lvl is not None
        boxes = [b.read for b in plan_blocks(PatchGrid(512, 512, 64, 16), 8)]
        expect_reads(ahead, lvl, boxes)
        for box in boxes:
            np.testing.assert_array_equal(read_padded(ahead, lvl, box, 0), read_padded(plain, lvl, box, 0))
        inner = ahead.inner
        assert isinstance(inner, TiffReader)
        assert inner.tile_cache.hits > 0 and len(inner.tile_cache) == 0
    finally:
        plain.close()
        ahead.close()


def test_planar_and_striped_files_read_unchanged(tmp_path: Path) -> None:
    img = textured_image(300, 310, seed=6)
    planar = tmp_path / "planar.tif"
    tifffile.imwrite(planar, np.moveaxis(img, -1, 0), photometric="rgb", planarconfig="separate", tile=(64, 64),
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    striped = tmp_path / "striped.tif"
    tifffile.imwrite(striped, img, photometric="rgb", rowsperstrip=16, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    for path in (planar, striped):
        reader = open_image(str(path))
        try:
            boxes = [Box(0, 0, 200, 200), Box(150, 100, 150, 210), Box(0, 0, 200, 200)]
            expect_reads(reader, 0, boxes)
            for box in boxes:
                np.testing.assert_array_equal(reader.read(0, box), img[box.y : box.y1, box.x : box.x1])
        finally:
            reader.close()


@pytest.mark.parametrize("kind", ["jpeg-ycbcr", "zlib", "zstd", "none", "gray-lzw", "sparse"])
def test_direct_tile_decoding_gives_the_zarr_stores_pixels(tmp_path: Path, kind: str) -> None:
    """Tiles of one-page levels are read and decoded directly (not through tifffile's Zarr store):
    the same pixels for every codec and layout, edge tiles cropped, boxes past the edge clipped as a
    Zarr read clips them, and tiles a writer left out (no bytes) filled as the store fills them."""
    img = textured_image(330, 290, seed=8)
    path = tmp_path / f"{kind}.tif"
    res = {"resolution": (1e4 / 0.5, 1e4 / 0.5), "resolutionunit": "CENTIMETER"}
    if kind == "jpeg-ycbcr":  # as scanners write (YCbCr 4:2:0), through our pyramid writer
        write_tiff(path, img, n_levels=2, compression="jpeg", tile_px=64)
    elif kind == "gray-lzw":
        img = img[..., :1]
        tifffile.imwrite(path, img[..., 0], tile=(64, 64), compression="lzw", **res)
    elif kind == "sparse":  # tiles of pure background not written at all (byte count 0)
        tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", compression="zlib", **res)
        with tifffile.TiffFile(path, mode="r+b") as tif:
            counts = tif.pages[0].tags["TileByteCounts"]
            counts.overwrite([0 if i % 3 == 0 else n for i, n in enumerate(counts.value)])
    else:
        tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb", compression=None if kind == "none" else kind, **res)
    reader = open_image(str(path))
    assert isinstance(reader, TiffReader)
    try:
        for level in range(len(reader.levels)):
            assert reader._tile_page(level) is not None  # the direct path is the one under test
            arr = reader._array(level)
            ref = np.asarray(arr[...]).reshape(reader.levels[level].height, reader.levels[level].width, -1)
            boxes = [Box(0, 0, *ref.shape[:2]), Box(37, 5, 100, 120), Box(60, 70, 500, 500), Box(64, 64, 64, 64)]
            for box in boxes:
                got = reader.read(level, box)
                want = ref[box.y : box.y1, box.x : box.x1]
                assert got.shape == want.shape
                np.testing.assert_array_equal(got, want)
            expect_reads(reader, level, boxes[1:2] * 2)  # the cached path too
            for _ in range(2):
                np.testing.assert_array_equal(reader.read(level, boxes[1]), ref[37:137, 5:125])
        if kind == "sparse":
            assert (reader.read(0, Box(0, 0, 64, 64)) == 0).all()  # tile (0, 0) was left out
    finally:
        reader.close()


def test_a_corrupt_tile_names_the_file_and_level(tmp_path: Path) -> None:
    img = textured_image(256, 256, seed=2)
    path = write_tiff(tmp_path / "c.tif", img, n_levels=1, compression="jpeg", tile_px=64)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        off, n = page.dataoffsets[5], page.databytecounts[5]
    raw = bytearray(path.read_bytes())
    raw[off + n // 2 : off + n] = b"\x00" * (n - n // 2)  # second half of one tile's JPEG zeroed (no end marker)
    raw[off : off + 4] = b"\x12\x34\x56\x78"  # and its start-of-image marker gone
    path.write_bytes(bytes(raw))
    reader = open_image(str(path))
    try:
        with pytest.raises(UnsupportedImageError, match=r"c\.tif: failed to decode level 0 tiles .*re-export"):
            reader.read(0, Box(0, 0, 256, 256))
    finally:
        reader.close()
