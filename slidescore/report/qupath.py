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


def tile_factor(scored: np.ndarray, max_tiles: int) -> int:
    """Smallest cells-per-tile factor whose grid has at most ``max_tiles`` tiles with scored cells."""
    n = int(scored.sum())
    f = max(1, math.ceil(math.sqrt(n / max(1, max_tiles))))
    while True:
        h, w = -(-scored.shape[0] // f), -(-scored.shape[1] // f)
        pad = np.zeros((h * f, w * f), bool)
        pad[: scored.shape[0], : scored.shape[1]] = scored
        if int(pad.reshape(h, f, w, f).any(axis=(1, 3)).sum()) <= max_tiles:
            return f
        f += 1


def tile_heatmap_geojson(prob: np.ndarray, class_names: list[str] | tuple[str, ...], cell_px0: float, sample_id: str,
                         *, max_tiles: int = 20000) -> dict[str, Any]:
    """A FeatureCollection of tiles for QuPath measurement maps (see the module docstring).

    ``prob`` is the (C, H, W) level-0 mosaic (NaN = not scored); ``cell_px0`` is level-0 pixels
    per cell.
    """
    c, h0, w0 = prob.shape
    scored = np.isfinite(prob).any(axis=0)
    f = tile_factor(scored, max_tiles)
    h, w = -(-h0 // f), -(-w0 // f)
    pad = np.full((c, h * f, w * f), np.nan, np.float32)
    pad[:, :h0, :w0] = prob
    blocks = pad.reshape(c, h, f, w, f).transpose(0, 1, 3, 2, 4).reshape(c, h, w, f * f)
    ok = np.isfinite(blocks)
    n_ok = ok.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_ok > 0, np.where(ok, blocks, 0).sum(axis=-1) / np.maximum(n_ok, 1), np.nan)
        peak = np.where(n_ok > 0, np.where(ok, blocks, -np.inf).max(axis=-1), np.nan)
    # tiles at the right/bottom edge cover only the cells inside the map
    cells_in = np.zeros((h * f, w * f), np.float32)
    cells_in[:h0, :w0] = 1
    n_in = cells_in.reshape(h, f, w, f).sum(axis=(1, 3))
    tile_px = f * cell_px0
    any_ok = n_ok.max(axis=0)
    tys, txs = np.nonzero(any_ok > 0)
    # gathered once as Python values (per-tile numpy indexing and reductions made this the report's slow part)
    cols = {"mean": mean[:, tys, txs].T.tolist(), "peak": peak[:, tys, txs].T.tolist(),
            "has": (n_ok[:, tys, txs] > 0).T.tolist(), "frac": (any_ok[tys, txs] / n_in[tys, txs]).tolist()}
    features = []
    for i, (ty, tx) in enumerate(zip(tys.tolist(), txs.tolist(), strict=True)):
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
