"""Present any image to a model as uint8 at the model's resolution: explicit conversion and resampling.

:func:`~slidescore.stages.input_plan.plan_input` decides, once per sample, how the image's pixels
become the model's input and returns an :class:`InputRecipe` (plain data: it travels in the sample
plan to every worker); this module applies it:

- **pixel type**: uint8 is used as is; other types need an explicit linear window from the model
  card's ``input_conversion`` or the config's ``input.conversion`` (``{"uint16": {"low": 0,
  "high": 4095}}``: ``low`` → 0, ``high`` → 255, clipped; NaN → 0). Without a rule the sample is
  refused — never silently rescaled.
- **channels**: RGB and RGBA are passed on (the scorer drops alpha); a single-channel image goes to
  a GRAY model as is, and to an RGB model only when ``gray_to_rgb`` is true (replicated).
- **resolution**: when no pyramid level is within ``input.mpp_tolerance`` of the model's µm/px, a
  *virtual level* is appended: the nearest finer level (or the finest, if none is finer) resampled
  to exactly the model's µm/px. Downsampling averages each output pixel's footprint (area
  weighting, the anti-aliased "box" resize); upsampling interpolates linearly. Every output pixel
  is a fixed function of its own source pixels, so reading a box equals cropping the fully
  resampled image and blocks stay exact.

:class:`AdaptedReader` applies a recipe to a reader; :func:`open_adapted` opens a URI with one.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from slidescore.core.types import Box, LevelInfo
from slidescore.io.base import SlideReader
from slidescore.io.open import open_image

_STRIP_ROWS = 256


@dataclass(frozen=True)
class InputRecipe:
    """How one image becomes model input (picklable; recorded in run.json ``input.conversion``)."""

    dtype: str
    window: tuple[float, float] | None = None  # (low, high) mapped onto (0, 255); None: uint8 as is
    window_source: str = ""
    gray_to_rgb: bool = False
    resample_from_level: int | None = None
    resample_factor: float = 1.0  # source pixels per virtual pixel (> 1: downsampling)
    resample_method: str = ""

    @property
    def scale(self) -> float:
        """Virtual pixels per source pixel (the zoom applied to ``resample_from_level``)."""
        return 1.0 / self.resample_factor

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["window"] = list(self.window) if self.window else None
        d["scale"] = self.scale
        return d


class AdaptedReader:
    """A reader seen through an :class:`InputRecipe`: uint8 pixels, model channels, a virtual level."""

    def __init__(self, inner: SlideReader, recipe: InputRecipe) -> None:
        self.inner = inner
        self.recipe = recipe
        self.uri, self.mpp, self.mpp_source = inner.uri, inner.mpp, inner.mpp_source
        self.georeference: dict[str, Any] | None = getattr(inner, "georeference", None)
        self.n_channels = 3 if recipe.gray_to_rgb else inner.n_channels
        self.dtype = np.dtype(np.uint8)
        self._lut: np.ndarray | None = None
        levels = list(inner.levels)
        self.virtual_level: int | None = None
        if recipe.resample_from_level is not None:
            src = inner.levels[recipe.resample_from_level]
            f = recipe.resample_factor
            self.virtual_level = len(levels)
            levels.append(LevelInfo(len(levels), _out_len(src.height, f), _out_len(src.width, f), downsample=src.downsample * f))
        self.levels = tuple(levels)

    def read(self, level: int, box: Box) -> np.ndarray:
        if level == self.virtual_level:
            return self._channels(self._read_resampled(box))
        return self._channels(self._convert(self.inner.read(level, box)))

    def expect(self, level: int, boxes: list[Box]) -> None:
        """Pass announced reads on to the file's reader (for the virtual level: its source boxes)."""
        expect = getattr(self.inner, "expect", None)
        if expect is None:
            return
        if level != self.virtual_level:
            expect(level, boxes)
        else:
            expect(self.recipe.resample_from_level, [self._source_box(b) for b in boxes])

    def _source_box(self, box: Box) -> Box:
        """The box of the source level that :meth:`_read_resampled` reads for ``box``."""
        r = self.recipe
        assert r.resample_from_level is not None
        src = self.inner.levels[r.resample_from_level]
        y0, iy, _ = axis_weights(box.y, box.h, r.resample_factor, src.height)
        x0, ix, _ = axis_weights(box.x, box.w, r.resample_factor, src.width)
        return Box(y0, x0, int(iy.max()) + 1, int(ix.max()) + 1)

    def _convert(self, data: np.ndarray) -> np.ndarray:
        if self.recipe.window is None:
            return data
        low, high = self.recipe.window
        if data.dtype.kind in "ui" and data.dtype.itemsize <= 2:  # a lookup table: exact and fast
            if self._lut is None:
                info = np.iinfo(data.dtype)
                self._lut = _window(np.arange(info.min, info.max + 1, dtype=np.float64), low, high)
            return self._lut[data.astype(np.int64) - np.iinfo(data.dtype).min]
        x = np.nan_to_num(data.astype(np.float64), nan=low, posinf=high, neginf=low)
        return _window(x, low, high)

    def _channels(self, data: np.ndarray) -> np.ndarray:
        return np.repeat(data, 3, axis=-1) if self.recipe.gray_to_rgb and data.shape[-1] == 1 else data

    def _read_resampled(self, box: Box) -> np.ndarray:
        r = self.recipe
        assert r.resample_from_level is not None  # only called for the virtual level
        src = self.inner.levels[r.resample_from_level]
        y0, iy, wy = axis_weights(box.y, box.h, r.resample_factor, src.height)
        x0, ix, wx = axis_weights(box.x, box.w, r.resample_factor, src.width)
        pix = self._convert(self.inner.read(r.resample_from_level, self._source_box(box)))
        out = np.empty((box.h, box.w, pix.shape[2]), np.uint8)
        for r0 in range(0, box.h, _STRIP_ROWS):  # strips keep the float intermediates small
            sy, swy = iy[r0 : r0 + _STRIP_ROWS], wy[r0 : r0 + _STRIP_ROWS]
            rows = swy[:, 0, None, None] * pix[sy[:, 0]]  # uint8 · float32 → float32, (strip, m_x, c)
            for k in range(1, sy.shape[1]):
                rows += swy[:, k, None, None] * pix[sy[:, k]]
            acc = wx[None, :, 0, None] * rows[:, ix[:, 0]]
            for k in range(1, ix.shape[1]):
                acc += wx[None, :, k, None] * rows[:, ix[:, k]]
            out[r0 : r0 + len(sy)] = np.rint(np.clip(acc, 0, 255))
        return out

    def close(self) -> None:
        self.inner.close()


def _window(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """[low, high] → [0, 255] linearly, clipped, rounded to the nearest integer."""
    return np.rint(np.clip((x - low) * (255.0 / (high - low)), 0, 255)).astype(np.uint8)


def _out_len(n_src: int, factor: float) -> int:
    return max(1, math.ceil(n_src / factor - 1e-9))


def axis_weights(o0: int, n: int, factor: float, n_src: int) -> tuple[int, np.ndarray, np.ndarray]:
    """Resampling weights of output pixels ``o0 … o0+n-1`` along one axis.

    Returns ``(s0, idx, w)``: output pixel ``o0 + i`` is ``Σ_k w[i, k] · source[s0 + idx[i, k]]``, summed
    in order of ``k``. Each row depends only on the global output index (never on ``o0`` or ``n``), so
    a box is computed with the same float operations as the whole image. ``factor`` is source pixels
    per output pixel: > 1 averages the footprint ``[i·factor, (i+1)·factor)`` clipped to the image
    (area); < 1 interpolates linearly between the two source pixels nearest the output pixel's
    centre (clamped at the edges).
    """
    i = np.arange(o0, o0 + n, dtype=np.float64)
    if factor > 1:
        lo, hi = i * factor, np.minimum((i + 1) * factor, n_src)
        j0 = np.floor(lo).astype(np.int64)
        width = max(1, int(np.max(np.ceil(hi) - j0))) if n else 1
        js = j0[:, None] + np.arange(width)[None, :]
        w = np.clip(np.minimum(js + 1, hi[:, None]) - np.maximum(js, lo[:, None]), 0, None)
        w /= w.sum(axis=1, keepdims=True)
    else:
        centre = np.clip((i + 0.5) * factor - 0.5, 0, n_src - 1)
        j0 = np.minimum(np.floor(centre).astype(np.int64), max(n_src - 2, 0))
        t = centre - j0
        js = j0[:, None] + np.arange(2)[None, :]
        w = np.stack([1 - t, t], axis=1)
    w[js >= n_src] = 0.0
    js = np.minimum(js, n_src - 1)  # zero-weight taps past the edge point at a real pixel
    s0 = int(js.min()) if n else 0
    return s0, js - s0, w.astype(np.float32)


def open_adapted(uri: str, recipe: InputRecipe | None, *, max_tile_bytes: int | None = None,
                 **options: Any) -> SlideReader:
    """Open ``uri`` for scoring, through ``recipe`` (``None``: the raw reader); ``max_tile_bytes`` and
    ``options`` (backend, slide cache) as :func:`~slidescore.io.open.open_image` takes them."""
    reader = open_image(uri, max_tile_bytes=max_tile_bytes, **options)
    return reader if recipe is None else AdaptedReader(reader, recipe)
