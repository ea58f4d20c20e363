"""QuPath tiles of a sparse map are reduced over the runs of tile columns holding scored cells (#16): every
tile's measurements equal a tile-by-tile recomputation, in row-by-row order."""

from __future__ import annotations

import numpy as np
import pytest

from slidescore.report.qupath import tile_heatmap_geojson


def _brute_force(prob: np.ndarray, f: int) -> list[tuple[int, int, dict[str, float]]]:
    c, h, w = prob.shape
    out = []
    for ty in range(-(-h // f)):
        for tx in range(-(-w // f)):
            cells = prob[:, ty * f : (ty + 1) * f, tx * f : (tx + 1) * f].reshape(c, -1)
            ok = np.isfinite(cells)
            if not ok.any():
                continue
            m: dict[str, float] = {}
            means = [float(np.where(ok[i], cells[i], 0).sum() / max(ok[i].sum(), 1)) for i in range(c)]
            m["probability"] = round(means[0], 5) if ok[0].any() else float("nan")
            for i in range(c):
                if ok[i].any():
                    m[f"probability: c{i}"] = round(means[i], 5)
                    m[f"max probability: c{i}"] = round(float(cells[i][ok[i]].max()), 5)
            m["scored fraction"] = round(float(ok.any(axis=0).sum() / cells.shape[1]), 4)
            out.append((ty, tx, m))
    return out


@pytest.mark.parametrize(("shape", "max_tiles"), [((2, 301, 457), 20000), ((1, 77, 1000), 300), ((3, 640, 96), 50)])
def test_sparse_tiles_equal_a_tile_by_tile_recomputation(shape: tuple[int, int, int], max_tiles: int) -> None:
    rng = np.random.default_rng(sum(shape))
    prob = np.full(shape, np.nan, np.float32)
    for _ in range(5):  # islands in separate runs of tile columns
        y, x = rng.integers(0, shape[1] - 12), rng.integers(0, shape[2] - 12)
        prob[:, y : y + 12, x : x + 12] = rng.random((shape[0], 12, 12))
    prob[-1, -3:, -5:] = 0.25  # the partial corner tile, one class only
    gj = tile_heatmap_geojson(prob, [f"c{i}" for i in range(shape[0])], 32.0, "s", max_tiles=max_tiles)
    f = gj["properties"]["cells_per_tile"]
    want = _brute_force(prob, f)
    got = gj["features"]
    assert len(got) == len(want) > 5
    for feat, (ty, tx, m) in zip(got, want, strict=True):
        x0, y0 = feat["geometry"]["coordinates"][0][0]
        assert (y0, x0) == (ty * f * 32.0, tx * f * 32.0)
        meas = feat["properties"]["measurements"]
        if np.isnan(m["probability"]):  # class 0 not scored in this tile: the first class's NaN mean is kept
            assert np.isnan(meas.pop("probability"))
            m.pop("probability")
        assert meas == m
