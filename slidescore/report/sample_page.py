"""``report.html`` of a sample of several images: the call, its images, and regions ranked across them.

The images of such a sample (fields of one smear) each get their own page
(``images/<image_id>/report.html``, :func:`~slidescore.report.html.write_report`); this page sits
at the sample's folder and brings them together: the sample-level call, every image (overview
thumbnail, regions, top score, raised quality flags, a link to its page) and the top regions
ranked across the images, each naming its image and linking to the region on that image's page.
The region pictures (crops, overlays, Grad-CAM) are the image pages' own, handed over through
:class:`~slidescore.report.html.SampleParts`: nothing is read, rendered or explained twice.
Every link is relative, so the page works in a local folder and from an object store alike.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from slidescore.config import ReportConfig
from slidescore.core.regions import Region
from slidescore.io.outputs import write_text
from slidescore.report import images as im
from slidescore.report.html import REPORT, SampleParts, _links
from slidescore.report.markup import CSS, _e, _flatten, _kv, _num
from slidescore.report.review import review_section
from slidescore.report.summary import call_of, summary_html
from slidescore.stages.records import SampleRecord, SampleReport


# Long by its markup, not its logic: a page template, one f-string document.
def write_sample_report(out_dir: str | Path, run: SampleRecord | Mapping[str, Any], regions: list[Region], parts: SampleParts,
                        card: Any, *, cfg: ReportConfig | None = None, image_folder: str = "images") -> SampleReport:
    """Write the ``report.html`` of a multi-image sample, after :func:`write_report` ran for each image.

    The page shows the sample-level call, every image (overview thumbnail, regions, top score,
    raised quality flags, a link to its own report), and the top ``cfg.top_k`` regions ranked
    across the images, each saying which image it lies on and linking to it there. Every link is
    relative (``images/<image_id>/report.html``), so the page works in a local folder and from an
    object store alike. Returns the sample-level ``report`` of the run record (its ``images``, each
    image page's own entry, are the caller's to add). ``run`` may be a run.json's dict.
    """
    t0 = time.perf_counter()
    cfg = cfg or ReportConfig()
    run = SampleRecord.of(run)
    sid = run.sample_id
    call, numbers = call_of(run)
    by_uri = {img.uri: img.image_id for img in parts.images}
    top = regions[: cfg.top_k]
    top_peak = float(regions[0].peak_probability) if regions else None

    def image_href(image_id: str, anchor: str = "") -> str:
        return f"{image_folder}/{image_id}/{REPORT}{anchor}"

    blocks, missing = [], []
    for r in top:
        iid = by_uri.get(r.image, "")
        link = f"<a class='image-link' href='{_e(image_href(iid, f'#region-{r.rank}'))}'>{_e(iid)}</a>" if iid else _e(r.image)
        view = parts.views.get(r.rank)
        if view is None:  # cannot happen when each image's report shows its own top_k; said, not hidden
            missing.append(r.rank)
            blocks.append(f"<div class='region' id='region-{r.rank}' data-image='{_e(iid)}'><div class='rank'>#{r.rank}</div>"
                          f"{_kv([('image', link), ('peak probability', _num(r.peak_probability))])}</div>")
        else:
            blocks.append(view.html(link))
    raised = sorted({f for img in parts.images for f in img.raised})
    flag_summary = (f"<b>{len(raised)} raised:</b> " + _e(", ".join(raised))) if raised else "no check raised"
    call_rows = [(k, _num(v)) for k, v in _flatten(numbers)] if numbers else \
        [("status", "not computed: this run has no sample-level decision (run.json has no <code>decision</code>)")]
    image_rows = "".join(
        f"<tr class='image' data-image='{_e(img.image_id)}'><td><a href='{_e(image_href(img.image_id))}'>"
        f"<img class='thumb' alt='overview of image {_e(img.image_id)}' src='{im.data_uri(img.thumb)}'></a></td>"
        f"<td><a class='image-report' href='{_e(image_href(img.image_id))}'>{_e(img.image_id)}</a><br>"
        f"<span class='muted'>{_e(img.uri)}</span></td><td>{_num(img.n_regions)}</td><td>{_num(img.top)}</td>"
        f"<td>{_e(', '.join(img.raised) or '—')}</td></tr>"
        for img in parts.images
    )
    pt, area, model = run.patches, run.area, run.model
    dcfg = run.config.get("decision") or {}  # the config's serialisation (typed in slidescore.config)
    op = (run.decision.operating_point if run.decision else None) or dcfg.get("operating_point") or "card thresholds"
    context = _kv([
        ("model", f"{_e(card.name)} v{_e(card.version)} <span class='muted'>({_e(model.source)}, sha256 "
                  f"{_e(model.sha256[:12])}…)</span>"),
        ("operating point", _e(op)),
        ("thresholds", _e(", ".join(f"{k} ≥ {v:g}" for k, v in run.thresholds.items()))),
        ("images", f"{len(parts.images)}"),
        ("patches", f"{_num(pt.scored)} scored, {_num(pt.skipped_background)} skipped as background "
                    f"of {_num(pt.total)}"),
        ("area discarded", f"{area.discarded_fraction:.1%} of the images not scored (background)"),
        ("regions", f"{len(regions):,} written, ranked across the images; top {len(top)} shown below"),
    ])
    note = f"<p class='muted'>Explanations: {_e('; '.join(parts.cam_notes))}</p>" if parts.cam_notes else ""
    ranks = sorted(parts.tiles)
    review = review_section(blocks, [parts.tiles[k] for k in ranks], [parts.features[k] for k in ranks if k in parts.features],
                            len(regions), sid, note, title="Regions to review, ranked across the images")
    links = [("regions.json", "regions of all images (JSON)"), ("regions.csv", "regions of all images (CSV)"),
             ("regions.geojson", "regions of all images (GeoJSON; each feature names its image)"), ("run.json", "run record (run.json)")]
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>slidescore report — {_e(sid)}</title><style>{CSS}</style></head>
<body>
<header><h1>{_e(sid)}</h1><span>{len(regions):,} suspected region{'s' if len(regions) != 1 else ''} in {len(parts.images)} image{'s' if len(parts.images) != 1 else ''}</span>
<span>data quality: {flag_summary}</span></header>
<main>
{summary_html(run, card, call, len(regions))}
<section id="images"><h2>Images</h2><table><tr><th>overview</th><th>image (its own report)</th><th>regions</th>
<th>highest region probability</th><th>quality flags raised</th></tr>{image_rows}</table></section>
{review}
<section id="files"><h2>Files</h2>{_links(links)}</section>
<details id="technical"><summary>Technical details (decision record, thresholds, calibration, model, run)</summary>
<section id="decision"><h2>Decision record</h2>{_kv(call_rows)}</section>
<section id="context"><h2>Context</h2>{context}<p>highest region probability <b id="top-score">{_num(top_peak)}</b></p></section></details>
<footer class="muted" style="padding:0 24px 24px">Generated by slidescore {_e(run.slidescore_version)} on
{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. Self-contained: no network access needed.</footer>
</main></body></html>
"""
    write_text(Path(out_dir) / REPORT, text)
    return SampleReport(html=REPORT, top_k=len(top), top_peak_probability=top_peak, call=call,
                        image_pages=[image_href(img.image_id) for img in parts.images], regions_without_crops=missing,
                        seconds=round(time.perf_counter() - t0, 3))
