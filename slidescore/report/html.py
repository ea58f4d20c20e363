"""``report.html`` per sample and ``index.html`` per run: self-contained pages for the specialist.

A report is one HTML file with every picture inlined as a base64 JPEG and its CSS and one small
script inline: no CDN, no side file, no server, so it can be mailed or archived as is. It shows, top
to bottom: a plain summary (the call in words, what it rests on in examined fields of the model's
patch size, the rule applied — "positive from K suspected fields on" — with that rule's sample-level
sensitivity and specificity, and the caution for demonstration models right beside the call); the
overview with the overlay in the card's class colour (as the mosaic, napari and QuPath show it), the
outline of the thresholded area, numbered region boxes and a scale bar; the regions to review: the
top-K enlarged 2–3× (crop with one ring on the region's peak and a scale bar, overlay, explanation:
integrated gradients, :mod:`slidescore.report.gradcam`), a gallery of every written region (up to
``GALLERY_MAX`` thumbnails), and accept / reject marks that the script exports as CSV and as a
QuPath GeoJSON (the regions' outlines are embedded as JSON; ``#selftest-export`` fills
``<pre id='export-preview'>`` with the CSV for tests); then data quality, files, and the technical
details (decision record, thresholds, calibration, model, run) folded in ``<details>``. Links point
only at files the run wrote (GeoJSONs, CSV, run.json, the OME-Zarr metadata files): a link to a
folder resolves on a local disk but to nothing on an object store or its website, so the OME-Zarr
folders are shown as paths to copy into napari or QuPath. Elements carry stable ids/classes
(``#call``, ``#caution``, ``#overview``, ``.crop``, ``.gallery-thumb``) for tests and styling.

A sample of several images gets one such page per image (``images/<image_id>/report.html``) and a
sample page (:mod:`slidescore.report.sample_page`); :class:`SampleParts` hands the rendered regions
over, so nothing is rendered twice. The explanations use the model that scored the sample when the
caller passes it, else load it again. The run's ``index.html`` is :mod:`slidescore.report.index`.

The pages read the sample's run record by attribute (:class:`~slidescore.stages.records.SampleRecord`);
the public functions also take a run.json's dict (an older one included) and read it with
:meth:`~slidescore.stages.records.SampleRecord.from_dict`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from slidescore.config import ReportConfig
from slidescore.core.regions import Region
from slidescore.core.types import Box
from slidescore.errors import ConfigError
from slidescore.io import SlideReader, read_padded
from slidescore.io.outputs import join, write_text
from slidescore.report import images as im
from slidescore.report.markup import CSS, _e, _flatten, _kv, _num
from slidescore.report.quality import QualityThresholds, check_quality
from slidescore.report.qupath import tile_heatmap_geojson
from slidescore.report.review import (
    GALLERY_MAX,
    RegionView,
    _fit,
    gallery_tile,
    magnification,
    review_features,
    review_section,
)
from slidescore.report.summary import (
    call_of,
    summary_html,
)
from slidescore.stages.layout import MASK, MOSAIC, image_dir
from slidescore.stages.records import ImageReport, QualityFlag, RegionCrop, SampleRecord

log = logging.getLogger(__name__)

REPORT = "report.html"
TILES = "tiles.geojson"
THUMB_PX = 360  # long side of an image's overview on its sample's page
EXPLANATION = "integrated gradients"  # the method of slidescore.report.gradcam (run.json: report.gradcam)
EXPLANATION_TEXT = ("integrated gradients from an empty background — each pixel's share of how far the class probability "
                    "of the patches covering the crop rose above what empty background scores; red/yellow = raised it most. "
                    "The overlay beside it is the score map itself, one cell per scoring stride.")


def render_overview(reader: SlideReader, prob: np.ndarray, cell_px0: float, regions: list[Region], card: Any,
                    thresholds: list[float], max_px: int, mpp0: float | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Thumbnail with every class's overlay (in the card's class colour), the thresholded-area outline,
    numbered region boxes and, with ``mpp0``, a scale bar; returns the picture and the bar (``{}`` without)."""
    rgb, px0 = im.thumbnail(reader, max_px)
    above = np.zeros(rgb.shape[:2], bool)
    for ci, color in enumerate(card.class_colors()):
        p = im.cells_at(prob[ci], rgb.shape[:2], px0, cell_px0)
        rgb = im.overlay(rgb, p, color)
        above |= np.nan_to_num(p, nan=-1) >= thresholds[ci]
    rgb = im.outline(rgb, above)
    rgb = im.draw_boxes(rgb, regions, px0)
    if mpp0:
        return im.scale_bar(rgb, px0 * float(mpp0))
    return rgb, {}


def _region_figures(reader: SlideReader, prob: np.ndarray, cell_px0: float, r: Region, card: Any, run: SampleRecord,
                    cfg: ReportConfig, model: Any, cam_note: list[str], image_id: str = "") -> RegionView:
    lv0 = reader.levels[0]
    box = im.crop_box(r, (lv0.height, lv0.width), min_px=cfg.crop_px, max_px=cfg.max_crop_px)
    crop = im.to_rgb(np.asarray(reader.read(0, box)))
    p = im.cells_at(prob[r.class_index], crop.shape[:2], 1.0, cell_px0, (box.y, box.x))
    ov = im.overlay(crop, p, card.class_colors()[r.class_index])
    ov = im.outline(ov, np.nan_to_num(p, nan=-1) >= r.threshold)
    crop_rec = RegionCrop(rank=r.rank, crop_box_px=[box.y, box.x, box.h, box.w])
    raw = [("crop", "level-0 pixels, ring on the score's peak cell", crop), ("overlay", "score overlay (class colour), outline at threshold", ov)]
    if model is not None:
        raw += _explanation_figure(reader, box, crop, r, card, run, model, cam_note, crop_rec)
    f = magnification(box)
    peak = ((r.peak_px[0] - box.y) * f, (r.peak_px[1] - box.x) * f)  # peak_px: the peak cell's centre
    mpp0 = run.image_input.mpp0
    figs = []
    for cls, cap, pic in raw:
        big = im.magnify(pic, f)
        if cls == "crop":
            big = im.peak_marker(big, peak, radius=max(10, 4 * f))
            if mpp0:
                big, _ = im.scale_bar(big, float(mpp0) / f, frac=0.25)
        figs.append((cls, f"{cap} ({f}×)", big))
    figures = "".join(
        f"<figure><img class='{cls}' alt='{_e(cls)} of region {r.rank}' data-box='{box.y} {box.x} {box.h} {box.w}' "
        f"data-magnification='{f}' src='{im.data_uri(pic)}'><figcaption>{_e(cap)}</figcaption></figure>"
        for cls, cap, pic in figs
    )
    rows = [
        ("class", _e(r.class_name)), ("peak probability", _num(r.peak_probability)),
        ("mean probability", _num(r.mean_probability)), ("area", f"{_num(r.area_um2)} µm² ({r.n_cells} cells)"),
        ("centroid", f"({r.centroid_px[0]:.0f}, {r.centroid_px[1]:.0f}) px · ({r.centroid_um[0]:.1f}, {r.centroid_um[1]:.1f}) µm"),
        ("bounding box", "y {:.0f}, x {:.0f}, h {:.0f}, w {:.0f} px".format(*r.bbox_px)),
        ("threshold", _num(r.threshold)),
    ]
    return RegionView(r.rank, figures, rows, crop_rec, image_id)


def _explanation_figure(reader: SlideReader, box: Box, crop: np.ndarray, r: Region, card: Any, run: SampleRecord, model: Any,
                        cam_note: list[str], crop_rec: RegionCrop) -> list[tuple[str, str, np.ndarray]]:
    """The region's explanation (:mod:`slidescore.report.gradcam`) as a heat map over its level-0 crop.

    The crop is explained at the scoring level with every patch of the scoring grid that covers it
    (read with their halo, padded past the edge as in scoring); the map goes back to the crop's
    level-0 pixels by sampling it at their centres (no stretching), and its peak is recorded.
    """
    from slidescore.report.gradcam import explain_crop, patch_read_box

    level = int(run.image_input.level)
    lv = reader.levels[level]
    ds = float(lv.downsample)
    inner = Box(int(np.floor(box.y / ds)), int(np.floor(box.x / ds)), 0, 0)
    inner = Box(inner.y, inner.x, max(1, int(np.ceil(box.y1 / ds)) - inner.y), max(1, int(np.ceil(box.x1 / ds)) - inner.x))
    rbox = patch_read_box(inner, (lv.height, lv.width), card.patch_px, int(run.grid.stride_px))
    pix = np.asarray(read_padded(reader, level, rbox, card.pad_value))
    res = explain_crop(model, pix, r.class_index, inner=Box(inner.y - rbox.y, inner.x - rbox.x, inner.h, inner.w),
                       stride_px=int(run.grid.stride_px))
    if res.note and res.note not in cam_note:
        cam_note.append(res.note)
    if res.heat is None:
        return []
    # level pixel u spans level-0 [u·ds, (u + 1)·ds): a crop pixel's centre Y + ½ sits at level (Y + ½)/ds − ½ from u's centre
    ly = (box.y + np.arange(crop.shape[0]) + 0.5) / ds - 0.5 - inner.y
    lx = (box.x + np.arange(crop.shape[1]) + 0.5) / ds - 0.5 - inner.x
    heat = ndimage.map_coordinates(res.heat, np.meshgrid(ly, lx, indexing="ij"), order=1, mode="nearest")
    crop_rec.gradcam_peak_px = [int(v) for v in np.unravel_index(int(np.argmax(heat)), heat.shape)]
    return [("explanation", f"{res.method}: pixels that raised the score (red/yellow), level-0 crop",
             im.heat_on(crop, heat))]


def _explained_views(reader: SlideReader, prob: np.ndarray, cell_px0: float, top: list[Region], card: Any,
                     run: SampleRecord, cfg: ReportConfig, model: Any, cam_note: list[str],
                     image_id: str) -> list[RegionView]:
    """The top regions' views, explained while ``report.explain_budget_s`` lasts: integrated gradients
    of a model scored patch by patch (a ViT, an exported program) can take minutes per region on CPU,
    and a report must not hold a sample's completion for an hour. Regions past the budget keep their
    crops and figures, and the report says from which rank on they are not explained."""
    deadline = time.perf_counter() + cfg.explain_budget_s
    views = []
    for r in top:
        if model is not None and time.perf_counter() > deadline:
            model = None
            cam_note.append(f"not computed from region {r.rank} on: the explanation budget of {cfg.explain_budget_s:g} s "
                            "(report.explain_budget_s) was spent")
        views.append(_region_figures(reader, prob, cell_px0, r, card, run, cfg, model, cam_note, image_id))
    return views


def _load_model_for(run: SampleRecord) -> tuple[Any, str]:
    """The scoring model again (for the explanations), on CPU; refused if its checksum differs from run.json's."""
    from slidescore.errors import InputError
    from slidescore.model import load_model

    src = run.model.source
    if not src:
        return None, "not computed: run.json names no model source"
    try:
        model = load_model(src, device="cpu")
    except (ConfigError, InputError, OSError) as e:
        return None, f"not computed: the model {src!r} could not be loaded again ({e})"
    if run.model.sha256 and model.checksum != run.model.sha256:
        return None, f"not computed: the model at {src!r} changed since scoring (checksum differs)"
    return model, ""


@dataclass
class SampleParts:
    """What the reports of a multi-image sample's images hand to the sample's page (:func:`~slidescore.report.sample_page.write_sample_report`).

    Each :func:`write_report` given one adds its rendered regions (by rank) and a summary of its
    image, so the sample page shows the regions ranked across images without rendering (or
    explaining) any crop twice.
    """

    views: dict[int, RegionView] = field(default_factory=dict)
    images: list[ImagePart] = field(default_factory=list)
    cam_notes: list[str] = field(default_factory=list)
    tiles: dict[int, str] = field(default_factory=dict)  # rank → its gallery thumbnail (HTML)
    features: dict[int, dict[str, Any]] = field(default_factory=dict)  # rank → its outline for the GeoJSON export


@dataclass(frozen=True)
class ImagePart:
    """One image of a multi-image sample as its sample's page shows it."""

    image_id: str
    uri: str
    n_regions: int
    top: float | None  # its top score
    raised: list[str]  # its raised quality checks
    thumb: np.ndarray  # its overview, at most THUMB_PX a side


@dataclass
class ReportAdded:
    """What one image's report adds to the sample's run record: every quality check and the page's summary."""

    quality: list[QualityFlag]
    report: ImageReport

    def to_dict(self) -> dict[str, Any]:
        return {"quality": [q.to_dict() for q in self.quality], "report": self.report.to_dict()}


def _usable_model(model: Any, run: SampleRecord) -> tuple[Any, str]:
    """The scoring model handed in, unless its checksum differs from the one run.json records."""
    want = run.model.sha256
    have = getattr(model, "checksum", "")
    if want and have and have != want:
        return None, f"not computed: the model passed for the explanations is not the scoring model (sha256 {have[:12]}… ≠ {want[:12]}…)"
    return model, ""


def write_report(out_dir: str | Path, run: SampleRecord | Mapping[str, Any], regions: list[Region], reader: SlideReader,
                 prob: np.ndarray, card: Any, *, cfg: ReportConfig | None = None, model: Any = None, image_id: str = "",
                 sample_href: str = "", parts: SampleParts | None = None) -> dict[str, Any]:
    """Write ``report.html`` and ``tiles.geojson`` of one sample; return what run.json should add.

    :func:`render_report` with the result as run.json writes it: ``{"quality": [...], "report": {...}}``;
    ``run`` may be the record or a run.json's dict (read with ``SampleRecord.from_dict``).
    """
    return render_report(out_dir, SampleRecord.of(run), regions, reader, prob, card, cfg=cfg, model=model,
                         image_id=image_id, sample_href=sample_href, parts=parts).to_dict()


# Long as the report is: each step (heat map, quality, crops, overview, gallery, page) is one call; the
# function is their order and the record each adds to.
def render_report(out_dir: str | Path, run: SampleRecord, regions: list[Region], reader: SlideReader, prob: np.ndarray,
                  card: Any, *, cfg: ReportConfig | None = None, model: Any = None, image_id: str = "",
                  sample_href: str = "", parts: SampleParts | None = None) -> ReportAdded:
    """Write ``report.html`` and ``tiles.geojson`` of one sample; return what its run record should add.

    Parameters
    ----------
    out_dir
        The sample's output folder (where run.json, regions.* and the mosaic are), or the image's
        folder of a multi-image sample.
    run
        The sample's run record (``decision`` optional); one image's: :meth:`SampleRecord.for_image`.
    regions
        Ranked regions (rank 1 first); the first ``cfg.top_k`` get crops.
    reader
        An open reader of the source image (level 0 for crops, the scoring level for the explanations).
    prob
        The (C, H, W) level-0 probability map (NaN = not scored).
    card
        The :class:`~slidescore.model.ModelCard`.
    model
        The :class:`~slidescore.model.PatchClassifier` that scored the sample, used for the explanations
        as it is (on its device); ``None`` loads the model named in run.json again, on CPU (if
        ``cfg.gradcam``).
    image_id, sample_href, parts
        For one image of a multi-image sample: its id, the relative link from its folder to the
        sample's folder (``../../``; the sample-level files are linked there), and the
        :class:`SampleParts` that collects what the sample page shows.

    Returns
    -------
    :class:`ReportAdded` — the record's ``quality`` and ``report``.
    """
    t0 = time.perf_counter()
    cfg = cfg or ReportConfig()
    out = Path(out_dir)
    inp = run.image_input
    if inp.mpp0 is None or inp.level_mpp is None:
        raise ValueError(f"run record of {run.sample_id!r} names no input.mpp0 / input.level_mpp: cannot place its cells")
    cell_px0 = float(run.grid.stride_px) * float(inp.level_mpp) / float(inp.mpp0)
    thresholds = [float(run.thresholds[c]) for c in card.classes]
    flags = check_quality(reader, run, card, QualityThresholds(quality_mpp=cfg.quality_mpp))

    heatmap = tile_heatmap_geojson(prob, card.classes, cell_px0, run.sample_id, max_tiles=cfg.qupath_max_tiles)
    # compact: tens of thousands of tiles; indented JSON goes through Python's slow encoder (seconds, 2× the bytes)
    write_text(out / TILES, json.dumps(heatmap, separators=(",", ":")) + "\n")

    cam_note: list[str] = []
    top = regions[: cfg.top_k]
    model_used = "none"
    if not cfg.gradcam:
        model = None
        cam_note.append("not computed: report.gradcam is off")
    elif model is not None and top:
        model, note = _usable_model(model, run)
        model_used = "passed in" if model is not None else "none"
        if note:
            cam_note.append(note)
    elif top:
        model, note = _load_model_for(run)
        model_used = "loaded again" if model is not None else "none"
        if note:
            cam_note.append(note)
    views = _explained_views(reader, prob, cell_px0, top, card, run, cfg, model, cam_note, image_id)

    overview, bar = render_overview(reader, prob, cell_px0, top, card, thresholds, cfg.overview_px, inp.mpp0)
    call, numbers = call_of(run)
    top_peak = float(regions[0].peak_probability) if regions else (float(np.nanmax(prob)) if np.isfinite(prob).any() else None)
    shown = regions[:GALLERY_MAX]
    tiles = {r.rank: gallery_tile(reader, r, cfg, image_id) for r in shown}
    features = dict(zip([r.rank for r in shown], review_features(shown, card, run.sample_id), strict=True))
    html_text = render_html(run, card, call, numbers, flags, overview, [v.html() for v in views], len(regions), top_peak,
                            cam_note, cfg, sample_href=sample_href if image_id else "", image_id=image_id,
                            gallery=list(tiles.values()), features=list(features.values()), bar=bar)
    write_text(out / REPORT, html_text)
    if parts is not None:
        parts.views.update({v.rank: v for v in views})
        parts.cam_notes.extend(n for n in cam_note if n not in parts.cam_notes)
        parts.tiles.update(tiles)
        parts.features.update(features)
        parts.images.append(ImagePart(image_id, inp.uri, len(regions), top_peak, [f.flag for f in flags if f.raised],
                                      im.resize(overview, _fit(overview.shape[:2], THUMB_PX))))
    return ReportAdded(flags, ImageReport(
        html=REPORT, tiles_geojson=TILES, top_k=len(top), top_peak_probability=top_peak, call=call,
        gradcam="; ".join(([EXPLANATION] if model is not None else []) + cam_note) or EXPLANATION, gradcam_model=model_used, regions=[v.crop for v in views],
        seconds=round(time.perf_counter() - t0, 3)))


# Long by its markup, not its logic: the page template, one f-string document.
def render_html(run: SampleRecord, card: Any, call: str, numbers: dict[str, Any], flags: list[QualityFlag],
                overview: np.ndarray, region_html: list[str], n_regions: int, top_peak: float | None,
                cam_note: list[str], cfg: ReportConfig, *, sample_href: str = "", image_id: str = "",
                gallery: list[str] | None = None, features: list[dict[str, Any]] | None = None,
                bar: dict[str, float] | None = None) -> str:
    """The page of one sample (or, with ``sample_href`` and ``image_id``, of one image of a multi-image sample).

    Top to bottom: the summary (call in words, its basis in fields, the caution), the overview, the
    regions to review (top ones enlarged, a gallery of all, accept / reject and their export), data
    quality, files, and the technical details folded in ``<details>``."""
    sid = run.sample_id
    pt, area, inp, model = run.patches, run.area, run.image_input, run.model
    dcfg = run.config.get("decision") or {}  # the config's serialisation (typed in slidescore.config)
    op = (run.decision.operating_point if run.decision else None) or dcfg.get("operating_point") or "card thresholds"
    raised = [f for f in flags if f.raised]
    call_rows = [(k, _num(v)) for k, v in _flatten(numbers)] if numbers else \
        [("status", "not computed: this run has no sample-level decision (run.json has no <code>decision</code>)")]
    flag_rows = "".join(
        f"<tr class='{'raised' if f.raised else 'ok'}'><td>{_e(f.flag.replace('_', ' '))}</td><td>{_num(f.value)}</td>"
        f"<td>{_num(f.threshold)}</td><td>{'RAISED' if f.raised else 'ok'}</td><td>{_e(f.message)}</td></tr>"
        for f in flags
    )
    outs = run.outputs
    per = outs.per_image if sample_href else None
    mosaic, mask = (per.mosaic, per.mask) if per else (outs.mosaic, outs.mask)
    if sample_href:  # one image of a multi-image sample: its own mosaic and GeoJSONs, the sample's tables and record
        links = [(f"{sample_href}{REPORT}", "the sample's page (regions ranked across its images)"),
                 ("regions.geojson", "regions of this image (GeoJSON, QuPath annotations)"),
                 (TILES, "tile heat map (GeoJSON, QuPath measurement maps)"),
                 (f"{sample_href}regions.csv", "regions of the sample (CSV)"), (f"{sample_href}run.json", "run record (run.json)")]
    else:
        links = [("regions.geojson", "regions (GeoJSON, QuPath annotations)"), (TILES, "tile heat map (GeoJSON, QuPath measurement maps)"),
                 ("regions.csv", "regions (CSV)"), ("run.json", "run record (run.json)")]
    where = _folder_location(run, image_id)
    folders = [(mosaic or MOSAIC, "probability mosaic" + (" of this image" if sample_href else ""),
                "OME-Zarr 0.4, one pixel per stride cell, levels 0…n; <code>labels/suspect</code> is the thresholded map"),
               (mask or MASK, "foreground mask", "OME-Zarr 0.4, foreground fraction per cell")]
    legend = "".join(f"<span style='background:rgb{tuple(c)}'></span>{_e(n)} "
                     for n, c in zip(card.classes, card.class_colors(), strict=True))
    context = _kv([
        ("model", f"{_e(card.name)} v{_e(card.version)} <span class='muted'>({_e(model.source)}, sha256 "
                  f"{_e(model.sha256[:12])}…, on {_e(model.device)})</span>"),
        ("model card", _e(card.description) or "<span class='muted'>no description</span>"),
        ("input", f"{card.patch_px}-px patches at {_num(card.mpp)} µm/px, {_e(card.color_space)}, head {_e(card.head)}, "
                  f"classes {_e(', '.join(card.classes))}"),
        ("operating point", _e(op)),
        ("thresholds", _e(", ".join(f"{k} ≥ {v:g}" for k, v in run.thresholds.items()))),
        ("image", f"{_e(inp.uri)} <span class='muted'>({_num(inp.mpp0)} µm/px from {_e(inp.mpp_source)}; "
                  f"scored at level {_e(inp.level)}, {_num(inp.level_mpp)} µm/px, "
                  f"{_e(' × '.join(str(v) for v in inp.level_shape))} px)</span>"),
        ("patches", f"{_num(pt.scored)} scored, {_num(pt.skipped_background)} skipped as background "
                    f"of {_num(pt.total)} ({pt.skipped_background / max(1, pt.total):.1%} skipped)"),
        ("area discarded", f"{area.discarded_fraction:.1%} of the image not scored (background)"),
        ("regions", f"{n_regions:,} above threshold; top {len(region_html)} enlarged"),
        ("highest region probability", f"<b id='top-score'>{_num(top_peak)}</b>"),
        ("run", f"key {_e(run.run_key)}, slidescore {_e(run.slidescore_version)}, code {_e(run.code_version[:12])}, "
                f"{_num(run.timings_s.total_s)} s"),
    ])
    flag_summary = (f"<b>{len(raised)} raised:</b> " + _e(", ".join(f.flag.replace('_', ' ') for f in raised))) if raised \
        else "no check raised"
    explained = not any(n.startswith("not computed") for n in cam_note)
    note = ("<p class='muted'>Explanation: " + _e(EXPLANATION_TEXT) + "</p>" if explained else "") + \
        (f"<p class='muted'>Explanations: {_e('; '.join(cam_note))}</p>" if cam_note else "")
    scale = (f"; scale bar {bar['um']:g} µm" if bar else "")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>slidescore report — {_e(sid)}</title><style>{CSS}</style></head>
<body>
<header><h1>{_e(sid)}</h1><span>{n_regions:,} suspected region{'s' if n_regions != 1 else ''}</span>
<span>data quality: {flag_summary}</span></header>
<main>
{summary_html(run, card, call, n_regions)}
<section id="overview-section"><h2>Overview</h2><div class="ovw"><img id="overview" alt="overview of {_e(sid)} with score overlay and regions"
 data-scalebar-um="{bar.get('um', '') if bar else ''}" data-scalebar-px="{bar.get('px', '') if bar else ''}"
 data-scalebar-row="{bar.get('row', '') if bar else ''}" src="{im.data_uri(overview, quality=90)}"><div><p class="legend">overlay: {legend}<br>
 <span style="background:rgb{im.OUTLINE_RGB}"></span> area at or above threshold; numbered boxes: the top regions by rank{scale}</p></div></div></section>
{review_section(region_html, gallery or [], features or [], n_regions, sid, note)}
<section id="quality"><h2>Data quality</h2><p>{flag_summary}</p><table class="flags"><tr><th>check</th><th>value</th>
<th>threshold</th><th>status</th><th>detail</th></tr>{flag_rows}</table></section>
<section id="files"><h2>Files</h2>{_links(links)}{_folders(folders, where)}</section>
<details id="technical"><summary>Technical details (decision record, thresholds, calibration, model, run)</summary>
<section id="decision"><h2>Decision record</h2>{_kv(call_rows)}</section>
<section id="context"><h2>Context</h2>{context}</section></details>
<footer class="muted" style="padding:0 24px 24px">Generated by slidescore {_e(run.slidescore_version)} on
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Self-contained: no network access needed.</footer>
</main></body></html>
"""


def _links(links: list[tuple[str, str]]) -> str:
    """Links to files (relative to the page): a link resolves on a local disk and on an object store alike only
    when it names an object, never a folder (a prefix), so folders go through :func:`_folders`."""
    return "<ul class='files'>" + "".join(f"<li><a href='{_e(href)}'>{_e(text)}</a></li>" for href, text in links) + "</ul>"


# every OME-Zarr folder slidescore writes holds these files (slidescore.io.mosaic): linkable as objects
ZARR_FILES = (("OME/METADATA.ome.xml", "OME-XML metadata"), (".zattrs", "Zarr attributes (.zattrs)"))


def _folders(folders: list[tuple[str, str, str]], where: str) -> str:
    """Output folders (OME-Zarr) as copyable paths with how to open them, and links to the files they hold.

    A link to a folder works only on a local disk (an object store, its static website or a presigned
    URL has no object there), so the folder's path is text to copy into napari or QuPath; ``where`` is
    the page's folder as the run wrote it (an absolute path or URL), shown with it when known.
    """
    items = []
    for path, name, what in folders:
        path = path.rstrip("/")
        loc = f" <span class='muted'>written to</span> <code class='path'>{_e(join(where, path))}</code>" if where else ""
        meta = ", ".join(f"<a href='{_e(f'{path}/{f}')}'>{_e(text)}</a>" for f, text in ZARR_FILES)
        items.append(f"<li class='folder'>{_e(name)}: folder <code class='path'>{_e(path)}/</code>{loc}<br>"
                     f"<span class='muted'>{what}; a folder, not a file: copy its path into QuPath (File ▸ Open, Bio-Formats) "
                     f"or napari (<code>slidescore view</code> on the sample's folder, or <code>napari --plugin "
                     f"napari-ome-zarr</code>); other viewers: README, “Open it in …”. Files in it: {meta}</span></li>")
    return "<ul class='folders'>" + "".join(items) + "</ul>"


def _folder_location(run: SampleRecord, image_id: str) -> str:
    """The page's folder as the run wrote it (``output.uri`` of the run's config), if that is absolute (a URL or an
    absolute path); "" otherwise (a relative path names nothing once the report is opened elsewhere)."""
    root = str((run.config.get("output") or {}).get("uri") or "")
    if not root or not ("://" in root or Path(root).is_absolute()):
        return ""
    sid = run.sample_id.removesuffix(f"/{image_id}") if image_id else run.sample_id  # for_image names "<sample>/<image>"
    try:
        return image_dir(root, sid, image_id)
    except ConfigError:  # an id that names no folder (a hand-made record): no location to show
        return ""
