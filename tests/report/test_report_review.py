"""The report a pathologist reviews with: plain summary first, one class colour, scale bars, enlarged crops,
a gallery of every region, and accept / reject marks exported as CSV and QuPath GeoJSON (issue #8)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.stats import binom

from slidescore.config import ReportConfig
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.model.card import ModelCard
from slidescore.report import write_index, write_report
from slidescore.stages.layout import MOSAIC

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Report(HTMLParser):
    """The parts of a report page the tests read: the first section's text, the text outside <details>, images."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.depth_details = 0
        self.details_seen = False
        self.skip = 0  # inside <script> / <style>
        self.section_depth = 0
        self.sections = 0
        self.first_section: list[str] = []
        self.first_section_before_details = True
        self.visible: list[str] = []
        self.imgs: list[dict[str, str]] = []
        self.classes: dict[str, list[dict[str, str]]] = {}
        self._in: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag in ("script", "style"):
            self.skip += 1
        if tag == "details":
            self.depth_details += 1
            self.details_seen = True
        if tag == "section":
            if self.sections == 0 and self.section_depth == 0:
                self.first_section_before_details = not self.details_seen
            self.section_depth += 1
        if tag == "img":
            self.imgs.append(a)
        for c in a.get("class", "").split():
            self.classes.setdefault(c, []).append(a)
        self._in.append(a.get("class", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self.skip -= 1
        if tag == "details":
            self.depth_details -= 1
        if tag == "section":
            self.section_depth -= 1
            if self.section_depth == 0:
                self.sections += 1

    def handle_data(self, data: str) -> None:
        if self.skip:
            return
        if self.depth_details == 0:
            self.visible.append(data)
        if self.sections == 0 and self.section_depth > 0:
            self.first_section.append(data)


def _img(uri: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(np.float32)


@pytest.fixture(scope="module")
def page(scored_batch, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first generated smear's report, rendered again from the pipeline's record (with its decision) into a folder
    of its own: the other report tests rewrite the batch's pages and run.json (without a decision, a hand-made one)."""
    _, results = scored_batch
    res = results[0]
    d = tmp_path_factory.mktemp("review")
    for name in ("regions.json", "regions.geojson", "regions.csv"):
        shutil.copy(Path(res.out_dir) / name, d / name)
    run = json.loads(json.dumps(res.run))  # the pipeline's record, as finish_sample wrote it
    card = ModelCard.from_dict(run["model"]["card"])
    reader = open_image(res.uri)
    try:
        prob = mz.read_level(Path(res.out_dir) / MOSAIC, 0)
        added = write_report(d, run, list(res.regions), reader, prob, card, cfg=ReportConfig(top_k=6),
                             model=load_model("builtin:smearnet", device="cpu"))
    finally:
        reader.close()
    run.update(added)
    text = (d / "report.html").read_text()
    return {"dir": d, "text": text, "parsed": _Report(text), "run": run, "res": res,
            "regions": json.loads((d / "regions.json").read_text())["regions"], "card": card}


def test_summary_first_with_call_and_caution_and_no_raw_values(page) -> None:
    p: _Report = page["parsed"]
    call = page["run"]["decision"]["sample_call"]["call"].replace("_", " ")
    first = " ".join(" ".join(p.first_section).split())
    assert p.first_section_before_details
    assert call in first.lower(), first
    assert "Demonstration model — not for diagnosis" in first  # the built-in model's card says it is one
    assert "examined fields" in first and "positive from" in first and "sensitivity" in first and "specificity" in first
    visible = " ".join(p.visible)
    for raw in ("None", "False", "True", "per_class.", "nan"):
        assert not re.search(rf"\b{re.escape(raw)}\b" if raw[0].isalpha() else re.escape(raw), visible), raw
    assert "per_class." in page["text"]  # … the technical record is still there, folded
    assert page["text"].index("<details") > page["text"].index("id='caution'")


def _shown(p: _Report, text: str, cls: str) -> tuple[float, float, int]:
    """(data-value, displayed percentage, decimals) of the element with class ``cls`` (first one)."""
    el = p.classes[cls][0]
    m = re.search(rf"class='{cls}' data-value='[^']+'>([0-9.]+)%<", text)
    assert m, cls
    return float(el["data-value"]), float(m.group(1)), len(m.group(1).split(".")[1]) if "." in m.group(1) else 0


def test_sensitivity_and_specificity_are_those_of_the_rule_applied(page) -> None:
    run, p = page["run"], page["parsed"]
    (cls, rec), = run["decision"]["sample_call"]["per_class"].items()
    unit = run["decision"]["unit_figures"][cls]  # the card's validation figures at the operating point
    s, c = unit["sensitivity"], unit["specificity"]
    n = rec["n_examined"]
    alpha = run["config"]["decision"]["call_alpha"]
    m0 = run["config"]["decision"]["min_positive_units"]
    fpr = 1.0 - c
    # the rule applied: positive from the fewest positive fields a negative sample reaches with p <= alpha
    m = next(k for k in range(max(1, m0), n + 2) if k > n or binom.sf(k - 1, n, fpr) <= alpha)
    assert f"positive from {m} suspected" in " ".join(p.first_section)
    sp = binom.cdf(m - 1, n, fpr)
    se = s * binom.sf(m - 2, n - 1, fpr) + (1 - s) * binom.sf(m - 1, n - 1, fpr)  # one infected field among n
    for name, want in (("sample-sensitivity", se), ("sample-specificity", sp)):
        value, shown, decimals = _shown(p, page["text"], name)
        assert value == pytest.approx(want, rel=1e-6, abs=1e-9), name
        assert abs(shown - 100 * want) <= 0.5 * 10**-decimals + 1e-9, (name, shown, want)
    assert f"class='n-examined'>{n:,}<" in page["text"] and f"class='n-positive'>{rec['n_positive']:,}<" in page["text"]


def test_overview_has_a_scale_bar_and_the_class_colour(page) -> None:
    p: _Report = page["parsed"]
    ov = next(i for i in p.imgs if i.get("id") == "overview")
    um, px, row = float(ov["data-scalebar-um"]), float(ov["data-scalebar-px"]), int(float(ov["data-scalebar-row"]))
    assert um in {v * 10**k for v in (1, 2, 5) for k in range(-1, 5)}  # a round number of µm
    pic = _img(ov["src"])
    bar = pic[row, 10 : 10 + int(px)]
    assert bar.max() < 90, "the bar's pixel row is dark along its length"
    assert pic[row, 10 + int(px) + 2 :][:1].min() > 200 or 10 + int(px) + 2 >= pic.shape[1]  # white backing after it
    mpp0 = page["run"]["input"]["mpp0"]
    level0_w = max(page["run"]["input"]["level_shape"]) * page["run"]["input"]["level_mpp"] / mpp0
    assert px * (level0_w / pic.shape[1]) * mpp0 == pytest.approx(um, rel=0.05)  # px × µm per overview pixel
    color = tuple(page["card"].class_colors()[0])
    assert f"background:rgb{color}" in page["text"]  # the legend swatch is the card's class colour
    assert "(0, 150, 255)" not in page["text"]


def test_crops_are_enlarged_and_every_region_has_a_thumbnail(page) -> None:
    p: _Report = page["parsed"]
    crops = [i for i in p.imgs if i.get("class") == "crop"]
    assert crops and len(crops) == page["run"]["report"]["top_k"] == min(6, len(page["regions"]))
    for i in crops:
        y, x, h, w = (int(v) for v in i["data-box"].split())
        pic = _img(i["src"])
        assert pic.shape[0] >= 2 * h and pic.shape[1] >= 2 * w, (pic.shape, h, w)
    thumbs = [i for i in p.imgs if i.get("class") == "gallery-thumb"]
    assert len(thumbs) == min(500, len(page["regions"]))
    assert {int(t["data-rank"]) for t in p.classes["tile"]} == {r["rank"] for r in page["regions"][:500]}
    assert all(max(_img(t["src"]).shape[:2]) <= 96 for t in thumbs)


def test_overlay_colour_is_the_class_colour(page) -> None:
    """Where p = 1 the overlay is 0.25 · crop + 0.75 · class colour: unmixed, it is the card's colour (not azure)."""
    p: _Report = page["parsed"]
    color = np.asarray(page["card"].class_colors()[0], np.float32)
    by_rank = {r["rank"]: r for r in page["regions"]}
    crops = [i for i in p.imgs if i.get("class") == "crop"]
    overlays = [i for i in p.imgs if i.get("class") == "overlay"]
    checked = 0
    for crop_el, ov_el in zip(crops, overlays, strict=True):
        rank = int(crop_el["alt"].rsplit(" ", 1)[1])
        r = by_rank[rank]
        if r["peak_probability"] < 0.999:
            continue
        y, x, h, w = (int(v) for v in crop_el["data-box"].split())
        f = int(crop_el["data-magnification"])
        cy, cx = int((r["peak_px"][0] - y) * f), int((r["peak_px"][1] - x) * f)
        a = _img(crop_el["src"])[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
        b = _img(ov_el["src"])[cy - 1 : cy + 2, cx - 1 : cx + 2].reshape(-1, 3).mean(0)
        unmixed = (b - 0.25 * a) / 0.75
        assert np.abs(unmixed - color).max() < 30, (rank, unmixed, color)
        checked += 1
    assert checked >= 1


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_accept_reject_marks_export_csv_and_qupath_geojson(page, tmp_path: Path) -> None:
    html_path = page["dir"] / "report.html"
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=10000", "--window-size=1400,1000",
           "--dump-dom", html_path.as_uri() + "#selftest-export"]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    m = re.search(r'<pre id="export-preview"[^>]*>(.*?)</pre>', dom, re.S)
    assert m and m.group(1).strip(), dom[-2000:]
    rows = [r.split(",") for r in html.unescape(m.group(1)).strip().splitlines()]
    assert rows[0] == ["rank", "image", "class", "peak_probability", "area_um2", "centroid_y_px", "centroid_x_px", "mark"]
    regions = page["regions"][:500]
    assert [int(r[0]) for r in rows[1:]] == [r["rank"] for r in regions]
    marks = [r[-1] for r in rows[1:]]
    assert marks[0] == "accepted" and (len(marks) < 2 or marks[1] == "rejected")
    assert set(marks[2:]) <= {"unreviewed"}
    for row, r in zip(rows[1:], regions, strict=True):
        assert row[2] == r["class_name"] and float(row[3]) == pytest.approx(r["peak_probability"])
    g = re.search(r'<pre id="export-geojson-preview"[^>]*>(.*?)</pre>', dom, re.S)
    assert g
    geo = json.loads(html.unescape(g.group(1)))
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == len(regions)
    f0 = geo["features"][0]
    assert f0["properties"]["review"] == "accepted" and f0["properties"]["classification"]["name"] == regions[0]["class_name"]
    assert f0["properties"]["objectType"] == "annotation" and f0["geometry"]["type"] in ("Polygon", "MultiPolygon")
    if len(regions) > 1:
        assert geo["features"][1]["properties"]["classification"]["name"] == "Rejected"
    # the outlines are the ones regions.geojson (QuPath) holds, rounded to 0.1 px
    written = json.loads((page["dir"] / "regions.geojson").read_text())["features"][0]["geometry"]
    assert np.allclose(np.asarray(written["coordinates"][0], float) if written["type"] == "Polygon" else 0,
                       np.asarray(f0["geometry"]["coordinates"][0], float) if written["type"] == "Polygon" else 0, atol=0.06)


def _run_root(root: Path, results: list) -> Path:
    """An output root with each sample's run.json as the pipeline wrote it (and _SUCCESS)."""
    for r in results:
        (root / r.sample_id).mkdir(parents=True)
        (root / r.sample_id / "run.json").write_text(json.dumps(r.run))
        (root / r.sample_id / "_SUCCESS").write_text("{}")
    write_index(root)
    return root / "index.html"


def test_index_has_date_model_operating_point_and_counts(scored_batch, tmp_path: Path) -> None:
    _, results = scored_batch
    text = _run_root(tmp_path / "all", results).read_text()
    sha = results[0].run["model"]["sha256"][:12]
    assert "slidescore run: 3 samples" in text and re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC", text)
    assert f"smearnet v1 (sha256 {sha}…)" in text and "operating point" in text
    assert "Demonstration model" in text
    for r in results:
        row = re.search(rf"<tr class='sample' data-sample='{re.escape(r.sample_id)}'>(.*?)</tr>", text, re.S)
        assert row and r.run["decision"]["sample_call"]["call"].replace("_", " ") in row.group(1)
        (rec,) = r.run["decision"]["sample_call"]["per_class"].values()
        assert f"<td class='basis'>{rec['n_positive']} of {rec['n_examined']} fields" in row.group(1)
    # one sample: "1 sample", not "1 samples"
    text1 = _run_root(tmp_path / "one", results[:1]).read_text()
    assert "slidescore run: 1 sample<" in text1 and "1 samples" not in text1
