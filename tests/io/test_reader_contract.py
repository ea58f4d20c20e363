"""Every reader backend through the one contract (:mod:`tests.io.reader_contract`): tifffile (tiled
TIFF, OME-TIFF with SubIFDs, SVS-like), zarr (OME-Zarr 0.4), OpenSlide (generic tiled TIFF, SVS),
each from disk and, through the loopback S3 server, from object storage."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile

from slidescore.io import SlideReader, open_image
from slidescore.io.openslide_reader import OpenSlideReader
from slidescore.io.tiff import TiffReader
from slidescore.io.zarr_image import ZarrImageReader
from tests.io.reader_contract import ReaderContract, damage_tiff_tile, upload_once
from tests.io.test_formats import write_format

Maker = Callable[[np.ndarray, float, Path], SlideReader]


def write_pages_pyramid(path: Path, img: np.ndarray, mpp: float, *, n_levels: int = 3, tile_px: int = 64,
                        compression: str = "zlib") -> Path:
    """A generic tiled TIFF whose levels are top-level pages (reduced-resolution subfiles), the layout
    OpenSlide's generic-tiff reader takes as a pyramid; resolution tags in pixels per centimetre."""
    with tifffile.TiffWriter(path) as tw:
        for lvl in range(n_levels):
            ds = 2**lvl
            tw.write(img[::ds, ::ds], tile=(tile_px, tile_px), compression=compression, photometric="rgb",
                     extrasamples=["unassalpha"] if img.shape[-1] == 4 else None,
                     resolution=(1e4 / (mpp * ds), 1e4 / (mpp * ds)), resolutionunit="CENTIMETER",
                     subfiletype=0 if lvl == 0 else 1, metadata=None)
    return path


def _damage_zarr_chunk(folder: Path) -> None:
    """Overwrite the largest chunk file of level 0 of an OME-Zarr folder with garbage."""
    chunks = [p for p in (folder / "s0").rglob("*") if p.is_file() and not p.name.startswith(".") and p.name != "zarr.json"]
    victim = max(chunks, key=lambda p: p.stat().st_size)
    victim.write_bytes(np.random.default_rng(1).integers(0, 256, victim.stat().st_size, dtype=np.uint8).tobytes())


def _write(kind: str, pixels: np.ndarray, mpp: float, folder: Path) -> Path:
    assert mpp == 0.5  # test_formats writes at its MPP, which is the contract's
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "pages":
        return write_pages_pyramid(folder / "pages.tif", pixels, mpp)
    return write_format(kind, pixels, folder)


class _Local(ReaderContract):
    kind = ""
    reader_type: type = object

    @pytest.fixture
    def make_reader(self) -> Maker:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(str(_write(self.kind, pixels, mpp, tmp_path / "src")), backend=self.backend)
            assert isinstance(reader, self.reader_type), type(reader)
            return reader
        return make


class _TiffCorrupt:
    @pytest.fixture
    def make_corrupt(self) -> Callable[..., Any]:
        kind, backend = self.kind, self.backend  # type: ignore[attr-defined]

        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            path = _write(kind, pixels, mpp, tmp_path / "bad")
            damage_tiff_tile(path, 0, 3)
            return (lambda: open_image(str(path), backend=backend)), path.name
        return make


class _Remote(ReaderContract):
    kind = ""
    remote = True
    reader_type: type = object

    @pytest.fixture
    def make_reader(self, s3fs_client: Any, tmp_path_factory: pytest.TempPathFactory) -> Maker:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            uri = upload_once(s3fs_client, self.kind, pixels, lambda d: _write(self.kind, pixels, mpp, d),
                              tmp_path_factory.getbasetemp() / "uploads")
            reader = open_image(uri, backend=self.backend, cache_dir=str(tmp_path / "cache"))
            assert isinstance(reader, self.reader_type), type(reader)
            return reader
        return make


# -- tifffile --------------------------------------------------------------------------------------
class TestTiffTiled(_TiffCorrupt, _Local):
    kind, reader_type, expected_levels = "tiled", TiffReader, 3

    @pytest.fixture
    def make_rgba_reader(self) -> Maker:
        def make(rgba: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            return open_image(str(write_pages_pyramid(tmp_path / "rgba.tif", rgba, mpp, n_levels=1)))
        return make

    rgba = "channels"  # tifffile gives the samples as stored; io.adapt drops alpha for the model


class TestTiffOmeSubifds(_TiffCorrupt, _Local):
    kind, reader_type, expected_levels = "ome-tiff", TiffReader, 3


class TestTiffSvs(_TiffCorrupt, _Local):
    kind, reader_type, expected_levels = "svs", TiffReader, 3


@pytest.mark.s3
class TestTiffTiledS3(_Remote):
    kind, reader_type, expected_levels = "tiled", TiffReader, 3


# -- zarr ------------------------------------------------------------------------------------------
class TestOmeZarr(_Local):
    kind, reader_type, expected_levels = "ome-zarr-0.4", ZarrImageReader, 3

    @pytest.fixture
    def make_corrupt(self) -> Callable[..., Any]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            path = _write(self.kind, pixels, mpp, tmp_path / "bad")
            _damage_zarr_chunk(path)
            return (lambda: open_image(str(path))), path.name
        return make


@pytest.mark.s3
class TestOmeZarrS3(_Remote):
    kind, reader_type, expected_levels = "ome-zarr-0.4", ZarrImageReader, 3


# -- OpenSlide -------------------------------------------------------------------------------------
class TestOpenSlideGenericTiff(_TiffCorrupt, _Local):
    kind, reader_type, expected_levels, backend = "pages", OpenSlideReader, 3, "openslide"

    @pytest.fixture
    def make_rgba_reader(self) -> Maker:
        def make(rgba: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            return open_image(str(write_pages_pyramid(tmp_path / "rgba.tif", rgba, mpp, n_levels=1)), backend="openslide")
        return make


class TestOpenSlideSvs(_TiffCorrupt, _Local):
    kind, reader_type, expected_levels, backend = "svs", OpenSlideReader, 3, "openslide"


@pytest.mark.s3
class TestOpenSlideSvsS3(_Remote):
    kind, reader_type, expected_levels, backend = "svs", OpenSlideReader, 3, "openslide"
