"""Single-machine orchestration: plan a sample, score its blocks, finish its outputs.

The three steps are separate so a distributed runner can reuse them: :func:`plan_sample` (open the
image, choose the level, compute the foreground mask, plan blocks, create the mosaic) returns a
picklable :class:`SamplePlan`; :func:`run_block` scores one block and writes its own chunks;
:func:`finish_sample` builds the pyramid, the regions and the files, then the completion marker.
:func:`score_samples` runs them in one process. Readers and models are passed in, not created here
behind the caller's back, except through the two factories ``open_image`` and ``load_model``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from slidescore import __version__
from slidescore.blend import blend_cells, patch_weights
from slidescore.config import JobConfig
from slidescore.errors import (
    ConfigError,
    InputError,
    ResolutionError,
    SlideScoreError,
    UnsupportedImageError,
)
from slidescore.io import SlideReader, open_image, read_padded
from slidescore.io import mosaic as mz
from slidescore.io.outputs import append_jsonl, read_json, write_csv, write_json, write_text
from slidescore.io.overview import render_overview
from slidescore.io.storage import fingerprint
from slidescore.mask import cell_fractions, detect_foreground, patch_fractions, reduce_mean
from slidescore.model.card import ModelCard
from slidescore.regions import Region, find_regions, regions_geojson
from slidescore.tiling import PatchGrid, choose_level, level_count, plan_blocks
from slidescore.types import Block, Box

log = logging.getLogger(__name__)

MOSAIC = "probabilities.ome.zarr"
MASK = "mask.ome.zarr"
SUCCESS = "_SUCCESS"
REGION_COLUMNS = [
    "rank", "class_name", "peak_probability", "mean_probability", "area_um2", "n_cells",
    "bbox_y_px", "bbox_x_px", "bbox_h_px", "bbox_w_px", "centroid_y_px", "centroid_x_px",
    "centroid_y_um", "centroid_x_um", "threshold", "image",
]


@dataclass(frozen=True)
class SamplePlan:
    """Everything a worker needs to score a block of one sample (picklable, no open handles)."""

    sample_id: str
    uri: str
    out_dir: str
    run_key: str
    level: int
    level_shape: tuple[int, int]
    level_downsample: float
    mpp0: float
    mpp_source: str
    grid: PatchGrid
    blocks: tuple[Block, ...]
    valid: np.ndarray
    mosaic: mz.MosaicSpec
    input_fingerprint: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def level_mpp(self) -> float:
        return self.mpp0 * self.level_downsample

    @property
    def mosaic_path(self) -> Path:
        return Path(self.out_dir) / MOSAIC

    @property
    def blocks_dir(self) -> Path:
        return Path(self.out_dir) / ".blocks" / self.run_key


@dataclass(frozen=True)
class BlockRecord:
    """What a worker reports for one block (small; never pixels)."""

    key: str
    patches_scored: int  # foreground patches whose origin cell this block owns (each patch counted once)
    patches_skipped: int  # background patches whose origin cell this block owns
    seconds_read: float
    seconds_score: float
    seconds_write: float
    resumed: bool = False
    patch_evaluations: int = 0  # patches sent through the model, halo included (per-patch equivalent)


@dataclass
class SampleResult:
    sample_id: str
    uri: str
    status: str
    out_dir: str
    regions: list[Region] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    error_type: str = ""


# -- identity ---------------------------------------------------------------------------------
def sample_id_for(uri: str) -> str:
    """A filesystem-safe sample id from an image URI (file name without image extensions)."""
    name = uri.rstrip("/").split("/")[-1]
    name = re.sub(r"(\.ome)?\.(tiff?|svs|ndpi|zarr|btf|tf8)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "sample"




def run_key_for(fp: dict[str, Any], model_checksum: str, card: ModelCard, cfg: JobConfig) -> str:
    """Deterministic key of everything that determines a sample's outputs."""
    d = cfg.to_dict()
    d["output"].pop("uri")
    d["output"].pop("overwrite")
    d["model"].pop("device")
    d["model"].pop("batch_size")
    # which samples are in the job and how the cluster runs it never change a sample's outputs
    d.pop("samples", None)
    d.pop("cluster", None)
    payload = {"input": fp, "model": model_checksum, "card": card.to_dict(), "config": d, "version": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# -- planning ---------------------------------------------------------------------------------
def resolve_mpp(reader: SlideReader, cfg: JobConfig, sample_id: str) -> tuple[float, str]:
    if cfg.input.mpp is not None:
        return cfg.input.mpp, "config:input.mpp"
    if reader.mpp is None:
        raise ResolutionError(
            f"sample {sample_id!r} ({reader.uri}): the image has no resolution metadata (µm/px); "
            f"set input.mpp in the config (or --mpp) to the scanner's level-0 µm/px ({reader.mpp_source})",
            uri=reader.uri,
        )
    if not 0.01 <= reader.mpp <= 1e8:  # 10 nm/px … 100 m/px: microscopy to satellite
        raise ResolutionError(
            f"sample {sample_id!r} ({reader.uri}): implausible resolution metadata {reader.mpp} µm/px "
            f"(from {reader.mpp_source}); set input.mpp in the config to the true level-0 µm/px",
            uri=reader.uri,
        )
    return reader.mpp, reader.mpp_source


def compute_cell_foreground(reader: SlideReader, cfg: JobConfig, mpp0: float, grid: PatchGrid, level_downsample: float) -> np.ndarray:
    """Foreground fraction of every output cell, from a low-resolution level, read in strips."""
    mcfg = cfg.mask
    if mcfg.method == "none":
        return np.ones(grid.cells_shape, np.float32)
    mpps = [mpp0 * lv.downsample for lv in reader.levels]
    candidates = [i for i, m in enumerate(mpps) if m <= mcfg.mask_mpp * 1.01]
    lvl = max(candidates, key=lambda i: mpps[i]) if candidates else int(np.argmin(mpps))
    info = reader.levels[lvl]
    factor = max(1, int(mcfg.mask_mpp / mpps[lvl] + 1e-6))
    strip = factor * max(1, 2048 // factor)
    parts = []
    for y in range(0, info.height, strip):
        h = min(strip, info.height - y)
        rows = []
        for x in range(0, info.width, strip):
            w = min(strip, info.width - x)
            pix = reader.read(lvl, Box(y, x, h, w))
            fg = detect_foreground(
                pix, mcfg.method, min_saturation=mcfg.min_saturation,
                max_brightness=mcfg.max_brightness, nodata_value=mcfg.nodata_value,
            )
            rows.append(reduce_mean(fg, factor))
        parts.append(np.concatenate(rows, axis=1))
    frac = np.concatenate(parts, axis=0)
    src_px0 = info.downsample * factor
    cell_px0 = grid.stride_px * level_downsample
    return cell_fractions(frac, src_px0, grid.cells_shape, cell_px0)


def plan_sample(uri: str, cfg: JobConfig, card: ModelCard, model_checksum: str, out_root: str, sample_id: str | None = None,
                *, dry_run: bool = False) -> SamplePlan | None:
    """Open, choose the level, mask, plan; create or reuse the mosaic. ``None`` = already done.

    With ``dry_run`` nothing is created or changed under ``out_root`` (the plan is only computed).
    """
    t0 = time.perf_counter()
    sample_id = sample_id or sample_id_for(uri)
    reader = open_image(uri)
    fp = fingerprint(uri)
    try:
        run_key = run_key_for(fp, model_checksum, card, cfg)
        out_dir = Path(out_root) / sample_id
        if (out_dir / SUCCESS).exists():
            done = read_json(out_dir / SUCCESS)
            if done.get("run_key") == run_key and not cfg.output.overwrite:
                return None
            if not cfg.output.overwrite:
                raise InputError(
                    f"sample {sample_id!r}: {out_dir} holds finished results of a different run "
                    f"(run key {done.get('run_key')} ≠ {run_key}); pass --overwrite or choose another --output",
                    uri=uri,
                )
        if reader.dtype != np.uint8:
            raise UnsupportedImageError(
                f"sample {sample_id!r} ({uri}): pixel type {reader.dtype} is not supported yet; expected 8-bit RGB "
                "(convert the image to uint8, e.g. with a window/level export)",
                uri=uri,
            )
        if reader.n_channels not in (1, 3, 4) or (reader.n_channels == 1 and card.n_channels == 3):
            raise UnsupportedImageError(
                f"sample {sample_id!r} ({uri}): {reader.n_channels} channel(s); model {card.name!r} expects "
                f"{card.color_space} — export an RGB image",
                uri=uri,
            )
        mpp0, mpp_source = resolve_mpp(reader, cfg, sample_id)
        level_mpps = [mpp0 * lv.downsample for lv in reader.levels]
        level, scale = choose_level(level_mpps, card.mpp, cfg.input.mpp_tolerance)
        if scale != 1.0:
            raise ResolutionError(
                f"sample {sample_id!r} ({uri}): no pyramid level within {cfg.input.mpp_tolerance:.0%} of the model's "
                f"{card.mpp} µm/px (levels: {', '.join(f'{m:.3g}' for m in level_mpps)} µm/px); resampling is not "
                "supported yet — export a level at the model resolution, raise input.mpp_tolerance, or fix input.mpp",
                uri=uri,
            )
        info = reader.levels[level]
        try:
            grid = PatchGrid(info.height, info.width, card.patch_px, cfg.tiling.stride_px)
        except ValueError as e:
            raise UnsupportedImageError(
                f"sample {sample_id!r} ({uri}): {e} at level {level} ({level_mpps[level]:.3g} µm/px); "
                "a sample must be at least one model patch in size",
                uri=uri,
            ) from None
        t_open = time.perf_counter()
        cell_fg = compute_cell_foreground(reader, cfg, mpp0, grid, info.downsample)
        pf = patch_fractions(cell_fg, grid.k, grid.patches_shape)
        valid = pf >= max(cfg.mask.min_foreground_frac, 1e-6) if cfg.mask.method != "none" else np.ones_like(pf, bool)
        t_mask = time.perf_counter()
    finally:
        reader.close()

    cells = grid.cells_shape
    spec = mz.MosaicSpec(
        shape=(card.n_classes, *cells),
        chunk=cfg.tiling.chunk_cells,
        n_levels=level_count(cells, cfg.tiling.chunk_cells),
        dtype=cfg.output.dtype,
        cell_um=grid.stride_px * info.downsample * mpp0,
        source_mpp=mpp0,
        channel_names=card.classes,
        colors=tuple(card.class_colors()),
        thresholds=thresholds_for(card, cfg),
    )
    blocks = tuple(plan_blocks(grid, cfg.tiling.chunk_cells, cfg.tiling.block_chunks))
    plan = SamplePlan(
        sample_id=sample_id, uri=uri, out_dir=str(out_dir), run_key=run_key, level=level,
        level_shape=(info.height, info.width), level_downsample=info.downsample, mpp0=mpp0,
        mpp_source=mpp_source, grid=grid, blocks=blocks, valid=valid, mosaic=spec, input_fingerprint=fp,
        timings={"open_s": t_open - t0, "mask_s": t_mask - t_open},
    )
    if not dry_run:
        _prepare_outputs(plan, cfg, cell_fg)
    return plan


def check_config_for_model(cfg: JobConfig, card: ModelCard) -> None:
    """Usage errors that need the model card (before any sample is touched)."""
    s = cfg.tiling.stride_px
    if card.patch_px % s:
        divisors = [d for d in range(1, card.patch_px + 1) if card.patch_px % d == 0]
        raise ConfigError(
            f"tiling.stride_px: expected a positive int that divides patch_px={card.patch_px} of model "
            f"{card.name!r}, got {s}; use one of {divisors}"
        )
    if cfg.model.mode == "dense" and (not card.dense or s % card.network_stride_px):
        raise ConfigError(
            f"model.mode: dense needs a dense-capable model whose network stride ({card.network_stride_px}) "
            f"divides tiling.stride_px={s}; model {card.name!r} is {'dense' if card.dense else 'not dense'} — use auto"
        )
    thresholds_for(card, cfg)


def thresholds_for(card: ModelCard, cfg: JobConfig) -> tuple[float, ...]:
    if cfg.regions.thresholds is None:
        return tuple(card.thresholds)
    if len(cfg.regions.thresholds) != card.n_classes:
        raise ConfigError(
            f"regions.thresholds: {len(cfg.regions.thresholds)} values given, model {card.name!r} has "
            f"{card.n_classes} classes {list(card.classes)}; give one threshold per class"
        )
    return tuple(cfg.regions.thresholds)


def _prepare_outputs(plan: SamplePlan, cfg: JobConfig, cell_fg: np.ndarray) -> None:
    """Create the mosaic unless a partial one of the same run exists (then resume into it)."""
    out = Path(plan.out_dir)
    key_file = out / ".run_key"
    same_run = key_file.exists() and key_file.read_text().strip() == plan.run_key and plan.mosaic_path.exists()
    if same_run and not cfg.output.overwrite:
        return
    for stale in (out / SUCCESS, out / ".blocks"):
        if stale.is_dir():
            shutil.rmtree(stale)
        elif stale.exists():
            stale.unlink()
    attrs = {"run_key": plan.run_key, "sample_id": plan.sample_id, "source": plan.uri, "version": __version__,
             "config": cfg.to_dict()}
    mz.create_mosaic(plan.mosaic_path, plan.mosaic, attrs)
    mz.write_fraction_image(out / MASK, cell_fg, plan.mosaic)
    write_text(key_file, plan.run_key + "\n")


# -- blocks -----------------------------------------------------------------------------------
def prepare_pixels(pixels: np.ndarray, card: ModelCard) -> np.ndarray:
    """Image channels → model channels (RGBA drops alpha; RGB → gray by luminance for gray models)."""
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if card.color_space == "GRAY" and pixels.shape[-1] == 3:
        gray = pixels.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        pixels = np.rint(gray)[..., None].astype(np.uint8)
    return pixels


def run_block(plan: SamplePlan, block: Block, reader: SlideReader, model: Any, cfg: JobConfig) -> BlockRecord:
    """Score one block and write its own chunks; record completion after the chunks are written."""
    marker = plan.blocks_dir / f"{block.key}.json"
    if marker.exists():
        return BlockRecord(**{**read_json(marker), "resumed": True})
    p, c = block.patches, block.cells
    valid = plan.valid[p.y : p.y1, p.x : p.x1]
    n_valid = int(valid.sum())
    t0 = time.perf_counter()
    t1 = t2 = t0
    if n_valid:
        card = model.card
        pixels = prepare_pixels(read_padded(reader, plan.level, block.read, card.pad_value), card)
        t1 = time.perf_counter()
        scores = model.score_block(pixels, valid, plan.grid.stride_px, mode=cfg.model.mode, batch_size=cfg.model.batch_size)
        kernel = patch_weights(plan.grid.k, cfg.blending.weights, cfg.blending.sigma_frac)
        prob = blend_cells(scores, valid, kernel, (p.y, p.x), (c.y, c.x, c.h, c.w))
        t2 = time.perf_counter()
        mz.write_block(plan.mosaic_path, plan.mosaic, block.cells, prob)
    t3 = time.perf_counter()
    # Patch (a, b) is owned by the block whose cells contain its origin cell (a, b): counts add up.
    owned = valid[max(c.y, p.y) - p.y : min(c.y1, p.y1) - p.y, max(c.x, p.x) - p.x : min(c.x1, p.x1) - p.x]
    n_owned = int(owned.sum())
    rec = BlockRecord(block.key, n_owned, int(owned.size - n_owned), t1 - t0, t2 - t1, t3 - t2, patch_evaluations=n_valid)
    write_json(marker, asdict(rec))
    return rec


# -- finishing --------------------------------------------------------------------------------
def finish_sample(plan: SamplePlan, records: list[BlockRecord], cfg: JobConfig, model_info: dict[str, Any], card: ModelCard, t_start: float) -> SampleResult:
    """Pyramid, regions, files, run.json; the completion marker last."""
    out = Path(plan.out_dir)
    t0 = time.perf_counter()
    mz.build_pyramid(plan.mosaic_path, plan.mosaic)
    t1 = time.perf_counter()
    prob = mz.read_level(plan.mosaic_path, 0)
    cell_px0 = plan.grid.stride_px * plan.level_downsample
    regions = find_regions(
        prob, card.classes, plan.mosaic.thresholds, cell_px0=cell_px0, mpp0=plan.mpp0,
        min_area_um2=cfg.regions.min_area_um2, connectivity=cfg.regions.connectivity, image=plan.uri,
    )
    n_regions = len(regions)
    regions = regions[: cfg.regions.top_k]
    write_json(out / "regions.json", {"sample_id": plan.sample_id, "n_regions_total": n_regions,
                                      "coordinates": "level-0 pixels (y, x, h, w) and µm",
                                      "regions": [r.to_dict() for r in regions]})
    write_csv(out / "regions.csv", [_region_row(r) for r in regions], REGION_COLUMNS)
    colors = dict(zip(card.classes, card.class_colors(), strict=True))
    write_json(out / "regions.geojson", regions_geojson(regions, colors, plan.sample_id))
    reader = open_image(plan.uri)
    try:
        render_overview(reader, prob[0], cell_px0, regions, out / "overview.png")
    finally:
        reader.close()
    t2 = time.perf_counter()
    scored = sum(r.patches_scored for r in records)
    skipped = sum(r.patches_skipped for r in records)
    score_s = sum(r.seconds_score for r in records)
    scored_cells = int(np.isfinite(prob[0]).sum())
    run = {
        "sample_id": plan.sample_id,
        "run_key": plan.run_key,
        "slidescore_version": __version__,
        "code_version": code_version(),
        "input": {**plan.input_fingerprint, "uri": plan.uri, "mpp0": plan.mpp0, "mpp_source": plan.mpp_source,
                  "level": plan.level, "level_mpp": plan.level_mpp, "level_shape": list(plan.level_shape)},
        "model": model_info,
        "config": cfg.to_dict(),
        "grid": {"patch_px": plan.grid.patch_px, "stride_px": plan.grid.stride_px, "cells_shape": list(plan.grid.cells_shape),
                 "patches_shape": list(plan.grid.patches_shape), "border_policy": "patches from origin 0; the last may extend past the bottom/right edge, filled with the card's pad_value"},
        "patches": {"total": plan.grid.n_patches, "scored": scored, "skipped_background": skipped,
                    "evaluated_with_halo": sum(r.patch_evaluations for r in records)},
        "blocks": {"total": len(plan.blocks), "resumed": sum(r.resumed for r in records),
                   "without_foreground": sum(1 for r in records if r.patches_scored == 0)},
        "area": {"scored_cells": scored_cells, "cell_um": plan.mosaic.cell_um,
                 "discarded_fraction": 1 - scored_cells / max(1, prob[0].size)},
        "thresholds": dict(zip(card.classes, plan.mosaic.thresholds, strict=True)),
        "regions": {"total": n_regions, "written": len(regions)},
        "timings_s": {**plan.timings, "read_s": sum(r.seconds_read for r in records), "score_s": score_s,
                      "write_s": sum(r.seconds_write for r in records), "pyramid_s": t1 - t0, "regions_s": t2 - t1,
                      "total_s": time.perf_counter() - t_start},
        "throughput": {"patches_per_s": scored / score_s if score_s else None,
                       "megapixels_per_s": plan.level_shape[0] * plan.level_shape[1] / 1e6 / max(1e-9, time.perf_counter() - t_start)},
        "outputs": {"mosaic": MOSAIC, "mask": MASK, "labels": f"{MOSAIC}/labels/suspect",
                    "regions": ["regions.json", "regions.csv", "regions.geojson"], "overview": "overview.png"},
    }
    write_json(out / "run.json", run)
    write_json(out / SUCCESS, {"run_key": plan.run_key, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return SampleResult(plan.sample_id, plan.uri, "ok", str(out), regions, run)


def _region_row(r: Region) -> dict[str, Any]:
    d = r.to_dict()
    d.update(bbox_y_px=r.bbox_px[0], bbox_x_px=r.bbox_px[1], bbox_h_px=r.bbox_px[2], bbox_w_px=r.bbox_px[3],
             centroid_y_px=r.centroid_px[0], centroid_x_px=r.centroid_px[1],
             centroid_y_um=r.centroid_um[0], centroid_x_um=r.centroid_um[1])
    return d


def code_version() -> str:
    """The git commit of the running code when available, else the package version."""
    head = Path(__file__).resolve().parent.parent / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_file = head.parent / ref[5:]
            return ref_file.read_text().strip() if ref_file.exists() else __version__
        return ref
    except OSError:
        return __version__


def model_info(model: Any) -> dict[str, Any]:
    return {"source": model.source, "sha256": model.checksum, "card": model.card.to_dict(), "device": str(model.device)}


# -- single-process run -------------------------------------------------------------------------
def score_sample(uri: str, model: Any, cfg: JobConfig, out_root: str, *, sample_id: str | None = None,
                 progress: Callable[[int, int], Any] | None = None) -> SampleResult:
    """Plan, score every block, finish. Raises on a bad sample (callers record it)."""
    t_start = time.perf_counter()
    sid = sample_id or sample_id_for(uri)
    plan = plan_sample(uri, cfg, model.card, model.checksum, out_root, sid)
    if plan is None:
        out = Path(out_root) / sid
        return SampleResult(sid, uri, "skipped", str(out), [], read_json(out / "run.json"))
    reader = open_image(uri)
    try:
        records = []
        bar = progress(len(plan.blocks), plan.grid.n_patches) if progress else None
        for block in plan.blocks:
            rec = run_block(plan, block, reader, model, cfg)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(patches=rec.patches_scored, refresh=False)
        if bar is not None:
            bar.close()
    finally:
        reader.close()
    return finish_sample(plan, records, cfg, model_info(model), model.card, t_start)


def score_samples(uris: list[str], cfg: JobConfig, out_root: str, *, model: Any = None,
                  progress: Callable[[int, int], Any] | None = None) -> list[SampleResult]:
    """Score many samples in this process; a failing sample is recorded and the others go on."""
    if model is None:
        from slidescore.model import load_model

        model = load_model(cfg.model.name, device=cfg.model.device)
    check_config_for_model(cfg, model.card)
    Path(out_root).mkdir(parents=True, exist_ok=True)
    ids = unique_ids(uris)
    results = []
    for uri, sid in zip(uris, ids, strict=True):
        try:
            results.append(score_sample(uri, model, cfg, out_root, sample_id=sid, progress=progress))
        except ConfigError:
            raise
        except (SlideScoreError, OSError) as e:
            log.info("sample %s failed: %s", sid, e)  # the CLI prints one FAILED line per sample
            results.append(SampleResult(sid, uri, "failed", str(Path(out_root) / sid), error=str(e), error_type=type(e).__name__))
            append_jsonl(Path(out_root) / "failures.jsonl", {"sample_id": sid, "uri": uri, "error_type": type(e).__name__,
                                                              "error": str(e), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    write_json(Path(out_root) / "run.json", {
        "slidescore_version": __version__, "code_version": code_version(), "config": cfg.to_dict(),
        "model": model_info(model),
        "samples": [{"sample_id": r.sample_id, "uri": r.uri, "status": r.status, "error": r.error,
                     "n_regions": r.run.get("regions", {}).get("total") if r.run else None} for r in results],
    })
    return results


def unique_ids(uris: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for u in uris:
        sid = sample_id_for(u)
        n = seen.get(sid, 0)
        seen[sid] = n + 1
        out.append(sid if n == 0 else f"{sid}-{n + 1}")
    return out


