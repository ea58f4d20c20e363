"""DICOM WSI fixtures written by tools no one here wrote: ``wsidicomizer`` (PyPI) and Orthanc's
``OrthancWSIDicomizer`` (Debian ``orthanc-wsi``), both converting TIFFs written by
:func:`tests.conftest.write_tiff`; and a real DICOMweb server, Orthanc with its DICOMweb plugin
(Debian ``orthanc`` + ``orthanc-dicomweb``), on loopback.

Orthanc and its dicomizer are Debian packages CI installs: a test that needs them fails when they are
missing, unless ``SLIDESCORE_SKIP_ORTHANC=1`` is set (a developer machine without them), which skips.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.conftest import free_port, write_tiff

ORTHANC = os.environ.get("SLIDESCORE_ORTHANC", "/usr/sbin/Orthanc")
ORTHANC_DICOMWEB = os.environ.get("SLIDESCORE_ORTHANC_DICOMWEB", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
ORTHANC_DICOMIZER = shutil.which("OrthancWSIDicomizer") or "/usr/bin/OrthancWSIDicomizer"
#: wsidicomizer encodings by name (``native``: the source's own JPEG tiles, copied as they are, which
#: opentile does for an SVS; ``jpeg``: decoded and re-encoded as JPEG baseline, quality 90, 4:2:2)
WSIDICOMIZER_ENCODINGS = ("native", "jpeg", "jpeg2000-lossless", "jpegls-lossless", "jpeg-lossless", "uncompressed")


def require_orthanc(*paths: str) -> None:
    """Fail (CI installs the Debian packages) or, with ``SLIDESCORE_SKIP_ORTHANC=1``, skip when missing."""
    missing = [p for p in paths if not os.path.exists(p)]
    if not missing:
        return
    msg = (f"missing {missing}: install the Debian packages orthanc orthanc-dicomweb orthanc-wsi "
           "(or set SLIDESCORE_SKIP_ORTHANC=1 to skip these tests locally)")
    if os.environ.get("SLIDESCORE_SKIP_ORTHANC") == "1":
        pytest.skip(msg)
    pytest.fail(msg)


def source_tiff(pixels: np.ndarray, path: Path, *, mpp: float = 0.5, compression: str = "zlib", n_levels: int = 3,
                tile_px: int = 128) -> Path:
    """The TIFF the DICOM series are made from (levels are 2× decimations)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_tiff(path, pixels, mpp=mpp, n_levels=n_levels, compression=compression, tile_px=tile_px)


def svs_jpeg(pixels: np.ndarray, path: Path, *, mpp: float = 0.5, tile_px: int = 128) -> Path:
    """An SVS-like TIFF of JPEG tiles (Aperio description with ``MPP``; levels 2× decimations), the
    layout wsidicomizer's opentile source copies tiles from without re-encoding."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = pixels.shape[:2]
    desc = f"Aperio Image Library v12.0.15\r\n{w}x{h} ({tile_px}x{tile_px}) JPEG/RGB Q=90|AppMag = 20|MPP = {mpp}"
    opts: dict[str, Any] = dict(tile=(tile_px, tile_px), compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                                description=desc, metadata=None)
    with tifffile.TiffWriter(path) as tw:
        tw.write(pixels, **opts)
        tw.write(pixels[::8, ::8], photometric="rgb", description="Aperio Image Library thumbnail", metadata=None)
        for ds in (2, 4):
            tw.write(pixels[::ds, ::ds], **opts)
    return path


def wsidicomize(tiff: Path, out: Path, encoding: str = "jpeg2000-lossless", tile_px: int = 128) -> Path:
    """A DICOM WSI series (TILED_FULL, one instance per level) written by ``wsidicomizer`` from ``tiff``."""
    from slidescore.io.dicom_web import import_wsidicom

    import_wsidicom()  # first: its import warns under pydicom 3, which slidescore's import silences
    from wsidicom.codec import Channels
    from wsidicom.codec.settings import (
        Jpeg2kSettings,
        JpegLosslessSettings,
        JpegLsSettings,
        JpegSettings,
        NumpySettings,
    )
    from wsidicomizer import WsiDicomizer
    from wsidicomizer.sources import OpenTileSource

    settings: dict[str, Any] = {
        "native": None,
        "jpeg": JpegSettings(quality=90),
        "jpeg2000-lossless": Jpeg2kSettings(levels=0, channels=Channels.RGB),
        "jpegls-lossless": JpegLsSettings(level=0, channels=Channels.RGB),
        "jpeg-lossless": JpegLosslessSettings(channels=Channels.RGB),
        "uncompressed": NumpySettings(),
    }
    source: dict[str, Any] = {"preferred_source": OpenTileSource} if encoding == "native" else {}
    WsiDicomizer.convert(str(tiff), str(out), tile_size=tile_px, encoding=settings[encoding], include_label=False,
                         include_overview=False, include_thumbnail=False, **source)
    return out


def orthanc_dicomize(tiff: Path, out: Path, shape: tuple[int, int], *, mpp: float = 0.5, compression: str = "jpeg2000",
                     tile_px: int = 128, n_levels: int = 3) -> Path:
    """A DICOM WSI series (TILED_SPARSE: per-frame positions) written by ``OrthancWSIDicomizer`` from ``tiff``.

    A TIFF of JPEG tiles is read by the dicomizer itself and its tiles copied; others through OpenSlide
    (the library inside the ``openslide-bin`` wheel). The pyramid is rebuilt by the dicomizer
    (``--pyramid 1``). Orthanc WSI 1.1 computes PixelSpacing crosswise (row spacing = imaged width /
    rows, column spacing = imaged height / columns), so the imaged size is passed that way round to
    make both spacings ``mpp``.
    """
    import openslide_bin

    require_orthanc(ORTHANC_DICOMIZER)
    h, w = shape
    out.mkdir(parents=True, exist_ok=True)
    dataset = out.parent / f"{out.name}-dataset.json"
    dataset.write_text(json.dumps({"ImageType": "DERIVED\\PRIMARY\\VOLUME\\NONE", "PatientID": "SLIDESCORE-TEST",
                                   "StudyID": "1", "SeriesNumber": "1"}))
    lib = Path(openslide_bin.__file__).with_name("libopenslide.so.1")
    cmd = [ORTHANC_DICOMIZER, "--dataset", str(dataset), "--openslide", str(lib), "--folder", str(out),
           "--compression", compression, "--tile-width", str(tile_px), "--tile-height", str(tile_px),
           "--pyramid", "1", "--levels", str(n_levels),
           "--imaged-width", f"{h * mpp / 1000:.9f}", "--imaged-height", f"{w * mpp / 1000:.9f}", str(tiff)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or not list(out.glob("*.dcm")):
        raise RuntimeError(f"OrthancWSIDicomizer failed ({done.returncode}):\n{done.stderr[-2000:]}")
    dataset.unlink()
    return out


def drop_sparse_frames(path: Path, drop: set[tuple[int, int]]) -> int:
    """Remove the tiles at (row, column) tile positions ``drop`` from an uncompressed TILED_SPARSE
    instance (as a scanner leaves empty glass out): their frames and per-frame positions. Returns the
    number of frames removed."""
    import pydicom

    ds = pydicom.dcmread(path)
    rows, cols, spp = int(ds.Rows), int(ds.Columns), int(ds.SamplesPerPixel)
    size = rows * cols * spp * int(ds.BitsAllocated) // 8
    keep_frames, keep_items = [], []
    for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        pos = item.PlanePositionSlideSequence[0]
        tile = ((int(pos.RowPositionInTotalImagePixelMatrix) - 1) // rows, (int(pos.ColumnPositionInTotalImagePixelMatrix) - 1) // cols)
        if tile not in drop:
            keep_frames.append(ds.PixelData[i * size : (i + 1) * size])
            keep_items.append(item)
    removed = int(ds.NumberOfFrames) - len(keep_frames)
    ds.PerFrameFunctionalGroupsSequence = keep_items
    ds.NumberOfFrames = len(keep_frames)
    ds.PixelData = b"".join(keep_frames)
    ds.save_as(path, enforce_file_format=True)
    return removed


def damage_frame(path: Path, marker: bytes = b"\xff\x4f\xff\x51") -> None:
    """Overwrite bytes inside the first compressed frame of a DICOM file (found by its codestream
    marker: JPEG 2000 ``SOC SIZ`` by default) with garbage; the frame's offsets stay valid."""
    data = bytearray(path.read_bytes())
    at = data.find(marker)
    assert at > 0, f"no frame marker {marker!r} in {path}"
    garbage = np.random.default_rng(at).integers(0, 256, 400, dtype=np.uint8).tobytes()
    data[at + 2 : at + 2 + len(garbage)] = garbage
    path.write_bytes(bytes(data))


@dataclass
class Orthanc:
    """A running Orthanc with the DICOMweb plugin on loopback."""

    url: str  # REST API root, e.g. http://127.0.0.1:8042
    proc: subprocess.Popen
    log: Path

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def upload(self, folder: Path) -> str:
        """POST every ``.dcm`` of ``folder`` (REST API ``/instances``); returns the series'
        ``dicomweb+http://…/studies/<uid>/series/<uid>`` URL."""
        import pydicom

        uids = set()
        for f in sorted(folder.glob("*.dcm")):
            req = urllib.request.Request(f"{self.url}/instances", data=f.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(req, timeout=30) as r:
                status = json.loads(r.read())
            assert status.get("Status") in ("Success", "AlreadyStored"), status
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            uids.add((str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)))
        assert len(uids) == 1, uids
        ((study, series),) = uids
        return f"dicomweb+{self.dicomweb}/studies/{study}/series/{series}"


def start_orthanc(workdir: Path, timeout_s: float = 60) -> Orthanc:
    """Start Orthanc on a free loopback port with a temporary configuration; wait for ``/system``."""
    require_orthanc(ORTHANC, ORTHANC_DICOMWEB)
    port = free_port()
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "slidescore-test", "StorageDirectory": str(storage), "IndexDirectory": str(storage),
        "HttpPort": port, "DicomServerEnabled": False, "DicomPort": free_port(),
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpCompressionEnabled": False,
        "Plugins": [ORTHANC_DICOMWEB], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = workdir / "orthanc.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    server = Orthanc(f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            pytest.fail(f"Orthanc exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/system", timeout=5) as r:
                if json.loads(r.read()).get("PluginsEnabled"):
                    break
        except (OSError, ValueError):  # URLError included: not up yet
            pass
        if time.monotonic() > deadline:
            stop_orthanc(server)
            pytest.fail(f"Orthanc did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    return server


def stop_orthanc(server: Orthanc) -> None:
    """Stop the Orthanc this fixture started (only it, by its own pid)."""
    proc = server.proc
    if proc.poll() is None:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)


#: what makes instances one series (and one pyramid) in wsidicom's eyes, copied from the first series
_SERIES_KEYS = ("StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID", "PyramidUID", "ContainerIdentifier",
                "StudyDate", "StudyTime", "SeriesDate", "SeriesTime", "AcquisitionDateTime", "ContentDate", "ContentTime")


def merge_planes(first: Path, second: Path, out: Path, *, optical_path: str | None = None,
                 z_um: float | None = None) -> Path:
    """One series in ``out`` holding ``first`` as it is and ``second`` (a series of the same geometry,
    from ``wsidicomize``) as another plane: optical path ``optical_path`` (its OpticalPathIdentifier
    in the OpticalPathSequence and the shared functional groups) or focal plane ``z_um`` (the
    ZOffsetInSlideCoordinateSystem of its TotalPixelMatrixOriginSequence, in µm as DICOM has it).
    The second series' instances keep their own SOP instance UIDs and take the first's study, series,
    frame of reference and pyramid, as a scanner writes one multi-plane series."""
    import shutil

    import pydicom
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    out.mkdir(parents=True, exist_ok=True)
    firsts = sorted(first.glob("*.dcm"))
    ref = pydicom.dcmread(firsts[0], stop_before_pixels=True)
    for f in firsts:
        shutil.copy(f, out / f.name)
    for f in sorted(second.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        for key in _SERIES_KEYS:
            if key in ref:
                setattr(ds, key, getattr(ref, key))
        if optical_path is not None:
            ds.OpticalPathSequence[0].OpticalPathIdentifier = optical_path
            ident = Dataset()
            ident.OpticalPathIdentifier = optical_path
            ds.SharedFunctionalGroupsSequence[0].OpticalPathIdentificationSequence = Sequence([ident])
        if z_um is not None:
            ds.TotalPixelMatrixOriginSequence[0].ZOffsetInSlideCoordinateSystem = z_um
        ds.save_as(out / f"plane-{f.name}", enforce_file_format=True)
    return out
