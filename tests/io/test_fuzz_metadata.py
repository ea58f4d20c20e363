"""Fuzzed metadata: a mutated TIFF header / IFD or OME-Zarr ``.zattrs`` / ``.zarray`` either opens and
reads or fails with one of our errors — never another exception type, never a hang or a huge allocation.

Bounded (``max_examples``, derandomized so CI runs the same examples; no example database is
written). Crashes found while writing this became the explicit regressions at the end.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tifffile
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from slidescore.core.types import Box
from slidescore.errors import SlideScoreError
from slidescore.io import open_image
from tests.conftest import textured_image, write_tiff

FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def open_and_read(uri: str) -> None:
    """What a run does first with a file: open it, read one box of level 0 (and of the last level)."""
    try:
        reader = open_image(uri)
    except SlideScoreError:
        return
    try:
        for level in {0, len(reader.levels) - 1}:
            info = reader.levels[level]
            box = Box(0, 0, min(info.height, 48), min(info.width, 48))
            data = reader.read(level, box)
            assert data.shape[:2] == (box.h, box.w) and data.ndim == 3
    except SlideScoreError:
        pass
    finally:
        reader.close()


# -- TIFF: bytes of the header and of every IFD (entries and out-of-line tag values) -------------
def _tiff_templates(folder: Path) -> dict[str, tuple[bytes, list[int]]]:
    img = textured_image(96, 80, seed=11)
    paths = {
        "pyramid": write_tiff(folder / "pyramid.tif", img, mpp=0.5, n_levels=2, tile_px=32),  # BigTIFF, SubIFDs, zlib
        "jpeg": write_tiff(folder / "jpeg.tif", img, mpp=0.5, n_levels=1, tile_px=48, compression="jpeg"),
    }
    striped = folder / "striped.tif"  # classic TIFF, strips, an Aperio description with MPP
    tifffile.imwrite(striped, img, rowsperstrip=16, photometric="rgb", compression="zlib",
                     description="Aperio Image Library v12\r\n80x96 (16x80) RGB|MPP = 0.25", metadata=None)
    paths["striped"] = striped
    out = {}
    for name, path in paths.items():
        positions: set[int] = set(range(16))  # the file header (byte order, version, first IFD offset)
        with tifffile.TiffFile(path) as tif:
            pages = list(tif.pages) + [sub for lv in tif.series[0].levels for sub in lv.pages if sub is not None]
            for page in pages:
                for tag in page.keyframe.tags if hasattr(page, "keyframe") else page.tags:
                    entry = 20 if tif.is_bigtiff else 12
                    positions.update(range(tag.offset, tag.offset + entry))
                    positions.update(range(tag.valueoffset, tag.valueoffset + min(64, max(1, tag.count))))
        data = path.read_bytes()
        out[name] = (data, sorted(p for p in positions if p < len(data)))
    return out


@pytest.fixture(scope="module")
def tiff_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, list[int]]]:
    return _tiff_templates(tmp_path_factory.mktemp("fuzz_tiff"))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_scratch")


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_mutated_tiff_header_opens_or_fails_with_our_error(tiff_templates: dict[str, tuple[bytes, list[int]]],
                                                          scratch: Path, data: st.DataObject) -> None:
    name = data.draw(st.sampled_from(sorted(tiff_templates)), label="template")
    blob, positions = tiff_templates[name]
    mutated = bytearray(blob)
    edits = data.draw(st.lists(st.tuples(st.sampled_from(positions), st.integers(0, 255)), min_size=1, max_size=6),
                      label="edits")
    for pos, value in edits:
        mutated[pos] = value
    path = scratch / f"{name}.tif"
    path.write_bytes(bytes(mutated))
    open_and_read(str(path))


# -- OME-Zarr: JSON values of .zattrs and .zarray replaced, deleted or retyped ------------------
def _ome_zarr_template(path: Path) -> Path:
    img = textured_image(80, 72, seed=12)
    group = zarr.open_group(str(path), mode="w", zarr_format=2)
    for i, lv in enumerate((img, img[::2, ::2])):
        data = np.ascontiguousarray(np.moveaxis(lv, -1, 0))
        arr = group.create_array(str(i), shape=data.shape, chunks=(3, 32, 32), dtype="uint8")
        arr[:] = data
    group.attrs["multiscales"] = [{
        "version": "0.4",
        "axes": [{"name": "c", "type": "channel"}, {"name": "y", "type": "space", "unit": "micrometer"},
                 {"name": "x", "type": "space", "unit": "micrometer"}],
        "datasets": [{"path": str(i), "coordinateTransformations": [{"type": "scale", "scale": [1.0, 0.5 * 2**i, 0.5 * 2**i]}]}
                     for i in range(2)],
    }]
    return path


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a JSON document (the document itself too)."""
    yield at
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*at, i))


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6) | st.sampled_from(["x", "y", "c", "0", "1", "scale", "<u2", "|O", "zlib", "micrometer"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def _mutate(doc: Any, data: st.DataObject, label: str) -> Any:
    places = list(_paths(doc))
    at = data.draw(st.sampled_from(places), label=f"{label} place")
    action = data.draw(st.sampled_from(["replace", "delete", "replace"]) if at else st.just("replace"), label=f"{label} action")
    if not at:
        return data.draw(JSON_VALUES, label=f"{label} document")
    parent = doc
    for key in at[:-1]:
        parent = parent[key]
    if action == "delete":
        del parent[at[-1]]
    else:
        parent[at[-1]] = data.draw(JSON_VALUES, label=f"{label} value")
    return doc


@pytest.fixture(scope="module")
def zarr_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _ome_zarr_template(tmp_path_factory.mktemp("fuzz_zarr") / "image.ome.zarr")


@pytest.mark.timeout(120)
@FUZZ
@given(data=st.data())
def test_mutated_ome_zarr_metadata_opens_or_fails_with_our_error(zarr_template: Path, data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "image.ome.zarr"
        shutil.copytree(zarr_template, path)
        targets = [path / ".zattrs", path / "0" / ".zarray", path / "1" / ".zarray"]
        chosen = data.draw(st.lists(st.sampled_from(targets), min_size=1, max_size=2, unique=True), label="files")
        for target in chosen:
            doc = json.loads(target.read_text())
            for _ in range(data.draw(st.integers(1, 3), label="edits")):
                doc = _mutate(doc, data, target.name)
            target.write_text(json.dumps(doc))
        open_and_read(str(path))


# -- regressions: what the fuzzers found -------------------------------------------------------
def _patch_tag(src: Path, dst: Path, tag_name: str, field: str, value: int) -> Path:
    """A copy of ``src`` with the count or the (inline) value of one tag of the first IFD overwritten."""
    with tifffile.TiffFile(src) as tif:
        tag = tif.pages[0].tags[tag_name]
        if field == "count":  # an IFD entry: code (2 bytes), type (2), count (4 or 8 in BigTIFF), value
            at, fmt = tag.offset + 4, "Q" if tif.is_bigtiff else "I"
        else:
            at, fmt = tag.valueoffset, {3: "H", 4: "I", 16: "Q"}[int(tag.dtype)]
        order = tif.byteorder
    blob = bytearray(src.read_bytes())
    struct.pack_into(order + fmt, blob, at, value)
    dst.write_bytes(bytes(blob))
    return dst


# each raised a library's own exception (TypeError, ZeroDivisionError, IndexError, ValueError) before
@pytest.mark.parametrize("template, tag, field, value, message", [
    ("pyramid", "ImageWidth", "count", 2, "not a readable TIFF (TypeError"),  # the width became a tuple
    ("striped", "ImageWidth", "count", 2, "not a readable TIFF (TypeError"),
    ("jpeg", "TileLength", "value", 0, "level 0 has tiles / strips of shape (0, 48, 3)"),  # ZeroDivisionError when read
    ("striped", "RowsPerStrip", "value", 0, "level 0 has tiles / strips of shape (0, 80, 3)"),
    ("pyramid", "TileOffsets", "count", 2, "failed to decode level 0 box"),  # fewer offsets than tiles: IndexError
    ("jpeg", "PhotometricInterpretation", "value", 14, "failed to decode level 0 box"),  # ValueError when decoded
])
def test_fuzz_regression_tiff(tiff_templates: dict[str, tuple[bytes, list[int]]], tmp_path: Path, template: str, tag: str,
                              field: str, value: int, message: str) -> None:
    src = tmp_path / "src.tif"
    src.write_bytes(tiff_templates[template][0])
    path = _patch_tag(src, tmp_path / "bad.tif", tag, field, value)
    with pytest.raises(SlideScoreError) as e:
        reader = open_image(str(path))
        try:
            reader.read(0, Box(0, 0, 48, 48))
        finally:
            reader.close()
    assert message in str(e.value) and str(path) in str(e.value), str(e.value)


def test_fuzz_regression_zarr_chunk_of_size_zero(zarr_template: Path, tmp_path: Path) -> None:
    """``chunks: [false, 32, 32]`` (a zero-size chunk) opened, then a failed read divided by zero naming the chunk."""
    path = tmp_path / "image.ome.zarr"
    shutil.copytree(zarr_template, path)
    meta = path / "1" / ".zarray"
    doc = json.loads(meta.read_text())
    doc["chunks"][0] = False
    meta.write_text(json.dumps(doc))
    with pytest.raises(SlideScoreError, match=r"level 1 \(array '1'\) has chunk shape \(0, 32, 32\)"):
        open_image(str(path))
