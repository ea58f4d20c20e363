"""Zarr and OME-Zarr (0.4 / 0.5) image reader.

A group with ``multiscales`` metadata (OME-Zarr 0.4 in the attributes, 0.5 under ``ome``) gives
the levels in order and the µm/px from the first dataset's ``scale`` on the x axis (converted from
the axis unit). A bare array is one level with axes guessed from its shape ((y, x), (y, x, c) or
(c, y, x)) and no resolution metadata.
"""

from __future__ import annotations

import math
from itertools import islice, product
from typing import Any

import numpy as np
import zarr

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import (
    InputError,
    SlideScoreError,
    TransientStorageError,
    UnsupportedImageError,
)
from slidescore.io.base import as_yxc, check_chunk_bytes, check_level_shapes, read_failed
from slidescore.io.storage import is_local, storage_options, with_retries

_UNITS_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}
#: chunks of a failed read decoded again one by one to name the bad one (beyond: the message gives the range)
_PROBE_CHUNKS = 64


class ZarrImageReader:
    """An OME-Zarr multiscale image or a plain Zarr array.

    Opening validates the metadata (``multiscales``, ``datasets``, ``axes``, ``scale``) against the
    arrays and refuses, with :class:`UnsupportedImageError` naming the store and the problem,
    metadata that is missing, mistyped or inconsistent, a level without pixels, and chunks that
    decode to more than ``max_tile_bytes`` (``None``: :data:`~slidescore.io.base.MAX_TILE_BYTES`).
    A chunk that fails to decode when read is named with its level, key and the box read.
    """

    def __init__(self, uri: str, *, max_tile_bytes: int | None = None) -> None:
        self.uri = uri
        try:
            if is_local(uri):
                node = zarr.open(uri, mode="r")
            else:
                store = zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options(uri), read_only=True)
                node = zarr.open(store, mode="r")
        except Exception as e:  # zarr raises several types for non-Zarr content
            raise UnsupportedImageError(f"{uri}: not a readable Zarr store ({type(e).__name__}: {e})", uri=uri) from None
        try:
            self._open(node, max_tile_bytes)
        except SlideScoreError:
            raise
        except Exception as e:  # a library error on metadata the checks above let through
            raise UnsupportedImageError(
                f"{uri}: unreadable Zarr image metadata ({type(e).__name__}: {e}); re-export the image as OME-Zarr",
                uri=uri) from None

    def _open(self, node: Any, max_tile_bytes: int | None) -> None:
        uri = self.uri
        self.mpp: float | None = None
        self.mpp_source = "none"
        self.georeference: dict[str, Any] | None = None  # OME-Zarr has no map georeference
        scale_of: tuple[dict[str, Any], list[str], list[Any]] | None = None
        if isinstance(node, zarr.Array):
            self._arrays = [node]
            self._paths = [""]
            self._axes = _guess_axes(node.shape, uri)
        else:
            ms = _multiscales(dict(node.attrs), uri)
            if ms is None:
                raise UnsupportedImageError(
                    f"{uri}: Zarr group without OME-Zarr 'multiscales' metadata; point at the image group or an array",
                    uri=uri,
                )
            axes, names = _axes(ms, uri)
            self._axes = "".join(n[0].upper() for n in names)
            self._paths = _dataset_paths(ms, uri)
            self._arrays = [_dataset_array(node, path, uri) for path in self._paths]
            scale_of = (ms, names, axes)
        dtype = np.dtype(self._arrays[0].dtype)
        for i, (arr, path) in enumerate(zip(self._arrays, self._paths, strict=True)):
            where = f"level {i} (array {path!r})" if path else "the array"
            if len(arr.shape) != len(self._axes):
                raise UnsupportedImageError(
                    f"{uri}: {where} has {len(arr.shape)} dimensions (shape {tuple(arr.shape)}) but the multiscales axes "
                    f"name {len(self._axes)} ({self._axes.lower()}); the metadata does not match the arrays — re-export it",
                    uri=uri, level=i)
            if any(int(n) < 1 for n in arr.shape):
                raise UnsupportedImageError(f"{uri}: {where} has shape {tuple(arr.shape)}: no pixels; re-export the image",
                                            uri=uri, level=i)
            if len(arr.chunks) != len(arr.shape) or any(isinstance(c, bool) or int(c) < 1 for c in arr.chunks):
                raise UnsupportedImageError(f"{uri}: {where} has chunk shape {tuple(arr.chunks)}; expected a positive size "
                                            "per dimension — re-export the image", uri=uri, level=i)
            if np.dtype(arr.dtype) != dtype or dtype.kind not in "biuf":
                raise UnsupportedImageError(
                    f"{uri}: {where} has pixel type {np.dtype(arr.dtype)} (level 0: {dtype}); expected the same integer "
                    "or float type on every level", uri=uri, level=i)
            for ax, n in zip(self._axes, arr.shape, strict=True):
                if ax not in "YXC" and int(n) != 1:
                    raise UnsupportedImageError(
                        f"{uri}: axis {ax!r} has size {n}; only 2-D (y, x[, c]) images are supported — export one plane "
                        "(z/t) per sample", uri=uri)
        if scale_of is not None:  # after the axes are known to match the arrays
            self.mpp, self.mpp_source = _scale_mpp(*scale_of, uri)
        # one decoded chunk of every level, from the metadata: a hostile one is refused before any allocation
        self.max_chunk_bytes = max(check_chunk_bytes(uri, i, arr.chunks, arr.dtype, max_tile_bytes, "chunk")
                                   for i, arr in enumerate(self._arrays))
        shapes = [self._yxc_shape(a) for a in self._arrays]
        check_level_shapes(uri, shapes)
        self.levels = tuple(LevelInfo(i, h, w, downsample=shapes[0][1] / w) for i, (h, w, _) in enumerate(shapes))
        self.n_channels = shapes[0][2]
        self.dtype = dtype

    def _yxc_shape(self, arr: Any) -> tuple[int, int, int]:
        d = dict(zip(self._axes, arr.shape, strict=True))
        return d.get("Y", 0), d.get("X", 0), d.get("C", 1)

    def _slices(self, box: Box) -> tuple[slice, ...]:
        return tuple(
            slice(box.y, box.y1) if ax == "Y" else slice(box.x, box.x1) if ax == "X" else slice(None) for ax in self._axes
        )

    def read(self, level: int, box: Box) -> np.ndarray:
        arr = self._arrays[level]
        sl = self._slices(box)
        try:
            if is_local(self.uri):
                data = np.asarray(arr[sl])
            else:
                data = with_retries(lambda: np.asarray(arr[sl]), self.uri, f"reading level {level} box {box}")
        except (InputError, TransientStorageError):
            raise
        except Exception as e:  # codecs (numcodecs, zstd, blosc) and zarr raise many types on a corrupt chunk
            raise read_failed(self.uri, level, box, e, self._bad_chunk(level, box)) from None
        return as_yxc(data, self._axes, self.uri)

    def _bad_chunk(self, level: int, box: Box) -> str:
        """Which chunk of a failed read does not decode (the first of the first :data:`_PROBE_CHUNKS`), for the message."""
        try:
            return self._find_bad_chunk(level, box)
        except Exception:  # noqa: BLE001 — only for the message: the read's own error is what is reported
            return ""

    def _find_bad_chunk(self, level: int, box: Box) -> str:
        arr = self._arrays[level]
        ranges = []
        for ax, sl, n, c in zip(self._axes, self._slices(box), arr.shape, arr.chunks, strict=True):
            start, stop = (sl.start, min(sl.stop, n)) if ax in "YX" else (0, n)
            ranges.append(range(start // c, -(-stop // c)))
        for idx in islice(product(*ranges), _PROBE_CHUNKS):
            try:
                arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, arr.chunks, strict=True))]
            except Exception:  # noqa: BLE001 — the one that fails is the one to name
                try:
                    key = arr.metadata.encode_chunk_key(idx)
                except Exception:  # noqa: BLE001 — the key is only for the message
                    key = ".".join(map(str, idx))
                path = self._paths[level]
                return f"chunk {f'{path}/' if path else ''}{key}"
        first, last = [r.start for r in ranges], [r.stop - 1 for r in ranges]
        return f"chunks {tuple(first)}–{tuple(last)} of array {self._paths[level]!r}" if self._paths[level] \
            else f"chunks {tuple(first)}–{tuple(last)}"

    def close(self) -> None:
        pass


def _bad(uri: str, what: str) -> UnsupportedImageError:
    return UnsupportedImageError(f"{uri}: corrupt OME-Zarr metadata: {what}; re-export the image as OME-Zarr", uri=uri)


def _multiscales(attrs: dict[str, Any], uri: str) -> dict[str, Any] | None:
    """The first ``multiscales`` entry (OME-Zarr 0.4 in the attributes, 0.5 under ``ome``); ``None`` if absent."""
    ome = attrs.get("ome")
    ms = attrs.get("multiscales") or (ome.get("multiscales") if isinstance(ome, dict) else None)
    if not ms:
        return None
    if not isinstance(ms, list) or not isinstance(ms[0], dict):
        raise _bad(uri, f"'multiscales' must be a list of objects, got {_show(ms)}")
    return ms[0]


def _axes(ms: dict[str, Any], uri: str) -> tuple[list[Any], list[str]]:
    """The ``axes`` of a multiscales entry (absent: OME-Zarr 0.1–0.3's t, c, z, y, x) and their names."""
    axes = ms.get("axes")
    if axes is None:
        axes = [{"name": n} for n in "tczyx"]
    if not isinstance(axes, list) or not axes:
        raise _bad(uri, f"'axes' must be a non-empty list, got {_show(axes)}")
    names: list[str] = []
    for a in axes:
        name = a.get("name") if isinstance(a, dict) else a
        if not isinstance(name, str) or not name:
            raise _bad(uri, f"every axis needs a name (a non-empty string), got {_show(axes)}")
        names.append(name)
    letters = [n[0].upper() for n in names]
    if len(set(letters)) != len(letters) or "X" not in letters or "Y" not in letters:
        raise _bad(uri, f"axes {names} must include 'y' and 'x' and name each axis once")
    return axes, names


def _dataset_paths(ms: dict[str, Any], uri: str) -> list[str]:
    datasets = ms.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise _bad(uri, f"'multiscales' has no 'datasets' (expected a non-empty list of {{path: …}}), got {_show(datasets)}")
    paths = [d.get("path") if isinstance(d, dict) else None for d in datasets]
    if not all(isinstance(p, str) and p.strip("/") for p in paths):
        raise _bad(uri, f"every dataset needs a 'path' (a non-empty string), got {_show(datasets)}")
    return paths  # type: ignore[return-value]


def _dataset_array(node: Any, path: str, uri: str) -> Any:
    try:
        arr = node[path]
    except KeyError:
        raise _bad(uri, f"dataset path {path!r} is not in the group") from None
    except Exception as e:  # zarr refuses its own corrupt metadata (.zarray / zarr.json) with several types
        raise _bad(uri, f"the array of dataset {path!r} has unreadable metadata ({type(e).__name__}: {e})") from None
    if not isinstance(arr, zarr.Array):
        raise _bad(uri, f"dataset path {path!r} is a group, not an array")
    return arr


def _scale_mpp(ms: dict[str, Any], names: list[str], axes: list[Any], uri: str) -> tuple[float | None, str]:
    """µm/px from the first dataset's ``scale`` on the x axis, in its unit; corrupt values are refused."""
    transforms = ms["datasets"][0].get("coordinateTransformations", [])
    if not isinstance(transforms, list) or not all(isinstance(t, dict) for t in transforms):
        raise _bad(uri, f"datasets[0].coordinateTransformations must be a list of objects, got {_show(transforms)}")
    for tr in transforms:
        if tr.get("type") != "scale":
            continue
        scale = tr.get("scale")
        if not isinstance(scale, list) or len(scale) != len(names):
            raise _bad(uri, f"datasets[0] scale must be a list of {len(names)} numbers (one per axis), got {_show(scale)}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in scale):
            raise _bad(uri, f"datasets[0] scale has a non-numeric value: {_show(scale)}")
        if not all(math.isfinite(v) and v > 0 for v in scale):
            raise _bad(uri, f"datasets[0] scale must be finite and positive, got {_show(scale)}")
    if "x" not in names:
        return None, "none"
    ix = names.index("x")
    unit = axes[ix].get("unit", "micrometer") if isinstance(axes[ix], dict) else "micrometer"
    if not isinstance(unit, str):
        raise _bad(uri, f"the unit of axis 'x' must be a string, got {_show(unit)}")
    factor = _UNITS_UM.get(unit)
    for tr in transforms:
        if tr.get("type") == "scale" and factor is not None:
            return float(tr["scale"][ix]) * factor, f"ome-zarr:scale({unit})"
    return None, "none"


def _show(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _guess_axes(shape: tuple[int, ...], uri: str) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[2] <= 4 else "CYX"
    raise UnsupportedImageError(
        f"{uri}: bare Zarr array of shape {shape}; expected (y, x), (y, x, c) or (c, y, x), or an OME-Zarr group with axes",
        uri=uri,
    )
