"""OpenSlide backend. Slides written here as OpenSlide documents each format (the smallest faithful
ones): Hamamatsu VMS (an index, a baseline JPEG with restart markers, a map JPEG), 3DHistech MIRAX
(``.mrxs`` + folder: Slidedat.ini, Index.dat, Data0000.dat of PNG camera images, sparse too),
Philips TIFF (DPUfsImport XML) and Leica SCN (scn XML), each through the reader contract from disk and from S3 (fetched
whole, with every part, into the node's cache); the backend choice (auto by signature and name,
input.backend, a manifest's backend=); tifffile and OpenSlide give the same mosaic; and real slides
of the formats no library here writes (NDPI, BIF, SVSlide), given through
SLIDESCORE_OPENSLIDE_FILES."""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
from PIL import Image

from slidescore.config import JobConfig, SampleSpec, parse_manifest
from slidescore.core.types import Box
from slidescore.errors import ConfigError, InputError, UnsupportedImageError
from slidescore.io import SlideReader, open_image
from slidescore.io.openslide_reader import OpenSlideReader, composite
from slidescore.io.tiff import TiffReader
from tests.conftest import textured_image
from tests.io.reader_contract import ReaderContract, contract_pixels, upload, upload_once
from tests.io.test_reader_contract import write_pages_pyramid

MPP = 0.5


def write_vms(folder: Path, img: np.ndarray, mpp: float, *, name: str = "slide") -> Path:
    """A Hamamatsu VMS slide as OpenSlide documents it (openslide.org/formats/hamamatsu): a key file
    naming one baseline JPEG (restart markers every 8 MCUs: OpenSlide's tiles) and a map JPEG (the
    overview level), with the physical size in nm. JPEG q=100 4:4:4; width a multiple of 64 px and
    height of 8 px (whole restart intervals)."""
    h, w = img.shape[:2]
    assert w % 64 == 0 and h % 8 == 0
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(folder / f"{name}.jpg", quality=100, subsampling=0, restart_marker_blocks=8)
    Image.fromarray(np.ascontiguousarray(img[::8, ::8])).save(folder / f"{name}_map.jpg", quality=100, subsampling=0,
                                                             restart_marker_blocks=1)
    vms = folder / f"{name}.vms"
    vms.write_text("[Virtual Microscope Specimen]\nNoLayers=1\nNoJpegColumns=1\nNoJpegRows=1\n"
                   f"ImageFile={name}.jpg\nMapFile={name}_map.jpg\n"
                   f"PhysicalWidth={round(w * mpp * 1000)}\nPhysicalHeight={round(h * mpp * 1000)}\n")
    return vms


class TestOpenSlideVms(ReaderContract):
    backend = "auto"  # .vms is OpenSlide's by name
    max_abs_diff = 6  # JPEG q=100 4:4:4 of the contract's noisy texture: measured 4

    @pytest.fixture
    def pixels(self) -> np.ndarray:
        return contract_pixels(256, 320)

    @pytest.fixture
    def make_reader(self) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(str(write_vms(tmp_path / "vms", pixels, mpp)))
            assert isinstance(reader, OpenSlideReader) and reader.vendor == "hamamatsu"
            return reader
        return make

    @pytest.fixture
    def make_corrupt(self) -> Callable[..., Any]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            vms = write_vms(tmp_path / "bad", pixels, mpp)
            jpg = vms.with_suffix(".jpg")
            data = bytearray(jpg.read_bytes())
            mid = len(data) // 2
            data[mid : mid + 4000] = np.random.default_rng(5).integers(0, 256, 4000, dtype=np.uint8).tobytes()
            jpg.write_bytes(bytes(data))
            return (lambda: open_image(str(vms))), vms.name
        return make


@pytest.mark.s3
class TestOpenSlideVmsS3(TestOpenSlideVms):
    remote = True

    @pytest.fixture
    def make_reader(self, s3fs_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            uri = upload_once(s3fs_client, "vms", pixels, lambda d: write_vms(d / "vms", pixels, mpp).parent,
                              tmp_path_factory.getbasetemp() / "uploads", "/slide.vms")
            reader = open_image(uri, cache_dir=str(tmp_path / "cache"))
            assert isinstance(reader, OpenSlideReader)
            assert reader.fetch_stats is not None and reader.fetch_stats["files"] == 3  # index, image, map
            return reader
        return make

    def reopen(self, reader: SlideReader) -> SlideReader:
        again = open_image(reader.uri, cache_dir=str(Path(reader.path).parents[1]))  # type: ignore[attr-defined]
        assert again.fetch_stats["cache_hit"] and again.fetch_stats["bytes"] == 0  # type: ignore[attr-defined]
        return again


def test_a_missing_part_names_the_slide(tmp_path: Path) -> None:
    vms = write_vms(tmp_path, contract_pixels(64, 128), MPP)
    vms.with_name("slide_map.jpg").unlink()
    with pytest.raises(UnsupportedImageError, match=r"slide\.vms: OpenSlide cannot open it .*missing"):
        open_image(str(vms))


def test_auto_backend_by_name_and_signature(tmp_path: Path) -> None:
    img = contract_pixels(128, 128)
    pages = write_pages_pyramid(tmp_path / "pages.tif", img, MPP)
    svs = tmp_path / "slide.svs"
    tifffile.imwrite(svs, img, tile=(64, 64), photometric="rgb", description=f"Aperio Image Library v1\r\n128x128|MPP = {MPP}", metadata=None)
    cases = [(pages, "auto", TiffReader), (svs, "auto", TiffReader), (pages, "openslide", OpenSlideReader),
             (svs, "openslide", OpenSlideReader), (write_vms(tmp_path / "v", img, MPP), "auto", OpenSlideReader)]
    for path, backend, kind in cases:
        reader = open_image(str(path), backend=backend)
        try:
            assert isinstance(reader, kind), (path.name, backend, type(reader))
            assert reader.mpp == pytest.approx(MPP)
        finally:
            reader.close()
    with pytest.raises(InputError, match="unknown reader backend 'bioformats'"):
        open_image(str(pages), backend="bioformats")
    with pytest.raises(UnsupportedImageError, match="not a slide OpenSlide reads"):
        (tmp_path / "notes.txt").write_text("hello")
        open_image(str(tmp_path / "notes.txt"), backend="openslide")


def test_software_default_dpi_is_no_resolution(tmp_path: Path) -> None:
    """OpenSlide turns 72 dpi into 352.8 µm/px; the TIFF reader's policy (a software default) holds."""
    path = tmp_path / "screenshot.tif"
    tifffile.imwrite(path, contract_pixels(64, 64), tile=(32, 32), photometric="rgb", resolution=(72, 72),
                     resolutionunit="INCH", metadata=None)
    for backend in ("tifffile", "openslide"):
        reader = open_image(str(path), backend=backend)
        assert reader.mpp is None and "software default" in reader.mpp_source, (backend, reader.mpp_source)
        reader.close()


def test_composite_against_the_background() -> None:
    rgba = np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 128]]], np.uint8)
    out = composite(rgba, (240, 230, 220))
    # recomputed: a·rgb/255 + (1 − a/255)·bg, rounded
    want = [[240, 230, 220], [10, 20, 30], [round(200 * 128 / 255 + 240 * 127 / 255), round(100 * 128 / 255 + 230 * 127 / 255),
                                           round(220 * 127 / 255)]]
    np.testing.assert_array_equal(out[0], np.array(want, np.uint8))


def test_manifest_backend_word() -> None:
    entries = parse_manifest("a.tif backend=openslide\nS1: b.mrxs c.mrxs backend=tifffile\nd.tif\n", "m")
    assert entries[0] == SampleSpec(None, ("a.tif",), backend="openslide")
    assert entries[1] == SampleSpec("S1", ("b.mrxs", "c.mrxs"), backend="tifffile")
    assert entries[2] == "d.tif"
    with pytest.raises(ConfigError, match="line 1: expected at most one 'backend=NAME'"):
        parse_manifest("a.tif backend=bioformats\n", "m")
    with pytest.raises(ConfigError, match="input.backend"):
        JobConfig.from_dict({"input": {"backend": "pillow"}})
    with pytest.raises(ConfigError, match="input.cache_max_bytes"):
        JobConfig.from_dict({"input": {"cache_max_bytes": 0}})


def _score(src: list[str | SampleSpec], cfg: JobConfig, out: Path, model: Any) -> list[np.ndarray]:
    from slidescore.io import mosaic as mz
    from slidescore.run.local import score_samples

    results = score_samples(src, cfg, str(out), model=model)
    maps = []
    for res in results:
        assert res.status == "ok", res.error
        maps.append(mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0))
    return maps


@pytest.mark.slow
@pytest.mark.parametrize("compression", ["zlib", "jpeg"])
def test_tifffile_and_openslide_give_the_same_mosaic(compression: str, tmp_path: Path, random_model_dir: Path) -> None:
    """The same generic tiled TIFF scored through tifffile (config input.backend) and OpenSlide (a
    manifest's backend=): identical mosaics for lossless tiles. JPEG tiles are decoded by two
    libjpeg-turbo builds (imagecodecs', openslide-bin's): the stated tolerance is 1 grey level per
    pixel and 1e-3 per probability (both builds here decode bit-identically, so the mosaics are equal)."""
    from slidescore.model import load_model

    model = load_model(str(random_model_dir))
    img = textured_image(400, 336, seed=21, fg_box=(40, 24, 300, 260))
    src = str(write_pages_pyramid(tmp_path / "slide.tif", img, MPP, tile_px=128, compression=compression))
    base = {"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}}
    (via_tifffile,) = _score([src], JobConfig.from_dict({**base, "input": {"backend": "tifffile"}}), tmp_path / "a", model)
    (via_openslide,) = _score([SampleSpec("s", (src,), backend="openslide")], JobConfig.from_dict(base), tmp_path / "b", model)
    run = json.loads((tmp_path / "b" / "s" / "run.json").read_text())
    assert run["input"]["backend"] == "openslide" and run["input"]["mpp_source"].startswith("openslide:mpp-x")
    if compression == "zlib":
        np.testing.assert_array_equal(via_openslide, via_tifffile)
        return
    np.testing.assert_allclose(via_openslide, via_tifffile, atol=1e-3, equal_nan=True)
    a, b = open_image(src, backend="tifffile"), open_image(src, backend="openslide")
    try:
        for lv in a.levels:
            box = Box(0, 0, lv.height, lv.width)
            assert np.abs(a.read(lv.index, box).astype(np.int16) - b.read(lv.index, box)).max() <= 1, lv
    finally:
        a.close()
        b.close()


@pytest.mark.s3
@pytest.mark.slow
def test_remote_vms_scores_like_the_local_one(s3fs_client: Any, tmp_path: Path, random_model_dir: Path) -> None:
    """A VMS slide (three files) on S3 scores as the same slide on disk; run.json records the fetch."""
    from slidescore.model import load_model

    model = load_model(str(random_model_dir))
    img = textured_image(256, 320, seed=4, fg_box=(20, 16, 200, 280))
    vms = write_vms(tmp_path / "vms", img, MPP)
    uri = upload(s3fs_client, vms.parent, "vms-score") + "/slide.vms"
    cfg = JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 8},
                               "input": {"cache_dir": str(tmp_path / "cache")}})
    (local,) = _score([str(vms)], cfg, tmp_path / "a", model)
    (remote,) = _score([SampleSpec("r", (uri,))], cfg, tmp_path / "b", model)
    np.testing.assert_array_equal(remote, local)
    fetch = json.loads((tmp_path / "b" / "r" / "run.json").read_text())["input"]["fetch"]
    sizes = sum(p.stat().st_size for p in vms.parent.iterdir())
    assert fetch["slide_bytes"] == sizes and fetch["files"] == 3 and fetch["seconds"] >= 0
    assert fetch["bytes"] in (0, sizes)  # fetched by the plan, or already cached by an earlier test's reader


def test_real_slides_when_given() -> None:
    """NDPI, Ventana BIF, SVSlide (and real MIRAX / VMS / Philips / SCN slides): no library here writes
    the first three. Point
    SLIDESCORE_OPENSLIDE_FILES at real slides (paths joined by os.pathsep; e.g. OpenSlide's public
    test data, openslide.cs.cmu.edu/download/openslide-testdata/) to check each opens, by ``auto``,
    through OpenSlide with a pyramid, a resolution and readable pixels."""
    paths = [p for p in os.environ.get("SLIDESCORE_OPENSLIDE_FILES", "").split(os.pathsep) if p]
    if not paths:
        pytest.skip("SLIDESCORE_OPENSLIDE_FILES is not set: no real NDPI/BIF/SVSlide (or MIRAX/VMS/SCN/Philips) slide to read")
    for path in paths:
        reader = open_image(path)
        try:
            assert isinstance(reader, OpenSlideReader), (path, type(reader))
            ds = [lv.downsample for lv in reader.levels]
            assert ds[0] == 1 and all(b > a for a, b in zip(ds, ds[1:], strict=False)), (path, ds)
            assert reader.mpp is not None and 0.05 <= reader.mpp <= 5.0, (path, reader.mpp, reader.mpp_source)
            top = reader.levels[-1]
            pix = reader.read(top.index, Box(0, 0, min(256, top.height), min(256, top.width)))
            assert pix.shape[2] == 3 and pix.std() > 0, path
        finally:
            reader.close()


def write_philips_tiff(path: Path, img: np.ndarray, mpp: float, *, n_levels: int = 3, tile_px: int = 64) -> Path:
    """A Philips TIFF as OpenSlide reads it (openslide.org/formats/philips): Software ``Philips…``,
    the DPUfsImport XML in the first ImageDescription with one WSI scanned image whose pixel data
    representations give each level's DICOM_PIXEL_SPACING (mm, row then column), levels as tiled
    pages marked reduced-resolution."""
    mm = [f'"{mpp * 2**i / 1000:.9g}" "{mpp * 2**i / 1000:.9g}"' for i in range(n_levels)]
    reps = "".join('<DataObject ObjectType="PixelDataRepresentation"><Attribute Name="DICOM_PIXEL_SPACING" '
                   f'Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">{s}</Attribute></DataObject>' for s in mm)
    xml = ('<?xml version="1.0" encoding="UTF-8" ?>\n<DataObject ObjectType="DPUfsImport">'
           '<Attribute Name="PIM_DP_SCANNED_IMAGES" Group="0x301D" Element="0x1003" PMSVR="IDataObjectArray"><Array>'
           '<DataObject ObjectType="DPScannedImage">'
           '<Attribute Name="PIM_DP_IMAGE_TYPE" Group="0x301D" Element="0x1004" PMSVR="IString">WSI</Attribute>'
           f'<Attribute Name="DICOM_PIXEL_SPACING" Group="0x0028" Element="0x0030" PMSVR="IDoubleArray">{mm[0]}</Attribute>'
           '<Attribute Name="PIIM_PIXEL_DATA_REPRESENTATION_SEQUENCE" Group="0x1001" Element="0x8B01" '
           f'PMSVR="IDataObjectArray"><Array>{reps}</Array></Attribute>'
           '</DataObject></Array></Attribute></DataObject>\n')
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(n_levels):
            ds = 2**lvl
            tw.write(img[::ds, ::ds], tile=(tile_px, tile_px), compression="zlib", photometric="rgb", software="Philips DP v1.0",
                     description=xml if lvl == 0 else None, subfiletype=0 if lvl == 0 else 1, metadata=None)
    return path


class TestOpenSlidePhilips(ReaderContract):
    """A Philips TIFF, read through OpenSlide by ``auto`` (tifffile lays its levels out differently)."""

    expected_levels = 3

    @pytest.fixture
    def make_reader(self) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(str(write_philips_tiff(tmp_path / "slide.tiff", pixels, mpp)))
            assert isinstance(reader, OpenSlideReader) and reader.vendor == "philips", type(reader)
            return reader
        return make

    @pytest.fixture
    def make_corrupt(self) -> Callable[..., Any]:
        from tests.io.reader_contract import damage_tiff_tile

        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            path = write_philips_tiff(tmp_path / "bad.tiff", pixels, mpp)
            damage_tiff_tile(path, 0, 2)
            return (lambda: open_image(str(path))), path.name
        return make


@pytest.mark.s3
class TestOpenSlidePhilipsS3(TestOpenSlidePhilips):
    """From S3, ``auto`` sees the Philips header while streaming and fetches the file for OpenSlide."""

    remote = True

    @pytest.fixture
    def make_reader(self, s3fs_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            uri = upload_once(s3fs_client, "philips", pixels, lambda d: write_philips_tiff(d / "slide.tiff", pixels, mpp),
                              tmp_path_factory.getbasetemp() / "uploads")
            reader = open_image(uri, cache_dir=str(tmp_path / "cache"))
            assert isinstance(reader, OpenSlideReader) and reader.fetch_stats is not None
            return reader
        return make

    def reopen(self, reader: SlideReader) -> SlideReader:
        return open_image(reader.uri, cache_dir=str(Path(reader.path).parents[1]))  # type: ignore[attr-defined]


def write_mirax(folder: Path, img: np.ndarray, mpp: float, *, n_levels: int = 3, tile_px: int = 64, name: str = "slide",
                fill_rgb: tuple[int, int, int] = (255, 255, 255), skip: tuple[tuple[int, int], ...] = ()) -> Path:
    """A 3DHistech MIRAX slide as OpenSlide documents it (openslide.org/formats/mirax): ``slide.mrxs``
    beside a ``slide/`` folder holding ``Slidedat.ini`` (the zoom levels, camera image size, µm/px,
    fill colour), ``Index.dat`` (version ``01.02``, the slide id, a pointer per zoom level to a
    linked list of data pages of (image index, offset, length, file) records) and ``Data0000.dat``
    (the camera images, PNG: lossless). One camera image is a tile of ``tile_px``; zoom level k
    concatenates 2^k × 2^k of them (IMAGE_CONCAT_FACTOR 1 per level); no overlap, no position map.
    ``skip`` leaves level-0 camera images (x, y) out: a sparse scan, which OpenSlide fills with the
    background colour ``fill_rgb``."""
    h, w = img.shape[:2]
    assert h % tile_px == 0 and w % tile_px == 0
    nx, ny = w // tile_px, h // tile_px
    data_dir = folder / name
    data_dir.mkdir(parents=True, exist_ok=True)
    slide_id = "0123456789abcdef0123456789abcdef"
    blobs = bytearray()
    levels: list[list[tuple[int, int, int, int]]] = []
    for lvl in range(n_levels):
        c = 2**lvl
        lv = img[::c, ::c]
        recs = []
        for y in range(0, ny, c):
            for x in range(0, nx, c):
                if lvl == 0 and (x, y) in skip:
                    continue
                tile = np.empty((tile_px, tile_px, 3), np.uint8)
                tile[:] = fill_rgb
                part = lv[(y // c) * tile_px : (y // c + 1) * tile_px, (x // c) * tile_px : (x // c + 1) * tile_px]
                tile[: part.shape[0], : part.shape[1]] = part
                buf = io.BytesIO()
                Image.fromarray(tile).save(buf, format="PNG")
                recs.append((y * nx + x, len(blobs), buf.tell(), 0))
                blobs += buf.getvalue()
        levels.append(recs)
    (data_dir / "Data0000.dat").write_bytes(bytes(blobs))
    head = b"01.02" + slide_id.encode()
    table = len(head) + 8  # after the hierarchical and the (unused) non-hierarchical root pointers
    index = bytearray(head + struct.pack("<ii", table, 0)) + b"\0" * (4 * n_levels)
    for lvl, recs in enumerate(levels):
        start = len(index)
        struct.pack_into("<i", index, table + 4 * lvl, start)
        index += struct.pack("<ii", 0, start + 8) + struct.pack("<ii", len(recs), 0)  # one page, no next
        for r in recs:
            index += struct.pack("<iiii", *r)
    (data_dir / "Index.dat").write_bytes(bytes(index))
    bgr = (fill_rgb[2] << 16) | (fill_rgb[1] << 8) | fill_rgb[0]
    sections = "".join(
        f"[LAYER_0_LEVEL_{i}_SECTION]\nIMAGE_CONCAT_FACTOR={0 if i == 0 else 1}\nOVERLAP_X=0\nOVERLAP_Y=0\n"
        f"MICROMETER_PER_PIXEL_X={mpp * 2**i!r}\nMICROMETER_PER_PIXEL_Y={mpp * 2**i!r}\nIMAGE_FILL_COLOR_BGR={bgr}\n"
        f"DIGITIZER_WIDTH={tile_px}\nDIGITIZER_HEIGHT={tile_px}\nIMAGE_FORMAT=PNG\n" for i in range(n_levels))
    vals = "".join(f"HIER_0_VAL_{i}=ZoomLevel_{i}\nHIER_0_VAL_{i}_SECTION=LAYER_0_LEVEL_{i}_SECTION\n" for i in range(n_levels))
    (data_dir / "Slidedat.ini").write_text(
        f"[GENERAL]\nSLIDE_ID={slide_id}\nIMAGENUMBER_X={nx}\nIMAGENUMBER_Y={ny}\nCameraImageDivisionsPerSide=1\n"
        f"[HIERARCHICAL]\nINDEXFILE=Index.dat\nHIER_COUNT=1\nHIER_0_NAME=Slide zoom level\nHIER_0_COUNT={n_levels}\n{vals}"
        f"NONHIER_COUNT=0\n[DATAFILE]\nFILE_COUNT=1\nFILE_0=Data0000.dat\n{sections}")
    mrxs = folder / f"{name}.mrxs"
    mrxs.write_bytes(b"MIRAX slide written by slidescore's tests\n")
    return mrxs


class TestOpenSlideMirax(ReaderContract):
    """A MIRAX slide (PNG camera images: lossless), read through OpenSlide by ``auto`` (.mrxs)."""

    expected_levels = 3

    @pytest.fixture
    def pixels(self) -> np.ndarray:
        return contract_pixels(256, 320)

    @pytest.fixture
    def make_reader(self) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(str(write_mirax(tmp_path / "mirax", pixels, mpp)))
            assert isinstance(reader, OpenSlideReader) and reader.vendor == "mirax", type(reader)
            return reader
        return make

    @pytest.fixture
    def make_corrupt(self) -> Callable[..., Any]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            mrxs = write_mirax(tmp_path / "bad", pixels, mpp)
            data = mrxs.with_suffix("") / "Data0000.dat"
            raw = bytearray(data.read_bytes())
            raw[200:1200] = np.random.default_rng(2).integers(0, 256, 1000, dtype=np.uint8).tobytes()  # inside image 0
            data.write_bytes(bytes(raw))
            return (lambda: open_image(str(mrxs))), mrxs.name
        return make


@pytest.mark.s3
class TestOpenSlideMiraxS3(TestOpenSlideMirax):
    """From S3: the .mrxs and its folder are fetched whole into the node's cache."""

    remote = True

    @pytest.fixture
    def make_reader(self, s3fs_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            uri = upload_once(s3fs_client, "mirax", pixels, lambda d: write_mirax(d / "mirax", pixels, mpp).parent,
                              tmp_path_factory.getbasetemp() / "uploads", "/slide.mrxs")
            reader = open_image(uri, cache_dir=str(tmp_path / "cache"))
            assert isinstance(reader, OpenSlideReader) and reader.fetch_stats is not None
            assert reader.fetch_stats["files"] == 4  # slide.mrxs, Slidedat.ini, Index.dat, Data0000.dat
            return reader
        return make

    def reopen(self, reader: SlideReader) -> SlideReader:
        return open_image(reader.uri, cache_dir=str(Path(reader.path).parents[1]))  # type: ignore[attr-defined]


def test_sparse_mirax_is_filled_with_its_background_colour(tmp_path: Path) -> None:
    """Camera images a scan left out are transparent in OpenSlide; the reader composites them onto
    the slide's fill colour (IMAGE_FILL_COLOR_BGR → openslide.background-color), not white."""
    img = contract_pixels(256, 320)
    fill = (220, 230, 240)
    reader = open_image(str(write_mirax(tmp_path, img, MPP, fill_rgb=fill, skip=((1, 1), (4, 3)))))
    try:
        assert isinstance(reader, OpenSlideReader) and reader.background == fill
        got = reader.read(0, Box(0, 0, 256, 320))
        for x, y in ((1, 1), (4, 3)):
            assert (got[y * 64 : y * 64 + 64, x * 64 : x * 64 + 64] == fill).all()
        keep = np.ones((256, 320), bool)
        keep[64:128, 64:128] = keep[192:256, 256:320] = False
        np.testing.assert_array_equal(got[keep], img[keep])
    finally:
        reader.close()


def test_mirax_without_its_folder_names_the_file(tmp_path: Path) -> None:
    mrxs = write_mirax(tmp_path, contract_pixels(64, 64), MPP)
    (mrxs.with_suffix("") / "Index.dat").unlink()
    with pytest.raises(UnsupportedImageError, match=r"slide\.mrxs: OpenSlide cannot open it"):
        open_image(str(mrxs))


def test_a_changed_mirax_data_file_changes_the_fingerprint(tmp_path: Path) -> None:
    """Run keys (stages.plan, intake) cover every part of a multi-file slide, not the .mrxs alone."""
    from slidescore.io.open import input_fingerprint

    img = contract_pixels(64, 128)
    mrxs = write_mirax(tmp_path, img, MPP)
    before = input_fingerprint(str(mrxs))
    assert before["parts"] == 4 and before["size_bytes"] == mrxs.stat().st_size
    data = mrxs.with_suffix("") / "Data0000.dat"
    data.write_bytes(data.read_bytes() + b"\0")  # the .mrxs file itself is untouched
    after = input_fingerprint(str(mrxs))
    assert after["parts_sha256"] != before["parts_sha256"]
    tif = write_pages_pyramid(tmp_path / "plain.tif", img, MPP)
    from slidescore.io.storage import fingerprint

    assert input_fingerprint(str(tif)) == fingerprint(str(tif))  # one-file images: keys as before


def write_scn(path: Path, img: np.ndarray, mpp: float, *, n_levels: int = 3, tile_px: int = 64) -> Path:
    """A Leica SCN slide as OpenSlide reads it (openslide.org/formats/leica): a tiled TIFF whose first
    ImageDescription is the ``scn`` XML (2010/10/01 namespace) of one collection holding one
    brightfield main image, its levels (``dimension`` elements naming their IFDs) and its physical
    size in nm. The collection is 1 nm smaller than the image: a main image exactly the collection's
    size at offset 0 is what Leica calls the macro image."""
    h, w = img.shape[:2]
    nm = mpp * 1000
    dims = "".join(f'<dimension sizeX="{-(-w // 2**i)}" sizeY="{-(-h // 2**i)}" r="{i}" ifd="{i}"/>' for i in range(n_levels))
    xml = ('<?xml version="1.0" encoding="utf-8"?>\n<scn xmlns="http://www.leica-microsystems.com/scn/2010/10/01">'
           f'<collection name="slide" uuid="c0" sizeX="{round(w * nm) - 1}" sizeY="{round(h * nm) - 1}">'
           '<image name="main" uuid="i0"><creationDate>2026-12-05T00:00:00.00Z</creationDate>'
           f'<device model="Leica SCN400" version="1.5"/><pixels sizeX="{w}" sizeY="{h}">{dims}</pixels>'
           f'<view sizeX="{round(w * nm)}" sizeY="{round(h * nm)}" offsetX="0" offsetY="0" spacingZ="0"/>'
           '<scanSettings><objectiveSettings><objective>20</objective></objectiveSettings><illuminationSettings>'
           '<numericalAperture>0.5</numericalAperture><illuminationSource>brightfield</illuminationSource>'
           '</illuminationSettings></scanSettings></image></collection></scn>')
    with tifffile.TiffWriter(path) as tw:
        for i in range(n_levels):
            d = 2**i
            tw.write(img[::d, ::d], tile=(tile_px, tile_px), compression="zlib", photometric="rgb",
                     description=xml if i == 0 else None, resolution=(1e4 / (mpp * d), 1e4 / (mpp * d)),
                     resolutionunit="CENTIMETER", metadata=None)
    return path


class TestOpenSlideLeicaScn(ReaderContract):
    """A Leica SCN slide, read through OpenSlide by ``auto`` (.scn)."""

    expected_levels = 3

    @pytest.fixture
    def make_reader(self) -> Callable[..., SlideReader]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(str(write_scn(tmp_path / "slide.scn", pixels, mpp)))
            assert isinstance(reader, OpenSlideReader) and reader.vendor == "leica", type(reader)
            return reader
        return make

    @pytest.fixture
    def make_corrupt(self) -> Callable[..., Any]:
        from tests.io.reader_contract import damage_tiff_tile

        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            path = write_scn(tmp_path / "bad.scn", pixels, mpp)
            damage_tiff_tile(path, 0, 5)
            return (lambda: open_image(str(path))), path.name
        return make


def test_tiles_above_max_tile_bytes_are_refused_when_opened(tmp_path: Path) -> None:
    """From OpenSlide's tile hints (generic TIFF) or, without them (Leica SCN), the TIFF's own tiles."""
    img = contract_pixels(128, 128)
    for path in (write_pages_pyramid(tmp_path / "g.tif", img, MPP), write_scn(tmp_path / "s.scn", img, MPP)):
        ok = open_image(str(path), backend="openslide", max_tile_bytes=64 * 64 * 4)
        assert ok.max_chunk_bytes == 64 * 64 * 4  # type: ignore[attr-defined]
        ok.close()
        with pytest.raises(UnsupportedImageError, match="above limits.max_tile_bytes = 16,000"):
            open_image(str(path), backend="openslide", max_tile_bytes=16_000)


@pytest.mark.ray
@pytest.mark.s3
@pytest.mark.slow
def test_ray_actors_share_one_cached_copy_of_a_remote_mirax(s3fs_client: Any, tmp_path: Path, random_model_dir: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A MIRAX slide on S3 scored by two Ray actors on one node: every reader (the plan's, each
    actor's, the finish's) opens the one cached copy (fetched once), and the mosaic equals the
    local slide's scored in one process."""
    import ray

    from slidescore.model import load_model
    from slidescore.run.ray import score_samples_ray

    img = textured_image(256, 320, seed=8, fg_box=(16, 16, 224, 288))
    mrxs = write_mirax(tmp_path / "src", img, MPP)
    uri = upload(s3fs_client, mrxs.parent, "mirax-ray") + "/slide.mrxs"
    cache = tmp_path / "cache"
    cfg = JobConfig.from_dict({"mask": {"method": "none"}, "tiling": {"chunk_cells": 4},
                               "input": {"cache_dir": str(cache)}, "model": {"name": str(random_model_dir)}})
    (local,) = _score([str(mrxs)], cfg, tmp_path / "local", load_model(str(random_model_dir)))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        (res,) = score_samples_ray([SampleSpec("m", (uri,))], cfg, str(tmp_path / "ray"), n_actors=2, progress=False)
    finally:
        ray.shutdown()
    assert res.status == "ok", res.error
    from slidescore.io import mosaic as mz

    np.testing.assert_array_equal(mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0), local)
    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert len(entries) == 1 and not [p for p in cache.iterdir() if ".tmp-" in p.name]  # one fetch, no leftovers
    fetch = json.loads((tmp_path / "ray" / "m" / "run.json").read_text())["input"]["fetch"]
    assert fetch["files"] == 4 and fetch["bytes"] == fetch["slide_bytes"] > 0 and not fetch["cache_hit"]
