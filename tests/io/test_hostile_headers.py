"""Hostile headers: bounded work and clear per-sample errors (issue "Unattended means unbreakable", items 3 and 7).

Each hostile file is built with the real libraries (tifffile, zarr): tiny on disk, claiming an enormous
image, tile or resampling, or carrying corrupt metadata. Scored with a good image after them, each
fails alone, fast, naming the limit or the problem and the config key; the good one finishes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr

from slidescore.config import JobConfig
from slidescore.core.tiling import PatchGrid, choose_level
from slidescore.core.types import Box, LevelInfo
from slidescore.errors import ConfigError, UnsupportedImageError
from slidescore.io import open_image
from slidescore.io.adapt import AdaptedReader
from slidescore.model import load_model
from slidescore.run.local import score_samples
from slidescore.stages.input_plan import plan_input
from slidescore.stages.limits import check_planned_image
from tests.conftest import textured_image, write_tiff

HUGE = 2_000_000


def sparse_bigtiff(path: Path, n: int, tile: int, mpp: float = 0.5) -> Path:
    """A BigTIFF claiming n × n RGB px in ``tile``² tiles, of which only the first is written."""
    n_tiles = (-(-n // tile)) ** 2

    def tiles() -> Any:
        yield np.zeros((tile, tile, 3), np.uint8)
        for _ in range(n_tiles - 1):
            yield None  # a tile left out: no bytes in the file

    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(tiles(), shape=(n, n, 3), dtype="uint8", tile=(tile, tile), photometric="rgb", compression="zlib",
                 resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", metadata=None)
    return path


def one_absent_tile(path: Path, edge: int = 60_000) -> Path:
    """A BigTIFF of a few hundred bytes: one edge × edge tile, declared and absent (10 GB if decoded)."""
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(iter([(b"", 0)]), shape=(edge, edge, 3), dtype="uint8", tile=(edge, edge), photometric="rgb",
                 compression="zlib", resolution=(2e4, 2e4), resolutionunit="CENTIMETER", metadata=None)
    return path


def ome_zarr(path: Path, img: np.ndarray | None = None, *, shape: tuple[int, int] | None = None, mpp: float = 0.5,
             chunk: int = 128) -> Path:
    """An OME-Zarr 0.4 image (one level, axes c, y, x) written with zarr: ``img``'s pixels, or only the
    metadata of a ``shape`` image (no chunk written: every read is the fill value)."""
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    if img is not None:
        data = np.ascontiguousarray(np.moveaxis(img, -1, 0))
        arr = group.create_array("0", shape=data.shape, chunks=(data.shape[0], chunk, chunk), dtype=data.dtype,
                                 compressors=None)
        arr[:] = data
    else:
        assert shape is not None
        group.create_array("0", shape=(3, *shape), chunks=(3, chunk, chunk), dtype="uint8")
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp, mpp]}]}],
    }]
    return path


def edit_json(path: Path, edit: Any) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture(scope="module")
def model(random_model_dir: Path) -> Any:
    return load_model(str(random_model_dir))


@pytest.fixture(scope="module")
def good_img() -> np.ndarray:
    return textured_image(300, 300, seed=5)


def _score(paths: list[Path], out: Path, model: Any, **cfg: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    config = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "report": {"enabled": False}, **cfg})
    results = score_samples([str(p) for p in paths], config, str(out), model=model)
    rows = {r["sample_id"]: r for r in json.loads((out / "run.json").read_text())["samples"]}
    return {r.sample_id: r for r in results}, rows


@pytest.mark.timeout(60)
def test_hostile_headers_are_refused_fast_and_the_good_sample_after_them_finishes(
        tmp_path: Path, model: Any, good_img: np.ndarray) -> None:
    d = tmp_path / "in"
    d.mkdir()
    huge_tif = sparse_bigtiff(d / "huge_tiff.tif", HUGE, 4096)
    huge_zarr = ome_zarr(d / "huge_zarr.ome.zarr", shape=(HUGE, HUGE), chunk=1024)
    big_tile = one_absent_tile(d / "big_tile.tif")
    meter = d / "one_metre.tif"  # 512² px at 1 m/px for a 0.5 µm/px model: a 2,000,000× upsampling
    tifffile.imwrite(meter, textured_image(512, 512, seed=2), photometric="rgb", tile=(64, 64),
                     resolution=(1e4 / 1e6, 1e4 / 1e6), resolutionunit="CENTIMETER")
    good = write_tiff(d / "good.tif", good_img, mpp=0.5)
    assert huge_tif.stat().st_size < 4_000_000 and big_tile.stat().st_size < 1000
    assert sum(f.stat().st_size for f in huge_zarr.rglob("*") if f.is_file()) < 2000

    t0 = time.perf_counter()
    by_id, rows = _score([huge_tif, huge_zarr, big_tile, meter, good], tmp_path / "out", model)
    elapsed = time.perf_counter() - t0

    assert by_id["good"].status == "ok" and (tmp_path / "out" / "good" / "_SUCCESS").exists()
    expected = {
        "huge_tiff": ("level 0 is 2,000,000 × 2,000,000 px (4.0e12 px)", "limits.max_pixels = 5e10",
                      "raise limits.max_pixels in the config"),
        "huge_zarr": ("level 0 is 2,000,000 × 2,000,000 px", "limits.max_pixels = 5e10"),
        "big_tile": ("tiles of 60,000 × 60,000 × 3", "limits.max_tile_bytes = 268,435,456",
                     "raise limits.max_tile_bytes in the config"),
        "one_metre": ("upsampled 2,000,000×", "limits.max_upsample = 8", "input.mpp"),
    }
    for sid, fragments in expected.items():
        r = by_id[sid]
        assert r.status == "failed" and r.error_type == "UnsupportedImageError", (sid, r.error)
        for f in fragments:
            assert f in r.error, (sid, f, r.error)
        assert sid in r.error, r.error  # names the sample (or its file)
        assert rows[sid]["seconds"] < 5, (sid, rows[sid]["seconds"])
    assert elapsed < 30, elapsed


@pytest.mark.timeout(60)
def test_a_tile_too_large_is_refused_from_the_header_before_any_allocation(tmp_path: Path) -> None:
    path = one_absent_tile(tmp_path / "t.tif")
    with pytest.raises(UnsupportedImageError, match=r"10\.1 GiB decoded each, above limits\.max_tile_bytes"):
        open_image(str(path))
    # the limit is the reader's argument (a job passes limits.max_tile_bytes): raised, the header opens
    reader = open_image(str(path), max_tile_bytes=11 * 2**30)
    try:
        assert reader.levels[0].height == 60_000 and reader.max_chunk_bytes == 60_000**2 * 3
    finally:
        reader.close()
    # the same for a Zarr chunk
    z = tmp_path / "big_chunk.zarr"
    zarr.create_array(str(z), shape=(3, 60_000, 60_000), chunks=(3, 60_000, 60_000), dtype="uint8", zarr_format=2)
    with pytest.raises(UnsupportedImageError, match=r"chunks of 3 × 60,000 × 60,000 .*limits\.max_tile_bytes"):
        open_image(str(z))


@pytest.mark.timeout(60)
def test_limits_from_the_config_name_their_key(tmp_path: Path, model: Any, good_img: np.ndarray) -> None:
    d = tmp_path / "in"
    d.mkdir()
    fine = d / "fine.tif"  # 400² px at 0.1 µm/px, no pyramid: the 0.5 µm/px model needs a 5× downsampling
    tifffile.imwrite(fine, textured_image(400, 400, seed=3), photometric="rgb", tile=(64, 64),
                     resolution=(1e4 / 0.1, 1e4 / 0.1), resolutionunit="CENTIMETER")
    good = write_tiff(d / "good.tif", good_img, mpp=0.5)
    cases = [
        ({"max_downsample": 4}, fine, ("downsampled 5×", "limits.max_downsample = 4")),
        ({"max_blocks": 4}, good, ("9 blocks of 8 × 8 cells", "limits.max_blocks = 4", "tiling.chunk_cells")),
        ({"max_mask_pixels": 50_000}, good, ("the foreground mask would read level 0", "(90,000 px)",
                                              "limits.max_mask_pixels = 50,000", "mask.mask_mpp")),
        ({"max_tile_bytes": 4096}, good, ("limits.max_tile_bytes = 4,096",)),
    ]
    for i, (limits, path, fragments) in enumerate(cases):
        by_id, _ = _score([path], tmp_path / f"out{i}", model, limits=limits)
        (r,) = by_id.values()
        assert r.status == "failed", (limits, r)
        for f in fragments:
            assert f in r.error, (limits, f, r.error)
    by_id, _ = _score([fine], tmp_path / "out_ok", model, limits={"max_downsample": 5})
    assert by_id["fine"].status == "ok", by_id["fine"].error


@pytest.mark.timeout(60)
def test_raising_max_pixels_lets_a_just_over_limit_image_through(tmp_path: Path, model: Any, good_img: np.ndarray) -> None:
    good = write_tiff(tmp_path / "good.tif", good_img, mpp=0.5)  # 300 × 300 = 90,000 px
    by_id, _ = _score([good], tmp_path / "low", model, limits={"max_pixels": 89_999})
    r = by_id["good"]
    assert r.status == "failed"
    assert "level 0 is 300 × 300 px (90,000 px), above limits.max_pixels = 89,999" in r.error, r.error
    assert "raise limits.max_pixels in the config if this image is real" in r.error
    by_id, _ = _score([good], tmp_path / "raised", model, limits={"max_pixels": 90_000})
    assert by_id["good"].status == "ok", by_id["good"].error


@pytest.mark.parametrize("data, message", [
    ({"max_pixels": 0}, "limits.max_pixels: expected a positive number"),
    ({"max_upsample": 0.5}, "limits.max_upsample: expected a finite factor >= 1"),
    ({"max_tile_bytes": 1.5}, "limits.max_tile_bytes: expected an integer"),
    ({"max_blocks": 0}, "limits.max_blocks: expected a positive integer"),
    ({"max_pixel": 1}, "limits.max_pixel: unknown key"),
])
def test_limits_config_is_validated(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict({"limits": data})
    cfg = JobConfig.from_dict({"limits": {"max_pixels": 1e11, "max_tile_bytes": 2**30}})
    assert JobConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["limits"]["max_pixels"] == 1e11


# -- corrupt metadata: a clear per-sample error naming the file and what is wrong ------------------
def _break_multiscales(path: Path, edit: Any) -> None:
    edit_json(path / ".zattrs", lambda doc: edit(doc["multiscales"][0]))


CORRUPT_ZARR = {
    "no_datasets": (lambda p: _break_multiscales(p, lambda ms: ms.pop("datasets")), "'multiscales' has no 'datasets'"),
    "empty_datasets": (lambda p: _break_multiscales(p, lambda ms: ms.update(datasets=[])), "'multiscales' has no 'datasets'"),
    "text_scale": (lambda p: _break_multiscales(
        p, lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=["1", "half", "half"])),
        "scale has a non-numeric value"),
    "scale_is_text": (lambda p: _break_multiscales(
        p, lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale="0.5")), "scale must be a list of 3 numbers"),
    "zero_scale": (lambda p: _break_multiscales(
        p, lambda ms: ms["datasets"][0]["coordinateTransformations"][0].update(scale=[1, 0, 0])), "finite and positive"),
    "two_axes": (lambda p: _break_multiscales(p, lambda ms: ms.update(axes=ms["axes"][1:])),
                 "has 3 dimensions (shape (3, 96, 96)) but the multiscales axes name 2"),
    "no_x_axis": (lambda p: _break_multiscales(p, lambda ms: ms["axes"][2].update(name="z")), "must include 'y' and 'x'"),
    "axis_without_name": (lambda p: _break_multiscales(p, lambda ms: ms["axes"][2].pop("name")), "every axis needs a name"),
    "unit_not_text": (lambda p: _break_multiscales(p, lambda ms: ms["axes"][2].update(unit=["micrometer"])),
                      "the unit of axis 'x' must be a string"),
    "missing_path": (lambda p: _break_multiscales(p, lambda ms: ms["datasets"][0].update(path="7")),
                     "dataset path '7' is not in the group"),
    "multiscales_not_list": (lambda p: edit_json(p / ".zattrs", lambda doc: doc.update(multiscales={"datasets": []})),
                             "'multiscales' must be a list of objects"),
    "zero_height": (lambda p: edit_json(p / "0" / ".zarray", lambda doc: doc.update(shape=[3, 0, 96])), "no pixels"),
    "negative_shape": (lambda p: edit_json(p / "0" / ".zarray", lambda doc: doc.update(shape=[3, -96, 96])),
                       "the array of dataset '0' has unreadable metadata"),
    "attrs_not_json": (lambda p: (p / ".zattrs").write_text('{"multiscales": [{'), "not a readable Zarr store"),
    "garbage_chunk": (lambda p: (p / "0" / "0.0.0").write_bytes(b"\x00garbage\xff" * 7), "chunk 0/0.0.0"),
}


@pytest.mark.timeout(60)
def test_corrupt_ome_zarr_metadata_fails_alone_naming_the_problem(tmp_path: Path, model: Any, good_img: np.ndarray) -> None:
    d = tmp_path / "in"
    d.mkdir()
    img = textured_image(96, 96, seed=4)
    paths = []
    for name, (corrupt, _) in CORRUPT_ZARR.items():
        path = d / f"{name}.ome.zarr"
        if name == "garbage_chunk":  # a compressed store, so the garbage fails in the codec
            group = zarr.open_group(str(path), mode="w", zarr_format=2)
            arr = group.create_array("0", shape=(3, 96, 96), chunks=(3, 64, 64), dtype="uint8")
            arr[:] = np.moveaxis(img, -1, 0)
            ome_zarr_attrs(group)
        else:
            ome_zarr(path, img, chunk=64)
        corrupt(path)
        paths.append(path)
    good = write_tiff(d / "good.tif", good_img, mpp=0.5)
    by_id, _ = _score([*paths, good], tmp_path / "out", model)
    assert by_id["good"].status == "ok"
    for name, (_, fragment) in CORRUPT_ZARR.items():
        r = by_id[name]
        assert r.status == "failed", name
        assert r.error_type in ("UnsupportedImageError", "InputError"), (name, r.error_type, r.error)
        assert fragment in r.error, (name, r.error)
        assert str(d / f"{name}.ome.zarr") in r.error, r.error  # names the file
    garbage = by_id["garbage_chunk"].error
    assert "failed to decode level 0 box" in garbage and "re-export or re-upload" in garbage, garbage


def ome_zarr_attrs(group: Any, mpp: float = 0.5) -> None:
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, mpp, mpp]}]}],
    }]


def test_a_garbage_chunk_names_the_chunk_level_and_box(tmp_path: Path) -> None:
    path = tmp_path / "g.zarr"
    arr = zarr.create_array(str(path), shape=(128, 128, 3), chunks=(64, 64, 3), dtype="uint8", zarr_format=2)
    arr[:] = 7
    (path / "1.0.0").write_bytes(b"not a compressed chunk")
    reader = open_image(str(path))
    assert reader.read(0, Box(0, 0, 64, 64)).shape == (64, 64, 3)  # the good chunks still read
    with pytest.raises(UnsupportedImageError) as e:
        reader.read(0, Box(32, 0, 64, 64))
    msg = str(e.value)
    assert str(path) in msg and "level 0 box Box(y=32, x=0, h=64, w=64)" in msg and "chunk 1.0.0" in msg, msg


def test_corrupt_tiff_headers_are_refused_with_the_file_named(tmp_path: Path) -> None:
    """Header fields a library would trip over later: zero width, no pixel type tifffile can decode."""
    good = write_tiff(tmp_path / "good.tif", textured_image(128, 128, seed=1), mpp=0.5)
    data = bytearray(good.read_bytes())
    with tifffile.TiffFile(good) as t:
        tag = t.pages[0].tags["ImageWidth"]
        at, size = tag.valueoffset, {3: 2, 4: 4, 16: 8}[int(tag.dtype)]
    zero = tmp_path / "zero_width.tif"
    blob = bytearray(data)
    blob[at : at + size] = bytes(size)
    zero.write_bytes(bytes(blob))
    with pytest.raises(UnsupportedImageError) as e:
        open_image(str(zero))
    assert str(zero) in str(e.value)


class _HeaderOnly:
    """A reader of metadata only (no pixels): what the limits see of a real slide."""

    def __init__(self, shape: tuple[int, int], mpp: float, downsamples: tuple[int, ...], tile: int = 512) -> None:
        self.uri = "s3://slides/real.svs"
        self.levels = tuple(LevelInfo(i, -(-shape[0] // d), -(-shape[1] // d), float(d)) for i, d in enumerate(downsamples))
        self.mpp, self.mpp_source = mpp, "aperio:MPP"
        self.n_channels, self.dtype = 3, np.dtype(np.uint8)
        self.max_chunk_bytes = tile * tile * 3

    def read(self, level: int, box: Box) -> np.ndarray:
        raise AssertionError("the limits read no pixels")

    def close(self) -> None:
        pass


@pytest.mark.parametrize("shape, mpp, downsamples", [
    ((100_000, 100_000), 0.25, (1, 4, 16, 64)),  # a real whole slide (40×, pyramid)
    ((100_000, 100_000), 0.25, (1,)),  # the same without a pyramid
    ((100_000, 100_000), 0.5, (1,)),  # 20×, no pyramid: the mask reads all of level 0 (1e10 px)
    ((8192, 8192), 0.25, (1, 2, 4, 8)),  # the 8k demo smear
    ((220_000, 220_000), 0.5, (1, 4, 16)),  # near limits.max_pixels
])
def test_default_limits_pass_real_slides(model: Any, shape: tuple[int, int], mpp: float, downsamples: tuple[int, ...]) -> None:
    cfg = JobConfig()
    reader: Any = _HeaderOnly(shape, mpp, downsamples)
    recipe = plan_input(reader, model.card, cfg.input, "real", mpp)
    adapted = AdaptedReader(reader, recipe)
    level, _ = choose_level([mpp * lv.downsample for lv in adapted.levels], model.card.mpp, cfg.input.mpp_tolerance)
    info = adapted.levels[level]
    grid = PatchGrid(info.height, info.width, model.card.patch_px, cfg.tiling.stride_px)
    check_planned_image(adapted, cfg, "real", mpp0=mpp, recipe=recipe, level=level, grid=grid)  # raises nothing


# -- what planning must do with the limits beyond the checks (plan.py lines the lead owns) -------
def test_run_key_ignores_limits(tmp_path: Path, model: Any, good_img: np.ndarray) -> None:
    from slidescore.io.storage import fingerprint
    from slidescore.stages.plan import run_key_for

    fp = fingerprint(str(write_tiff(tmp_path / "a.tif", good_img, mpp=0.5)))
    base = JobConfig()
    raised = base.replace(limits={"max_pixels": 1e12, "max_tile_bytes": 2**31})
    assert run_key_for(fp, model.checksum, model.card, base) == run_key_for(fp, model.checksum, model.card, raised)


def test_raising_max_tile_bytes_reaches_the_reader(tmp_path: Path, model: Any, good_img: np.ndarray) -> None:
    import slidescore.io.base
    from slidescore.config import LimitsConfig

    assert LimitsConfig().max_tile_bytes == slidescore.io.base.MAX_TILE_BYTES  # one default, config and readers
    good = write_tiff(tmp_path / "good.tif", good_img, mpp=0.5)  # 64² px RGB tiles: 12,288 bytes each
    by_id, _ = _score([good], tmp_path / "out", model, limits={"max_tile_bytes": 4096})
    assert by_id["good"].status == "failed" and "limits.max_tile_bytes = 4,096" in by_id["good"].error
    assert by_id["good"].error.startswith("sample 'good'"), by_id["good"].error  # the sample is named
    by_id, _ = _score([good], tmp_path / "raised", model, limits={"max_tile_bytes": 12_288})
    assert by_id["good"].status == "ok", by_id["good"].error
