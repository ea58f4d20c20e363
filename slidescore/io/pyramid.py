"""The mosaic's pyramid: levels 1… as 2 × 2 reductions of the level below (probabilities: NaN-aware mean;
labels: max), written after every block of level 0 is in (docs/architecture.md, "Where an output value comes from", step 11).

A mostly-background level 0 is reduced chunk by chunk above its scored chunks only, so a giant sparse
slide's pyramid costs its tissue, not its canvas; the values are those of the whole-level reduction.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync as zarr_sync

from slidescore.io.mosaic import MosaicSpec, _arr, _open, _storage_guard, decode, encode


def build_pyramid(path: str | Path, spec: MosaicSpec, prob0: np.ndarray | None = None) -> np.ndarray:
    """Fill levels 1… from level 0 (probabilities and labels); return level 0 as probabilities.

    Level 0 is read once (or given as ``prob0``, as :func:`read_level` returns it) and each level is
    computed from the stored values of the level below (decoded: a cell not scored is NaN to
    :func:`nanmean_2x2` whatever the mosaic stores for it); then every level array is written with one
    call each, the calls side by side (zarr splits each into whole chunks, written concurrently; a
    chunk holding only "not scored" is not written, ``write_empty_chunks`` off).
    """
    root = _storage_guard(path, "opening the mosaic", lambda: _open(path, "r+"))
    enc = spec.encoding
    if prob0 is None:
        prob0 = decode(_storage_guard(path, "reading mosaic level 0", lambda: np.asarray(_arr(root, "0")[...])), enc)
    hot = _scored_chunks(prob0, spec.chunk)
    if 2 * int(hot.sum()) < hot.size:  # mostly background: only the chunks above scored ones
        _build_sparse_pyramid(path, root, spec, prob0, hot)
        return prob0
    cur = prob0
    labels = _storage_guard(path, "reading the level-0 labels", lambda: np.asarray(_arr(root, "labels/suspect/0")[...]))
    levels: list[tuple[str, np.ndarray]] = []
    for lvl in range(1, spec.n_levels):
        stored = encode(_nanmean_2x2_banded(cur, spec.chunk), enc)  # cur is decoded: not scored = NaN, whatever is stored
        labels = max_2x2(labels)
        levels += [(str(lvl), stored), (f"labels/suspect/{lvl}", labels)]
        cur = decode(stored, enc)  # the next level averages what is stored, as a reader would

    def write(item: tuple[str, np.ndarray]) -> None:
        name, data = item

        def put() -> None:
            _arr(root, name)[...] = data

        _storage_guard(path, f"writing mosaic array {name}", put)

    if levels:
        with ThreadPoolExecutor(max_workers=min(len(levels), 8), thread_name_prefix="slidescore-pyramid") as pool:
            list(pool.map(write, levels))  # the first error, if any, raised here
    return prob0


def _scored_chunks(prob: np.ndarray, chunk: int) -> np.ndarray:
    """(chunk rows, chunk columns): whether a chunk of a decoded level holds any scored cell."""
    scored = ~np.isnan(prob).all(axis=0)
    h, w = scored.shape
    pad = np.zeros((-(-h // chunk) * chunk, -(-w // chunk) * chunk), bool)
    pad[:h, :w] = scored
    return np.asarray(pad.reshape(pad.shape[0] // chunk, chunk, pad.shape[1] // chunk, chunk).any(axis=(1, 3)))


def _build_sparse_pyramid(path: str | Path, root: zarr.Group, spec: MosaicSpec, prob0: np.ndarray, hot: np.ndarray) -> None:
    """:func:`build_pyramid` chunk by chunk, for the chunks above scored level-0 chunks only.

    Every level-L cell is the 2 × 2 reduction of four level-(L − 1) cells, so a chunk of level L is
    computed from the (at most) four chunks below it, the same function on the same values as the
    whole level gives (the equality is tested); a chunk without a scored chunk below it is all "not
    scored", which the whole-level write does not store either. A giant sparse slide's pyramid then
    costs its scored chunks, not its canvas. Labels are read for the scored chunks only (a chunk
    without a scored cell has label 0 everywhere).
    """
    c, enc = spec.chunk, spec.encoding
    h, w = prob0.shape[1:]
    a_labels0 = _arr(root, "labels/suspect/0")
    where = {(int(cy), int(cx)): (slice(cy * c, min(h, (cy + 1) * c)), slice(cx * c, min(w, (cx + 1) * c)))
             for cy, cx in zip(*np.nonzero(hot), strict=True)}

    async def get_all() -> list[Any]:  # every label chunk read at once in zarr's event loop
        return list(await asyncio.gather(*(a_labels0.async_array.getitem(sel) for sel in where.values())))

    labels0 = _storage_guard(path, "reading the level-0 labels", lambda: zarr_sync(get_all()))
    cur: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {
        key: (prob0[:, ys, xs], np.asarray(lab)) for (key, (ys, xs)), lab in zip(where.items(), labels0, strict=True)}
    writes: list[tuple[str, tuple[slice, ...], np.ndarray]] = []
    for lvl in range(1, spec.n_levels):
        nxt: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        h1, w1 = -(-h // 2), -(-w // 2)
        for py, px in sorted({(cy // 2, cx // 2) for cy, cx in cur}):
            rh, rw = min(2 * c, h - 2 * py * c), min(2 * c, w - 2 * px * c)  # the level-(L − 1) cells below
            region = np.full((prob0.shape[0], rh, rw), np.nan, np.float32)
            lab = np.zeros((rh, rw), np.uint8)
            for dy in (0, 1):
                for dx in (0, 1):
                    below = cur.get((2 * py + dy, 2 * px + dx))
                    if below is not None:
                        bp, bl = below
                        region[:, dy * c : dy * c + bp.shape[1], dx * c : dx * c + bp.shape[2]] = bp
                        lab[dy * c : dy * c + bl.shape[0], dx * c : dx * c + bl.shape[1]] = bl
            stored = encode(nanmean_2x2(region), enc)
            labels = max_2x2(lab)
            y0, x0 = py * c, px * c
            ys, xs = slice(y0, y0 + stored.shape[1]), slice(x0, x0 + stored.shape[2])
            writes += [(str(lvl), (slice(None), ys, xs), stored), (f"labels/suspect/{lvl}", (ys, xs), labels)]
            nxt[(py, px)] = (decode(stored, enc), labels)  # the next level averages what is stored
        cur, h, w = nxt, h1, w1
    arrays = {name: _arr(root, name) for name in {name for name, _, _ in writes}}

    async def put_all() -> None:  # every chunk write at once in zarr's event loop (one thread hop, not one per chunk)
        await asyncio.gather(*(arrays[name].async_array.setitem(where, data) for name, where, data in writes))

    if writes:  # whole-chunk writes are idempotent: a retried batch leaves the same bytes
        _storage_guard(path, "writing the mosaic's pyramid chunks", lambda: zarr_sync(put_all()))


def nanmean_2x2(a: np.ndarray) -> np.ndarray:
    """2×2 mean over the last two axes ignoring NaN (all-NaN → NaN); odd edges average what exists."""
    *lead, h, w = a.shape
    hh, ww = h + h % 2, w + w % 2
    pad = np.full((*lead, hh, ww), np.nan, np.float32)
    pad[..., :h, :w] = a
    blocks = pad.reshape(*lead, hh // 2, 2, ww // 2, 2)
    ok = ~np.isnan(blocks)
    n = ok.sum(axis=(-3, -1))
    s = np.where(ok, blocks, 0).sum(axis=(-3, -1))
    out = np.full(n.shape, np.nan, np.float32)
    np.divide(s, n, out=out, where=n > 0)
    return out


def _nanmean_2x2_banded(a: np.ndarray, rows: int) -> np.ndarray:
    """:func:`nanmean_2x2` band by band (``rows`` output rows at a time): the same values, with the
    temporaries of one band instead of several copies of the whole level."""
    *lead, h, w = a.shape
    out = np.empty((*lead, -(-h // 2), -(-w // 2)), np.float32)
    for y in range(0, out.shape[-2], rows):
        out[..., y : y + rows, :] = nanmean_2x2(a[..., 2 * y : 2 * (y + rows), :])
    return out


def max_2x2(a: np.ndarray) -> np.ndarray:
    h, w = a.shape
    pad = np.zeros((h + h % 2, w + w % 2), a.dtype)
    pad[:h, :w] = a
    return pad.reshape(pad.shape[0] // 2, 2, pad.shape[1] // 2, 2).max(axis=(1, 3))
