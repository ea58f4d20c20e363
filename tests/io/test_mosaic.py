"""The OME-Zarr mosaic is valid OME-Zarr 0.4, readable by ome-zarr, aligned and scaled to the source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from slidescore.config import JobConfig
from slidescore.io import mosaic as mz
from slidescore.io.pyramid import build_pyramid
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("mosaic")
    # level 0 at 0.25 µm/px; the 0.5 µm/px model reads level 1: cell = 16 px · 0.5 µm = 8 µm
    img = textured_image(2400, 2000, seed=2, fg_box=(300, 200, 1500, 1400))
    tif = write_tiff(root / "slide.tif", img, mpp=0.25, n_levels=3, tile_px=128)
    cfg = JobConfig.from_dict({"output": {"uri": str(root / "out")}, "tiling": {"chunk_cells": 32}})
    (res,) = score_samples([str(tif)], cfg, str(root / "out"), model=load_model(str(random_model_dir)))
    assert res.status == "ok", res.error
    return Path(res.out_dir)


def test_mosaic_validates_with_ome_zarr_models(scored: Path) -> None:
    from ome_zarr_models.v04 import Image, ImageLabel

    img = Image.from_zarr(zarr.open_group(str(scored / "probabilities.ome.zarr"), mode="r"))
    ms = img.attributes.multiscales[0]
    assert [a.name for a in ms.axes] == ["c", "y", "x"]
    assert len(ms.datasets) >= 2
    ImageLabel.from_zarr(zarr.open_group(str(scored / "probabilities.ome.zarr/labels/suspect"), mode="r"))
    Image.from_zarr(zarr.open_group(str(scored / "mask.ome.zarr"), mode="r"))


def test_mosaic_is_zarr_v2_blosc_slash_separator(scored: Path) -> None:
    meta = json.loads((scored / "probabilities.ome.zarr/0/.zarray").read_text())
    assert meta["zarr_format"] == 2 and meta["dimension_separator"] == "/"
    assert meta["compressor"]["id"] == "blosc" and meta["filters"] is None
    assert meta["dtype"] == "<f4"
    assert any(p.is_dir() for p in (scored / "probabilities.ome.zarr/0").iterdir())  # nested chunk keys


def test_ome_zarr_reader_opens_at_the_right_scale(scored: Path) -> None:
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(scored / "probabilities.ome.zarr")))())
    image = next(n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs))
    tr = image.metadata["coordinateTransformations"]
    for lvl, transforms in enumerate(tr):
        scale = next(t["scale"] for t in transforms if t["type"] == "scale")
        assert scale[1:] == pytest.approx([8.0 * 2**lvl] * 2)  # 0.25 µm/px · 2 (level 1) · 16 px stride · 2^lvl
        trans = next(t["translation"] for t in transforms if t["type"] == "translation")
        # pixel centre of an n-source-pixel cell lies at (n − 1)/2 source pixels
        n_src = 32 * 2**lvl
        assert trans[1] == pytest.approx((n_src - 1) / 2 * 0.25)
    data0 = np.asarray(image.data[0])
    assert data0.shape == (1, -(-1200 // 16), -(-1000 // 16))  # level-1 image 1200×1000 px, 16-px cells
    # aligned to the source: scored cells lie over the textured (foreground) box of the image
    scored_cells = ~np.isnan(data0[0])
    ys, xs = np.nonzero(scored_cells)
    um_y = ys * 8.0 + 4.0
    um_x = xs * 8.0 + 4.0
    assert um_y.min() >= (300 - 64 * 2) * 0.25 and um_y.max() <= (1800 + 64 * 2) * 0.25
    assert um_x.min() >= (200 - 64 * 2) * 0.25 and um_x.max() <= (1600 + 64 * 2) * 0.25


def test_ome_xml_carries_pixel_size_and_pyramid_levels_are_consistent(scored: Path) -> None:
    xml = (scored / "probabilities.ome.zarr/OME/METADATA.ome.xml").read_text()
    assert float(re.search(r'PhysicalSizeX="([0-9.]+)"', xml).group(1)) == pytest.approx(8.0)
    root = zarr.open_group(str(scored / "probabilities.ome.zarr"), mode="r")
    l0, l1 = np.asarray(root["0"]), np.asarray(root["1"])
    assert l1.shape[1:] == (-(-l0.shape[1] // 2), -(-l0.shape[2] // 2))
    with np.errstate(all="ignore"):
        block = l0[0, :2, :2]
        if np.isfinite(block).any():
            assert l1[0, 0, 0] == pytest.approx(np.nanmean(block))
    omero = root.attrs["omero"]
    assert omero["channels"][0]["label"] == "parasitized"
    assert omero["channels"][0]["window"]["end"] == 1.0


def test_labels_are_the_thresholded_map(scored: Path) -> None:
    root = zarr.open_group(str(scored / "probabilities.ome.zarr"), mode="r")
    prob = np.asarray(root["0"])[0]
    lab = np.asarray(root["labels/suspect/0"])
    np.testing.assert_array_equal(lab == 1, np.nan_to_num(prob, nan=0) >= 0.5)


# -- the stored encoding (float32 NaN or a finite no-data value; uint8 0 = not scored, 1…255) ------
def _spec(dtype: str, not_scored: float | None = None, shape: tuple[int, int, int] = (2, 7, 5)) -> mz.MosaicSpec:
    return mz.MosaicSpec(shape=shape, chunk=4, n_levels=3, dtype=dtype, cell_um=8.0, source_mpp=0.5,
                         channel_names=("a", 'b "q" <&>'), colors=((230, 25, 75), (255, 255, 255)), thresholds=(0.5, 0.5),
                         not_scored=not_scored)


def test_uint8_not_scored_sorts_below_every_probability_and_round_trips() -> None:
    enc = mz.Encoding.for_output("uint8")
    p = np.concatenate([[np.nan], np.linspace(0, 1, 10001)]).astype(np.float32)
    stored = mz.encode(p, enc)
    assert stored[0] == 0 == enc.fill and stored[1:].min() == 1 and stored[-1] == 255
    assert np.all(np.diff(stored[1:].astype(int)) >= 0)  # monotone: "not scored" (0) below p = 0 (1)
    back = mz.decode(stored, enc)
    assert np.isnan(back[0]) and not np.isnan(back[1:]).any()
    assert np.abs(back[1:] - p[1:]).max() <= 1 / 254 / 2 + 1e-7
    np.testing.assert_array_equal(mz.decode(stored), back)  # without an encoding: what slidescore writes
    assert enc.to_attrs() == {"dtype": "uint8", "not_scored": 0, "scale": 254, "offset": 1}
    assert enc.window() == {"start": 1, "end": 255, "min": 0, "max": 255}


def test_float32_no_data_value_and_nan_default() -> None:
    p = np.array([[np.nan, 0.0, 0.25, 1.0]], np.float32)
    default = mz.Encoding.for_output("float32")
    np.testing.assert_array_equal(mz.encode(p, default).view(np.uint32), p.view(np.uint32))  # stored as is, bit for bit
    assert default.to_attrs()["not_scored"] == "NaN" and default.window() == {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}
    minus1 = mz.Encoding.for_output("float32", -1.0)
    stored = mz.encode(p, minus1)
    np.testing.assert_array_equal(stored, [[-1.0, 0.0, 0.25, 1.0]])
    np.testing.assert_array_equal(mz.decode(stored, minus1), p)
    assert minus1.fill == -1.0 and minus1.window() == {"start": 0.0, "end": 1.0, "min": -1.0, "max": 1.0}
    assert mz.Encoding.from_attrs({"slidescore": {"encoding": minus1.to_attrs()}}, "float32") == minus1
    assert mz.Encoding.for_output("float32", float("nan")) == default


def test_old_uint8_mosaics_without_a_recorded_encoding_still_decode() -> None:
    old = mz.Encoding.from_attrs({"slidescore": {"run_key": "k"}}, np.uint8)  # 255 = not scored, p · 254
    out = mz.decode(np.array([255, 0, 127, 254], np.uint8), old)
    assert np.isnan(out[0]) and out[1:] == pytest.approx([0.0, 0.5, 1.0])


@pytest.mark.parametrize(("dtype", "not_scored"), [("float32", None), ("float32", -1.0), ("uint8", None)])
def test_pyramid_and_readers_treat_the_no_data_value_as_not_scored(tmp_path: Path, dtype: str, not_scored: float | None) -> None:
    from slidescore.core.types import Box

    spec = _spec(dtype, not_scored)
    path = tmp_path / "m.ome.zarr"
    mz.create_mosaic(path, spec, {"run_key": "k"})
    prob = np.full(spec.shape, np.nan, np.float32)
    prob[:, :3, :3] = [[[0.2, 0.4, np.nan], [0.6, 0.8, 0.1], [1.0, np.nan, 0.0]]]
    mz.write_block(path, spec, Box(0, 0, 4, 4), prob[:, :4, :4])  # chunk (0, 0); the others stay absent
    build_pyramid(path, spec)
    tol = 1 / 254 / 2 + 1e-6 if dtype == "uint8" else 1e-7
    np.testing.assert_allclose(mz.read_level(path, 0), prob, atol=tol)
    lvl1 = mz.read_level(path, 1)
    assert lvl1[0, 0, 0] == pytest.approx(np.mean([0.2, 0.4, 0.6, 0.8]), abs=tol)
    assert lvl1[0, 0, 1] == pytest.approx(0.1, abs=tol)  # the not-scored neighbour is left out of the mean
    assert lvl1[0, 1, 0] == pytest.approx(1.0, abs=tol)
    assert np.isnan(lvl1[:, 2:, :]).all() and np.isnan(lvl1[:, :, 2:]).all()  # absent chunks = not scored
    assert np.isnan(mz.read_level(path, 2)[:, 1:, :]).all()
    np.testing.assert_allclose(mz.read_box(path, 0, Box(0, 0, 4, 4)), prob[:, :4, :4], atol=tol)
    assert zarr.open_group(str(path), mode="r").attrs["slidescore"] == {"run_key": "k", "encoding": spec.encoding.to_attrs()}


def test_ome_xml_names_and_colours_every_channel() -> None:
    import xml.etree.ElementTree as ET

    ns = {"ome": "http://www.openmicroscopy.org/Schemas/OME/2016-06"}
    root = ET.fromstring(mz.ome_xml(_spec("uint8")).encode())
    channels = root.findall("ome:Image/ome:Pixels/ome:Channel", ns)
    assert [c.get("Name") for c in channels] == ["a", 'b "q" <&>']
    assert [int(c.get("Color")) for c in channels] == [mz.ome_color((230, 25, 75)), -1]
    assert root.find("ome:Image/ome:Pixels", ns).get("Type") == "uint8"
    assert root.find("ome:Image/ome:Pixels", ns).get("PhysicalSizeX") == "8.0"


@pytest.mark.parametrize("rgb", [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255), (230, 25, 75), (128, 1, 254)])
def test_ome_colour_is_signed_rgba_and_round_trips(rgb: tuple[int, int, int]) -> None:
    v = mz.ome_color(rgb)
    assert -(2**31) <= v < 2**31
    assert v == int(np.array([(rgb[0] << 24) | (rgb[1] << 16) | (rgb[2] << 8) | 255], np.uint32).view(np.int32)[0])
    assert mz.ome_color_rgba(v) == (*rgb, 255)
    assert mz.ome_color((255, 0, 0)) == -16776961 and mz.ome_color((0, 0, 255)) == 0xFFFF  # red, blue; alpha 255


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"not_scored": 0.5}, "output.not_scored: expected nan or a finite number outside [0, 1]"),
        ({"not_scored": 1}, "output.not_scored: expected nan or a finite number outside [0, 1]"),
        ({"not_scored": float("inf")}, "output.not_scored: expected nan or a finite number outside [0, 1]"),
        ({"not_scored": "none"}, "output.not_scored: expected nan or a finite number outside [0, 1]"),
        ({"not_scored": [1]}, "output.not_scored: expected nan or a finite number outside [0, 1]"),
        ({"not_scored": -1, "dtype": "uint8"}, "output.not_scored: applies to float32 mosaics only"),
    ],
)
def test_output_not_scored_is_validated(output: dict, message: str) -> None:
    from slidescore.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        JobConfig.from_dict({"output": output})


@pytest.mark.parametrize(("value", "stored"), [("nan", None), (".nan", None), (float("nan"), None), (-1, -1.0), (2.5, 2.5)])
def test_output_not_scored_values(value: object, stored: float | None) -> None:
    cfg = JobConfig.from_dict({"output": {"not_scored": value}})
    assert cfg.output.not_scored_value() == stored
    assert JobConfig.from_dict(cfg.to_dict()) == cfg  # NaN spelled "nan": equal to itself, JSON-safe in run.json
