"""The one test suite every :class:`~slidescore.io.base.SlideReader` backend runs (as zarr-python runs
one ``StoreTests`` over every store).

A backend's tests subclass :class:`ReaderContract` and override the fixture ``make_reader``: a
function ``make(pixels, mpp, tmp_path) -> SlideReader`` that writes ``pixels`` ((h, w, 3) uint8,
level 0 at ``mpp`` µm/px) losslessly, with that backend's own writer or a tool's, and opens it the
way slidescore opens it (:func:`slidescore.io.open_image`, with the backend and options the
subclass tests). The base class then checks, over those pixels:

- levels: level 0 is the image; downsamples start at 1, grow, and match the level sizes;
- µm/px: ``mpp`` within 1e-6 (relative) and a ``mpp_source`` that says where it came from;
- boxes inside, touching and past the edge (:func:`read_padded`), fully outside, one pixel, at
  every level; equal pixels to the input at level 0 (``max_abs_diff`` for lossy subclasses);
- announced reads (:func:`expect_reads`) and reads from several threads give the same pixels;
- re-opening: readers are never pickled — a plan (plain data) carries the URI and the options, and
  every worker re-opens the image (:func:`slidescore.stages.plan.open_for_plan`); the contract
  checks a reader re-opened from ``reader.uri`` with :meth:`ReaderContract.reopen` reads the same;
- a corrupt tile: override ``make_corrupt`` (``make(pixels, mpp, tmp_path) -> (open, name)``)
  and the suite checks opening it and reading every level fails with
  :class:`~slidescore.errors.UnsupportedImageError` naming ``name`` (the file), never a library
  error; :func:`damage_tiff_tile` damages one tile of a TIFF-family file;
- RGBA: override ``make_rgba_reader`` (``make(rgba, mpp, tmp_path) -> SlideReader``) and set
  ``rgba`` to ``"composite"`` (the reader returns RGB composited against the background, white
  unless the file says otherwise) or ``"channels"`` (the reader returns the 4 channels as stored);
- remote: set ``remote = True`` on a subclass whose ``make_reader`` uploads to the loopback S3
  server (:func:`upload`) and opens ``s3://…``: the same checks then cover remote reads.

A check that does not apply to a backend is skipped by leaving its fixture as it is (the skip says
why). Class attributes tune what is checked: ``expected_levels`` (``None``: any number ≥ 1),
``max_abs_diff`` (0: lossless), ``backend`` (the ``open_image`` backend :meth:`reopen` uses).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from slidescore.core.types import Box
from slidescore.errors import SlideScoreError, UnsupportedImageError
from slidescore.io import SlideReader, open_image, read_padded
from slidescore.io.base import expect_reads

MPP = 0.5
FILL = 7  # a fill value no test image holds at the edge by chance


def contract_pixels(h: int = 300, w: int = 260, seed: int = 11) -> np.ndarray:
    """The contract's test image: random texture (every pixel differs from its neighbours, so an
    off-by-one read fails) over a gradient (coarse levels keep structure), sizes not a multiple of
    any tile size (edge tiles are partial)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([yy * 200 // h, xx * 200 // w, (yy + xx) * 100 // (h + w)], axis=-1)
    return (base + rng.integers(0, 56, (h, w, 3))).astype(np.uint8)


def damage_tiff_tile(path: Path, page: int = 0, tile: int = 0, *, subifd: int | None = None) -> None:
    """Overwrite the bytes of one tile (or strip) of a TIFF-family file with garbage, in place.

    ``page`` is the top-level page (IFD), ``subifd`` one of its SubIFDs (``None``: the page itself).
    The tile's offsets and byte counts stay valid: only its compressed data is wrong.
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        p: Any = tif.pages[page]
        if subifd is not None:
            p = p.pages[subifd]
        offset, count = int(p.dataoffsets[tile]), int(p.databytecounts[tile])
    garbage = np.random.default_rng(count).integers(0, 256, count, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(garbage)


def upload(fs: Any, local: Path, bucket: str) -> str:
    """Upload a file or a folder (recursively) to ``s3://<bucket>/<name>`` on the loopback S3
    server (``fs``: the ``s3fs_client`` fixture) and return the ``s3://`` URI."""
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    target = f"{bucket}/{local.name}"
    if local.is_dir():
        fs.put(str(local), target, recursive=True)
    else:
        fs.put_file(str(local), target)
    return f"s3://{target}"


_UPLOADED: dict[str, str] = {}


def upload_once(fs: Any, key: str, pixels: np.ndarray, write: Callable[[Path], Path], root: Path, suffix: str = "") -> str:
    """The ``s3://`` URI of what ``write(folder)`` writes for ``pixels``, written and uploaded once per
    test session and ``key`` (the loopback server lives for the session): the remote subclasses'
    many tests then read one upload. ``suffix`` is appended to the URI (e.g. ``/slide.mrxs`` when
    ``write`` returns the folder of a multi-file slide)."""
    import hashlib

    k = f"{key}:{hashlib.sha256(pixels.tobytes()).hexdigest()[:16]}:{pixels.shape}"
    if k not in _UPLOADED:
        folder = root / hashlib.sha256(k.encode()).hexdigest()[:12]
        folder.mkdir(parents=True, exist_ok=True)
        _UPLOADED[k] = upload(fs, write(folder), "contract-" + hashlib.sha256(k.encode()).hexdigest()[:20]) + suffix
    return _UPLOADED[k]


def _close(reader: SlideReader | None) -> None:
    if reader is not None:
        reader.close()


class ReaderContract:
    """Shared tests of a :class:`SlideReader` backend; subclass and override :meth:`make_reader`."""

    #: the number of levels ``make_reader`` writes (``None``: any number ≥ 1)
    expected_levels: int | None = None
    #: the largest |read − written| at level 0 (0: lossless)
    max_abs_diff: int = 0
    #: the ``backend`` argument :meth:`reopen` passes to ``open_image``
    backend: str = "auto"
    #: ``"composite"`` (RGB against the background) or ``"channels"`` (4 channels as stored)
    rgba: str = "composite"
    #: ``make_reader`` opens ``s3://`` (loopback S3) URIs
    remote: bool = False

    # -- what subclasses provide -------------------------------------------------------------------
    @pytest.fixture
    def make_reader(self) -> Callable[[np.ndarray, float, Path], SlideReader]:
        raise NotImplementedError("a ReaderContract subclass overrides the make_reader fixture")

    @pytest.fixture
    def make_corrupt(self) -> Callable[[np.ndarray, float, Path], tuple[Callable[[], SlideReader], str]]:
        pytest.skip("this backend's tests give no corrupt-file writer (make_corrupt)")

    @pytest.fixture
    def make_rgba_reader(self) -> Callable[[np.ndarray, float, Path], SlideReader]:
        pytest.skip("this backend reads no RGBA images (make_rgba_reader)")

    def reopen(self, reader: SlideReader) -> SlideReader:
        """Open the image of ``reader`` again as a worker does: from its URI and options."""
        return open_image(reader.uri, backend=self.backend)

    # -- fixtures of the suite ----------------------------------------------------------------------
    @pytest.fixture
    def pixels(self) -> np.ndarray:
        return contract_pixels()

    @pytest.fixture
    def reader(self, make_reader: Callable[..., SlideReader], pixels: np.ndarray, tmp_path: Path) -> Iterator[SlideReader]:
        r = make_reader(pixels, MPP, tmp_path)
        yield r
        r.close()

    def assert_pixels(self, got: np.ndarray, want: np.ndarray, what: str = "") -> None:
        assert got.shape == want.shape, f"{what}: shape {got.shape} ≠ {want.shape}"
        if self.max_abs_diff == 0:
            np.testing.assert_array_equal(got, want, err_msg=what)
        else:
            diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
            assert diff.max() <= self.max_abs_diff, f"{what}: max |diff| {diff.max()} > {self.max_abs_diff}"

    # -- the contract -------------------------------------------------------------------------------
    def test_is_a_slide_reader(self, reader: SlideReader) -> None:
        assert isinstance(reader, SlideReader)
        assert reader.n_channels == 3 and reader.dtype == np.uint8
        if self.remote:
            assert reader.uri.startswith("s3://"), reader.uri

    def test_levels_and_downsamples(self, reader: SlideReader, pixels: np.ndarray) -> None:
        h, w = pixels.shape[:2]
        levels = reader.levels
        assert len(levels) >= 1
        if self.expected_levels is not None:
            assert len(levels) == self.expected_levels, [(lv.height, lv.width) for lv in levels]
        assert (levels[0].height, levels[0].width, levels[0].downsample) == (h, w, 1)
        for i, lv in enumerate(levels):
            assert lv.index == i
            assert abs(h / lv.downsample - lv.height) <= 1 and abs(w / lv.downsample - lv.width) <= 1, lv
        ds = [lv.downsample for lv in levels]
        assert all(b > a for a, b in zip(ds, ds[1:], strict=False)), ds

    def test_resolution(self, reader: SlideReader) -> None:
        assert reader.mpp == pytest.approx(MPP, rel=1e-6), reader.mpp_source
        assert reader.mpp_source and not reader.mpp_source.startswith("none"), reader.mpp_source

    def test_level0_equals_the_input(self, reader: SlideReader, pixels: np.ndarray) -> None:
        h, w = pixels.shape[:2]
        self.assert_pixels(reader.read(0, Box(0, 0, h, w)), pixels, "whole level 0")
        self.assert_pixels(reader.read(0, Box(37, 51, 100, 90)), pixels[37:137, 51:141], "inner box")
        self.assert_pixels(reader.read(0, Box(h - 1, w - 1, 1, 1)), pixels[h - 1 :, w - 1 :], "last pixel")
        self.assert_pixels(reader.read(0, Box(h - 70, w - 45, 70, 45)), pixels[h - 70 :, w - 45 :], "box at the corner")

    def test_boxes_past_the_edge_are_filled(self, reader: SlideReader, pixels: np.ndarray) -> None:
        h, w = pixels.shape[:2]
        out = read_padded(reader, 0, Box(h - 30, w - 20, 64, 64), FILL)
        assert out.shape == (64, 64, 3) and out.dtype == np.uint8
        self.assert_pixels(out[:30, :20], pixels[h - 30 :, w - 20 :], "inside part")
        assert (out[30:] == FILL).all() and (out[:, 20:] == FILL).all()
        out = read_padded(reader, 0, Box(-10, -5, 40, 30), FILL)  # before the origin
        self.assert_pixels(out[10:, 5:], pixels[:30, :25], "inside part")
        assert (out[:10] == FILL).all() and (out[:, :5] == FILL).all()
        assert (read_padded(reader, 0, Box(h + 5, w + 5, 16, 16), FILL) == FILL).all()  # wholly outside

    def test_every_level_reads_its_box(self, reader: SlideReader, pixels: np.ndarray) -> None:
        for lv in reader.levels:
            whole = reader.read(lv.index, Box(0, 0, lv.height, lv.width))
            assert whole.shape == (lv.height, lv.width, 3) and whole.dtype == np.uint8
            # coarse levels are the backend's own downsampling: they keep the image's structure
            ds = int(round(lv.downsample))
            ref = pixels[: lv.height * ds, : lv.width * ds].astype(np.float64)
            ref = ref[: ref.shape[0] // ds * ds, : ref.shape[1] // ds * ds].reshape(ref.shape[0] // ds, ds, -1, ds, 3).mean(axis=(1, 3))
            got = whole[: ref.shape[0], : ref.shape[1]].astype(np.float64)
            assert np.abs(got.mean(axis=(0, 1)) - ref.mean(axis=(0, 1))).max() < 8, lv
            corr = np.corrcoef(got[..., 0].ravel(), ref[..., 0].ravel())[0, 1] if got.size > 3 else 1.0
            assert corr > 0.8, (lv, corr)
            edge = read_padded(reader, lv.index, Box(lv.height - 3, lv.width - 4, 8, 8), FILL)
            np.testing.assert_array_equal(edge[:3, :4], whole[-3:, -4:])
            assert (edge[3:] == FILL).all() and (edge[:, 4:] == FILL).all()

    def test_announced_and_threaded_reads_agree(self, reader: SlideReader, pixels: np.ndarray) -> None:
        h, w = pixels.shape[:2]
        boxes = [Box(y, x, 96, 96) for y in range(0, h, 64) for x in range(0, w, 64)]
        expect_reads(reader, 0, boxes)
        first = [read_padded(reader, 0, b, FILL) for b in boxes]
        results: dict[int, np.ndarray] = {}
        errors: list[BaseException] = []

        def work(i: int) -> None:
            try:
                results[i] = read_padded(reader, 0, boxes[i], FILL)
            except BaseException as e:  # reported below
                errors.append(e)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(boxes))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, b in enumerate(boxes):
            np.testing.assert_array_equal(results[i], first[i], err_msg=str(b))
            inner = b.clip(h, w)
            self.assert_pixels(first[i][: inner.h, : inner.w], pixels[inner.y : inner.y1, inner.x : inner.x1], str(b))

    def test_reopened_from_its_uri_reads_the_same(self, reader: SlideReader) -> None:
        again = self.reopen(reader)
        try:
            assert again.uri == reader.uri
            assert [(lv.height, lv.width, lv.downsample) for lv in again.levels] == \
                [(lv.height, lv.width, lv.downsample) for lv in reader.levels]
            assert (again.mpp, again.mpp_source) == (reader.mpp, reader.mpp_source)
            box = Box(20, 30, 120, 110)
            np.testing.assert_array_equal(again.read(0, box), reader.read(0, box))
        finally:
            again.close()

    def test_corrupt_tile_is_a_clear_error(self, make_corrupt: Callable[..., tuple[Callable[[], SlideReader], str]],
                                           pixels: np.ndarray, tmp_path: Path) -> None:
        open_it, name = make_corrupt(pixels, MPP, tmp_path)
        reader = None
        with pytest.raises(UnsupportedImageError) as err:
            reader = open_it()
            for lv in reader.levels:
                reader.read(lv.index, Box(0, 0, lv.height, lv.width))
        _close(reader)
        msg = str(err.value)
        assert name in msg, msg
        assert "corrupt" in msg or "re-export" in msg or "truncated" in msg, msg  # says what to do
        assert isinstance(err.value, SlideScoreError)

    def test_rgba(self, make_rgba_reader: Callable[..., SlideReader], pixels: np.ndarray, tmp_path: Path) -> None:
        h, w = pixels.shape[:2]
        alpha = np.full((h, w, 1), 255, np.uint8)
        alpha[: h // 3] = 0  # a transparent band (outside the scanned area)
        rgba = np.concatenate([pixels, alpha], axis=-1)
        reader = make_rgba_reader(rgba, MPP, tmp_path)
        try:
            got = reader.read(0, Box(0, 0, h, w))
            if self.rgba == "channels":
                assert reader.n_channels == 4
                self.assert_pixels(got, rgba, "RGBA as stored")
            else:
                assert reader.n_channels == 3 and got.shape == (h, w, 3)
                bg = np.asarray(getattr(reader, "background", (255, 255, 255)), np.uint8)
                assert (got[: h // 3] == bg).all(), "transparent pixels become the background colour"
                self.assert_pixels(got[h // 3 :], pixels[h // 3 :], "opaque pixels")
        finally:
            reader.close()
