"""Planning a sample: ids, run keys, the resume check, the level, the foreground mask, the blocks.

:func:`plan_images` turns a :class:`~slidescore.config.SampleSpec` into one picklable
:class:`SamplePlan` per image (``None`` when the sample's finished outputs of this run exist):
open the image, resolve its µm/px, choose the level for the model, compute the foreground mask at
a low resolution, lay out the global patch grid and the output-chunk-aligned blocks, and create
(or reuse, when resuming) the image's mosaic. Both runners plan through here; :func:`dry_run_rows`
says what a run would do without writing anything. See docs/architecture.md ("Planning").
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from slidescore.config import JobConfig, SampleSpec
from slidescore.core.mask import CellFractions, detect_foreground, patch_fractions, reduce_mean
from slidescore.core.roi import apply_roi
from slidescore.core.tiling import PatchGrid, choose_level, level_count, plan_blocks
from slidescore.core.types import Block, Box
from slidescore.decide import DecisionPolicy
from slidescore.errors import (
    ConfigError,
    InputError,
    ResolutionError,
    RoiError,
    SlideScoreError,
    UnsupportedImageError,
)
from slidescore.io import SlideReader, open_image
from slidescore.io import mosaic as mz
from slidescore.io.adapt import AdaptedReader, InputRecipe, open_adapted
from slidescore.io.open import input_fingerprint as fingerprint
from slidescore.io.outputs import exists, join, list_children, remove, write_text
from slidescore.io.prefetch import prefetch
from slidescore.io.roi_source import load_roi
from slidescore.model.card import ModelCard
from slidescore.stages import layout
from slidescore.stages.input_plan import plan_input
from slidescore.stages.layout import (
    IMAGES,
    MASK,
    MOSAIC,
    RUN_JSON,
    RUN_KEY_FILE,
    SUCCESS,
    image_ids,
    sample_id_for,
    sample_label,
)
from slidescore.stages.lease import (
    acquire_lease,
    check_lease,
    finished_key,
    read_run_key_file,
    release_lease,
)
from slidescore.stages.limits import (
    check_planned_image,
    drop_default_reader,
    keyed_config,
    reader_options,
)
from slidescore.version import __version__

log = logging.getLogger(__name__)

GRID_VERSION = "centred"  # the patch grid's geometry (core.tiling): outputs of another geometry are never resumed into


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
    max_tile_bytes: int | None = None  # limits.max_tile_bytes, for every reader that opens this image
    image_id: str = ""  # set for the images of a sample of several images ("" for a one-image sample)
    sample_dir: str = ""  # where the sample's regions, run.json and _SUCCESS go ("" = out_dir)
    open_options: dict[str, Any] = field(default_factory=dict)  # open_image's backend and slide cache, for every reader
    input_fetch: dict[str, Any] | None = None  # a remote slide fetched into the node's cache: bytes, seconds (io.remote_cache)
    roi: dict[str, Any] | None = None  # the region of interest used (core.roi.apply_roi's record), None = none

    @property
    def level_mpp(self) -> float:
        return self.mpp0 * self.level_downsample

    @property
    def mosaic_path(self) -> str:
        """The image's mosaic: a local path or a URL (a string; never ``Path``, which breaks ``s3://``)."""
        return join(self.out_dir, MOSAIC)

    @property
    def blocks_dir(self) -> str:
        return layout.blocks_dir(self.out_dir, self.run_key)

    def block_marker(self, block: Block) -> str:
        """The completion record of ``block`` (written after its chunks)."""
        return layout.block_marker(self.out_dir, self.run_key, block.key)

    def block_has_foreground(self, block: Block) -> bool:
        """Whether any patch the block scores is foreground (else it is neither read nor written)."""
        p = block.patches
        return bool(self.valid[p.y : p.y1, p.x : p.x1].any())

    @property
    def blocks_with_foreground(self) -> int:
        return sum(self.block_has_foreground(b) for b in self.blocks)

    @property
    def cell_px0(self) -> float:
        """Level-0 pixels per output cell."""
        return self.grid.stride_px * self.level_downsample

    @property
    def sample_out(self) -> str:
        return self.sample_dir or self.out_dir


def resolve_samples(entries: Sequence[str | SampleSpec]) -> list[SampleSpec]:
    """Every entry as a :class:`SampleSpec` with its id: plain URIs get ``sample_id_for`` ids, made unique."""
    explicit = [e.sample_id for e in entries if isinstance(e, SampleSpec) and e.sample_id]
    dups = sorted({s for s in explicit if explicit.count(s) > 1})
    if dups:
        raise ConfigError(f"samples: sample id {dups[0]!r} is given twice; sample ids must be unique")
    for sid in explicit:  # before any work: an id that would shadow a run-level file stops the run (exit 2)
        layout.check_folder_name(sid, "samples: sample id")
    specs = [e if isinstance(e, SampleSpec) else SampleSpec(None, (e,)) for e in entries]
    for s in specs:
        if not s.uris:
            raise ConfigError(f"samples: sample {s.sample_id!r} lists no image; give at least one image URI")
    unnamed = [i for i, s in enumerate(specs) if not s.sample_id]
    names = layout._unique_names([specs[i].uris[0] for i in unnamed], set(explicit))
    for i, name in zip(unnamed, names, strict=True):
        specs[i] = replace(specs[i], sample_id=name)  # keeps the spec's other fields (roi, …)
    return specs


def run_key_for(fp: dict[str, Any], model_checksum: str, card: ModelCard, cfg: JobConfig,
                roi_sha256: str | None = None) -> str:
    """Deterministic key of everything that determines a sample's outputs (an ROI by its checksum, not its path)."""
    d = cfg.to_dict()
    d["mask"].pop("roi", None)
    d["output"].pop("uri")
    d["output"].pop("overwrite")
    d["model"].pop("device")
    d["model"].pop("batch_size")
    for speed_only in ("channels_last", "compile", "prefetch_blocks", "dense_tile_px"):  # how fast, never what comes out
        d["model"].pop(speed_only, None)
    # which samples are in the job and how the cluster runs it never change a sample's outputs
    d.pop("samples", None)
    d.pop("cluster", None)
    d.pop("limits", None)  # limits refuse work; they never change what a finished sample holds
    for where_cached in ("cache_dir", "cache_max_bytes"):  # where a remote slide is staged, never what it holds
        d["input"].pop(where_cached, None)
    drop_default_reader(d["input"])  # input.backend / input.dicom at their defaults: earlier runs' keys stay as they were
    payload = {"input": fp, "model": model_checksum, "card": card.to_dict(), "config": d, "version": __version__,
               "grid": GRID_VERSION}
    payload.update({"roi": roi_sha256} if roi_sha256 else {})
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_run_key_for(fps: Sequence[dict[str, Any]], model_checksum: str, card: ModelCard, cfg: JobConfig,
                       *, image_ids: Sequence[str], roi: str | None = None, backend: str = "auto") -> str:
    """The run key of a sample from its images' fingerprints (in the sample's order): one image →
    :func:`run_key_for` of its fingerprint (and of its ROI's checksum: ``roi`` or ``mask.roi``);
    several → of all of them by image id. What the job writes into ``_SUCCESS``, and what intake
    compares it with."""
    cfg = keyed_config(cfg, backend)
    if len(fps) == 1:
        roi = roi or cfg.mask.roi
        return run_key_for(fps[0], model_checksum, card, cfg, load_roi(roi).sha256 if roi else None)
    return run_key_for({"images": [{"image_id": iid, **fp} for iid, fp in zip(image_ids, fps, strict=True)]},
                       model_checksum, card, cfg)


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
    strip = factor * max(1, 2048 // factor)  # columns per read (the reduction's blocks never straddle two)
    strip_h = factor * max(1, 512 // factor)  # rows per read: one strip of the mask level in memory, not all of it
    # reduced strip by strip straight onto the cells (bit for bit what the whole reduced level gives)
    cells = CellFractions((-(-info.height // factor), -(-info.width // factor)), info.downsample * factor,
                          grid.cells_shape, grid.stride_px * level_downsample)
    def read_strip(y: int) -> list[np.ndarray]:
        h = min(strip_h, info.height - y)
        return [reader.read(lvl, Box(y, x, h, min(strip, info.width - x))) for x in range(0, info.width, strip)]

    # the next strip is decoded in the background while this one is measured
    for _, pixels, _ in prefetch(range(0, info.height, strip_h), read_strip, depth=1):
        rows = []
        for pix in pixels or ():
            fg = detect_foreground(
                pix, mcfg.method, min_saturation=mcfg.min_saturation,
                max_brightness=mcfg.max_brightness, nodata_value=mcfg.nodata_value,
            )
            rows.append(fg if factor == 1 else reduce_mean(fg, factor))  # booleans sum as the 0.0/1.0 they mean
        cells.add_rows(np.concatenate(rows, axis=1))
    return cells.result()


def _finished(sample_dir: str, run_key: str, cfg: JobConfig, sample_id: str, uri: str) -> bool:
    """Whether the sample's finished outputs of this run exist; refuse those of another run, and a
    folder another run is writing (its live lease; read only here, taken before the first write).

    An empty or garbage ``_SUCCESS`` (a crash) means "not finished": the sample is redone.
    """
    done_key = finished_key(sample_dir)  # None: absent or unreadable (logged)
    if done_key is not None and not cfg.output.overwrite:
        if done_key == run_key:
            return True
        raise InputError(
            f"sample {sample_id!r}: {sample_dir} holds finished results of a different run "
            f"(run key {done_key} ≠ {run_key}); pass --overwrite or choose another --output",
            uri=uri,
        )
    check_lease(sample_dir, run_key, sample_id=sample_id, uri=uri)
    return False


# Long: the steps of docs/architecture.md "Planning" in order, under one open reader and one error boundary.
def plan_sample(uri: str, cfg: JobConfig, card: ModelCard, model_checksum: str, out_root: str, sample_id: str | None = None,
                *, dry_run: bool = False, image_id: str = "", run_key: str | None = None,
                fp: dict[str, Any] | None = None, roi: str | None = None, backend: str = "auto") -> SamplePlan | None:
    """Open, choose the level, mask (within ``roi``, the sample's region of interest: core.roi), plan;
    create or reuse the mosaic. ``None`` = already done.
    ``backend``: the sample's reader (a manifest's ``backend=``; ``auto``: the config's ``input.backend``).

    With ``dry_run`` nothing is created or changed under ``out_root`` (the plan is only computed).
    ``image_id`` (with the sample's ``run_key`` and this image's fingerprint ``fp``) plans one image
    of a sample of several images, in ``<out_root>/<sample_id>/images/<image_id>/``; the sample's
    completion is then checked by :func:`plan_images`, not here.
    """
    t0 = time.perf_counter()
    sample_id = sample_id or sample_id_for(uri)
    try:
        open_options = reader_options(cfg, backend)
        reader = open_image(uri, **open_options)
    except InputError as e:  # name the sample: the reader knows only the file
        raise type(e)(f"sample {sample_id!r}: {e}", **e.context) from None
    try:
        fp = fingerprint(uri) if fp is None else fp
        roi_src = load_roi(roi, sample_id) if roi else None
        run_key = run_key or run_key_for(fp, model_checksum, card, keyed_config(cfg, backend), roi_src.sha256 if roi_src else None)
        sample_dir = layout.sample_dir(out_root, sample_id)
        out_dir = layout.image_dir(out_root, sample_id, image_id)
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
        check_planned_image(reader, cfg, sample_id, mpp0=mpp0, recipe=recipe, level=level, grid=grid)  # limits.*
        t_open = time.perf_counter()
        cell_fg = compute_cell_foreground(reader, cfg, mpp0, grid, info.downsample)
        pf = patch_fractions(cell_fg, grid.k, grid.patches_shape)
        valid = pf >= max(cfg.mask.min_foreground_frac, 1e-6) if cfg.mask.method != "none" else np.ones_like(pf, bool)
        cell_fg, valid, roi_record = apply_roi(  # the region of interest: inside fractions on the cells, with the mask
            roi_src, cell_fg, grid, level0_shape=(reader.levels[0].height, reader.levels[0].width),
            level_downsample=info.downsample, mpp0=mpp0, georeference=getattr(reader, "georeference", None),
            mcfg=cfg.mask, sample_id=sample_id) if roi_src else (cell_fg, valid, None)
        t_mask = time.perf_counter()
    finally:
        reader.close()

    cells = grid.cells_shape
    spec = mz.MosaicSpec(
        shape=(card.n_classes, *cells),
        chunk=cfg.tiling.chunk_cells,
        n_levels=level_count(cells, cfg.tiling.chunk_cells),
        dtype=cfg.output.dtype,
        not_scored=cfg.output.not_scored_value(),
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
        image_id=image_id, sample_dir=sample_dir if image_id else "", max_tile_bytes=cfg.limits.max_tile_bytes,
        input_recipe=recipe, georeference=getattr(reader, "georeference", None), roi=roi_record,
        open_options={k: v for k, v in open_options.items() if k != "max_tile_bytes"},
        input_fetch=getattr(getattr(reader, "inner", reader), "fetch_stats", None),
    )
    if not dry_run:
        _prepare_outputs(plan, cfg, cell_fg)
    return plan


def plan_images(spec: SampleSpec, cfg: JobConfig, card: ModelCard, model_checksum: str, out_root: str,
                *, dry_run: bool = False) -> list[SamplePlan] | None:
    """Plan every image of a sample (one plan each, in order). ``None`` = the sample is already done.

    A one-image sample is exactly :func:`plan_sample`. For several images, the run key covers the
    fingerprints of all of them; a bad image fails the whole sample with an error that names it.
    """
    sid = spec.sample_id or sample_id_for(spec.uris[0])
    if len(spec.uris) == 1:
        plan = plan_sample(spec.uris[0], cfg, card, model_checksum, out_root, sid, dry_run=dry_run,
                           roi=spec.roi or cfg.mask.roi, backend=spec.backend)
        return None if plan is None else [plan]
    if spec.roi or cfg.mask.roi:
        raise RoiError(f"sample {sid!r}: a region of interest (mask.roi / roi=) applies to one image, this sample has "
                       f"{len(spec.uris)}; list each image as a sample of its own with its roi", uri=sample_label(spec))
    ids = image_ids(spec.uris)
    fps = []
    for iid, uri in zip(ids, spec.uris, strict=True):
        try:
            fps.append(fingerprint(uri))
        except ConfigError:
            raise
        except Exception as e:  # the sample's error boundary names the bad image of a sample of several
            raise image_error(sid, iid, uri, e) from e
    run_key = sample_run_key_for(fps, model_checksum, card, cfg, image_ids=ids, backend=spec.backend)
    sample_dir = layout.sample_dir(out_root, sid)
    if _finished(sample_dir, run_key, cfg, sid, sample_label(spec)):
        return None
    if not dry_run:
        # the sample folder's lease before anything is written under it (its images' plans write under it too)
        acquire_lease(sample_dir, run_key, sample_id=sid, uri=sample_label(spec))
        key_file = join(sample_dir, RUN_KEY_FILE)
        same_run = read_run_key_file(key_file) == run_key  # absent or unreadable: not this run's
        if not same_run or cfg.output.overwrite:
            # another run's partial outputs (or --overwrite): start the sample afresh, images included
            for stale in (SUCCESS, RUN_JSON, "regions.json", "regions.csv", "regions.geojson", IMAGES):
                remove(join(sample_dir, stale))
            write_text(key_file, run_key + "\n")
        else:
            remove(join(sample_dir, SUCCESS))  # an unreadable marker a crash left: not complete until we say so
    plans = []
    for iid, uri, fp in zip(ids, spec.uris, fps, strict=True):
        try:
            plan = plan_sample(uri, cfg, card, model_checksum, out_root, sid, dry_run=dry_run, image_id=iid,
                               run_key=run_key, fp=fp, backend=spec.backend)
        except ConfigError:
            raise
        except Exception as e:  # the sample's error boundary names the bad image of a sample of several
            raise image_error(sid, iid, uri, e) from e
        if plan is None:  # only one-image plans check completion
            raise RuntimeError(f"sample {sid!r}: image {iid!r} planned as complete on its own")
        plans.append(plan)
    return plans


def image_error(sample_id: str, image_id: str, uri: str, err: BaseException) -> SlideScoreError:
    """The error of one image of a sample of several images, naming the image (same type when ours)."""
    text = str(err) if isinstance(err, SlideScoreError | OSError) else f"unexpected {type(err).__name__}: {err}"
    head = f"sample {sample_id!r}"
    if text.startswith(head):
        msg = f"{head}, image {image_id!r}{text[len(head):]}"
    else:
        msg = f"{head}, image {image_id!r} ({uri}): {text}"
    if isinstance(err, SlideScoreError):
        return type(err)(msg, **{**err.context, "image_id": image_id})
    return InputError(msg, uri=uri, image_id=image_id)


def open_for_plan(plan: SamplePlan) -> SlideReader:
    """Open a planned image as the plan reads it (converted to uint8, with its resampled level if any,
    under the same ``limits.max_tile_bytes``)."""
    return open_adapted(plan.uri, plan.input_recipe, max_tile_bytes=plan.max_tile_bytes, **plan.open_options)


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
    """Create the mosaic unless a partial one of the same run exists (then resume into it).

    A one-image sample takes its folder's lease first (:mod:`slidescore.stages.lease`), and releases
    it when this fails (nothing more will be written there); the images of a sample of several images
    are planned under the lease :func:`plan_images` took.
    """
    if plan.image_id:
        _create_or_resume(plan, cfg, cell_fg)
        return
    acquire_lease(plan.sample_out, plan.run_key, sample_id=plan.sample_id, uri=plan.uri)
    try:
        _create_or_resume(plan, cfg, cell_fg)
    except BaseException:
        release_lease(plan.sample_out, plan.run_key)
        raise


def dry_run_rows(specs: Sequence[SampleSpec], cfg: JobConfig, card: ModelCard, model_checksum: str,
                 out_root: str) -> list[dict[str, Any]]:
    """Plan every sample without writing anything and say what a run would do.

    Per-sample problems are reported in the rows (``status: failed``); a ``ConfigError`` propagates.
    """
    rows = []
    for spec in specs:
        row: dict[str, Any] = {"sample_id": spec.sample_id, "uri": sample_label(spec)}
        try:
            plans = plan_images(spec, cfg, card, model_checksum, out_root, dry_run=True)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 — the dry run reports every per-sample problem, as a run would record it
            rows.append({**row, "status": "failed", "error": str(e), "error_type": type(e).__name__})
            continue
        if plans is None:
            rows.append({**row, "status": "complete"})
            continue
        images = [_dry_run_image(plan, cfg) for plan in plans]
        # one-image samples: that image's figures; several images: the first image's level, summed counts
        rows.append({**row, "status": "to score", **images[0],
                     **{k: sum(img[k] for img in images) for k in ("blocks", "blocks_done", "patches_total", "patches_to_score")},
                     **({"images": images} if len(images) > 1 else {})})
    return rows


def _dry_run_image(plan: SamplePlan, cfg: JobConfig) -> dict[str, Any]:
    fg = [b for b in plan.blocks if plan.block_has_foreground(b)]  # the others have nothing to do, and no marker
    done = len(plan.blocks) - len(fg) + (0 if cfg.output.overwrite or not fg else
                                         len({f"{b.key}.json" for b in fg} & set(list_children(plan.blocks_dir))))
    return {"image_id": plan.image_id, "image": plan.uri, "level": plan.level, "level_mpp": plan.level_mpp,
            "level_shape": list(plan.level_shape), "cells_shape": list(plan.grid.cells_shape),
            "blocks": len(plan.blocks), "blocks_done": done, "patches_total": plan.grid.n_patches,
            "patches_to_score": int(np.count_nonzero(plan.valid))}


def _create_or_resume(plan: SamplePlan, cfg: JobConfig, cell_fg: np.ndarray) -> None:
    """:func:`_prepare_outputs` under the sample's lease: resume into this run's mosaic, or write it afresh."""
    out = plan.out_dir
    key_file = join(out, RUN_KEY_FILE)
    same_run = read_run_key_file(key_file) == plan.run_key and exists(join(plan.mosaic_path, ".zgroup"))
    if same_run and not cfg.output.overwrite:
        if not plan.image_id:
            remove(join(out, SUCCESS))  # an unreadable marker a crash left: this sample is not complete until we say so
        return
    for stale in (join(out, SUCCESS), join(out, layout.BLOCKS)):
        remove(stale)
    attrs = {"run_key": plan.run_key, "sample_id": plan.sample_id, "source": plan.uri, "version": __version__,
             "config": cfg.to_dict()}
    if plan.image_id:
        attrs["image_id"] = plan.image_id
    mz.create_mosaic(plan.mosaic_path, plan.mosaic, attrs)
    mz.write_fraction_image(join(out, MASK), cell_fg, plan.mosaic)
    write_text(key_file, plan.run_key + "\n")
