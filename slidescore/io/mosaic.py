"""The OME-Zarr probability mosaic: layout, block writes, pyramid, labels.

Default output is OME-Zarr 0.4 (Zarr format 2, Blosc/zstd, no filters, ``/`` dimension separator),
which Java readers (QuPath via Bio-Formats, OMERO) can open. Arrays are (c, y, x), one channel per
class, one pixel per stride cell; level ``l`` has pixel size ``mpp · stride · 2^l`` µm and a
translation that puts each pixel's centre on the centre of the source pixels it covers. The
thresholded map is an OME-Zarr labels image (``labels/suspect``), and ``OME/METADATA.ome.xml``
carries the physical pixel size and the channel names and colours for Bio-Formats (QuPath); the mask
gets the same.

Encoding (:class:`Encoding`, recorded as ``slidescore.encoding`` in the mosaic's attributes, read
back by :func:`read_level`, :func:`read_box` and the napari viewer): float32 stores p, and a cell
not scored as NaN, or as ``output.not_scored`` (a finite number outside [0, 1], e.g. -1, for viewers
that cannot handle NaN); uint8 stores ``1 + round(p · 254)`` (1…255) and 0 for not scored, so "not
scored" sorts below every probability and viewers windowing 1…255 draw it dark. The no-data value is
the arrays' fill value; :func:`decode` always returns NaN for it. uint8 mosaics written before the
encoding was recorded (255 = not scored, p · 254) still decode.

Block ownership: level-0 chunks are written only by the block that owns them, whole, and
``write_empty_chunks`` is off, so an all-background chunk is simply absent (reads give the fill
value, "not scored"). Higher levels are built after all blocks, from level 0 in memory.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from xml.sax.saxutils import escape

import numcodecs
import numpy as np
import zarr
from zarr.core.group import GroupMetadata
from zarr.core.metadata.v2 import ArrayV2Metadata
from zarr.dtype import parse_dtype

from slidescore.core.types import Box, group_runs
from slidescore.io.outputs import join, local_path, remove, write_text
from slidescore.io.storage import is_local, storage_options, with_retries

T = TypeVar("T")

UINT8_NOT_SCORED = 0  # stored uint8 value of a cell not scored (the fill value: absent chunks read as it)
UINT8_OFFSET = 1
UINT8_SCALE = 254.0  # p ↦ UINT8_OFFSET + round(p · UINT8_SCALE): 1…255


@dataclass(frozen=True)
class Encoding:
    """How a mosaic stores probabilities: ``stored = offset + p · scale`` (rounded for uint8), and
    ``not_scored`` (``None``: NaN) for a cell no patch scored, which is also the arrays' fill value.

    Recorded as ``slidescore.encoding`` in the mosaic's attributes (:meth:`to_attrs`), e.g.
    ``{"dtype": "uint8", "not_scored": 0, "scale": 254, "offset": 1}``.
    """

    dtype: str = "float32"
    not_scored: float | None = None
    scale: float = 1.0
    offset: float = 0.0

    @classmethod
    def for_output(cls, dtype: str, not_scored: float | None = None) -> Encoding:
        """The encoding slidescore writes: float32 with ``not_scored`` (NaN by default), or uint8 1…255 with 0."""
        if dtype == "uint8":
            return cls("uint8", UINT8_NOT_SCORED, UINT8_SCALE, UINT8_OFFSET)
        if dtype != "float32":
            raise ValueError(f"mosaic dtype {dtype!r}: expected 'float32' or 'uint8'")
        return cls("float32", None if not_scored is None or np.isnan(not_scored) else float(not_scored))

    @classmethod
    def from_attrs(cls, attrs: Any, dtype: Any) -> Encoding:
        """The encoding recorded in a mosaic's root attributes (``attrs``: the whole ``.zattrs``); a
        mosaic without one is float32 with NaN, or uint8 of the old encoding (255 = not scored, p · 254)."""
        ours = attrs.get("slidescore") if isinstance(attrs, dict) else None
        rec = ours.get("encoding") if isinstance(ours, dict) else None
        dt = np.dtype(dtype)
        if not isinstance(rec, dict):
            return cls("uint8", 255, UINT8_SCALE, 0) if dt == np.uint8 else cls(dt.name)
        ns = rec.get("not_scored")
        return cls(str(rec.get("dtype", dt.name)), None if ns is None or ns == "NaN" else float(ns),
                   float(rec.get("scale", 1.0)), float(rec.get("offset", 0.0)))

    def to_attrs(self) -> dict[str, Any]:
        """The JSON form (NaN spelled ``"NaN"``, as in ``.zarray``'s fill value; uint8 values as integers)."""
        num = (lambda v: int(v)) if self.dtype == "uint8" else (lambda v: float(v))
        ns = "NaN" if self.not_scored is None else num(self.not_scored)
        return {"dtype": self.dtype, "not_scored": ns, "scale": num(self.scale), "offset": num(self.offset)}

    @property
    def fill(self) -> Any:
        """The arrays' fill value: what a cell not scored (and an absent chunk) holds."""
        if self.dtype == "uint8":
            return int(self.not_scored if self.not_scored is not None else 0)
        return float("nan") if self.not_scored is None else self.not_scored

    def window(self) -> dict[str, float]:
        """The ``omero`` window: start/end = the stored values of p = 0 and p = 1 (uint8: 1–255; float32:
        0–1), min/max = the data range (uint8: 0–255; float32: 0–1, widened to a finite ``not_scored``)."""
        if self.dtype == "uint8":
            return {"start": int(self.offset), "end": int(self.offset + self.scale), "min": 0, "max": 255}
        ns = self.not_scored
        return {"start": float(self.offset), "end": float(self.offset + self.scale),
                "min": min(0.0, ns) if ns is not None else 0.0, "max": max(1.0, ns) if ns is not None else 1.0}


@dataclass(frozen=True)
class MosaicSpec:
    """Everything that fixes the mosaic's layout (identical for every writer of one sample)."""

    shape: tuple[int, int, int]
    chunk: int
    n_levels: int
    dtype: str
    cell_um: float
    source_mpp: float
    channel_names: tuple[str, ...]
    colors: tuple[tuple[int, int, int], ...]
    thresholds: tuple[float, ...]
    name: str = "probabilities"
    not_scored: float | None = None  # float32 only: the stored value of a cell not scored (None: NaN)

    @property
    def encoding(self) -> Encoding:
        return Encoding.for_output(self.dtype, self.not_scored)


def _compressor() -> numcodecs.Blosc:
    return numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)


def _v2_meta(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str, fill: Any) -> ArrayV2Metadata:
    """A Zarr v2 array's metadata: Blosc-zstd chunks under ``/``-separated keys."""
    return ArrayV2Metadata(shape=shape, dtype=parse_dtype(np.dtype(dtype), zarr_format=2), chunks=chunks, fill_value=fill,
                           order="C", dimension_separator="/", compressor=_compressor(), filters=None, attributes={})


def _create(path: str | Path, nodes: dict[str, GroupMetadata | ArrayV2Metadata]) -> None:
    """Create a hierarchy of groups and arrays in one call: zarr writes their metadata concurrently
    (twice as fast as one node after the other, which on object storage is one PUT round trip each)."""
    store = _store(path)
    if isinstance(store, str):
        store = zarr.storage.LocalStore(store)
    list(zarr.create_hierarchy(store=store, nodes=dict(nodes)))


def level_shape(shape: tuple[int, ...], level: int) -> tuple[int, ...]:
    """Shape of pyramid level ``level`` (each level halves y and x, rounding up)."""
    *lead, h, w = shape
    f = 2**level
    return (*lead, -(-h // f), -(-w // f))


def _transforms(spec: MosaicSpec, level: int, with_channel: bool) -> list[dict[str, Any]]:
    px_um = spec.cell_um * 2**level
    # Pixel centre of a level pixel covering source pixels [i·n, (i+1)·n) sits at ((n − 1) / 2) · mpp.
    n_src = spec.cell_um / spec.source_mpp * 2**level
    offset = (n_src - 1) / 2 * spec.source_mpp
    lead = [1.0] if with_channel else []
    lead0 = [0.0] if with_channel else []
    return [
        {"type": "scale", "scale": [*lead, px_um, px_um]},
        {"type": "translation", "translation": [*lead0, offset, offset]},
    ]


def _axes(with_channel: bool) -> list[dict[str, str]]:
    yx = [{"name": "y", "type": "space", "unit": "micrometer"}, {"name": "x", "type": "space", "unit": "micrometer"}]
    return ([{"name": "c", "type": "channel"}] if with_channel else []) + yx


def _multiscales(spec: MosaicSpec, name: str, with_channel: bool, method: str) -> list[dict[str, Any]]:
    return [
        {
            "version": "0.4",
            "name": name,
            "axes": _axes(with_channel),
            "datasets": [
                {"path": str(lvl), "coordinateTransformations": _transforms(spec, lvl, with_channel)}
                for lvl in range(spec.n_levels)
            ],
            "type": method,
            "metadata": {"description": f"2x2 {method} downsampling, computed by slidescore"},
        }
    ]


def _store(path: str | Path, *, read_only: bool = False) -> Any:
    """What ``zarr.open_group`` gets for a location: a local path string, or an FsspecStore for a URL.

    On an object store every chunk and metadata document is one PUT, the atomic unit there.
    """
    if isinstance(path, Path) or is_local(str(path)):
        return local_path(path)
    return zarr.storage.FsspecStore.from_url(str(path), storage_options=storage_options(str(path)), read_only=read_only)


def _open(path: str | Path, mode: str) -> zarr.Group:
    return zarr.open_group(_store(path, read_only=mode == "r"), mode=mode, zarr_format=2)  # type: ignore[arg-type]


def create_mosaic(path: str | Path, spec: MosaicSpec, attrs: dict[str, Any]) -> None:
    """Create (or re-create) the empty mosaic: metadata, all level arrays, labels, OME-XML."""
    remove(path)
    _level0_arrays.cache_clear()
    enc = spec.encoding
    root_attrs = {
        "multiscales": _multiscales(spec, spec.name, True, "mean"),
        "omero": {
            "version": "0.4",
            "name": spec.name,
            "channels": [
                {
                    "label": name,
                    "color": "".join(f"{v:02X}" for v in color),
                    "window": enc.window(),
                    "active": True,
                    "coefficient": 1.0,
                    "family": "linear",
                    "inverted": False,
                }
                for name, color in zip(spec.channel_names, spec.colors, strict=True)
            ],
            "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
        },
        "slidescore": {**attrs, "encoding": enc.to_attrs()},
    }
    label_attrs = {
        "multiscales": _multiscales(spec, "suspect", False, "max"),
        "image-label": {
            "version": "0.4",
            "colors": [{"label-value": i + 1, "rgba": [*color, 255]} for i, color in enumerate(spec.colors)],
            "properties": [
                {"label-value": i + 1, "class": name, "threshold": t}
                for i, (name, t) in enumerate(zip(spec.channel_names, spec.thresholds, strict=True))
            ],
            "source": {"image": "../../"},
        },
    }
    nodes: dict[str, GroupMetadata | ArrayV2Metadata] = {
        "": GroupMetadata(attributes=root_attrs, zarr_format=2),
        "labels": GroupMetadata(attributes={"labels": ["suspect"]}, zarr_format=2),
        "labels/suspect": GroupMetadata(attributes=label_attrs, zarr_format=2),
    }
    for lvl in range(spec.n_levels):
        nodes[str(lvl)] = _v2_meta(level_shape(spec.shape, lvl), (1, spec.chunk, spec.chunk), spec.dtype, enc.fill)
        nodes[f"labels/suspect/{lvl}"] = _v2_meta(level_shape(spec.shape[1:], lvl), (spec.chunk, spec.chunk), "uint8", 0)
    _create(path, nodes)
    write_text(join(path, "OME", "METADATA.ome.xml"), ome_xml(spec))


PIXEL_TYPES = {"float32": "float", "uint8": "uint8"}  # numpy dtype → OME-XML Pixels/@Type


def ome_color(rgb: tuple[int, ...], alpha: int = 255) -> int:
    """An RGB colour as OME-XML's ``Color``: the RGBA bytes as one signed 32-bit integer
    ((r << 24 | g << 16 | b << 8 | a), two's complement), e.g. white → -1, red → -16776961."""
    r, g, b = (int(v) & 0xFF for v in rgb[:3])
    v = (r << 24) | (g << 16) | (b << 8) | (alpha & 0xFF)
    return v - (1 << 32) if v >= 1 << 31 else v


def ome_color_rgba(value: int) -> tuple[int, int, int, int]:
    """The inverse of :func:`ome_color`: a signed 32-bit ``Color`` → (r, g, b, a)."""
    v = int(value) & 0xFFFFFFFF
    return (v >> 24) & 0xFF, (v >> 16) & 0xFF, (v >> 8) & 0xFF, v & 0xFF


def ome_xml(spec: MosaicSpec) -> str:
    """Minimal OME-XML (2016-06) for Bio-Formats / QuPath: the level-0 size, pixel type and physical
    pixel size (µm), and one ``Channel`` per class with its ``Name`` and ``Color`` (QuPath takes the
    channel colours from here; it ignores the ``omero`` colours)."""
    c, h, w = spec.shape
    channels = "".join(
        f'<Channel ID="Channel:0:{i}" Name="{escape(n, {chr(34): "&quot;"})}" SamplesPerPixel="1" '
        f'Color="{ome_color(color)}"/>'
        for i, (n, color) in enumerate(zip(spec.channel_names, spec.colors, strict=True))
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<OME xmlns="http://www.openmicroscopy.org/Schemas/OME/2016-06" '
        'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
        'xsi:schemaLocation="http://www.openmicroscopy.org/Schemas/OME/2016-06 '
        'http://www.openmicroscopy.org/Schemas/OME/2016-06/ome.xsd">'
        f'<Image ID="Image:0" Name="{escape(spec.name, {chr(34): "&quot;"})}">'
        f'<Pixels ID="Pixels:0" DimensionOrder="XYCZT" Type="{PIXEL_TYPES[spec.dtype]}" SizeX="{w}" SizeY="{h}" '
        f'SizeC="{c}" SizeZ="1" SizeT="1" PhysicalSizeX="{spec.cell_um}" PhysicalSizeXUnit="µm" '
        f'PhysicalSizeY="{spec.cell_um}" PhysicalSizeYUnit="µm">'
        f"{channels}<MetadataOnly/></Pixels></Image></OME>\n"
    )


def encode(prob: np.ndarray, enc: Encoding) -> np.ndarray:
    """Probabilities (NaN = not scored) → stored values (see :class:`Encoding`)."""
    if enc.dtype == "float32":
        out = prob.astype(np.float32)
        if enc.not_scored is not None:
            out[np.isnan(out)] = enc.not_scored
        return out
    out = np.full(prob.shape, enc.fill, np.uint8)
    ok = ~np.isnan(prob)
    out[ok] = np.rint(enc.offset + np.clip(prob[ok], 0, 1) * enc.scale).astype(np.uint8)
    return out


def decode(stored: np.ndarray, enc: Encoding | None = None) -> np.ndarray:
    """Stored values → float32 probabilities with NaN for cells not scored.

    ``enc``: the mosaic's :class:`Encoding` (:func:`read_encoding`); ``None``: what slidescore
    writes for the array's dtype by default (float32 with NaN, uint8 with 0 = not scored)."""
    enc = enc or Encoding.for_output("uint8" if stored.dtype == np.uint8 else "float32")
    if enc.dtype == "uint8" or stored.dtype == np.uint8:
        out = (stored.astype(np.float32) - np.float32(enc.offset)) / np.float32(enc.scale)
    else:
        out = stored.astype(np.float32)
    if enc.not_scored is not None:
        out[stored == enc.not_scored] = np.nan
    return out


def threshold_labels(prob: np.ndarray, thresholds: tuple[float, ...]) -> np.ndarray:
    """Label image: 1 + index of the most probable class at or above its threshold, else 0."""
    p = np.nan_to_num(prob, nan=-1.0)
    above = p >= np.asarray(thresholds, dtype=np.float32)[:, None, None]
    best = np.where(above, p, -np.inf).argmax(axis=0)
    return np.where(above.any(axis=0), best + 1, 0).astype(np.uint8)


def _arr(root: zarr.Group, name: str) -> zarr.Array:
    node = root[name]
    if not isinstance(node, zarr.Array):
        raise TypeError(f"{name} in {root.store} is not an array")
    return node


@functools.lru_cache(maxsize=8)
def _level0_arrays(path: str, spec: MosaicSpec) -> tuple[zarr.Array, zarr.Array]:
    """The level-0 probability and label arrays of a mosaic, opened once per process (the spec fixes
    their metadata, so a mosaic re-created with the same spec is written correctly through them)."""
    root = _open(path, "r+")
    return _arr(root, "0"), _arr(root, "labels/suspect/0")


def _storage_guard(path: str | Path, what: str, fn: Callable[[], T]) -> T:
    """Remote mosaics: retry transient store errors, and raise slidescore's storage errors (a
    :class:`~slidescore.errors.TransientStorageError` lets the driver retry the block). Chunk
    writes are whole and idempotent, so a retried write leaves the same bytes."""
    return fn() if is_local(str(path)) else with_retries(fn, str(path), what)


def write_block(path: str | Path, spec: MosaicSpec, cells: Box, prob: np.ndarray) -> None:
    """Write a block's level-0 chunks (probabilities and labels). ``cells`` must be chunk-aligned."""
    stored, labels = encode(prob, spec.encoding), threshold_labels(prob, spec.thresholds)

    def write() -> None:
        a_probs, a_labels = _level0_arrays(str(path), spec)
        a_probs[:, cells.y : cells.y1, cells.x : cells.x1] = stored
        a_labels[cells.y : cells.y1, cells.x : cells.x1] = labels

    _storage_guard(path, f"writing the mosaic chunks of cells {cells}", write)


def read_box(path: str | Path, level: int, cells: Box) -> np.ndarray:
    """A box of one level as float32 probabilities (c, h, w), the labels of level 0 read too (both decode)."""
    return box_reader(path, level)(cells)


def box_reader(path: str | Path, level: int) -> Callable[[Box], np.ndarray]:
    """:func:`read_box` for many boxes of one level: the mosaic opened once."""
    root = zarr.open_group(_store(path, read_only=True), mode="r")
    arr = _arr(root, str(level))
    enc = read_encoding(root, arr)
    labels = _arr(root, "labels/suspect/0") if level == 0 else None

    def read(cells: Box) -> np.ndarray:
        out = decode(np.asarray(arr[:, cells.y : cells.y1, cells.x : cells.x1]), enc)
        if labels is not None:
            np.asarray(labels[cells.y : cells.y1, cells.x : cells.x1])
        return out

    return read


def read_level(path: str | Path, level: int = 0) -> np.ndarray:
    """Whole level as float32 probabilities (c, y, x), NaN = not scored."""
    root = zarr.open_group(_store(path, read_only=True), mode="r")
    arr = _arr(root, str(level))
    return decode(np.asarray(arr[...]), read_encoding(root, arr))


def read_encoding(root: zarr.Group, arr: zarr.Array | None = None) -> Encoding:
    """The :class:`Encoding` a mosaic records (``slidescore.encoding``), or the one its dtype implies."""
    arr = arr if arr is not None else _arr(root, "0")
    return Encoding.from_attrs(dict(root.attrs), arr.dtype)


def write_fraction_image(path: str | Path, frac: np.ndarray, spec: MosaicSpec) -> None:
    """Save the foreground mask (fraction per cell, uint8 0–255) as a single-channel OME-Zarr, with
    ``OME/METADATA.ome.xml`` (pixel size, channel name and colour) as the mosaic has."""
    remove(path)
    one = MosaicSpec(
        shape=(1, *frac.shape), chunk=spec.chunk, n_levels=1, dtype="uint8", cell_um=spec.cell_um,
        source_mpp=spec.source_mpp, channel_names=("foreground fraction",), colors=((255, 255, 255),), thresholds=(0.5,),
        name="foreground",
    )
    attrs = {
        "multiscales": _multiscales(one, "foreground", True, "mean"),
        "omero": {
            "version": "0.4",
            "name": "foreground",
            "channels": [{"label": "foreground fraction", "color": "FFFFFF",
                          "window": {"start": 0, "end": 255, "min": 0, "max": 255}, "active": True}],
            "rdefs": {"model": "greyscale"},
        },
    }
    _create(path, {"": GroupMetadata(attributes=attrs, zarr_format=2), "0": _v2_meta(one.shape, (1, spec.chunk, spec.chunk), "uint8", 0)})
    arr = _arr(_open(path, "r+"), "0")
    c = spec.chunk
    for y in range(0, frac.shape[0], c):  # a row of chunks at a time: no full-canvas float copies
        q = np.rint(np.clip(frac[y : y + c], 0, 1) * 255).astype(np.uint8)
        # only runs of chunks holding foreground are written (all-zero chunks are not stored either way)
        for g0, g1 in group_runs(q.any(axis=0), c):
            x0, x1 = g0 * c, min(q.shape[1], g1 * c)
            arr[0, y : y + q.shape[0], x0:x1] = q[:, x0:x1]
    write_text(join(path, "OME", "METADATA.ome.xml"), ome_xml(one))


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False)
