"""Prefix discovery (:func:`slidescore.io.storage.list_images`, used by ``samples.prefix``, and the
intake poller's :func:`slidescore.intake.sources.find_samples`): one URI per image, whatever files the
image is made of — a DICOM WSI series folder is one image (not one per ``.dcm``), a MIRAX slide is its
``.mrxs`` (not its data folder), a VMS slide its ``.vms`` (not its ``.jpg`` parts) — in a local folder
and under an ``s3://`` prefix of the loopback S3 server."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from slidescore.core.types import Box
from slidescore.errors import SampleNotFoundError
from slidescore.intake import IntakeConfig, find_samples
from slidescore.io import open_image
from slidescore.io.dicom import DicomReader
from slidescore.io.dicom_web import import_wsidicom
from slidescore.io.storage import list_images
from slidescore.stages.layout import sample_id_for
from tests.conftest import textured_image
from tests.io.dicom_fixtures import source_tiff, wsidicomize

import_wsidicom()  # before wsidicomizer imports it: pydicom 3 deprecation warnings at import time

#: a folder of every kind (path → bytes; a trailing "/" is an empty folder); the stand-in bytes are
#: never opened, only listed
LAYOUT = {
    "a.tif": b"x", "b.svs": b"x", "notes.txt": b"x",
    # MIRAX: the slide file and its data folder of the same name
    "slide.mrxs": b"x", "slide/Slidedat.ini": b"x", "slide/Data0000.dat": b"x",
    # VMS: the index and its JPEG parts beside it
    "scan.vms": b"x", "scan.jpg": b"x", "scan_map.jpg": b"x", "scan.opt": b"x",
    # DICOM WSI series: folders of instances (upper-case suffix too)
    "series1/i1.dcm": b"x", "series1/i2.dcm": b"x", "series1/i3.dcm": b"x", "Series2/LEVEL0.DCM": b"x",
    # not images: a folder of something else, a hidden/underscore folder of .dcm, an image one level down
    "other/readme.txt": b"x", "_staging/x.dcm": b"x", ".cache/y.dcm": b"x", "deep/c.tif": b"x",
    "img.ome.zarr/.zattrs": b"{}",
}
EXPECTED = ["Series2", "a.tif", "b.svs", "img.ome.zarr", "scan.vms", "series1", "slide.mrxs"]


def _write_local(root: Path) -> Path:
    for rel, data in LAYOUT.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


def test_local_folder(tmp_path: Path) -> None:
    root = _write_local(tmp_path / "in")
    assert list_images(str(root)) == [str(root / n) for n in EXPECTED]
    assert list_images(f"{root}/") == [str(root / n) for n in EXPECTED]
    # a prefix that is itself a series: one URI, the series
    assert list_images(str(root / "series1")) == [str(root / "series1")]
    # a MIRAX data folder alone holds no image (its .dat files are not images)
    assert list_images(str(root / "slide")) == []
    with pytest.raises(SampleNotFoundError):
        list_images(str(tmp_path / "missing"))


@pytest.mark.s3
def test_s3_prefix(s3fs_client: Any) -> None:
    bucket = f"li-{uuid.uuid4().hex[:10]}"
    s3fs_client.mkdir(bucket)
    for rel, data in LAYOUT.items():
        s3fs_client.pipe(f"{bucket}/in/{rel}", data)
    want = [f"s3://{bucket}/in/{n}" for n in EXPECTED]
    assert list_images(f"s3://{bucket}/in/") == want
    assert list_images(f"s3://{bucket}/in") == want
    assert list_images(f"s3://{bucket}/in/series1/") == [f"s3://{bucket}/in/series1"]
    assert list_images(f"s3://{bucket}/in/slide") == []
    with pytest.raises(SampleNotFoundError):
        list_images(f"s3://{bucket}/nothing-here/")


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real DICOM WSI series (wsidicomizer, lossless) of a small image."""
    root = tmp_path_factory.mktemp("series")
    img = textured_image(160, 192, seed=21, fg_box=(20, 20, 120, 150))
    return wsidicomize(source_tiff(img, root / "src.tif", n_levels=2), root / "series", encoding="jpeg2000-lossless")


@pytest.mark.s3
def test_listed_series_opens_as_one_image(series: Path, tmp_path: Path, s3fs_client: Any) -> None:
    """What list_images gives for a series is what open_image reads as that series, locally and on S3."""
    bucket = f"li-{uuid.uuid4().hex[:10]}"
    s3fs_client.mkdir(bucket)
    s3fs_client.put(str(series), f"{bucket}/in/case7", recursive=True)
    s3fs_client.pipe(f"{bucket}/in/a.tif", b"x")
    local = tmp_path / "in"
    local.mkdir()
    os.symlink(series, local / "case7")
    for prefix, uri in ((f"s3://{bucket}/in/", f"s3://{bucket}/in/case7"), (str(local), str(local / "case7"))):
        listed = list_images(prefix)
        assert uri in listed and not any(u.lower().endswith(".dcm") for u in listed), listed
        reader = open_image(uri)
        try:
            assert isinstance(reader, DicomReader) and reader.levels[0].height == 160
            assert reader.read(0, Box(0, 0, 160, 192)).std() > 0
        finally:
            reader.close()


def test_intake_finds_series_and_skips_slide_parts(tmp_path: Path) -> None:
    """The intake poller: a series folder is one sample (complete on _READY, as a sample folder),
    a MIRAX data folder is neither a sample nor a folder waiting, a VMS's parts are not samples;
    with sample_folders: false a series is still found (it is one image, not a folder of samples)."""
    root = _write_local(tmp_path / "inbox")
    for folder in ("series1", "Series2", "other"):
        (root / folder / "_READY").write_bytes(b"")
    for sample_folders in (True, False):
        found = find_samples(IntakeConfig.from_dict({"intake_prefix": str(root), "output": str(tmp_path / "out"),
                                                     "sample_folders": sample_folders}))
        by_id = {s.sample_id: s.uris for s in found.samples}
        assert by_id["series1"] == (str(root / "series1"),) and by_id["Series2"] == (str(root / "Series2"),)
        for name in ("slide.mrxs", "scan.vms"):
            assert by_id[sample_id_for(name)] == (str(root / name),)
        assert "slide" not in found.waiting and "slide" not in found.problems and not found.conflicts
        assert set(by_id) == {sample_id_for(n) for n in EXPECTED}  # 'deep' waits for its _READY
        assert not any(u.lower().endswith((".dcm", ".jpg", ".dat")) for uris in by_id.values() for u in uris)
        if sample_folders:  # 'other' is a sample folder (with _READY) holding no image: a problem, as before
            assert "other" in found.problems
        else:
            assert "other" not in found.problems and "other" not in found.waiting


def test_intake_series_waits_until_complete(tmp_path: Path) -> None:
    """Instances of a series arrive one by one: without _READY (and settle_s) the series waits."""
    root = tmp_path / "inbox"
    (root / "case1").mkdir(parents=True)
    (root / "case1" / "i1.dcm").write_bytes(b"x")
    found = find_samples(IntakeConfig.from_dict({"intake_prefix": str(root), "output": "o"}))
    assert not found.samples and "case1" in found.waiting
    (root / "case1" / "_READY").write_bytes(b"")
    found = find_samples(IntakeConfig.from_dict({"intake_prefix": str(root), "output": "o"}))
    assert [(s.sample_id, s.uris) for s in found.samples] == [("case1", (str(root / "case1"),))]
    # a sample folder holding a series in a sub-folder and a TIFF: both are its images
    (root / "case2" / "series").mkdir(parents=True)
    (root / "case2" / "series" / "i.dcm").write_bytes(b"x")
    (root / "case2" / "extra.tif").write_bytes(b"x")
    (root / "case2" / "_READY").write_bytes(b"")
    found = find_samples(IntakeConfig.from_dict({"intake_prefix": str(root), "output": "o"}))
    by_id = {s.sample_id: s.uris for s in found.samples}
    assert by_id["case2"] == (str(root / "case2" / "extra.tif"), str(root / "case2" / "series"))
