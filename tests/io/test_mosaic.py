"""The OME-Zarr mosaic is valid OME-Zarr 0.4, readable by ome-zarr, aligned and scaled to the source."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from slidescore.config import JobConfig
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
