"""Single-machine orchestration: plan a sample, score its blocks, finish its outputs.

The three steps are separate so a distributed runner can reuse them: :func:`plan_sample` (open the
image, choose the level, compute the foreground mask, plan blocks, create the mosaic) returns a
picklable :class:`SamplePlan`; :func:`run_block` scores one block and writes its own chunks;
:func:`finish_sample` builds the pyramid, the regions and the files, then the completion marker.
:func:`score_samples` runs them in one process. Readers and models are passed in, not created here
behind the caller's back, except through the two factories ``open_image`` and ``load_model``.

Outputs go to a local folder or any fsspec URL (``s3://bucket/prefix``) through ``io.outputs`` and
``io.mosaic``; locations are strings joined with :func:`~slidescore.io.outputs.join`, never ``Path``.

A sample is one image or several (fields of one smear, :class:`~slidescore.config.SampleSpec`).
:func:`plan_images` plans every image of a sample (one :class:`SamplePlan` each; blocks are per
image); :func:`finish_sample` ranks the regions of all images together. Layout: a one-image sample
keeps ``<out>/<sample>/probabilities.ome.zarr`` etc.; a sample of several images has one folder per
image, ``<out>/<sample>/images/<image_id>/`` (mosaic, mask, overview.png, regions.geojson of that
image for QuPath) and ONE ``regions.json/csv/geojson``, ``run.json`` and ``_SUCCESS`` at the sample
level, every region carrying its ``image`` (URI). The run key covers the fingerprints of all images.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from slidescore import __version__
from slidescore.blend import blend_cells, patch_weights
from slidescore.config import JobConfig, SampleSpec
from slidescore.decide import DecisionPolicy
from slidescore.errors import (
    ConfigError,
    InputError,
    ResolutionError,
    SlideScoreError,
    UnsupportedImageError,
)
from slidescore.io import SlideReader, open_image, read_padded
from slidescore.io import mosaic as mz
from slidescore.io.adapt import AdaptedReader, InputRecipe, open_adapted, plan_input
from slidescore.io.outputs import (
    append_jsonl,
    exists,
    join,
    list_children,
    make_dirs,
    read_json,
    read_text,
    remove,
    write_bytes,
    write_csv,
    write_json,
    write_text,
)
from slidescore.io.overview import render_overview
from slidescore.io.prefetch import prefetch
from slidescore.io.readers import expect_reads
from slidescore.io.storage import fingerprint, is_local
from slidescore.mask import cell_fractions, detect_foreground, patch_fractions, reduce_mean
from slidescore.model.card import ModelCard
from slidescore.regions import (
    Region,
    find_regions,
    georeference_regions,
    regions_geojson,
    regions_map_geojson,
)
from slidescore.tiling import PatchGrid, choose_level, level_count, plan_blocks
from slidescore.types import Block, Box

log = logging.getLogger(__name__)

MOSAIC = "probabilities.ome.zarr"
MASK = "mask.ome.zarr"
SUCCESS = "_SUCCESS"
OVERVIEW_THREADS = 4  # at most this many overview PNGs drawn at once (samples of several images)
IMAGES = "images"  # <sample>/images/<image_id>/ for samples of several images
REGION_COLUMNS = [
    "rank", "class_name", "peak_probability", "mean_probability", "area_um2", "n_cells",
    "bbox_y_px", "bbox_x_px", "bbox_h_px", "bbox_w_px", "centroid_y_px", "centroid_x_px",
    "centroid_y_um", "centroid_x_um", "threshold", "image",
    "centroid_map_x", "centroid_map_y",  # GeoTIFF inputs: the centroid in the image's map CRS (empty otherwise)
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
    input_recipe: InputRecipe | None = None  # dtype conversion, channels, resampled virtual level (io.adapt)
    georeference: dict[str, Any] | None = None  # GeoTIFF: epsg, affine (level-0 px → map), units
    image_id: str = ""  # set for the images of a sample of several images ("" for a one-image sample)
    sample_dir: str = ""  # where the sample's regions, run.json and _SUCCESS go ("" = out_dir)

    @property
    def level_mpp(self) -> float:
        return self.mpp0 * self.level_downsample

    @property
    def mosaic_path(self) -> str:
        """The image's mosaic: a local path or a URL (a string; never ``Path``, which breaks ``s3://``)."""
        return join(self.out_dir, MOSAIC)

    @property
    def blocks_dir(self) -> str:
        return join(self.out_dir, ".blocks", self.run_key)

    @property
    def sample_out(self) -> str:
        return self.sample_dir or self.out_dir


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
    images: list[str] = field(default_factory=list)  # the sample's image URIs (one for a one-image sample)


# -- identity ---------------------------------------------------------------------------------
def sample_id_for(uri: str) -> str:
    """A filesystem-safe sample id from an image URI (file name without image extensions)."""
    name = uri.rstrip("/").split("/")[-1]
    name = re.sub(r"(\.ome)?\.(tiff?|svs|ndpi|zarr|btf|tf8)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "sample"


def _unique_names(uris: Sequence[str], taken: set[str]) -> list[str]:
    """``sample_id_for`` of each URI, made unique with ``-2``, ``-3`` … (and distinct from ``taken``)."""
    seen: dict[str, int] = {}
    out = []
    for u in uris:
        base = sample_id_for(u)
        n = seen.get(base, 0)
        while True:
            name = base if n == 0 else f"{base}-{n + 1}"
            n += 1
            if name not in taken:
                break
        seen[base] = n
        taken.add(name)
        out.append(name)
    return out


def resolve_samples(entries: Sequence[str | SampleSpec]) -> list[SampleSpec]:
    """Every entry as a :class:`SampleSpec` with its id: plain URIs get ``sample_id_for`` ids, made unique."""
    explicit = [e.sample_id for e in entries if isinstance(e, SampleSpec) and e.sample_id]
    dups = sorted({s for s in explicit if explicit.count(s) > 1})
    if dups:
        raise ConfigError(f"samples: sample id {dups[0]!r} is given twice; sample ids must be unique")
    specs = [e if isinstance(e, SampleSpec) else SampleSpec(None, (e,)) for e in entries]
    for s in specs:
        if not s.uris:
            raise ConfigError(f"samples: sample {s.sample_id!r} lists no image; give at least one image URI")
    unnamed = [i for i, s in enumerate(specs) if not s.sample_id]
    names = _unique_names([specs[i].uris[0] for i in unnamed], set(explicit))
    for i, name in zip(unnamed, names, strict=True):
        specs[i] = SampleSpec(name, specs[i].uris)
    return specs


def image_ids(uris: Sequence[str]) -> list[str]:
    """Folder names of the images of a sample (``images/<image_id>/``): file names, made unique."""
    return _unique_names(uris, set())


def sample_label(spec: SampleSpec) -> str:
    """The ``uri`` recorded for a sample: its image URI, or its URIs separated by spaces."""
    return " ".join(spec.uris)


def run_key_for(fp: dict[str, Any], model_checksum: str, card: ModelCard, cfg: JobConfig) -> str:
    """Deterministic key of everything that determines a sample's outputs."""
    d = cfg.to_dict()
    d["output"].pop("uri")
    d["output"].pop("overwrite")
    d["model"].pop("device")
    d["model"].pop("batch_size")
    for speed_only in ("channels_last", "compile", "prefetch_blocks", "dense_tile_px"):  # how fast, never what comes out
        d["model"].pop(speed_only, None)
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


def _finished(sample_dir: str, run_key: str, cfg: JobConfig, sample_id: str, uri: str) -> bool:
    """Whether the sample's finished outputs of this run exist; refuse those of another run."""
    marker = join(sample_dir, SUCCESS)
    if not exists(marker):
        return False
    done = read_json(marker)
    if done.get("run_key") == run_key and not cfg.output.overwrite:
        return True
    if not cfg.output.overwrite:
        raise InputError(
            f"sample {sample_id!r}: {sample_dir} holds finished results of a different run "
            f"(run key {done.get('run_key')} ≠ {run_key}); pass --overwrite or choose another --output",
            uri=uri,
        )
    return False


def plan_sample(uri: str, cfg: JobConfig, card: ModelCard, model_checksum: str, out_root: str, sample_id: str | None = None,
                *, dry_run: bool = False, image_id: str = "", run_key: str | None = None,
                fp: dict[str, Any] | None = None) -> SamplePlan | None:
    """Open, choose the level, mask, plan; create or reuse the mosaic. ``None`` = already done.

    With ``dry_run`` nothing is created or changed under ``out_root`` (the plan is only computed).
    ``image_id`` (with the sample's ``run_key`` and this image's fingerprint ``fp``) plans one image
    of a sample of several images, in ``<out_root>/<sample_id>/images/<image_id>/``; the sample's
    completion is then checked by :func:`plan_images`, not here.
    """
    t0 = time.perf_counter()
    sample_id = sample_id or sample_id_for(uri)
    reader = open_image(uri)
    try:
        fp = fingerprint(uri) if fp is None else fp
        run_key = run_key or run_key_for(fp, model_checksum, card, cfg)
        sample_dir = join(out_root, sample_id)
        out_dir = join(sample_dir, IMAGES, image_id) if image_id else sample_dir
        if not image_id and _finished(sample_dir, run_key, cfg, sample_id, uri):
            return None
        mpp0, mpp_source = resolve_mpp(reader, cfg, sample_id)
        recipe = plan_input(reader, card, cfg.input, sample_id, mpp0)  # refuses what it cannot convert
        reader = AdaptedReader(reader, recipe)  # uint8, model channels, a resampled virtual level if needed
        level_mpps = [mpp0 * lv.downsample for lv in reader.levels]
        level, scale = choose_level(level_mpps, card.mpp, cfg.input.mpp_tolerance)
        if scale != 1.0:
            raise ResolutionError(
                f"sample {sample_id!r} ({uri}): no pyramid level within {cfg.input.mpp_tolerance:.0%} of the model's "
                f"{card.mpp} µm/px (levels: {', '.join(f'{m:.3g}' for m in level_mpps)} µm/px) — export a level at "
                "the model resolution, raise input.mpp_tolerance, or fix input.mpp",
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
        sample_id=sample_id, uri=uri, out_dir=out_dir, run_key=run_key, level=level,
        level_shape=(info.height, info.width), level_downsample=info.downsample, mpp0=mpp0,
        mpp_source=mpp_source, grid=grid, blocks=blocks, valid=valid, mosaic=spec, input_fingerprint=fp,
        timings={"open_s": t_open - t0, "mask_s": t_mask - t_open},
        image_id=image_id, sample_dir=sample_dir if image_id else "",
        input_recipe=recipe, georeference=getattr(reader, "georeference", None),
    )
    if not dry_run:
        _prepare_outputs(plan, cfg, cell_fg)
    return plan


def sample_run_key_for(fps: Sequence[dict[str, Any]], model_checksum: str, card: ModelCard, cfg: JobConfig,
                       *, image_ids: Sequence[str]) -> str:
    """The run key of a sample from its images' fingerprints (in the sample's order): one image →
    :func:`run_key_for` of its fingerprint; several → of all of them by image id. What the job
    writes into ``_SUCCESS``, and what intake compares it with."""
    if len(fps) == 1:
        return run_key_for(fps[0], model_checksum, card, cfg)
    return run_key_for({"images": [{"image_id": iid, **fp} for iid, fp in zip(image_ids, fps, strict=True)]},
                       model_checksum, card, cfg)


def plan_images(spec: SampleSpec, cfg: JobConfig, card: ModelCard, model_checksum: str, out_root: str,
                *, dry_run: bool = False) -> list[SamplePlan] | None:
    """Plan every image of a sample (one plan each, in order). ``None`` = the sample is already done.

    A one-image sample is exactly :func:`plan_sample`. For several images, the run key covers the
    fingerprints of all of them; a bad image fails the whole sample with an error that names it.
    """
    sid = spec.sample_id or sample_id_for(spec.uris[0])
    if len(spec.uris) == 1:
        plan = plan_sample(spec.uris[0], cfg, card, model_checksum, out_root, sid, dry_run=dry_run)
        return None if plan is None else [plan]
    ids = image_ids(spec.uris)
    fps = []
    for iid, uri in zip(ids, spec.uris, strict=True):
        try:
            fps.append(fingerprint(uri))
        except (SlideScoreError, OSError) as e:
            raise image_error(sid, iid, uri, e) from None
    run_key = sample_run_key_for(fps, model_checksum, card, cfg, image_ids=ids)
    sample_dir = join(out_root, sid)
    if _finished(sample_dir, run_key, cfg, sid, sample_label(spec)):
        return None
    if not dry_run:
        key_file = join(sample_dir, ".run_key")
        same_run = exists(key_file) and read_text(key_file).strip() == run_key
        if not same_run or cfg.output.overwrite:
            # another run's partial outputs (or --overwrite): start the sample afresh, images included
            for stale in (SUCCESS, "run.json", "regions.json", "regions.csv", "regions.geojson", IMAGES):
                remove(join(sample_dir, stale))
            write_text(key_file, run_key + "\n")
    plans = []
    for iid, uri, fp in zip(ids, spec.uris, fps, strict=True):
        try:
            plan = plan_sample(uri, cfg, card, model_checksum, out_root, sid, dry_run=dry_run, image_id=iid,
                               run_key=run_key, fp=fp)
        except ConfigError:
            raise
        except (SlideScoreError, OSError) as e:
            raise image_error(sid, iid, uri, e) from None
        assert plan is not None  # only one-image plans check completion
        plans.append(plan)
    return plans


def image_error(sample_id: str, image_id: str, uri: str, err: BaseException) -> SlideScoreError:
    """The error of one image of a sample of several images, naming the image (same type when ours)."""
    text = str(err)
    head = f"sample {sample_id!r}"
    if text.startswith(head):
        msg = f"{head}, image {image_id!r}{text[len(head):]}"
    else:
        msg = f"{head}, image {image_id!r} ({uri}): {text}"
    if isinstance(err, SlideScoreError):
        return type(err)(msg, **{**err.context, "image_id": image_id})
    return InputError(msg, uri=uri, image_id=image_id)


def open_for_plan(plan: SamplePlan) -> SlideReader:
    """Open a planned image as the plan reads it (converted to uint8, with its resampled level if any)."""
    return open_adapted(plan.uri, plan.input_recipe)


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
    _check_region_rule(cfg, card)


def _check_region_rule(cfg: JobConfig, card: ModelCard) -> None:
    """Warn when a region-level operating point is used under other region settings than it was fitted with."""
    name = cfg.decision.operating_point
    if not name or name not in card.operating_points or card.operating_point_unit(name) != "region":
        return
    rule = card.operating_points[name].get("region_rule") or {}
    ours = {"stride_px": cfg.tiling.stride_px, "blending": cfg.blending.weights,
            "min_area_um2": cfg.regions.min_area_um2, "connectivity": cfg.regions.connectivity}
    differ = [f"{k} {ours[k]!r} (fitted with {rule[k]!r})" for k in ours if k in rule and rule[k] != ours[k]]
    if differ:
        log.warning("operating point %r of model %r was fitted on regions under other settings: %s; its precision/recall "
                    "figures may not hold — use the fitted settings or recalibrate", name, card.name, ", ".join(differ))


def thresholds_for(card: ModelCard, cfg: JobConfig) -> tuple[float, ...]:
    if cfg.regions.thresholds is None:
        return DecisionPolicy.from_card(card, cfg.decision).thresholds
    if len(cfg.regions.thresholds) != card.n_classes:
        raise ConfigError(
            f"regions.thresholds: {len(cfg.regions.thresholds)} values given, model {card.name!r} has "
            f"{card.n_classes} classes {list(card.classes)}; give one threshold per class"
        )
    return tuple(cfg.regions.thresholds)


def _prepare_outputs(plan: SamplePlan, cfg: JobConfig, cell_fg: np.ndarray) -> None:
    """Create the mosaic unless a partial one of the same run exists (then resume into it)."""
    out = plan.out_dir
    key_file = join(out, ".run_key")
    same_run = exists(key_file) and read_text(key_file).strip() == plan.run_key and exists(join(plan.mosaic_path, ".zgroup"))
    if same_run and not cfg.output.overwrite:
        return
    for stale in (join(out, SUCCESS), join(out, ".blocks")):
        remove(stale)
    attrs = {"run_key": plan.run_key, "sample_id": plan.sample_id, "source": plan.uri, "version": __version__,
             "config": cfg.to_dict()}
    if plan.image_id:
        attrs["image_id"] = plan.image_id
    mz.create_mosaic(plan.mosaic_path, plan.mosaic, attrs)
    mz.write_fraction_image(join(out, MASK), cell_fg, plan.mosaic)
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


def _to_read(plan: SamplePlan, block: Block, done: set[str] | None = None) -> bool:
    """Whether a block still needs its pixels: with foreground, and not done (its marker is not in
    ``done``, the names listed in the blocks folder; ``None``: look the marker up)."""
    p = block.patches
    if not plan.valid[p.y : p.y1, p.x : p.x1].any():
        return False
    marker = f"{block.key}.json"
    return marker not in done if done is not None else not exists(join(plan.blocks_dir, marker))


def read_block_pixels(plan: SamplePlan, block: Block, reader: SlideReader, card: ModelCard) -> np.ndarray | None:
    """The model-ready pixels of a block; ``None`` (nothing read) when it is done or has no foreground."""
    if not _to_read(plan, block):
        return None
    return prepare_pixels(read_padded(reader, plan.level, block.read, card.pad_value), card)


def iter_block_pixels(plan: SamplePlan, blocks: Sequence[Block], reader: SlideReader, card: ModelCard, depth: int) -> Iterator[tuple[Block, np.ndarray | None, float | None]]:
    """``(block, pixels, read_seconds)`` in order, read ``depth`` blocks ahead in background threads.

    The read boxes of the blocks to be read are announced to the reader first, so the tiles their
    halos share are decoded once.
    """
    done = set(list_children(plan.blocks_dir))  # one listing, not one request per block
    todo = {b.index for b in blocks if _to_read(plan, b, done)}
    expect_reads(reader, plan.level, [b.read for b in blocks if b.index in todo])

    def read(b: Block) -> np.ndarray | None:
        return prepare_pixels(read_padded(reader, plan.level, b.read, card.pad_value), card) if b.index in todo else None

    return prefetch(blocks, read, depth=depth)


def run_block(plan: SamplePlan, block: Block, reader: SlideReader, model: Any, cfg: JobConfig, *,
              pixels: np.ndarray | None = None, seconds_read: float | None = None) -> BlockRecord:
    """Score one block and write its own chunks; record completion after the chunks are written.

    ``pixels`` (with the ``seconds_read`` they took) are the block's pixels read ahead by
    :func:`iter_block_pixels`; without them the block is read here.
    """
    marker = join(plan.blocks_dir, f"{block.key}.json")
    if exists(marker):
        return BlockRecord(**{**read_json(marker), "resumed": True})
    p, c = block.patches, block.cells
    valid = plan.valid[p.y : p.y1, p.x : p.x1]
    n_valid = int(valid.sum())
    t0 = time.perf_counter()
    t1 = t2 = t0
    if n_valid:
        card = model.card
        if pixels is None:
            pixels = prepare_pixels(read_padded(reader, plan.level, block.read, card.pad_value), card)
        t1 = time.perf_counter()
        scores = model.score_block(pixels, valid, plan.grid.stride_px, mode=cfg.model.mode, batch_size=cfg.model.batch_size)
        # calibration and prior shift act on patch probabilities, before blending (identity when the card has none)
        scores = DecisionPolicy.from_card(model.card, cfg.decision).transform(scores)
        kernel = patch_weights(plan.grid.k, cfg.blending.weights, cfg.blending.sigma_frac)
        prob = blend_cells(scores, valid, kernel, (p.y, p.x), (c.y, c.x, c.h, c.w))
        t2 = time.perf_counter()
        mz.write_block(plan.mosaic_path, plan.mosaic, block.cells, prob)
    t3 = time.perf_counter()
    # Patch (a, b) is owned by the block whose cells contain its origin cell (a, b): counts add up.
    owned = valid[max(c.y, p.y) - p.y : min(c.y1, p.y1) - p.y, max(c.x, p.x) - p.x : min(c.x1, p.x1) - p.x]
    n_owned = int(owned.sum())
    read_s = t1 - t0 if seconds_read is None else seconds_read
    rec = BlockRecord(block.key, n_owned, int(owned.size - n_owned), read_s, t2 - t1, t3 - t2, patch_evaluations=n_valid)
    write_json(marker, asdict(rec))
    return rec


# -- finishing --------------------------------------------------------------------------------
def finish_sample(plans: SamplePlan | Sequence[SamplePlan], records: Sequence[BlockRecord] | Sequence[Sequence[BlockRecord]],
                  cfg: JobConfig, model_info: dict[str, Any], card: ModelCard, t_start: float, *, model: Any = None) -> SampleResult:
    """Pyramids, regions, files, run.json; the completion marker last.

    Takes one plan and its block records, or, for a sample of several images, the plans of all its
    images and one list of block records per image: their regions are ranked together and written
    once, at the sample level.
    """
    per_image: list[list[BlockRecord]]
    if isinstance(plans, SamplePlan):
        plans, per_image = [plans], [list(records)]  # type: ignore[arg-type]
    else:
        plans, per_image = list(plans), [list(r) for r in records]  # type: ignore[arg-type]
    # one overview per image, drawn in parallel (PNG encoding and numpy release the GIL): for a
    # sample of many small fields the overviews would otherwise take longer than scoring them
    workers = max(1, min(len(plans), os.cpu_count() or 1, OVERVIEW_THREADS))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slidescore-overview") as pool:
        return _finish(plans, per_image, cfg, model_info, card, t_start, model, pool)


def _finish(plans: list[SamplePlan], per_image: list[list[BlockRecord]], cfg: JobConfig, model_info: dict[str, Any],
            card: ModelCard, t_start: float, model: Any, pool: ThreadPoolExecutor) -> SampleResult:
    """:func:`finish_sample`'s steps; the overview PNGs are drawn in ``pool`` while the pyramid,
    the region files (and the reports) are written, and awaited before ``run.json`` and ``_SUCCESS``."""
    multi = len(plans) > 1
    first = plans[0]
    out = first.sample_out
    t0 = time.perf_counter()
    probs = [mz.read_level(plan.mosaic_path, 0) for plan in plans]
    # the overviews' thumbnails and overlays are made while the regions are found; their boxes wait for them
    outlined: Future[list[Region]] = Future()
    overviews = [pool.submit(_draw_overview, plan, prob, functools.partial(_image_regions, outlined, plan.uri if multi else None))
                 for plan, prob in zip(plans, probs, strict=True)]
    try:
        found = [
            find_regions(
                prob, card.classes, plan.mosaic.thresholds, cell_px0=_cell_px0(plan), mpp0=plan.mpp0,
                min_area_um2=cfg.regions.min_area_um2, connectivity=cfg.regions.connectivity, image=plan.uri,
            )
            for plan, prob in zip(plans, probs, strict=True)
        ]
        regions = rank_across_images(found) if multi else found[0]
    except BaseException as e:
        outlined.set_exception(e)  # the overview threads end instead of waiting
        raise
    written = regions[: cfg.regions.top_k]  # what the region files list, and the overviews outline
    outlined.set_result(written)
    t1 = time.perf_counter()
    for plan, prob in zip(plans, probs, strict=True):
        mz.build_pyramid(plan.mosaic_path, plan.mosaic, prob0=prob)
    t_pyramid = time.perf_counter() - t1
    all_records = [r for recs in per_image for r in recs]
    policy = DecisionPolicy.from_card(card, cfg.decision)
    decision = policy.record()
    if policy.sample_call_enabled:
        # overlapping patches: (patch/stride)² patches cover one patch-sized field, the independent unit
        k2 = (first.grid.patch_px // first.grid.stride_px) ** 2
        n_units = sum(r.patches_scored for r in all_records) // k2
        counts = {c: sum(1 for r in regions if r.class_name == c) for c in card.classes}
        decision["sample_call"] = policy.sample_call(n_units, counts, unit="patch field")
    n_regions = len(regions)
    regions = _georeferenced(regions[: cfg.regions.top_k], plans)  # GeoTIFF: map coordinates too
    doc: dict[str, Any] = {"sample_id": first.sample_id, "n_regions_total": n_regions,
                           "coordinates": "level-0 pixels (y, x, h, w) and µm", "regions": [r.to_dict() for r in regions]}
    if multi:
        doc["coordinates"] = "level-0 pixels (y, x, h, w) and µm of each region's image"
        doc["images"] = [{"image_id": p.image_id, "uri": p.uri} for p in plans]
    write_json(join(out, "regions.json"), doc)
    write_csv(join(out, "regions.csv"), [_region_row(r) for r in regions], REGION_COLUMNS)
    colors = dict(zip(card.classes, card.class_colors(), strict=True))
    geojson = regions_geojson(regions, colors, first.sample_id)
    if multi:  # one collection for the whole sample: say which image each box lies on
        for feature, r in zip(geojson["features"], regions, strict=True):
            feature["properties"]["image"] = r.image
    write_json(join(out, "regions.geojson"), geojson)
    for plan in plans:
        mine = [r for r in regions if r.image == plan.uri] if multi else regions
        if multi:  # QuPath opens one image at a time: its own regions (ranks of the whole sample)
            write_json(join(plan.out_dir, "regions.geojson"), regions_geojson(mine, colors, first.sample_id))
        if plan.georeference is not None:  # the same regions in the image's map CRS, for GIS tools
            write_json(join(plan.out_dir, "regions.map.geojson"), regions_map_geojson(mine, plan.georeference, first.sample_id))
    t2 = time.perf_counter()
    images = [_image_run(plan, recs, prob) for plan, recs, prob in zip(plans, per_image, probs, strict=True)]
    scored = sum(r.patches_scored for r in all_records)
    score_s = sum(r.seconds_score for r in all_records)
    megapixels = sum(p.level_shape[0] * p.level_shape[1] for p in plans) / 1e6
    outputs: dict[str, Any] = {"mosaic": MOSAIC, "mask": MASK, "labels": f"{MOSAIC}/labels/suspect",
               "regions": ["regions.json", "regions.csv", "regions.geojson"], "overview": "overview.png"}
    if multi:
        one = images
        images = [{"image_id": p.image_id, "folder": f"{IMAGES}/{p.image_id}", **img} for p, img in zip(plans, one, strict=True)]
        outputs = {"regions": ["regions.json", "regions.csv", "regions.geojson"],
                   "per_image": {"folder": f"{IMAGES}/<image_id>", "mosaic": MOSAIC, "mask": MASK,
                                 "labels": f"{MOSAIC}/labels/suspect", "regions": "regions.geojson", "overview": "overview.png"}}
    timings = {"pyramid_s": t_pyramid, "regions_s": t2 - t0 - t_pyramid, "total_s": time.perf_counter() - t_start}
    timings_s = {**(_sum_dicts([img["timings_s"] for img in images]) if multi else images[0]["timings_s"]), **timings}
    run: dict[str, Any] = {
        "sample_id": first.sample_id,
        "run_key": first.run_key,
        "slidescore_version": __version__,
        "code_version": code_version(),
        "input": images[0]["input"] if not multi else {"images": [p.uri for p in plans], "n_images": len(plans)},
        "model": model_info,
        "config": cfg.to_dict(),
    }
    if multi:
        run["images"] = images
        run["grid"] = {k: v for k, v in images[0]["grid"].items() if k not in ("cells_shape", "patches_shape")}
        run["patches"] = _sum_dicts([img["patches"] for img in images])
        run["blocks"] = _sum_dicts([img["blocks"] for img in images])
        cells = sum(int(np.prod(prob[0].shape)) for prob in probs)
        run["area"] = {"scored_cells": sum(img["area"]["scored_cells"] for img in images),
                       "discarded_fraction": 1 - sum(img["area"]["scored_cells"] for img in images) / max(1, cells)}
    else:
        run.update({k: images[0][k] for k in ("grid", "patches", "blocks", "area")})
    run.update({
        "thresholds": dict(zip(card.classes, first.mosaic.thresholds, strict=True)),
        "decision": decision,
        "regions": {"total": n_regions, "written": len(regions)},
        "timings_s": timings_s,
        "throughput": {"patches_per_s": scored / score_s if score_s else None,
                       "megapixels_per_s": megapixels / max(1e-9, time.perf_counter() - t_start)},
        "outputs": outputs,
    })
    if cfg.report.enabled:
        _write_reports(run, plans, probs, regions, images if multi else None, card, cfg, model=model)
    for f in overviews:
        f.result()  # drawn and written (or its error raised) before run.json and the completion marker
    write_json(join(out, "run.json"), run)
    write_json(join(out, SUCCESS), {"run_key": first.run_key, "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return SampleResult(first.sample_id, " ".join(p.uri for p in plans), "ok", out, regions, run, images=[p.uri for p in plans])


def _image_regions(outlined: Future[list[Region]], uri: str | None) -> list[Region]:
    """The written regions (once they are known), or those of one image of a multi-image sample."""
    regions = outlined.result()
    return regions if uri is None else [r for r in regions if r.image == uri]


def _draw_overview(plan: SamplePlan, prob: np.ndarray, regions: Callable[[], list[Region]]) -> None:
    reader = open_for_plan(plan)
    try:
        render_overview(reader, prob[0], _cell_px0(plan), regions, join(plan.out_dir, "overview.png"))
    finally:
        reader.close()


def _write_reports(run: dict[str, Any], plans: list[SamplePlan], probs: list[np.ndarray], regions: list[Region],
                   images: list[dict[str, Any]] | None, card: ModelCard, cfg: JobConfig, *, model: Any = None) -> None:
    """``report.html`` + ``tiles.geojson`` per image folder (the sample folder for one image); updates ``run``.

    A sample of several images also gets ``<sample>/report.html``: the call, its images and the
    regions ranked across them (crops and Grad-CAM rendered once, for the image pages). ``model``
    is the classifier that scored the sample, reused for Grad-CAM (``None``: the report loads it
    again). The report is rendered into a local temporary folder and its files copied to the output
    (a local folder or an object store), each in one write.
    """
    import tempfile

    # lazy: the report imports torch only for Grad-CAM
    from slidescore.report import SampleParts, write_report, write_sample_report

    def publish(tmp: str, dest: str) -> None:
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                write_bytes(join(dest, f.name), f.read_bytes())

    quality: list[dict[str, Any]] = []
    reports: list[dict[str, Any]] = []
    parts = SampleParts()  # filled only for a sample of several images
    for i, (plan, prob) in enumerate(zip(plans, probs, strict=True)):
        run_i = run if images is None else {**run, **images[i], "sample_id": f"{plan.sample_id}/{plan.image_id}"}
        mine = regions if images is None else [r for r in regions if r.image == plan.uri]
        reader = open_for_plan(plan)
        try:
            with tempfile.TemporaryDirectory(prefix="slidescore-report-") as tmp:
                added = write_report(tmp, run_i, mine, reader, prob, card, cfg=cfg.report, model=model,
                                     image_id=plan.image_id if images is not None else "", sample_href="../../",
                                     parts=parts if images is not None else None)
                publish(tmp, plan.out_dir)
        finally:
            reader.close()
        quality += [{**q, "image": plan.image_id} if images is not None else q for q in added.get("quality", [])]
        reports.append({**added.get("report", {}), **({"image_id": plan.image_id} if images is not None else {})})
    run["quality"] = quality
    if images is None:
        run["report"] = reports[0]
        run["outputs"]["report"] = "report.html"
        run["outputs"]["tiles"] = "tiles.geojson"
        return
    with tempfile.TemporaryDirectory(prefix="slidescore-report-") as tmp:
        page = write_sample_report(tmp, run, regions, parts, card, cfg=cfg.report, image_folder=IMAGES)
        publish(tmp, plans[0].sample_out)
    run["report"] = {**page, "images": reports}
    run["outputs"]["report"] = "report.html"
    run["outputs"]["per_image"].update(report="report.html", tiles="tiles.geojson")


def _cell_px0(plan: SamplePlan) -> float:
    """Level-0 pixels per output cell."""
    return plan.grid.stride_px * plan.level_downsample


def _image_run(plan: SamplePlan, records: list[BlockRecord], prob: np.ndarray) -> dict[str, Any]:
    """run.json entries of one image: input, grid, patches, blocks, area, its own timings."""
    scored_cells = int(np.isfinite(prob[0]).sum())
    return {
        "input": {**plan.input_fingerprint, "uri": plan.uri, "mpp0": plan.mpp0, "mpp_source": plan.mpp_source,
                  "level": plan.level, "level_mpp": plan.level_mpp, "level_shape": list(plan.level_shape),
                  **_input_record(plan)},
        "grid": {"patch_px": plan.grid.patch_px, "stride_px": plan.grid.stride_px, "cells_shape": list(plan.grid.cells_shape),
                 "patches_shape": list(plan.grid.patches_shape), "border_policy": "patches from origin 0; the last may extend past the bottom/right edge, filled with the card's pad_value"},
        "patches": {"total": plan.grid.n_patches, "scored": sum(r.patches_scored for r in records),
                    "skipped_background": sum(r.patches_skipped for r in records),
                    "evaluated_with_halo": sum(r.patch_evaluations for r in records)},
        "blocks": {"total": len(plan.blocks), "resumed": sum(r.resumed for r in records),
                   "without_foreground": sum(1 for r in records if r.patches_scored == 0)},
        "area": {"scored_cells": scored_cells, "cell_um": plan.mosaic.cell_um,
                 "discarded_fraction": 1 - scored_cells / max(1, prob[0].size)},
        "timings_s": {**plan.timings, "read_s": sum(r.seconds_read for r in records),
                      "score_s": sum(r.seconds_score for r in records), "write_s": sum(r.seconds_write for r in records)},
    }


def _sum_dicts(parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: sum(p[k] for p in parts) for k in parts[0]}


def rank_across_images(per_image: list[list[Region]]) -> list[Region]:
    """Rank the regions of several images together (peak, mean, area; ties keep image order)."""
    order = sorted((r for rs in per_image for r in rs), key=lambda r: (-r.peak_probability, -r.mean_probability, -r.area_um2))
    return [replace(r, rank=i + 1) for i, r in enumerate(order)]


def _georeferenced(regions: list[Region], plans: list[SamplePlan]) -> list[Region]:
    geo = {p.uri: p.georeference for p in plans if p.georeference is not None}
    if not geo:
        return regions
    return [georeference_regions([r], geo[r.image])[0] if r.image in geo else r for r in regions]


def _input_record(plan: SamplePlan) -> dict[str, Any]:
    """run.json ``input`` entries: pixel conversion, resampling, georeference (see io.adapt, io.tiff)."""
    r = plan.input_recipe
    return {"conversion": r.to_dict() if r else None,
            "resampled_from_level": r.resample_from_level if r else None,
            "resample_scale": r.scale if r and r.resample_from_level is not None else 1.0,
            "georeference": plan.georeference}


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
    info = {"source": model.source, "sha256": model.checksum, "card": model.card.to_dict(), "device": str(model.device)}
    if hasattr(model, "scoring_info"):  # dense self-check result and device options
        info["scoring"] = model.scoring_info()
    return info


# -- single-process run -------------------------------------------------------------------------
def score_sample(uri: str | SampleSpec, model: Any, cfg: JobConfig, out_root: str, *, sample_id: str | None = None,
                 progress: Callable[[int, int], Any] | None = None) -> SampleResult:
    """Plan, score every block of every image, finish. Raises on a bad sample (callers record it).

    ``uri`` is one image URI or a :class:`~slidescore.config.SampleSpec` (one or several images).
    """
    t_start = time.perf_counter()
    spec = uri if isinstance(uri, SampleSpec) else SampleSpec(sample_id, (uri,))
    sid = spec.sample_id or sample_id or sample_id_for(spec.uris[0])
    spec = SampleSpec(sid, spec.uris)
    plans = plan_images(spec, cfg, model.card, model.checksum, out_root)
    if plans is None:
        out = join(out_root, sid)
        return SampleResult(sid, sample_label(spec), "skipped", out, [], read_json(join(out, "run.json")), images=list(spec.uris))
    records = []
    for plan in plans:
        try:
            records.append(score_image(plan, model, cfg, progress))
        except ConfigError:
            raise
        except (SlideScoreError, OSError) as e:
            if not plan.image_id:
                raise
            raise image_error(sid, plan.image_id, plan.uri, e) from None
    return finish_sample(plans, records, cfg, model_info(model), model.card, t_start, model=model)


def score_image(plan: SamplePlan, model: Any, cfg: JobConfig, progress: Callable[[int, int], Any] | None = None) -> list[BlockRecord]:
    """Score every block of one planned image in this process; the block records in block order."""
    reader = open_for_plan(plan)
    try:
        records = []
        bar = progress(len(plan.blocks), plan.grid.n_patches) if progress else None
        for block, pixels, read_s in iter_block_pixels(plan, plan.blocks, reader, model.card,
                                                            cfg.model.prefetch_depth(model.device.type, not is_local(plan.uri))):
            rec = run_block(plan, block, reader, model, cfg, pixels=pixels, seconds_read=read_s)
            records.append(rec)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(patches=rec.patches_scored, refresh=False)
        if bar is not None:
            bar.close()
    finally:
        reader.close()
    return records


def score_samples(uris: Sequence[str | SampleSpec], cfg: JobConfig, out_root: str, *, model: Any = None,
                  progress: Callable[[int, int], Any] | None = None) -> list[SampleResult]:
    """Score many samples in this process; a failing sample is recorded and the others go on.

    Each entry is an image URI (one sample, its id from the file name) or a
    :class:`~slidescore.config.SampleSpec` (an id and one or several images). ``out_root`` is a
    local folder or a URL such as ``s3://bucket/prefix``.
    """
    if model is None:
        from slidescore.model import load_model

        model = load_model(cfg.model.name, **cfg.model.runtime_options())
    check_config_for_model(cfg, model.card)
    specs = resolve_samples(uris)
    make_dirs(out_root)
    results = []
    for spec in specs:
        sid, label = str(spec.sample_id), sample_label(spec)
        try:
            results.append(score_sample(spec, model, cfg, out_root, progress=progress))
        except ConfigError:
            raise
        except (SlideScoreError, OSError) as e:
            log.info("sample %s failed: %s", sid, e)  # the CLI prints one FAILED line per sample
            results.append(SampleResult(sid, label, "failed", join(out_root, sid), error=str(e), error_type=type(e).__name__,
                                        images=list(spec.uris)))
            record_failure(out_root, spec, e)
    write_json(join(out_root, "run.json"), {
        "slidescore_version": __version__, "code_version": code_version(), "config": cfg.to_dict(),
        "model": model_info(model),
        "samples": [_sample_row(r) for r in results],
    })
    write_run_index(out_root, cfg)
    return results


def write_run_index(out_root: str, cfg: JobConfig) -> None:
    """``index.html`` at the run's output root (a local folder or ``s3://…``): every sample with its call and top score."""
    if not cfg.report.enabled:
        return
    from slidescore.report import write_index

    write_index(out_root)


def record_failure(out_root: str, spec: SampleSpec, err: BaseException) -> None:
    """Append the sample's error to ``<out_root>/failures.jsonl`` (a multi-image sample lists its images)."""
    row: dict[str, Any] = {"sample_id": spec.sample_id, "uri": sample_label(spec), "error_type": type(err).__name__,
                           "error": str(err), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if len(spec.uris) > 1:
        row["images"] = list(spec.uris)
    append_jsonl(join(out_root, "failures.jsonl"), row)


def _sample_row(r: SampleResult) -> dict[str, Any]:
    row: dict[str, Any] = {"sample_id": r.sample_id, "uri": r.uri, "status": r.status, "error": r.error,
                           "n_regions": r.run.get("regions", {}).get("total") if r.run else None}
    if len(r.images) > 1:
        row["images"] = r.images
    return row


def unique_ids(uris: list[str]) -> list[str]:
    """Sample ids of one-image samples (kept for callers that pass plain URIs; see resolve_samples)."""
    return [str(s.sample_id) for s in resolve_samples(uris)]
