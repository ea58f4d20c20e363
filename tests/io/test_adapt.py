"""Explicit input conversion (uint16, float, gray) and resampling to the model's µm/px (io.adapt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.errors import ConfigError
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.io.adapt import AdaptedReader, InputRecipe, axis_weights
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff

CFG = {"tiling": {"chunk_cells": 8}, "mask": {"method": "none"}}


def _package_with(src: Path, dest: Path, **card_updates: Any) -> Path:
    """A copy of a model package whose card has some keys changed (e.g. input_conversion)."""
    shutil.copytree(src, dest)
    card = json.loads((dest / "card.json").read_text())
    card.update(card_updates)
    (dest / "card.json").write_text(json.dumps(card))
    return dest


def _score(src: Path, out: Path, model_dir: Path, **cfg_updates: Any) -> Any:
    cfg = JobConfig.from_dict({**CFG, **cfg_updates})
    (res,) = score_samples([str(src)], cfg, str(out), model=load_model(str(model_dir)))
    return res


def _mosaic(res: Any) -> np.ndarray:
    assert res.status == "ok", res.error
    return mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return textured_image(192, 160, seed=31, fg_box=(16, 16, 150, 120))


def _imwrite(path: Path, data: np.ndarray, mpp: float = 0.5) -> Path:
    photometric = "rgb" if data.ndim == 3 else "minisblack"
    tifffile.imwrite(path, data, photometric=photometric, tile=(64, 64), compression="zlib",
                     resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    return path


def test_uint16_and_float_need_an_explicit_rule_and_then_match_uint8(tmp_path: Path, image: np.ndarray, random_model_dir: Path) -> None:
    ref = _mosaic(_score(_imwrite(tmp_path / "u8.tif", image), tmp_path / "o8", random_model_dir))
    u16 = _imwrite(tmp_path / "u16.tif", image.astype(np.uint16) * 16)  # 12-bit camera: 0 … 4080
    f32 = _imwrite(tmp_path / "f32.tif", image.astype(np.float32) / 255)

    # no rule: refused, naming the sample, the dtype and both places to put the rule
    res = _score(u16, tmp_path / "none", random_model_dir)
    assert res.status == "failed" and res.error_type == "UnsupportedImageError"
    for fragment in ("'u16'", "uint16", "input_conversion", "input.conversion"):
        assert fragment in res.error, res.error

    # the model card's rule
    card_rule = _package_with(random_model_dir, tmp_path / "m16", input_conversion={"uint16": {"low": 0, "high": 4080}})
    res = _score(u16, tmp_path / "card", card_rule)
    np.testing.assert_array_equal(_mosaic(res), ref)  # 16·v mapped back by the window: the same pixels
    conv = res.run["input"]["conversion"]
    assert conv["dtype"] == "uint16" and conv["window"] == [0, 4080] and conv["window_source"] == "model card input_conversion.uint16"

    # the config overrides the card per key; "float" covers float32
    res = _score(u16, tmp_path / "cfg", card_rule, input={"conversion": {"uint16": {"low": 0, "high": 8160}}})
    assert res.run["input"]["conversion"]["window_source"] == "config input.conversion.uint16"
    assert not np.array_equal(_mosaic(res), ref)  # a different window gives different (darker) pixels
    res = _score(f32, tmp_path / "float", random_model_dir, input={"conversion": {"float": {"low": 0.0, "high": 1.0}}})
    np.testing.assert_array_equal(_mosaic(res), ref)


def test_window_clips_and_maps_nan_to_black(tmp_path: Path) -> None:
    data = np.array([[-5.0, 0.0, 0.5, 1.0, 7.0, np.nan]], np.float32)
    reader = AdaptedReader(open_image(str(_imwrite(tmp_path / "f.tif", data))), InputRecipe("float32", window=(0.0, 1.0)))
    try:
        assert reader.dtype == np.uint8
        assert reader.read(0, Box(0, 0, 1, 6))[0, :, 0].tolist() == [0, 0, 128, 255, 255, 0]
    finally:
        reader.close()


def test_gray_images_follow_the_card(tmp_path: Path, image: np.ndarray, random_model_dir: Path) -> None:
    gray = image[..., 1]
    src = _imwrite(tmp_path / "gray.tif", gray)
    res = _score(src, tmp_path / "refused", random_model_dir)
    assert res.status == "failed" and "single-channel" in res.error and "gray_to_rgb" in res.error
    ref = _mosaic(_score(_imwrite(tmp_path / "rgb.tif", np.repeat(gray[..., None], 3, axis=-1)), tmp_path / "o", random_model_dir))
    res = _score(src, tmp_path / "cfg", random_model_dir, input={"conversion": {"gray_to_rgb": True}})
    np.testing.assert_array_equal(_mosaic(res), ref)
    assert res.run["input"]["conversion"]["gray_to_rgb"] is True


def test_conversion_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"input\.conversion\.uint16: expected \{low"):
        JobConfig.from_dict({"input": {"conversion": {"uint16": {"low": 10, "high": 5}}}})
    with pytest.raises(ConfigError, match=r"input\.conversion\.rgb48: unknown key"):
        JobConfig.from_dict({"input": {"conversion": {"rgb48": {"low": 0, "high": 1}}}})
    with pytest.raises(ConfigError, match=r"input\.conversion\.gray_to_rgb: expected true or false"):
        JobConfig.from_dict({"input": {"conversion": {"gray_to_rgb": "yes"}}})


@pytest.mark.parametrize("factor", [2.0, 5 / 3, 1.37, 0.6, 0.25])
def test_resampled_boxes_equal_crops_of_the_whole_resampled_image(tmp_path: Path, factor: float) -> None:
    img = textured_image(301, 257, seed=4)
    src = write_tiff(tmp_path / "s.tif", img, mpp=0.3, tile_px=64)
    reader = AdaptedReader(open_image(str(src)), InputRecipe("uint8", resample_from_level=0, resample_factor=factor))
    try:
        lv = reader.levels[-1]
        assert (lv.height, lv.width) == (int(np.ceil(301 / factor - 1e-9)), int(np.ceil(257 / factor - 1e-9)))
        full = reader.read(lv.index, Box(0, 0, lv.height, lv.width))
        rng = np.random.default_rng(0)
        boxes = [Box(0, 0, 1, 1), Box(lv.height - 7, lv.width - 5, 7, 5)]
        for _ in range(6):
            y, x = int(rng.integers(0, lv.height - 1)), int(rng.integers(0, lv.width - 1))
            boxes.append(Box(y, x, int(rng.integers(1, lv.height - y + 1)), int(rng.integers(1, lv.width - x + 1))))
        for b in boxes:  # bit-exact: each output pixel is a fixed function of its own source pixels
            np.testing.assert_array_equal(reader.read(lv.index, b), full[b.y : b.y1, b.x : b.x1], err_msg=str(b))
    finally:
        reader.close()


def _dense(o0: int, n: int, factor: float, n_src: int) -> tuple[int, np.ndarray]:
    s0, idx, w = axis_weights(o0, n, factor, n_src)
    dense = np.zeros((n, int(idx.max()) + 1))
    for i in range(n):
        for k in range(idx.shape[1]):
            dense[i, idx[i, k]] += w[i, k]
    return s0, dense


def test_area_weights_average_the_footprint() -> None:
    s0, dense = _dense(3, 2, 2.5, 100)  # output 3 covers source [7.5, 10), output 4 covers [10, 12.5)
    assert s0 == 7
    np.testing.assert_allclose(dense[0], [0.2, 0.4, 0.4, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(dense[1], [0, 0, 0, 0.4, 0.4, 0.2], atol=1e-7)
    s0, dense = _dense(40, 1, 2.5, 101)  # the last output pixel: footprint [100, 102.5) clipped to [100, 101)
    assert s0 == 100 and dense.tolist() == [[1.0]]
    _, dense = _dense(0, 3, 0.5, 2)  # upsampling 2 → 4 px, the first 3 (clamped at the edge)
    np.testing.assert_allclose(dense, [[1, 0], [0.75, 0.25], [0.25, 0.75]])


def test_single_level_image_is_resampled_to_the_model_resolution(tmp_path: Path, random_model_dir: Path) -> None:
    """A 0.25 µm/px image without a pyramid, scored by a 0.5 µm/px model, gives the mosaic of the same image
    whose level 1 is the 2×2 area average (what scanners write), and run.json records the resampling."""
    img = textured_image(384, 320, seed=12, fg_box=(32, 16, 300, 260))
    single = write_tiff(tmp_path / "single.tif", img, mpp=0.25, n_levels=1)
    half = np.rint(img.astype(np.float64).reshape(192, 2, 160, 2, 3).mean(axis=(1, 3))).astype(np.uint8)
    pyramid = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(pyramid) as tw:
        tw.write(img, tile=(64, 64), compression="zlib", photometric="rgb", subifds=1, resolution=(4e4, 4e4),
                 resolutionunit="CENTIMETER", metadata=None)
        tw.write(half, tile=(64, 64), compression="zlib", photometric="rgb", subfiletype=1)
    cfg = {"mask": {"method": "brightfield"}}
    res_single = _score(single, tmp_path / "a", random_model_dir, **cfg)
    res_pyr = _score(pyramid, tmp_path / "b", random_model_dir, **cfg)
    inp = res_single.run["input"]
    assert inp["resampled_from_level"] == 0 and inp["resample_scale"] == pytest.approx(0.5)
    assert inp["level_mpp"] == pytest.approx(0.5) and inp["level_shape"] == [192, 160]
    assert res_pyr.run["input"]["resampled_from_level"] is None and res_pyr.run["input"]["level"] == 1
    np.testing.assert_allclose(_mosaic(res_single), _mosaic(res_pyr), atol=1e-6, equal_nan=True)
    # decimation (img[::2, ::2]) instead of area averaging differs, but stays close
    write_tiff(tmp_path / "decimated.tif", img, mpp=0.25, n_levels=2)
    dec = _mosaic(_score(tmp_path / "decimated.tif", tmp_path / "c", random_model_dir, **cfg))
    assert np.nanmax(np.abs(dec - _mosaic(res_single))) < 0.02  # measured 0.0022 (mean 0.0005)


def test_coarser_only_image_is_upsampled(tmp_path: Path, random_model_dir: Path) -> None:
    img = textured_image(100, 90, seed=13)
    res = _score(write_tiff(tmp_path / "coarse.tif", img, mpp=1.0), tmp_path / "o", random_model_dir)
    assert res.status == "ok", res.error
    assert res.run["input"]["resample_scale"] == pytest.approx(2.0) and res.run["input"]["level_shape"] == [200, 180]
    assert res.run["input"]["conversion"]["resample_method"] == "linear interpolation"


@pytest.mark.ray
def test_ray_actors_read_through_the_same_recipe(tmp_path: Path, random_model_dir: Path) -> None:
    """The plan carries the recipe: actors convert (uint16) and resample (0.25 → 0.5 µm/px) exactly like one process."""
    import ray

    from slidescore.run.ray import score_samples_ray

    img = textured_image(320, 288, seed=14, fg_box=(24, 24, 260, 230))
    src = _imwrite(tmp_path / "u16.tif", img.astype(np.uint16) * 257, mpp=0.25)
    cfg = JobConfig.from_dict({"model": {"name": str(random_model_dir)}, "tiling": {"chunk_cells": 4},
                               "input": {"conversion": {"uint16": {"low": 0, "high": 65535}}},
                               "cluster": {"num_cpus_per_actor": 0.5}})
    (one,) = score_samples([str(src)], cfg, str(tmp_path / "one"), model=load_model(str(random_model_dir)))
    assert one.run["input"]["resampled_from_level"] == 0 and len(one.run["input"]["conversion"]["window"]) == 2
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_AUTH_MODE", "disabled")  # a cluster inside the test process needs no token
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            (dist,) = score_samples_ray([str(src)], cfg, str(tmp_path / "ray"), n_actors=2, progress=False)
        finally:
            ray.shutdown()
    np.testing.assert_array_equal(_mosaic(dist), _mosaic(one))
