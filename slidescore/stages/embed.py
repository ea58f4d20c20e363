"""The embedding stage: one encoder vector per foreground patch of the global grid, as Zarr and HDF5.

``slidescore embed`` plans a sample exactly as scoring does (:func:`~slidescore.stages.plan.plan_sample`:
level, global centred patch grid, foreground mask, valid patches, blocks), then each block embeds its
patches and writes them into ``embeddings.zarr``, a Zarr v2 array of shape (patches_h, patches_w, D)
indexed like the grid (patch (a, b) → vector; NaN = background, never embedded). Its attributes give
the level-0 origin of patch (0, 0), the level-0 step between patches, µm/px and the encoder checksum,
so patch (a, b) starts at level-0 ``(origin_y + a·step, origin_x + b·step)``.

Block ownership (docs/architecture.md, invariant 2): a block of cells ``[c0, c1)`` writes the patches
``[c0, c1)`` of each axis (the last block along an axis also the k − 1 patches past the last cell);
the array's chunks divide the block edge, so two blocks never share a chunk and every patch is written
by exactly one block. (:meth:`~slidescore.core.tiling.PatchGrid.owned_patches`, which counts patches
for the scoring records, is offset by k − 1 from the chunk edges and would make blocks share chunks.)
A block's marker goes under ``.blocks/<run key>/`` after its chunks; a rerun embeds only blocks
without one. Finishing reads the array band by band, checks that every valid patch holds a finite
vector (a lost chunk removes the markers of its blocks and fails the sample, so the next run redoes
exactly those), writes ``features.h5`` (``coords`` (N, 2) level-0 x, y of each patch's top-left,
``features`` (N, D), ``grid_index`` (N, 2) a, b; the coords + features layout CLAM / TRIDENT-style MIL
tools read), ``run.json`` and ``_SUCCESS`` last. The encoder object is passed in (this layer does not
import torch): anything with ``card``, ``checksum``, ``dim``, ``info()`` and ``embed_block``.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidescore.config import JobConfig
from slidescore.core.types import Block, Box
from slidescore.errors import ConfigError, ModelOutputError
from slidescore.io.outputs import (
    exists,
    join,
    list_children,
    local_path,
    read_json,
    remove,
    write_bytes,
    write_json,
    write_text,
)
from slidescore.io.storage import fingerprint, is_local, storage_options
from slidescore.stages import layout
from slidescore.stages.block import iter_block_pixels
from slidescore.stages.lease import acquire_lease, read_run_key_file, release_lease
from slidescore.stages.plan import GRID_VERSION, SamplePlan, open_for_plan, plan_sample
from slidescore.stages.recipe import BlockRecipe
from slidescore.version import __version__

EMBEDDINGS = "embeddings.zarr"
FEATURES = "features.h5"
CHUNK_BYTES = 4 << 20  # largest stored chunk (float32): a few MiB, one PUT each on object storage


@dataclass(frozen=True)
class EmbedPlan:
    """A scoring plan (grid, mask, blocks) plus where and how its embeddings are stored."""

    plan: SamplePlan
    dim: int
    chunk: int  # patches per chunk edge; divides the block edge in cells

    @property
    def array_path(self) -> str:
        return join(self.plan.out_dir, EMBEDDINGS)


def embed_run_key(fp: dict[str, Any], encoder: Any, cfg: JobConfig) -> str:
    """Hash of what fixes the embeddings: input, encoder (checksum, card), grid, mask and input settings."""
    d = cfg.to_dict()
    payload = {"stage": "embed", "input": fp, "encoder": encoder.checksum, "card": encoder.card.to_dict(),
               "tiling": d["tiling"], "mask": d["mask"], "input_cfg": d["input"], "version": __version__,
               "grid": GRID_VERSION}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_patches(block_edge: int, dim: int) -> int:
    """The largest chunk edge (in patches) that divides the block edge and keeps a chunk under CHUNK_BYTES."""
    c = block_edge
    while c > 1 and c * c * dim * 4 > CHUNK_BYTES:
        c = max(d for d in range(1, c) if block_edge % d == 0)
    return c


def written_patches(grid: Any, cells: Box) -> Box:
    """The patch range a block of ``cells`` writes: ``[c0, c1)``, to the grid's end for the last block per axis."""
    ny, nx = grid.cells_shape
    py, px = grid.patches_shape
    y1 = py if cells.y1 >= ny else cells.y1
    x1 = px if cells.x1 >= nx else cells.x1
    return Box(cells.y, cells.x, y1 - cells.y, x1 - cells.x)


def _zarr_store(path: str, read_only: bool = False) -> Any:
    import zarr

    if is_local(path):
        return local_path(path)
    return zarr.storage.FsspecStore.from_url(path, storage_options=storage_options(path), read_only=read_only)


def _open_array(path: str, mode: str = "r+") -> Any:
    import zarr

    return zarr.open_array(_zarr_store(path, read_only=mode == "r"), mode=mode, zarr_format=2)  # type: ignore[arg-type]


def plan_embed(uri: str, cfg: JobConfig, encoder: Any, out_root: str, sample_id: str) -> EmbedPlan | None:
    """Plan one image for embedding (``None``: this run's embeddings are complete); create or resume its array."""
    card = encoder.card
    if card.patch_px % cfg.tiling.stride_px:
        raise ConfigError(f"--stride: expected a divisor of the encoder's patch_px={card.patch_px}, got "
                          f"{cfg.tiling.stride_px}")
    fp = fingerprint(uri)
    key = embed_run_key(fp, encoder, cfg)
    plan = plan_sample(uri, cfg, card, encoder.checksum, out_root, sample_id, dry_run=True, run_key=key, fp=fp)
    if plan is None:
        return None
    edge = cfg.tiling.chunk_cells * cfg.tiling.block_chunks
    ep = EmbedPlan(plan, int(encoder.dim), chunk_patches(edge, int(encoder.dim)))
    acquire_lease(plan.out_dir, key, sample_id=sample_id, uri=uri)
    try:
        _create_or_resume(ep, cfg, encoder)
    except BaseException:
        release_lease(plan.out_dir, key)
        raise
    return ep


def grid_attrs(plan: SamplePlan) -> dict[str, Any]:
    """Where patch (a, b) lies: level-0 origin of patch (0, 0), level-0 step, sizes, µm/px."""
    g, ds = plan.grid, plan.level_downsample
    o = g.patch_box(0, 0)
    return {"level": plan.level, "level_downsample": ds, "patch_px": g.patch_px, "stride_px": g.stride_px,
            "patch_px_level0": g.patch_px * ds, "step_level0": g.stride_px * ds,
            "origin_level0_yx": [o.y * ds, o.x * ds], "patches_shape": list(g.patches_shape),
            "level_shape": list(plan.level_shape), "mpp": plan.level_mpp, "mpp_level0": plan.mpp0,
            "grid": GRID_VERSION}


def _create_or_resume(ep: EmbedPlan, cfg: JobConfig, encoder: Any) -> None:
    import numcodecs
    import zarr

    plan = ep.plan
    key_file = join(plan.out_dir, layout.RUN_KEY_FILE)
    if read_run_key_file(key_file) == plan.run_key and exists(join(ep.array_path, ".zarray")) \
            and not cfg.output.overwrite:
        remove(join(plan.out_dir, layout.SUCCESS))
        return
    for stale in (layout.SUCCESS, layout.BLOCKS, EMBEDDINGS, FEATURES, layout.RUN_JSON):
        remove(join(plan.out_dir, stale))
    py, px = plan.grid.patches_shape
    attrs: dict[str, Any] = {"slidescore": {"kind": "patch_embeddings", "axes": ["patch_y", "patch_x", "feature"],
                            "fill": "NaN: background patch, not embedded", "run_key": plan.run_key,
                            "sample_id": plan.sample_id, "source": plan.uri, "version": __version__,
                            "encoder": encoder.info(), **grid_attrs(plan)}}
    zarr.create_array(_zarr_store(ep.array_path), shape=(py, px, ep.dim), chunks=(ep.chunk, ep.chunk, ep.dim),
                      dtype="float32", fill_value=float("nan"), zarr_format=2, attributes=attrs,
                      compressors=numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE),
                      chunk_key_encoding={"name": "v2", "separator": "/"}, overwrite=True)
    write_text(key_file, plan.run_key + "\n")


def embed_block(ep: EmbedPlan, block: Block, encoder: Any, pixels: np.ndarray | None, batch_size: int,
                read: Callable[[], np.ndarray]) -> dict[str, Any]:
    """Embed the patches ``block`` writes, write its chunks, then its marker; its record.

    ``pixels`` are the block's prepared pixels read ahead, or ``None`` (then ``read()`` reads them)."""
    plan = ep.plan
    marker = plan.block_marker(block)
    t0 = time.perf_counter()
    p, w = block.patches, written_patches(plan.grid, block.cells)
    valid = np.zeros((p.h, p.w), bool)
    sl = (slice(w.y - p.y, w.y1 - p.y), slice(w.x - p.x, w.x1 - p.x))
    valid[sl] = plan.valid[w.y : w.y1, w.x : w.x1]
    n = int(valid.sum())
    if n:
        pixels = read() if pixels is None else pixels
        emb = encoder.embed_block(pixels, valid, plan.grid.stride_px, batch_size=batch_size)[sl]
        _open_array(ep.array_path)[w.y : w.y1, w.x : w.x1] = emb
    rec = {"key": block.key, "patches_embedded": n, "seconds": round(time.perf_counter() - t0, 4)}
    write_json(marker, rec)
    return rec


def embed_blocks(ep: EmbedPlan, encoder: Any, *, batch_size: int, depth: int = 1,
                 progress: Callable[[], Any] | None = None, blocks: list[Block] | None = None) -> list[dict[str, Any]]:
    """Every block of the plan (or of ``blocks``: a Ray task's share) not yet done (read ahead ``depth``
    blocks); the block records."""
    plan = ep.plan
    recipe = BlockRecipe.create(encoder, plan.grid.stride_px, batch_size=batch_size)
    done = set(list_children(plan.blocks_dir))
    reader = open_for_plan(plan)
    records = []
    try:
        for block, pixels, _ in iter_block_pixels(plan, plan.blocks if blocks is None else blocks, reader, recipe, depth):
            if f"{block.key}.json" in done:
                records.append({**read_json(plan.block_marker(block)), "resumed": True})
            elif plan.block_has_foreground(block):
                records.append(embed_block(ep, block, encoder, pixels, batch_size,
                                           functools.partial(recipe.read, reader, plan.level, block.read)))
            if progress is not None:
                progress()
    finally:
        reader.close()
    return records


def finish_embed(ep: EmbedPlan, encoder: Any, records: list[dict[str, Any]], t_start: float, *,
                 write_h5: bool = True) -> dict[str, Any]:
    """Check every valid patch holds a finite vector, write features.h5 and run.json, then ``_SUCCESS``."""
    plan = ep.plan
    arr = _open_array(ep.array_path, "r")
    coords, index, feats = [], [], []
    missing: list[tuple[int, int]] = []
    g, ds = plan.grid, plan.level_downsample
    for y0 in range(0, g.patches_shape[0], ep.chunk):
        band_valid = plan.valid[y0 : y0 + ep.chunk]
        if not band_valid.any():
            continue
        band = np.asarray(arr[y0 : y0 + ep.chunk])
        a, b = np.nonzero(band_valid)
        vec = band[a, b]
        bad = ~np.isfinite(vec).all(1)
        missing += list(zip((a[bad] + y0).tolist(), b[bad].tolist(), strict=True))
        index.append(np.stack([a + y0, b], 1))
        feats.append(vec)
        coords.append(np.stack([(b - g.margin) * g.stride_px * ds, (a + y0 - g.margin) * g.stride_px * ds], 1))
    if missing:
        _drop_markers(ep, missing)
        raise ModelOutputError(f"sample {plan.sample_id!r}: {len(missing)} foreground patches have no finite embedding "
                               f"in {ep.array_path} (first at patch {missing[0]}); the markers of their blocks were "
                               "removed — run again to embed exactly those blocks", sample_id=plan.sample_id)
    n = sum(len(f) for f in feats)
    if write_h5:
        write_features_h5(join(plan.out_dir, FEATURES), plan, encoder,
                          np.concatenate(coords) if n else np.empty((0, 2)), np.concatenate(index) if n else np.empty((0, 2)),
                          np.concatenate(feats) if n else np.empty((0, ep.dim), np.float32))
    run = {"command": "slidescore embed", "sample_id": plan.sample_id, "input": plan.uri,
           "input_fingerprint": plan.input_fingerprint, "run_key": plan.run_key, "version": __version__,
           "encoder": encoder.info(), "grid": grid_attrs(plan), "mpp_source": plan.mpp_source,
           "patches": {"embedded": n, "background": int(plan.valid.size - n), "dim": ep.dim},
           "blocks": {"total": len(plan.blocks), "embedded": sum(1 for r in records if not r.get("resumed")),
                      "resumed": sum(1 for r in records if r.get("resumed"))},
           "outputs": {"embeddings": EMBEDDINGS, **({"features": FEATURES} if write_h5 else {})},
           "seconds": round(time.perf_counter() - t_start, 3)}
    write_json(join(plan.out_dir, layout.RUN_JSON), run)
    write_json(join(plan.out_dir, layout.SUCCESS), {"run_key": plan.run_key, "finished": time.strftime(
        "%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    release_lease(plan.out_dir, plan.run_key)
    return run


def _drop_markers(ep: EmbedPlan, patches: list[tuple[int, int]]) -> None:
    plan = ep.plan
    for block in plan.blocks:
        w = written_patches(plan.grid, block.cells)
        if any(w.y <= a < w.y1 and w.x <= b < w.x1 for a, b in patches):
            remove(plan.block_marker(block))


def write_features_h5(path: str, plan: SamplePlan, encoder: Any, coords: np.ndarray, index: np.ndarray,
                      feats: np.ndarray) -> None:
    """``coords`` (N, 2) level-0 x, y of patch top-lefts (int), ``features`` (N, D), ``grid_index`` (N, 2) a, b."""
    import h5py

    g = grid_attrs(plan)
    attrs = {"patch_size": plan.grid.patch_px, "patch_size_level0": g["patch_px_level0"], "patch_level": plan.level,
             "downsample": plan.level_downsample, "mpp": plan.level_mpp, "mpp_level0": plan.mpp0,
             "stride_px": plan.grid.stride_px, "encoder": encoder.card.name, "encoder_checksum": encoder.checksum,
             "sample_id": plan.sample_id, "source": plan.uri}
    buf = io.BytesIO()
    with h5py.File(buf, "w") as f:
        d = f.create_dataset("coords", data=np.rint(coords).astype(np.int64))
        f.create_dataset("features", data=feats.astype(np.float32))
        f.create_dataset("grid_index", data=index.astype(np.int64))
        for k, v in attrs.items():
            d.attrs[k] = v
            f.attrs[k] = v
    write_bytes(path, buf.getvalue())

