"""QuPath tile heat map: the probability mosaic as GeoJSON ``tile`` objects for measurement maps.

QuPath's *Measure ▸ Show measurement maps* colours detection/tile objects by a measurement. This
module turns the cell-resolution probability map into square tiles of ``f × f`` cells on a coarser
grid, ``f`` the smallest factor that keeps the number of tiles holding any scored cell at or below
``max_tiles`` (QuPath stays responsive with tens of thousands of objects, not millions). Each tile
is a level-0 pixel polygon (the coordinates of ``regions.geojson``) with ``objectType`` ``tile``
and the measurements ``probability`` (the first class's mean over the tile's scored cells),
``probability: <class>`` and ``max probability: <class>`` per class, and ``scored fraction``.
Pure data (numpy), deterministic: a rerun writes identical files.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np

from slidescore.core.types import group_runs

# cells of the map reduced at a time (bands of whole tile rows; 1 Mi cells: 4 MB of float32 per class)
_BAND_CELLS = 1 << 20


def _scored(prob: np.ndarray) -> np.ndarray:
    """Cells where any class holds a finite value (one bool per cell; tested band by band)."""
    c, h0, w0 = prob.shape
    scored = np.zeros((h0, w0), bool)
    step = max(1, _BAND_CELLS // max(1, c * w0))
    for r0 in range(0, h0, step):
        scored[r0: r0 + step] = np.isfinite(prob[:, r0: r0 + step]).any(axis=0)
    return scored


def _tile_rows(h0: int, w0: int, f: int) -> range:
    """First tile row of each band of whole tile rows of ``f × f`` cells (a band about :data:`_BAND_CELLS` cells)."""
    h = -(-h0 // f)
    return range(0, h, max(1, _BAND_CELLS // max(1, f * f * -(-w0 // f))))


def tile_factor(scored: np.ndarray, max_tiles: int) -> int:
    """Smallest cells-per-tile factor whose grid has at most ``max_tiles`` tiles with scored cells."""
    n = int(scored.sum())
    f = max(1, math.ceil(math.sqrt(n / max(1, max_tiles))))
    h0, w0 = scored.shape
    row_scored = np.asarray(scored.any(axis=1))  # bands without a scored cell hold no tile
    while True:
        h, w = -(-h0 // f), -(-w0 // f)
        step = _tile_rows(h0, w0, f).step
        n_tiles = 0
        for t0 in _tile_rows(h0, w0, f):
            t1 = min(h, t0 + step)
            if not row_scored[t0 * f: t1 * f].any():
                continue
            band = np.zeros(((t1 - t0) * f, w * f), bool)
            rows = scored[t0 * f: t1 * f]
            band[: rows.shape[0], :w0] = rows
            n_tiles += int(band.reshape(t1 - t0, f, w, f).any(axis=(1, 3)).sum())
        if n_tiles <= max_tiles:
            return f
        f += 1


def _tile_means(prob: np.ndarray, f: int, t0: int, t1: int) -> tuple[np.ndarray, ...]:
    """Per-class mean, peak and scored count of tile rows ``t0:t1``, and each tile's cell count inside the map.

    The tiles' cells are gathered into rows of ``f²`` and reduced along them exactly as over the
    whole padded map (the same float32 sums in the same order): the figures do not depend on the bands."""
    c, h0, w0 = prob.shape
    w = -(-w0 // f)
    nb = t1 - t0
    pad = np.full((c, nb * f, w * f), np.nan, np.float32)
    rows = prob[:, t0 * f: t1 * f]
    pad[:, : rows.shape[1], :w0] = rows
    blocks = pad.reshape(c, nb, f, w, f).transpose(0, 1, 3, 2, 4).reshape(c, nb, w, f * f)
    del pad
    ok = np.isfinite(blocks)
    n_ok = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_ok > 0, np.where(ok, blocks, 0).sum(axis=-1) / np.maximum(n_ok, 1), np.nan)
        peak = np.where(n_ok > 0, np.where(ok, blocks, -np.inf).max(axis=-1), np.nan)
    # tiles at the right/bottom edge cover only the cells inside the map
    cells_in = np.zeros((nb * f, w * f), np.float32)
    cells_in[: rows.shape[1], :w0] = 1
    n_in = cells_in.reshape(nb, f, w, f).sum(axis=(1, 3))
    return mean, peak, n_ok, n_in


def tile_heatmap_geojson(prob: np.ndarray, class_names: list[str] | tuple[str, ...], cell_px0: float, sample_id: str,
                         *, max_tiles: int = 20000) -> dict[str, Any]:
    """A FeatureCollection of tiles for QuPath measurement maps (see the module docstring).

    ``prob`` is the (C, H, W) level-0 mosaic (NaN = not scored); ``cell_px0`` is level-0 pixels
    per cell. The tiles are reduced in bands of tile rows (:func:`_tile_means`): besides ``prob``,
    one bool per cell and a band's copies are held, not padded copies of the whole map.
    """
    _, h0, w0 = prob.shape
    scored = _scored(prob)
    f = tile_factor(scored, max_tiles)
    row_scored = np.asarray(scored.any(axis=1))  # bands without a scored cell hold no tile: skipped
    tile_px = f * cell_px0
    # gathered band by band as Python values (per-tile numpy indexing and reductions made this the report's slow part)
    cols: dict[str, list[Any]] = {"ty": [], "tx": [], "mean": [], "peak": [], "has": [], "frac": []}
    rows = _tile_rows(h0, w0, f)
    for t0 in rows:
        t1 = min(-(-h0 // f), t0 + rows.step)
        if not row_scored[t0 * f: t1 * f].any():
            continue
        # only the runs of tile columns holding a scored cell (each tile reduces its own cells: the same figures)
        found = []
        for x0, x1 in group_runs(scored[t0 * f: t1 * f].any(axis=0), f):
            mean, peak, n_ok, n_in = _tile_means(prob[:, :, x0 * f: x1 * f], f, t0, t1)
            any_ok = n_ok.max(axis=0)
            tys, txs = np.nonzero(any_ok > 0)
            found.append((tys + t0, txs + x0, mean[:, tys, txs].T, peak[:, tys, txs].T, (n_ok[:, tys, txs] > 0).T,
                          any_ok[tys, txs] / n_in[tys, txs]))
        ty, tx, mean_, peak_, has_, frac_ = (np.concatenate(parts) for parts in zip(*found, strict=True))
        order = np.lexsort((tx, ty))  # row by row, as one pass over the band lists them
        cols["ty"] += ty[order].tolist()
        cols["tx"] += tx[order].tolist()
        cols["mean"] += mean_[order].tolist()
        cols["peak"] += peak_[order].tolist()
        cols["has"] += has_[order].tolist()
        cols["frac"] += frac_[order].tolist()
    del scored
    features = []
    for i, (ty, tx) in enumerate(zip(cols["ty"], cols["tx"], strict=True)):
        y, x = float(ty * tile_px), float(tx * tile_px)
        hh = float(min(f, h0 - ty * f) * cell_px0)
        ww = float(min(f, w0 - tx * f) * cell_px0)
        ring = [[x, y], [x + ww, y], [x + ww, y + hh], [x, y + hh], [x, y]]
        mean_i, peak_i, has_i = cols["mean"][i], cols["peak"][i], cols["has"][i]
        m: dict[str, float] = {"probability": round(mean_i[0], 5)}
        for ci, name in enumerate(class_names):
            if has_i[ci]:
                m[f"probability: {name}"] = round(mean_i[ci], 5)
                m[f"max probability: {name}"] = round(peak_i[ci], 5)
        m["scored fraction"] = round(cols["frac"][i], 4)
        features.append({
            "type": "Feature",
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"slidescore:{sample_id}:tile:{f}:{ty}:{tx}")),
            "geometry": {"type": "Polygon", "coordinates": [ring]},
            "properties": {"objectType": "tile", "isLocked": True, "measurements": m},
        })
    return {"type": "FeatureCollection", "features": features,
            "properties": {"sample_id": sample_id, "cells_per_tile": f, "tile_px0": tile_px, "max_tiles": max_tiles,
                           "coordinates": "level-0 pixels (x, y), as regions.geojson"}}
