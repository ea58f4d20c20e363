"""Reviewing regions on a static page: enlarged crops, a gallery of every region, accept / reject marks.

The marks live in the page (``localStorage``) and export as CSV and as QuPath GeoJSON from a few
lines of JavaScript (:data:`REVIEW_JS`), so a report needs no server.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from slidescore.config import ReportConfig
from slidescore.core.regions import Region, regions_geojson
from slidescore.core.types import Box
from slidescore.io import SlideReader
from slidescore.report import images as im
from slidescore.report.markup import _e, _kv
from slidescore.stages.records import RegionCrop

GALLERY_MAX = 500  # regions with a thumbnail on a page (the rest are in regions.csv / .geojson)


GALLERY_PX = 96  # long side of a gallery thumbnail


@dataclass(frozen=True)
class RegionView:
    """One region's pictures and measurements, rendered once; shown on its image's page and its sample's page."""

    rank: int
    figures: str  # the <figure> elements (inline pictures)
    rows: list[tuple[str, str]]  # measurements (name, HTML value)
    crop: RegionCrop  # what run.json records of the region's pictures
    image_id: str = ""

    def html(self, image_html: str = "") -> str:
        """The region's block; ``image_html`` (a label or a link) names its image on a multi-image page."""
        rows = ([("image", image_html)] if image_html else []) + self.rows
        return (f"<div class='region' id='region-{self.rank}' data-image='{_e(self.image_id)}'><div class='rank'>#{self.rank}"
                f"{review_buttons(self.rank)}</div>{self.figures}{_kv(rows)}</div>")


def magnification(box: Box) -> int:
    """How many times a region's level-0 crop is enlarged: 3× up to 256 px a side, else 2× (chromatin dots of a
    few level-0 pixels become visible)."""
    return 3 if max(box.h, box.w) <= 256 else 2


def review_buttons(rank: int) -> str:
    """Accept / reject marks of one region (the page's script keeps them and exports them)."""
    return (f"<span class='review' data-review-rank='{rank}' data-mark=''>"
            f"<button type='button' class='accept' data-rank='{rank}' data-set='accepted' title='accept region {rank}'>✓</button>"
            f"<button type='button' class='reject' data-rank='{rank}' data-set='rejected' title='reject region {rank}'>✗</button></span>")


def gallery_tile(reader: SlideReader, r: Region, cfg: ReportConfig, image_id: str = "", href: str = "") -> str:
    """A small thumbnail of one region (at most GALLERY_PX a side, peak marked) with its accept / reject marks."""
    lv0 = reader.levels[0]
    box = im.crop_box(r, (lv0.height, lv0.width), min_px=min(cfg.crop_px, 128), max_px=cfg.max_crop_px)
    crop = im.to_rgb(np.asarray(reader.read(0, box)))
    shape = _fit(crop.shape[:2], GALLERY_PX)
    small = im.resize(crop, shape)
    fy, fx = shape[0] / crop.shape[0], shape[1] / crop.shape[1]
    small = im.peak_marker(small, ((r.peak_px[0] - box.y) * fy, (r.peak_px[1] - box.x) * fx), radius=7)
    label = f"#{r.rank}" if not href else f"<a href='{_e(href)}'>#{r.rank}</a>"
    return (f"<figure class='tile' id='tile-{r.rank}' data-rank='{r.rank}' data-image='{_e(image_id)}'>"
            f"<img class='gallery-thumb' alt='region {r.rank}' decoding='async' src='{im.data_uri(small, quality=75)}'>"
            f"<figcaption>{label} <span class='muted'>{r.peak_probability:.2f}</span>{review_buttons(r.rank)}</figcaption></figure>")


def _round_coords(v: Any) -> Any:
    if isinstance(v, list | tuple):
        return [_round_coords(x) for x in v]
    if isinstance(v, float | np.floating):
        return round(float(v), 1)
    return v


def review_features(regions: list[Region], card: Any, sample_id: str) -> list[dict[str, Any]]:
    """The regions' QuPath features (their outlines, level-0 px) for the page's GeoJSON export."""
    colors = dict(zip(card.classes, card.class_colors(), strict=True))
    feats = regions_geojson(regions, colors, sample_id)["features"]
    for f, r in zip(feats, regions, strict=True):
        f["geometry"]["coordinates"] = _round_coords(f["geometry"]["coordinates"])
        f["properties"].update({"rank": r.rank, "image": r.image, "class": r.class_name,
                                "centroid_px": [round(float(v), 1) for v in r.centroid_px]})
    return feats


def _fit(shape: tuple[int, ...], max_px: int) -> tuple[int, int]:
    h, w = int(shape[0]), int(shape[1])
    f = min(1.0, max_px / max(h, w, 1))
    return max(1, round(h * f)), max(1, round(w * f))


def review_section(region_html: list[str], gallery: list[str], features: list[dict[str, Any]], n_regions: int,
                   sample_id: str, note: str = "", title: str = "Regions to review") -> str:
    """The top regions large, a gallery of every written region (thumbnails), accept / reject marks and their export."""
    n_top = len(region_html)
    capped = (f"<p class='muted'>Thumbnails of the first {len(gallery):,} of {n_regions:,} regions; the others are in "
              "regions.csv and regions.geojson.</p>") if len(gallery) < n_regions else ""
    data = json.dumps({"sample_id": sample_id, "features": features}, separators=(",", ":")).replace("</", "<\\/")
    top = "".join(region_html) or "<p class='muted'>No region above threshold.</p>"
    return f"""<section id="regions"><h2>{_e(title)}</h2>
<p>Mark each region <b>✓ accept</b> (a parasite) or <b>✗ reject</b> (not one); the marks stay in this page (this browser)
and export as a table or as QuPath annotations. <span id="review-count" class="muted"></span></p>
<p class="export"><button type="button" id="export-csv">Download marks (CSV)</button>
<button type="button" id="export-geojson">Download QuPath annotations (GeoJSON)</button>
<button type="button" id="export-clear">Clear marks</button></p>
<h3>Top {n_top} region{'s' if n_top != 1 else ''}, enlarged</h3>{note}{top}
<h3 id="gallery-title">All {n_regions:,} region{'s' if n_regions != 1 else ''}</h3>{capped}
<div id="gallery" class="gallery">{''.join(gallery)}</div>
<pre id="export-preview" hidden></pre><pre id="export-geojson-preview" hidden></pre>
<script type="application/json" id="review-data">{data}</script>
<script>{REVIEW_JS}</script></section>"""


REVIEW_JS = r"""
(function () {
  var data = JSON.parse(document.getElementById('review-data').textContent);
  var key = 'slidescore-review:' + data.sample_id, marks = {};
  var selftest = location.hash.indexOf('#selftest-export') === 0;
  try { if (!selftest) marks = JSON.parse(localStorage.getItem(key) || '{}'); } catch (e) { marks = {}; }
  function show() {
    document.querySelectorAll('.review').forEach(function (el) { el.dataset.mark = marks[el.dataset.reviewRank] || ''; });
    var a = 0, r = 0; Object.keys(marks).forEach(function (k) { if (marks[k] === 'accepted') a++; else r++; });
    document.getElementById('review-count').textContent = a + ' accepted, ' + r + ' rejected of ' + data.features.length + '.';
    try { localStorage.setItem(key, JSON.stringify(marks)); } catch (e) {}
  }
  function mark(rank, m) { if (marks[rank] === m) delete marks[rank]; else marks[rank] = m; show(); }
  function q(v) { v = String(v); return /[",\n]/.test(v) ? '"' + v.replace(/"/g, '""') + '"' : v; }
  function csv() {
    var rows = [['rank', 'image', 'class', 'peak_probability', 'area_um2', 'centroid_y_px', 'centroid_x_px', 'mark']];
    data.features.forEach(function (f) {
      var p = f.properties, m = p.measurements;
      rows.push([p.rank, p.image, p['class'], m.peak_probability, m.area_um2, p.centroid_px[0], p.centroid_px[1],
                 marks[p.rank] || 'unreviewed']);
    });
    return rows.map(function (r) { return r.map(q).join(','); }).join('\n') + '\n';
  }
  function geojson() {
    var feats = data.features.map(function (f) {
      var g = JSON.parse(JSON.stringify(f)), p = g.properties, m = marks[p.rank] || 'unreviewed';
      p.review = m;
      if (m === 'rejected') p.classification = {name: 'Rejected', color: [128, 128, 128]};
      else if (m === 'unreviewed') p.classification = {name: 'Unreviewed', color: [200, 200, 200]};
      p.name = p['class'] + ' #' + p.rank + ' (' + m + ')';
      return g;
    });
    return {type: 'FeatureCollection', features: feats};
  }
  function download(name, text, type) {
    var a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([text], {type: type})); a.download = name;
    document.body.appendChild(a); a.click(); a.remove();
  }
  document.addEventListener('click', function (ev) {
    var b = ev.target.closest && ev.target.closest('button[data-set]');
    if (b) mark(b.dataset.rank, b.dataset.set);
  });
  document.getElementById('export-csv').onclick = function () { download(data.sample_id.replace(/\W+/g, '_') + '.review.csv', csv(), 'text/csv'); };
  document.getElementById('export-geojson').onclick = function () {
    download(data.sample_id.replace(/\W+/g, '_') + '.review.geojson', JSON.stringify(geojson()), 'application/geo+json');
  };
  document.getElementById('export-clear').onclick = function () { marks = {}; show(); };
  if (selftest) {  // for tests: mark the first region accepted and the second rejected, show what would download
    marks = {};
    if (data.features[0]) marks[data.features[0].properties.rank] = 'accepted';
    if (data.features[1]) marks[data.features[1].properties.rank] = 'rejected';
    document.getElementById('export-preview').textContent = csv();
    document.getElementById('export-geojson-preview').textContent = JSON.stringify(geojson());
  }
  show();
})();
"""
