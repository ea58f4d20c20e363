"""Cross-format equivalence: the same pixels as SVS-like, OME-TIFF, tiled, striped TIFF, OME-Zarr 0.4/0.5
and bare Zarr arrays read identically and produce the same mosaic."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
import zarr

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff

MPP = 0.5


def write_format(kind: str, img: np.ndarray, folder: Path) -> Path:
    """Write ``img`` (level 0 at 0.5 µm/px) in one of the supported layouts, with its own libraries."""
    levels = [img, img[::2, ::2], img[::4, ::4]]
    if kind == "tiled":
        return write_tiff(folder / "tiled.tif", img, mpp=MPP, n_levels=3, tile_px=128)
    if kind == "svs":
        path = folder / "slide.svs"
        desc = f"Aperio Image Library v12.0.15\r\n{img.shape[1]}x{img.shape[0]} (128x128) RGB|AppMag = 20|MPP = {MPP}"
        with tifffile.TiffWriter(path) as tw:
            tw.write(levels[0], tile=(128, 128), compression="zlib", photometric="rgb", description=desc, metadata=None)
            tw.write(img[::8, ::8], photometric="rgb", description="Aperio Image Library thumbnail", metadata=None)
            for lv in levels[1:]:
                tw.write(lv, tile=(128, 128), compression="zlib", photometric="rgb", description=desc, metadata=None)
        return path
    if kind == "ome-tiff":
        path = folder / "slide.ome.tif"
        with tifffile.TiffWriter(path, ome=True) as tw:
            tw.write(levels[0], tile=(128, 128), subifds=2, compression="zlib", photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": MPP, "PhysicalSizeXUnit": "µm", "PhysicalSizeY": MPP, "PhysicalSizeYUnit": "µm"})
            for lv in levels[1:]:
                tw.write(lv, tile=(128, 128), subfiletype=1, compression="zlib", photometric="rgb")
        return path
    if kind == "striped":
        path = folder / "striped.tif"
        tifffile.imwrite(path, img, rowsperstrip=16, photometric="rgb", resolution=(1e4 / MPP, 1e4 / MPP), resolutionunit="CENTIMETER")
        return path
    if kind in ("ome-zarr-0.4", "ome-zarr-0.5"):
        from ome_zarr import format as fmt
        from ome_zarr import writer

        v5 = kind.endswith("0.5")
        path = folder / f"{kind}.ome.zarr"
        group = zarr.open_group(str(path), mode="w", zarr_format=3 if v5 else 2)
        writer.write_image(np.moveaxis(img, -1, 0), group, axes="cyx", fmt=fmt.FormatV05() if v5 else fmt.FormatV04(),
                           scale={"c": 1.0, "y": MPP, "x": MPP}, axes_units={"y": "micrometer", "x": "micrometer"}, scale_factors=(2, 4))
        return path
    if kind in ("zarr-v2", "zarr-v3"):
        path = folder / f"{kind}.zarr"
        zarr.create_array(str(path), data=img, chunks=(100, 100, 3), zarr_format=2 if kind == "zarr-v2" else 3)
        return path
    raise ValueError(kind)


KINDS = ["tiled", "svs", "ome-tiff", "striped", "ome-zarr-0.4", "ome-zarr-0.5", "zarr-v2", "zarr-v3"]


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return textured_image(400, 336, seed=21, fg_box=(40, 24, 300, 260))


@pytest.mark.parametrize("kind", KINDS)
def test_every_format_reads_the_same_pixels_and_resolution(kind: str, image: np.ndarray, tmp_path: Path) -> None:
    reader = open_image(str(write_format(kind, image, tmp_path)))
    try:
        assert (reader.levels[0].height, reader.levels[0].width, reader.n_channels) == (400, 336, 3)
        np.testing.assert_array_equal(reader.read(0, Box(13, 7, 200, 150)), image[13:213, 7:157])
        if kind.startswith("zarr-v"):
            assert reader.mpp is None  # bare arrays carry no resolution: the config must give it
        else:
            assert reader.mpp == pytest.approx(MPP), reader.mpp_source
        if kind not in ("striped", "zarr-v2", "zarr-v3"):
            assert len(reader.levels) == 3 and reader.levels[1].downsample == pytest.approx(2)
    finally:
        reader.close()


def test_all_formats_give_the_same_mosaic(image: np.ndarray, tmp_path: Path, random_model_dir: Path) -> None:
    model = load_model(str(random_model_dir))
    cfg = JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}, "input": {"mpp": MPP}})
    maps = {}
    for kind in KINDS:
        folder = tmp_path / kind
        folder.mkdir()
        src = write_format(kind, image, folder)
        (res,) = score_samples([str(src)], cfg, str(folder / "out"), model=model)
        assert res.status == "ok", f"{kind}: {res.error}"
        maps[kind] = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    for kind in KINDS[1:]:
        np.testing.assert_array_equal(maps[kind], maps["tiled"], err_msg=kind)  # lossless inputs: exactly equal


def test_real_ndpi_file_when_one_is_given() -> None:
    """Hamamatsu NDPI cannot be written by any library here: point SLIDESCORE_NDPI_FILE at a real slide."""
    import os

    path = os.environ.get("SLIDESCORE_NDPI_FILE")
    if not path:
        pytest.skip("SLIDESCORE_NDPI_FILE is not set: no real NDPI slide to read (none can be generated)")
    reader = open_image(path)
    try:
        assert len(reader.levels) >= 2, "NDPI slides carry a pyramid of reduced-resolution pages"
        ds = [lv.downsample for lv in reader.levels]
        assert ds[0] == 1 and all(b > a for a, b in zip(ds, ds[1:], strict=False))
        assert reader.mpp is not None and 0.1 <= reader.mpp <= 2.0, (reader.mpp, reader.mpp_source)  # 0.23 µm/px at 40×, 0.46 at 20×
        assert reader.mpp_source.startswith(("tiff:XResolution", "openslide:mpp-x"))  # .ndpi: OpenSlide's by name
        assert reader.n_channels == 3 and reader.dtype == np.uint8
        top = reader.levels[-1]
        pix = reader.read(top.index, Box(0, 0, min(256, top.height), min(256, top.width)))
        assert pix.shape == (min(256, top.height), min(256, top.width), 3) and pix.std() > 0
    finally:
        reader.close()


def test_demo_smear_is_a_pyramid_to_tifffile_and_openslide(tmp_path: Path) -> None:
    """The demo TIFF is written in the Aperio SVS layout: tifffile and OpenSlide (and Bio-Formats,
    whose SVS reader takes the same pages; not installed here) see every level, with the same pixels
    as the SubIFD layout it replaced (so the demo's outputs do not change) and 0.25 µm/px."""
    import openslide

    from slidescore.io.tiff import write_tiff_pyramid
    from slidescore.offline.demo import DEMO_MPP, generate_smear
    from slidescore.offline.synthetic import SmearSpec, plan_smear, render_region

    size, seed = 1536, 3
    svs = tmp_path / "smear.tif"
    generate_smear(svs, size, seed, progress=False)
    layout = plan_smear(SmearSpec(height_px=size, width_px=size, mpp=DEMO_MPP, seed=seed))
    old = tmp_path / "subifds.tif"
    write_tiff_pyramid(str(old), (size, size), lambda y, x, h, w, ds: render_region(layout, y, x, h, w, downsample=ds),
                       mpp=DEMO_MPP, n_levels=2, tile_px=512, compression="jpeg")
    with tifffile.TiffFile(svs) as tif:
        assert tif.is_svs and len(tif.series[0].levels) == 2 and tif.series[0].levels[1].shape[:2] == (768, 768)
    slide = openslide.OpenSlide(str(svs))
    try:
        assert slide.properties["openslide.vendor"] == "aperio" and slide.level_count == 2
        assert float(slide.properties["openslide.mpp-x"]) == DEMO_MPP
        assert "thumbnail" in slide.associated_images
    finally:
        slide.close()
    readers = [open_image(str(old)), open_image(str(svs)), open_image(str(svs), backend="openslide")]
    try:
        for r in readers:
            assert len(r.levels) == 2 and r.mpp == DEMO_MPP, (type(r), r.mpp_source)
        for lv in readers[0].levels:
            box = Box(0, 0, lv.height, lv.width)
            want = readers[0].read(lv.index, box)
            for r in readers[1:]:
                np.testing.assert_array_equal(r.read(lv.index, box), want, err_msg=f"{type(r).__name__} level {lv.index}")
    finally:
        for r in readers:
            r.close()
