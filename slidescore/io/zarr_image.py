"""Zarr and OME-Zarr (0.4 / 0.5) image reader.

A group with ``multiscales`` metadata (OME-Zarr 0.4 in the attributes, 0.5 under ``ome``) gives
the levels in order and the µm/px from the first dataset's ``scale`` on the x axis (converted from
the axis unit). A bare array is one level with axes guessed from its shape ((y, x), (y, x, c) or
(c, y, x)) and no resolution metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import zarr

from slidescore.core.types import Box, LevelInfo
from slidescore.errors import UnsupportedImageError
from slidescore.io.base import as_yxc
from slidescore.io.storage import is_local, storage_options

_UNITS_UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "centimeter": 1e4, "meter": 1e6}


class ZarrImageReader:
    """An OME-Zarr multiscale image or a plain Zarr array."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        try:
            if is_local(uri):
                node = zarr.open(uri, mode="r")
            else:
                store = zarr.storage.FsspecStore.from_url(uri, storage_options=storage_options(uri), read_only=True)
                node = zarr.open(store, mode="r")
        except Exception as e:  # zarr raises several types for non-Zarr content
            raise UnsupportedImageError(f"{uri}: not a readable Zarr store ({type(e).__name__}: {e})", uri=uri) from None
        self.mpp: float | None = None
        self.mpp_source = "none"
        self.georeference: dict[str, Any] | None = None  # OME-Zarr has no map georeference
        if isinstance(node, zarr.Array):
            self._arrays = [node]
            self._axes = _guess_axes(node.shape, uri)
        else:
            ms = _multiscales(dict(node.attrs))
            if ms is None:
                raise UnsupportedImageError(
                    f"{uri}: Zarr group without OME-Zarr 'multiscales' metadata; point at the image group or an array",
                    uri=uri,
                )
            axes = ms.get("axes") or [{"name": n} for n in "tczyx"]
            names = [a["name"] if isinstance(a, dict) else a for a in axes]
            self._axes = "".join(n[0].upper() for n in names)
            self._arrays = [node[d["path"]] for d in ms["datasets"]]  # type: ignore[misc]
            self.mpp, self.mpp_source = _scale_mpp(ms, names, axes)
        shapes = [self._yxc_shape(a) for a in self._arrays]
        self.levels = tuple(LevelInfo(i, h, w, downsample=shapes[0][1] / w) for i, (h, w, _) in enumerate(shapes))
        self.n_channels = shapes[0][2]
        self.dtype = np.dtype(self._arrays[0].dtype)

    def _yxc_shape(self, arr: Any) -> tuple[int, int, int]:
        d = dict(zip(self._axes, arr.shape, strict=True))
        return d.get("Y", 0), d.get("X", 0), d.get("C", 1)

    def read(self, level: int, box: Box) -> np.ndarray:
        sl = tuple(
            slice(box.y, box.y1) if ax == "Y" else slice(box.x, box.x1) if ax == "X" else slice(None) for ax in self._axes
        )
        return as_yxc(np.asarray(self._arrays[level][sl]), self._axes, self.uri)

    def close(self) -> None:
        pass


def _multiscales(attrs: dict[str, Any]) -> dict[str, Any] | None:
    ms = attrs.get("multiscales") or attrs.get("ome", {}).get("multiscales")
    return ms[0] if ms else None


def _scale_mpp(ms: dict[str, Any], names: list[str], axes: list[Any]) -> tuple[float | None, str]:
    if "x" not in names:
        return None, "none"
    ix = names.index("x")
    unit = axes[ix].get("unit", "micrometer") if isinstance(axes[ix], dict) else "micrometer"
    factor = _UNITS_UM.get(unit)
    for tr in ms["datasets"][0].get("coordinateTransformations", []):
        if tr.get("type") == "scale" and factor is not None:
            return float(tr["scale"][ix]) * factor, f"ome-zarr:scale({unit})"
    return None, "none"


def _guess_axes(shape: tuple[int, ...], uri: str) -> str:
    if len(shape) == 2:
        return "YX"
    if len(shape) == 3:
        return "YXC" if shape[2] <= 4 else "CYX"
    raise UnsupportedImageError(
        f"{uri}: bare Zarr array of shape {shape}; expected (y, x), (y, x, c) or (c, y, x), or an OME-Zarr group with axes",
        uri=uri,
    )
