"""DICOM WSI (:mod:`slidescore.io.dicom`): series written by ``wsidicomizer`` and by Orthanc's
``OrthancWSIDicomizer`` from TIFFs, read from a folder, from the loopback S3 server and from a real
DICOMweb server (Orthanc with its DICOMweb plugin) through the shared reader contract; the same pixels
as tifffile reads from the source TIFF (lossless: identical; JPEG: within a stated tolerance); the same
mosaic as the source TIFF; bad series fail their sample alone with a clear message."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.errors import InputError, SampleNotFoundError, UnsupportedImageError
from slidescore.io import SlideReader, open_image
from slidescore.io import mosaic as mz
from slidescore.io.dicom import DicomOptions, DicomReader, fingerprint, looks_like_dicom, open_dicom
from slidescore.io.dicom_web import import_wsidicom
from slidescore.io.tiff import TiffReader
from tests.conftest import textured_image
from tests.io.dicom_fixtures import (
    WSIDICOMIZER_ENCODINGS,
    Orthanc,
    damage_frame,
    drop_sparse_frames,
    orthanc_dicomize,
    source_tiff,
    svs_jpeg,
    wsidicomize,
)
from tests.io.reader_contract import ReaderContract, upload

import_wsidicom()  # before wsidicomizer imports it: pydicom 3 deprecation warnings at import time

Maker = Callable[[np.ndarray, float, Path], SlideReader]
MPP = 0.5
#: JPEG re-encoded by wsidicomizer (quality 90, 4:2:2) against the lossless source, level 0 of a
#: tissue-like (smoothed) texture: mean and 99th percentile of |Δ| per sample value (measured: 1.6, 12). JPEG tiles copied into DICOM
#: as they are decode exactly as tifffile decodes them (both libjpeg-turbo).
JPEG_MAX_MEAN_ABS_DIFF = 2.0
JPEG_MAX_P99_ABS_DIFF = 14


def _bucket() -> str:
    return f"dicom-{uuid.uuid4().hex[:10]}"


def _series(tool: str, pixels: np.ndarray, folder: Path, **kw: Any) -> Path:
    """A DICOM WSI series of ``pixels`` made by ``tool`` (``wsidicomizer`` / ``orthanc``) from a TIFF."""
    if tool == "wsidicomizer":
        tiff = svs_jpeg(pixels, folder / "src.tif") if kw.get("encoding") == "native" else source_tiff(pixels, folder / "src.tif")
        return wsidicomize(tiff, folder / "series", **kw)
    tiff = source_tiff(pixels, folder / "src.tif", compression=kw.pop("tiff_compression", "zlib"))
    return orthanc_dicomize(tiff, folder / "series", pixels.shape[:2], **kw)


def _level0_file(series: Path) -> Path:
    return max(series.glob("*.dcm"), key=lambda p: p.stat().st_size)


# -- the shared reader contract ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``get(tool, pixels, **options)``: the series of ``pixels`` made by ``tool``, converted once per
    module (the contract asks for the same image in every test); treat it as read-only."""
    cache: dict[tuple[Any, ...], Path] = {}

    def get(tool: str, pixels: np.ndarray, **kw: Any) -> Path:
        import hashlib

        key = (tool, hashlib.sha256(pixels.tobytes()).hexdigest(), pixels.shape, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = _series(tool, pixels, tmp_path_factory.mktemp("series"), **kw)
        return cache[key]
    return get


@pytest.fixture(scope="module")
def s3_uploads() -> dict[Path, str]:
    return {}


class _DicomContract(ReaderContract):
    expected_levels = 3
    tool = "wsidicomizer"
    options: dict[str, Any] = {"encoding": "jpeg2000-lossless"}

    @pytest.fixture
    def series(self, converted: Callable[..., Path]) -> Callable[[np.ndarray], Path]:
        return lambda pixels: converted(self.tool, pixels, **dict(self.options))

    @pytest.fixture
    def damaged(self, series: Callable[[np.ndarray], Path]) -> Callable[[np.ndarray, Path], tuple[Path, str]]:
        """A copy of the series with a JPEG 2000 frame of level 0 overwritten; and that file's name."""
        import shutil

        def make(pixels: np.ndarray, tmp_path: Path) -> tuple[Path, str]:
            copy = shutil.copytree(series(pixels), tmp_path / "damaged")
            victim = _level0_file(copy)
            damage_frame(victim)
            return copy, victim.name
        return make

    @pytest.fixture
    def make_corrupt(self, damaged: Callable[..., tuple[Path, str]]) -> Callable[..., Any]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            folder, name = damaged(pixels, tmp_path)
            return (lambda: open_image(str(folder))), name
        return make


class TestDicomFolderWsidicomizer(_DicomContract):
    """TILED_FULL, JPEG 2000 lossless, one instance per level, from a local folder (``auto`` finds it)."""

    @pytest.fixture
    def make_reader(self, series: Callable[[np.ndarray], Path]) -> Maker:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(str(series(pixels)))
            assert isinstance(reader, DicomReader), type(reader)
            return reader
        return make


class TestDicomFolderOrthanc(TestDicomFolderWsidicomizer):
    """TILED_SPARSE (per-frame positions), JPEG 2000 lossless, pyramid rebuilt by OrthancWSIDicomizer."""

    tool = "orthanc"
    options = {"compression": "jpeg2000"}


@pytest.mark.s3
class TestDicomS3(_DicomContract):
    """The wsidicomizer series uploaded to the loopback S3 server, read through fsspec (nothing staged)."""

    remote = True

    @pytest.fixture
    def make_reader(self, series: Callable[[np.ndarray], Path], s3fs_client: Any, s3_uploads: dict[Path, str]) -> Maker:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            folder = series(pixels)
            if folder not in s3_uploads:  # once per module: the contract only reads it
                s3_uploads[folder] = upload(s3fs_client, folder, _bucket())
            reader = open_image(s3_uploads[folder])
            assert isinstance(reader, DicomReader), type(reader)
            return reader
        return make

    @pytest.fixture
    def make_corrupt(self, damaged: Callable[..., tuple[Path, str]], s3fs_client: Any) -> Callable[..., Any]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            folder, name = damaged(pixels, tmp_path)
            uri = upload(s3fs_client, folder, _bucket())
            return (lambda: open_image(uri)), name
        return make


class TestDicomWeb(_DicomContract):
    """The wsidicomizer series stored in Orthanc, read through its DICOMweb API (WADO-RS frames)."""

    @pytest.fixture
    def make_reader(self, series: Callable[[np.ndarray], Path], orthanc_server: Orthanc) -> Maker:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> SlideReader:
            reader = open_image(orthanc_server.upload(series(pixels)))
            assert isinstance(reader, DicomReader) and reader.uri.startswith("dicomweb+http://"), reader.uri
            return reader
        return make

    @pytest.fixture
    def make_corrupt(self, damaged: Callable[..., tuple[Path, str]], orthanc_server: Orthanc) -> Callable[..., Any]:
        def make(pixels: np.ndarray, mpp: float, tmp_path: Path) -> tuple[Callable[[], SlideReader], str]:
            import pydicom

            folder, name = damaged(pixels, tmp_path)
            # a damaged copy of a stored series must be a series of its own: new UIDs for every instance
            for f in folder.glob("*.dcm"):
                ds = pydicom.dcmread(f)
                ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(tmp_path), "series"])
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[str(f)])
                ds.save_as(f, enforce_file_format=True)
            uid = str(pydicom.dcmread(folder / name, stop_before_pixels=True).SOPInstanceUID)
            uri = orthanc_server.upload(folder)
            return (lambda: open_image(uri)), uid  # over DICOMweb a frame is named by its instance UID
        return make


# -- equivalence with the source TIFF read through tifffile ----------------------------------------
@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return textured_image(560, 700, seed=4, fg_box=(60, 90, 400, 480))


def _levels_equal(dicom: SlideReader, tiff: SlideReader, levels: list[int], what: str) -> None:
    for i in levels:
        lv = tiff.levels[i]
        assert (dicom.levels[i].height, dicom.levels[i].width) == (lv.height, lv.width), what
        box = Box(0, 0, lv.height, lv.width)
        np.testing.assert_array_equal(dicom.read(i, box), tiff.read(i, box), err_msg=f"{what} level {i}")


def _open_both(tiff: Path, series: Path | str) -> tuple[SlideReader, SlideReader]:
    return open_image(str(tiff), backend="tifffile"), open_image(str(series))


@pytest.mark.parametrize("encoding", [e for e in WSIDICOMIZER_ENCODINGS if e not in ("native", "jpeg")])
def test_wsidicomizer_lossless_equals_tifffile(encoding: str, image: np.ndarray, tmp_path: Path) -> None:
    """Every level: wsidicomizer copies the TIFF's pyramid, re-encoded losslessly."""
    series = _series("wsidicomizer", image, tmp_path, encoding=encoding)
    tiff, dicom = _open_both(tmp_path / "src.tif", series)
    try:
        assert isinstance(dicom, DicomReader) and isinstance(tiff, TiffReader)
        assert dicom.mpp == pytest.approx(MPP, rel=1e-9) and dicom.mpp_source == "dicom:PixelSpacing"
        _levels_equal(dicom, tiff, [0, 1, 2], encoding)
    finally:
        tiff.close()
        dicom.close()


@pytest.mark.parametrize("compression", ["none", "jpeg2000"])
def test_orthanc_lossless_equals_tifffile(compression: str, image: np.ndarray, tmp_path: Path) -> None:
    """Level 0 (OrthancWSIDicomizer rebuilds the coarser levels with its own filter)."""
    series = _series("orthanc", image, tmp_path, compression=compression)
    tiff, dicom = _open_both(tmp_path / "src.tif", series)
    try:
        assert dicom.mpp == pytest.approx(MPP, rel=1e-6)
        _levels_equal(dicom, tiff, [0], f"orthanc {compression}")
        assert len(dicom.levels) == 3 and [lv.downsample for lv in dicom.levels] == [1, 2, 4]
    finally:
        tiff.close()
        dicom.close()


@pytest.mark.parametrize("tool", ["wsidicomizer", "orthanc"])
def test_copied_jpeg_tiles_equal_tifffile(tool: str, image: np.ndarray, tmp_path: Path) -> None:
    """A TIFF of JPEG tiles (an SVS for wsidicomizer's opentile source, our tiled TIFF for Orthanc):
    both tools copy the compressed tiles into DICOM (JPEG baseline), so the pixels are tifffile's."""
    kw = {"encoding": "native"} if tool == "wsidicomizer" else {"compression": "jpeg", "tiff_compression": "jpeg"}
    series = _series(tool, image, tmp_path, **kw)
    import pydicom

    syntax = pydicom.dcmread(_level0_file(series), stop_before_pixels=True).file_meta.TransferSyntaxUID
    assert syntax == pydicom.uid.JPEGBaseline8Bit, syntax.name
    tiff, dicom = _open_both(tmp_path / "src.tif", series)
    try:
        _levels_equal(dicom, tiff, [0, 1, 2] if tool == "wsidicomizer" else [0], f"{tool} jpeg")
        h, w = image.shape[:2]
        assert np.abs(dicom.read(0, Box(0, 0, h, w)).astype(np.int16) - image).mean() > 0.5  # it is lossy
    finally:
        tiff.close()
        dicom.close()


def test_reencoded_jpeg_within_tolerance(image: np.ndarray, tmp_path: Path) -> None:
    """wsidicomizer re-encoding a lossless TIFF as JPEG baseline: level 0 within the stated tolerance
    of tifffile; the coarser levels (2× decimations of the texture, so noisier) within twice that."""
    from scipy.ndimage import uniform_filter

    smooth = uniform_filter(image.astype(np.float32), size=(5, 5, 1)).round().astype(np.uint8)
    series = _series("wsidicomizer", smooth, tmp_path, encoding="jpeg")
    tiff, dicom = _open_both(tmp_path / "src.tif", series)
    try:
        for lv in dicom.levels:
            box = Box(0, 0, lv.height, lv.width)
            diff = np.abs(dicom.read(lv.index, box).astype(np.int16) - tiff.read(lv.index, box).astype(np.int16))
            k = 1 if lv.index == 0 else 2
            assert 0 < diff.mean() <= k * JPEG_MAX_MEAN_ABS_DIFF and np.percentile(diff, 99) <= k * JPEG_MAX_P99_ABS_DIFF, \
                (lv.index, diff.mean(), np.percentile(diff, 99), diff.max())
    finally:
        tiff.close()
        dicom.close()


def test_sparse_tiles_left_out_read_as_background(image: np.ndarray, tmp_path: Path) -> None:
    """TILED_SPARSE without some tiles (a scanner skips empty glass): they read as white, the rest as written."""
    series = _series("orthanc", image, tmp_path, compression="none")
    removed = drop_sparse_frames(_level0_file(series), {(0, 0), (3, 5)})
    assert removed == 2
    reader = open_dicom(str(series), max_tile_bytes=None)
    try:
        h, w = image.shape[:2]
        got = reader.read(0, Box(0, 0, h, w))
        want = image.copy()
        want[0:128, 0:128] = 255
        want[384:512, 640:700] = 255
        np.testing.assert_array_equal(got, want)
    finally:
        reader.close()


def test_tile_size_limit_is_checked_from_the_header(image: np.ndarray, tmp_path: Path) -> None:
    series = _series("wsidicomizer", image, tmp_path, encoding="uncompressed")
    with pytest.raises(UnsupportedImageError, match=r"128 × 128 × 3 .*limits.max_tile_bytes"):
        open_dicom(str(series), max_tile_bytes=128 * 128 * 3 - 1)
    open_dicom(str(series), max_tile_bytes=128 * 128 * 3).close()


def test_plane_options(image: np.ndarray, tmp_path: Path) -> None:
    series = _series("wsidicomizer", image, tmp_path, encoding="uncompressed")
    reader = open_dicom(str(series), max_tile_bytes=None, options=DicomOptions(focal_plane=0.0))
    reader.close()
    with pytest.raises(UnsupportedImageError, match=r"no optical path 'nope'; the series has \['0'\]"):
        open_dicom(str(series), max_tile_bytes=None, options=DicomOptions(optical_path="nope"))
    with pytest.raises(UnsupportedImageError, match=r"no focal plane at 5.0 µm; the series has \[0.0\] µm"):
        open_dicom(str(series), max_tile_bytes=None, options=DicomOptions(focal_plane=5.0))


def test_looks_like_dicom(image: np.ndarray, tmp_path: Path) -> None:
    series = _series("wsidicomizer", image, tmp_path, encoding="uncompressed")
    assert looks_like_dicom(str(series)) and looks_like_dicom(str(_level0_file(series)))
    assert looks_like_dicom("dicomweb+https://pacs.example/dicom-web/studies/1.2/series/1.2.3")
    assert not looks_like_dicom(str(tmp_path / "src.tif")) and not looks_like_dicom(str(tmp_path))
    assert not looks_like_dicom(str(tmp_path / "missing"))
    one = open_image(str(_level0_file(series)))  # one instance: a series of one level
    try:
        assert isinstance(one, DicomReader) and [(lv.height, lv.width) for lv in one.levels] == [image.shape[:2]]
        np.testing.assert_array_equal(one.read(0, Box(0, 0, 64, 64)), image[:64, :64])
    finally:
        one.close()
    renamed = tmp_path / "noext"
    renamed.mkdir()
    _level0_file(series).rename(renamed / "instance0")  # no suffix: found by the DICM marker
    assert looks_like_dicom(str(renamed))


@pytest.mark.s3
def test_looks_like_dicom_on_s3(image: np.ndarray, tmp_path: Path, s3fs_client: Any) -> None:
    series = _series("wsidicomizer", image, tmp_path, encoding="uncompressed")
    bucket = _bucket()
    uri = upload(s3fs_client, series, bucket)
    tif = upload(s3fs_client, tmp_path / "src.tif", bucket)
    assert looks_like_dicom(uri) and looks_like_dicom(uri + "/")
    assert not looks_like_dicom(tif) and not looks_like_dicom(f"s3://{bucket}/missing")


def test_fingerprint_follows_the_series_content(image: np.ndarray, tmp_path: Path, orthanc_server: Orthanc) -> None:
    """Run keys need the series' content: a folder's fingerprint covers every file, a DICOMweb
    series' its instance UIDs."""
    import os
    import shutil

    series = shutil.copytree(_series("wsidicomizer", image, tmp_path / "a", encoding="uncompressed"), tmp_path / "copy")
    first = fingerprint(str(series))
    assert first["files"] == 3 and first["size_bytes"] == sum(p.stat().st_size for p in series.glob("*.dcm"))
    assert fingerprint(str(series)) == first
    victim = min(series.glob("*.dcm"), key=lambda p: p.stat().st_size)
    os.utime(victim, (1e9, 1e9))  # the same bytes, another modification time: another fingerprint
    assert fingerprint(str(series)) != first
    web = fingerprint(orthanc_server.upload(series))
    assert web["instances"] == 3 and web["uri"].startswith("dicomweb+http://")


# -- end to end: the same mosaic ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def small() -> np.ndarray:
    return textured_image(320, 384, seed=5, fg_box=(40, 30, 240, 300))


SCORE_CFG = {"mask": {"method": "none"}, "tiling": {"chunk_cells": 8}, "report": {"enabled": False}}


def _mosaics(uris: dict[str, str], out: Path, model_dir: Path) -> dict[str, np.ndarray]:
    from slidescore.model import load_model
    from slidescore.run.local import score_samples

    model, cfg, maps = load_model(str(model_dir)), JobConfig.from_dict(SCORE_CFG), {}
    for kind, uri in uris.items():
        (res,) = score_samples([uri], cfg, str(out / kind), model=model)
        assert res.status == "ok", f"{kind}: {res.error}"
        maps[kind] = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    return maps


@pytest.mark.slow
@pytest.mark.s3
def test_dicom_scores_like_its_source_tiff(small: np.ndarray, tmp_path: Path, random_model_dir: Path,
                                           s3fs_client: Any) -> None:
    """``score_samples`` on the source TIFF and on lossless DICOM series made from it by both tools,
    read from a folder and from S3: identical mosaics."""
    wsi = _series("wsidicomizer", small, tmp_path / "w", encoding="jpeg2000-lossless")
    orth = _series("orthanc", small, tmp_path / "o", compression="jpeg2000")
    uris = {"tiff": str(tmp_path / "w" / "src.tif"), "folder": str(wsi), "orthanc": str(orth),
            "s3": upload(s3fs_client, wsi, _bucket())}
    maps = _mosaics(uris, tmp_path / "out", random_model_dir)
    assert np.isfinite(maps["tiff"]).all() and maps["tiff"].std() > 0
    for kind in uris:
        np.testing.assert_array_equal(maps[kind], maps["tiff"], err_msg=kind)


@pytest.mark.slow
def test_dicomweb_scores_like_its_source_tiff(small: np.ndarray, tmp_path: Path, random_model_dir: Path,
                                              orthanc_server: Orthanc) -> None:
    wsi = _series("wsidicomizer", small, tmp_path / "w", encoding="jpeg2000-lossless")
    maps = _mosaics({"tiff": str(tmp_path / "w" / "src.tif"), "dicomweb": orthanc_server.upload(wsi)},
                    tmp_path / "out", random_model_dir)
    np.testing.assert_array_equal(maps["dicomweb"], maps["tiff"])


# -- bad series: the sample fails alone, with a clear message ----------------------------------------
def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def _non_wsi_folder(folder: Path) -> Path:
    """A folder holding a real CT image (pydicom's own test file): DICOM, but not a slide."""
    import shutil

    from pydicom.data import get_testdata_file

    folder.mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "ct.dcm")
    return folder


def test_bad_series_fail_alone(small: np.ndarray, tmp_path: Path, random_model_dir: Path,
                               orthanc_server: Orthanc) -> None:
    from slidescore.model import load_model
    from slidescore.run.local import score_samples

    image = small
    good = _series("wsidicomizer", image, tmp_path / "good", encoding="jpeg2000-lossless")
    head_cut = _series("wsidicomizer", image, tmp_path / "headcut", encoding="jpeg2000-lossless")
    head_victim = _level0_file(head_cut)
    _truncate(head_victim, 300)  # inside the dataset header
    pixels_cut = _series("wsidicomizer", image, tmp_path / "pixcut", encoding="jpeg2000-lossless")
    victim = _level0_file(pixels_cut)
    _truncate(victim, victim.stat().st_size // 2)  # inside the pixel data: frames past the end
    not_wsi = _non_wsi_folder(tmp_path / "ct")
    web_uri = orthanc_server.upload(good)
    missing = web_uri.rsplit("/", 1)[0] + "/1.2.3.999"
    model = load_model(str(random_model_dir))
    cfg = JobConfig.from_dict(SCORE_CFG)
    uris = [str(good), str(head_cut), str(pixels_cut), str(not_wsi), missing]
    results = {r.uri: r for r in score_samples(uris, cfg, str(tmp_path / "out"), model=model)}
    assert results[str(good)].status == "ok", results[str(good)].error
    expect = {
        str(head_cut): (head_victim.name, "truncated"),
        str(pixels_cut): (victim.name, "truncated or corrupt"),
        str(not_wsi): ("CT Image Storage", "no DICOM whole-slide image instances"),
        missing: ("1.2.3.999", "no instances in series"),
    }
    for uri, (name, what) in expect.items():
        res = results[uri]
        assert res.status == "failed", uri
        assert name in res.error and what in res.error, res.error
        assert "Traceback" not in res.error and res.error_type in ("UnsupportedImageError", "SampleNotFoundError")


def test_open_errors_are_ours(tmp_path: Path) -> None:
    with pytest.raises(SampleNotFoundError):
        open_dicom(str(tmp_path / "nope"), max_tile_bytes=None)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.dcm").write_bytes(b"")
    with pytest.raises(UnsupportedImageError, match="a.dcm is named .dcm but is not a DICOM file"):
        open_dicom(str(empty), max_tile_bytes=None)
    (empty / "a.dcm").write_bytes(b"\0" * 100)
    with pytest.raises(UnsupportedImageError, match="a.dcm is named .dcm but is not a DICOM file"):
        open_image(str(empty / "a.dcm"))  # found by its name, refused by the DICOM reader
    with pytest.raises(InputError, match="not a DICOMweb series URL"):
        open_dicom("dicomweb+http://127.0.0.1:9/dicom-web/studies/1.2", max_tile_bytes=None)
    with pytest.raises(InputError, match="cannot reach the DICOMweb server"):
        open_dicom("dicomweb+http://127.0.0.1:9/dicom-web/studies/1.2/series/1.3", max_tile_bytes=None)
