"""Finishing a sample's outputs once all its blocks are written: pyramid, regions, region files, overviews.

:func:`write_outputs` reads level 0 of each image's mosaic, finds the suspect regions (threshold ▸
components ▸ rank, ranked across the images of a sample of several), builds the pyramid levels,
writes ``regions.json`` / ``.csv`` / ``.geojson`` (and the map-CRS GeoJSON of GeoTIFF inputs), draws
the overview PNGs, and assembles the sample's run record. It writes neither ``run.json`` nor the
completion marker: the sample lifecycle (:mod:`slidescore.run.lifecycle`) adds the report, then
writes both, the marker last (docs/architecture.md, invariant 6).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from slidescore.config import JobConfig
from slidescore.core.regions import (
    Region,
    find_regions,
    georeference_regions,
    rank_across_images,
    regions_geojson,
    regions_map_geojson,
)
from slidescore.decide import DecisionPolicy
from slidescore.io.outputs import join, write_csv, write_json
from slidescore.io.pyramid import build_pyramid
from slidescore.model.card import ModelCard
from slidescore.stages.layout import IMAGES, MASK, MOSAIC
from slidescore.stages.limits import dicom_record
from slidescore.stages.overview import render_overview
from slidescore.stages.plan import SamplePlan, open_for_plan
from slidescore.stages.records import (
    AreaRecord,
    BlockCounts,
    BlockRecord,
    DecisionRecord,
    GridRecord,
    ImageRecord,
    InputRecord,
    ModelRecord,
    OutputsRecord,
    PatchCounts,
    PerImageOutputs,
    RegionCounts,
    SampleInput,
    SampleRecord,
    Throughput,
    Timings,
    code_version,
)
from slidescore.stages.verify import covered_cell_count, read_level0_verified
from slidescore.version import __version__

OVERVIEW_THREADS = 4  # at most this many overview PNGs drawn at once (samples of several images)
REGION_COLUMNS = [
    "rank", "class_name", "peak_probability", "mean_probability", "area_um2", "n_cells",
    "bbox_y_px", "bbox_x_px", "bbox_h_px", "bbox_w_px", "centroid_y_px", "centroid_x_px",
    "centroid_y_um", "centroid_x_um", "threshold", "image",
    "centroid_map_x", "centroid_map_y",  # GeoTIFF inputs: the centroid in the image's map CRS (empty otherwise)
]
BORDER_POLICY = "patches from origin 0; the last may extend past the bottom/right edge, filled with the card's pad_value"


@dataclass
class Finished:
    """What :func:`write_outputs` leaves for the lifecycle: the run record so far and what the report needs."""

    run: SampleRecord  # the sample's run.json, without report and quality
    regions: list[Region]  # the written regions (top_k), ranked
    probs: list[np.ndarray]  # level 0 of each image's mosaic
    images: list[ImageRecord] | None  # per-image records of a sample of several images (None: one image)
    overviews: list[Future[None]]  # the overview PNGs being drawn


def write_outputs(plans: list[SamplePlan], per_image: list[list[BlockRecord]], cfg: JobConfig, model_info: dict[str, Any],
                  card: ModelCard, t_start: float, pool: ThreadPoolExecutor) -> Finished:
    """Pyramids, regions and region files of a scored sample, and its run record (not yet written).

    The overview PNGs are drawn in ``pool`` while the regions are found and the pyramid and region
    files are written; the caller awaits :attr:`Finished.overviews` before the sample's ``run.json``
    and completion marker (:func:`slidescore.run.lifecycle.finish_sample`)."""
    multi = len(plans) > 1
    t0 = time.perf_counter()
    probs = [read_level0_verified(plan) for plan in plans]  # every block's values present and decodable
    # the overviews' thumbnails and overlays are made while the regions are found; their boxes wait for them
    outlined: Future[list[Region]] = Future()
    overviews = [pool.submit(_draw_overview, plan, prob, functools.partial(_image_regions, outlined, plan.uri if multi else None))
                 for plan, prob in zip(plans, probs, strict=True)]
    try:
        regions = _find_regions(plans, probs, cfg, card)
    except BaseException as e:
        outlined.set_exception(e)  # the overview threads end instead of waiting
        raise
    outlined.set_result(regions[: cfg.regions.top_k])  # what the region files list, and the overviews outline
    t1 = time.perf_counter()
    for plan, prob in zip(plans, probs, strict=True):
        build_pyramid(plan.mosaic_path, plan.mosaic, prob0=prob)
    t_pyramid = time.perf_counter() - t1
    decision = _decision(plans, per_image, regions, cfg, card)
    written = _georeferenced(regions[: cfg.regions.top_k], plans)  # GeoTIFF: map coordinates too
    _write_region_files(plans, written, len(regions), card)
    timings = {"pyramid_s": t_pyramid, "regions_s": time.perf_counter() - t0 - t_pyramid}
    run = _sample_run(plans, per_image, probs, cfg, card, model_info, t_start, timings)
    run.decision, run.regions = decision, RegionCounts(total=len(regions), written=len(written))
    return Finished(run, written, probs, run.images, overviews)


def _find_regions(plans: list[SamplePlan], probs: list[np.ndarray], cfg: JobConfig, card: ModelCard) -> list[Region]:
    """Every region of every image (threshold ▸ components ▸ rank), ranked across the images of a sample."""
    found = [find_regions(prob, card.classes, plan.mosaic.thresholds, cell_px0=plan.cell_px0, mpp0=plan.mpp0,
                          min_area_um2=cfg.regions.min_area_um2, connectivity=cfg.regions.connectivity, image=plan.uri)
             for plan, prob in zip(plans, probs, strict=True)]
    return rank_across_images(found) if len(plans) > 1 else found[0]


def _decision(plans: list[SamplePlan], per_image: list[list[BlockRecord]], regions: list[Region], cfg: JobConfig,
              card: ModelCard) -> DecisionRecord:
    """run.json ``decision``: thresholds, operating point, calibration, and the sample-level call."""
    policy = DecisionPolicy.from_card(card, cfg.decision)
    decision = policy.record()
    if policy.sample_call_enabled:
        # the independent unit is a patch-sized field: the scored area (cells a scored patch covers) in
        # fields of k² cells — not scored patches / k², which would count the centred grid's margin
        # positions (mostly outside the image) as area
        grid = plans[0].grid
        k2 = (grid.patch_px // grid.stride_px) ** 2
        n_units = sum(covered_cell_count(p) for p in plans) // k2
        counts = {c: sum(1 for r in regions if r.class_name == c) for c in card.classes}
        decision["sample_call"] = policy.sample_call(n_units, counts, unit="patch field")
    return DecisionRecord.from_dict(decision)  # the decide layer's record, typed here


def _write_region_files(plans: list[SamplePlan], regions: list[Region], n_total: int, card: ModelCard) -> None:
    """``regions.json`` / ``.csv`` / ``.geojson`` of the sample; per image the QuPath and map-CRS GeoJSON."""
    multi = len(plans) > 1
    first = plans[0]
    out = first.sample_out
    # regions.json stays a small table (thousands of regions): of each outline only its counts
    # (parts, holes, vertices); the polygons themselves are in regions.geojson
    where = "outlines: level-0 pixel polygons in regions.geojson"
    doc: dict[str, Any] = {"sample_id": first.sample_id, "n_regions_total": n_total,
                           "coordinates": f"level-0 pixels (y, x, h, w) and µm; {where}",
                           "regions": [r.to_dict() for r in regions]}
    if multi:
        doc["coordinates"] = f"level-0 pixels (y, x, h, w) and µm of each region's image; {where}"
        doc["images"] = [{"image_id": p.image_id, "uri": p.uri} for p in plans]
    write_json(join(out, "regions.json"), doc)
    write_csv(join(out, "regions.csv"), [_region_row(r) for r in regions], REGION_COLUMNS)
    colors = dict(zip(card.classes, card.class_colors(), strict=True))
    geojson = regions_geojson(regions, colors, first.sample_id)
    if multi:  # one collection for the whole sample: say which image each outline lies on
        for feature, r in zip(geojson["features"], regions, strict=True):
            feature["properties"]["image"] = r.image
    write_json(join(out, "regions.geojson"), geojson)
    for plan in plans:
        mine = [r for r in regions if r.image == plan.uri] if multi else regions
        if multi:  # QuPath opens one image at a time: its own regions (ranks of the whole sample)
            write_json(join(plan.out_dir, "regions.geojson"), regions_geojson(mine, colors, first.sample_id))
        if plan.georeference is not None:  # the same regions in the image's map CRS, for GIS tools
            write_json(join(plan.out_dir, "regions.map.geojson"), regions_map_geojson(mine, plan.georeference, first.sample_id))


def _sample_run(plans: list[SamplePlan], per_image: list[list[BlockRecord]], probs: list[np.ndarray], cfg: JobConfig,
                card: ModelCard, model_info: dict[str, Any], t_start: float, timings: dict[str, float]) -> SampleRecord:
    """The sample's run record (without decision, regions and report), with its per-image records if it has several."""
    multi = len(plans) > 1
    first = plans[0]
    all_records = [r for recs in per_image for r in recs]
    images = [_image_run(plan, recs, prob) for plan, recs, prob in zip(plans, per_image, probs, strict=True)]
    scored = sum(r.patches_scored for r in all_records)
    score_s = sum(r.seconds_score for r in all_records)
    megapixels = sum(p.level_shape[0] * p.level_shape[1] for p in plans) / 1e6
    region_files = ["regions.json", "regions.csv", "regions.geojson"]
    total_s = time.perf_counter() - t_start
    if multi:
        for p, img in zip(plans, images, strict=True):
            img.image_id, img.folder = p.image_id, f"{IMAGES}/{p.image_id}"
        cells = sum(int(np.prod(prob[0].shape)) for prob in probs)
        scored_cells = sum(img.area.scored_cells for img in images)
        run = SampleRecord(
            input=SampleInput(images=[p.uri for p in plans], n_images=len(plans)), images=images,
            grid=replace(images[0].grid, cells_shape=None, patches_shape=None),
            patches=PatchCounts.summed([img.patches for img in images]),
            blocks=BlockCounts.summed([img.blocks for img in images]),
            area=AreaRecord(scored_cells=scored_cells, discarded_fraction=1 - scored_cells / max(1, cells)),
            timings_s=Timings.summed([img.timings_s for img in images]),
            outputs=OutputsRecord(regions=region_files, per_image=PerImageOutputs(
                folder=f"{IMAGES}/<image_id>", mosaic=MOSAIC, mask=MASK, labels=f"{MOSAIC}/labels/suspect",
                regions="regions.geojson", overview="overview.png")))
    else:
        one = images[0]
        run = SampleRecord(input=one.input, grid=one.grid, patches=one.patches, blocks=one.blocks, area=one.area,
                           timings_s=replace(one.timings_s),
                           outputs=OutputsRecord(mosaic=MOSAIC, mask=MASK, labels=f"{MOSAIC}/labels/suspect",
                                                 regions=region_files, overview="overview.png"))
    run = replace(run, sample_id=first.sample_id, run_key=first.run_key, slidescore_version=__version__,
                  code_version=code_version(), model=ModelRecord.from_dict(model_info), config=cfg.to_dict(),
                  thresholds=dict(zip(card.classes, first.mosaic.thresholds, strict=True)))
    run.timings_s.pyramid_s, run.timings_s.regions_s = timings["pyramid_s"], timings["regions_s"]
    run.timings_s.total_s = total_s
    run.throughput = Throughput(patches_per_s=scored / score_s if score_s else None,
                                megapixels_per_s=megapixels / max(1e-9, time.perf_counter() - t_start))
    return run


def _image_regions(outlined: Future[list[Region]], uri: str | None) -> list[Region]:
    """The written regions (once they are known), or those of one image of a multi-image sample."""
    regions = outlined.result()
    return regions if uri is None else [r for r in regions if r.image == uri]


def _draw_overview(plan: SamplePlan, prob: np.ndarray, regions: Callable[[], list[Region]]) -> None:
    reader = open_for_plan(plan)
    try:
        render_overview(reader, prob[0], plan.cell_px0, regions, join(plan.out_dir, "overview.png"),
                        color=plan.mosaic.colors[0])  # the class colour, as in the mosaic, report and viewers
    finally:
        reader.close()


def _image_run(plan: SamplePlan, records: list[BlockRecord], prob: np.ndarray) -> ImageRecord:
    """run.json entries of one image: input, grid, patches, blocks, area, its own timings."""
    scored_cells = int(np.isfinite(prob[0]).sum())
    fp, recipe = plan.input_fingerprint, plan.input_recipe  # fingerprint: slidescore.io.storage.fingerprint
    return ImageRecord(
        input=InputRecord(uri=plan.uri, size_bytes=fp.get("size_bytes", 0), etag=fp.get("etag"), mtime=fp.get("mtime"),
                          mpp0=plan.mpp0, mpp_source=plan.mpp_source, level=plan.level, level_mpp=plan.level_mpp,
                          level_shape=list(plan.level_shape),
                          # pixel conversion, resampling, georeference (see io.adapt, io.tiff)
                          conversion=recipe.to_dict() if recipe else None,
                          resampled_from_level=recipe.resample_from_level if recipe else None,
                          resample_scale=recipe.scale if recipe and recipe.resample_from_level is not None else 1.0,
                          georeference=plan.georeference, roi=plan.roi,
                          backend=None if plan.open_options.get("backend", "auto") == "auto" else plan.open_options["backend"],
                          fetch=plan.input_fetch, dicom=dicom_record(plan.open_options)),
        grid=GridRecord(patch_px=plan.grid.patch_px, stride_px=plan.grid.stride_px, cells_shape=list(plan.grid.cells_shape),
                        patches_shape=list(plan.grid.patches_shape), border_policy=BORDER_POLICY),
        patches=PatchCounts(total=plan.grid.n_patches, scored=sum(r.patches_scored for r in records),
                            skipped_background=sum(r.patches_skipped for r in records),
                            evaluated_with_halo=sum(r.patch_evaluations for r in records)),
        blocks=BlockCounts(total=len(plan.blocks), resumed=sum(r.resumed for r in records),
                           without_foreground=sum(1 for r in records if r.patches_scored == 0)),
        area=AreaRecord(scored_cells=scored_cells, cell_um=plan.mosaic.cell_um,
                        discarded_fraction=1 - scored_cells / max(1, prob[0].size)),
        timings_s=Timings(**plan.timings, read_s=sum(r.seconds_read for r in records),
                          score_s=sum(r.seconds_score for r in records), write_s=sum(r.seconds_write for r in records)),
    )


def _georeferenced(regions: list[Region], plans: list[SamplePlan]) -> list[Region]:
    geo = {p.uri: p.georeference for p in plans if p.georeference is not None}
    if not geo:
        return regions
    return [georeference_regions([r], geo[r.image])[0] if r.image in geo else r for r in regions]


def _region_row(r: Region) -> dict[str, Any]:
    d = r.to_dict()
    d.update(bbox_y_px=r.bbox_px[0], bbox_x_px=r.bbox_px[1], bbox_h_px=r.bbox_px[2], bbox_w_px=r.bbox_px[3],
             centroid_y_px=r.centroid_px[0], centroid_x_px=r.centroid_px[1],
             centroid_y_um=r.centroid_um[0], centroid_x_um=r.centroid_um[1])
    return d
