"""The report of generated smears opens in headless Chromium and shows the overview, crops and call."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidescore.config import ReportConfig
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.report import write_index, write_report
from slidescore.stages.records import SampleResult

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")

PROBE = """<script>
window.addEventListener('load', () => {
  const box = e => { const b = e.getBoundingClientRect(); return [b.left + scrollX, b.top + scrollY, b.width, b.height]; };
  const c = document.getElementById('call');
  const out = {height: document.documentElement.scrollHeight,
    imgs: [...document.images].map(i => ({id: i.id, cls: i.className, nw: i.naturalWidth, nh: i.naturalHeight, r: box(i)})),
    call: {text: c.textContent, bg: getComputedStyle(c).backgroundColor, r: box(c)}};
  const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script></body>"""


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
           "--virtual-time-budget=10000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _probe(html_path: Path, tmp_path: Path) -> dict:
    probe = tmp_path / f"probe-{html_path.parent.name}.html"
    probe.write_text(html_path.read_text().replace("</body>", PROBE))
    dom = _chromium("--window-size=1400,1000", "--dump-dom", probe.as_uri()).stdout
    m = re.search(r'<pre id="probe">(.*?)</pre>', dom, re.S)
    assert m, dom[-2000:]
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _report(res: SampleResult, cfg: ReportConfig, model=None, decision: dict | None = None) -> dict:
    out = Path(res.out_dir)
    run = dict(res.run)
    if decision is not None:
        run["decision"] = decision
    elif "sample_call" in run.get("decision", {}):
        run.pop("decision")  # a run without a decision (sample_call off, older runs) renders "not computed"
    reader = open_image(res.uri)
    try:
        prob = mz.read_level(out / "probabilities.ome.zarr", 0)
        from slidescore.model.card import ModelCard

        card = ModelCard.from_dict(run["model"]["card"])
        add = write_report(out, run, res.regions, reader, prob, card, cfg=cfg, model=model)
    finally:
        reader.close()
    run.update(add)
    (out / "run.json").write_text(json.dumps(run))  # what finish_sample does with the returned dict
    return add


@pytest.fixture(scope="module")
def reports(scored_batch, tmp_path_factory) -> tuple[Path, list[SampleResult], list[dict]]:
    out, results = scored_batch
    cfg = ReportConfig(top_k=4)
    model = load_model("builtin:smearnet", device="cpu")
    adds = [_report(results[0], cfg, model),  # without a decision: "not computed"
            _report(results[1], cfg, None, {"call": "positive", "sensitivity": 0.95, "specificity": 0.85, "n_cells": 350}),
            _report(results[2], ReportConfig(top_k=4, gradcam=False))]
    write_index(out)
    return out, results, adds


def _region_px(shot: np.ndarray, r: list[float]) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in r)
    return shot[y + 2 : y + h - 2, x + 2 : x + w - 2, :3].astype(np.float32)


def test_report_renders_overview_crops_and_call_in_chromium(reports, tmp_path: Path) -> None:
    out, results, adds = reports
    html_path = Path(results[0].out_dir) / "report.html"
    text = html_path.read_text()
    assert "http://" not in text and "https://" not in text  # offline: no network
    # the only script is the page's own (accept / reject marks and their export), inline
    assert text.count("<script>") == 1 and "src=" not in "".join(re.findall(r"<script[^>]*>", text))
    probe = _probe(html_path, tmp_path)
    imgs = probe["imgs"]
    assert all(i["nw"] > 0 and i["nh"] > 0 for i in imgs), imgs  # every inline image decoded
    kinds = [i["cls"] or i["id"] for i in imgs]
    n = adds[0]["report"]["top_k"]
    assert n == 4
    assert kinds.count("overview") == 1 and kinds.count("crop") == n and kinds.count("overlay") == n
    assert kinds.count("explanation") == n and "guided" not in kinds and "gradcam" not in kinds
    assert kinds.count("gallery-thumb") == len(results[0].regions[:500])  # every region has a thumbnail
    assert probe["call"]["text"].strip().lower() == "not computed"

    shot_path = tmp_path / "report.png"
    _chromium(f"--window-size=1400,{probe['height']}", f"--screenshot={shot_path}", html_path.as_uri())
    shot = np.asarray(Image.open(shot_path).convert("RGB"))
    assert shot.shape[0] >= probe["height"] - 1
    page_bg = np.array([246, 247, 249], np.float32)
    for i in imgs:  # each picture is painted where the DOM put it, with real content (not blank)
        px = _region_px(shot, i["r"])
        assert px.size and px.std() > 8 and np.abs(px.mean(axis=(0, 1)) - page_bg).max() > 5, (i["cls"], i["id"])
    ov = _region_px(shot, next(i for i in imgs if i["id"] == "overview")["r"])
    # the probability overlay in the card's class colour (the palette's red, (230, 25, 75)), as in napari and QuPath
    red = (ov[..., 0] > 190) & (ov[..., 1] < 110) & (ov[..., 2] > 60) & (ov[..., 2] < 150)
    amber = (ov[..., 0] > 220) & (ov[..., 1] > 170) & (ov[..., 1] < 230) & (ov[..., 2] < 60)  # outlines and boxes
    assert red.mean() > 0.001 and amber.sum() > 50
    badge = _region_px(shot, probe["call"]["r"])
    grey = np.array([0x7F, 0x8C, 0x8D], np.float32)
    assert (np.abs(badge - grey).max(axis=-1) < 12).mean() > 0.5  # the "not computed" badge is painted


def test_a_computed_call_is_shown_with_its_numbers(reports, tmp_path: Path) -> None:
    _, results, _ = reports
    html_path = Path(results[1].out_dir) / "report.html"
    probe = _probe(html_path, tmp_path)
    assert probe["call"]["text"].strip().lower() == "positive"
    assert probe["call"]["bg"] == "rgb(192, 57, 43)"
    text = html_path.read_text()
    assert "specificity" in text and "0.85" in text and "350" in text  # in the technical details
    # without a model at hand the report reloads the scoring model named in run.json
    assert "class='explanation'" in text


def test_run_record_gets_quality_flags_and_report_summary(reports) -> None:
    _, results, adds = reports
    for res in results:
        run = json.loads((Path(res.out_dir) / "run.json").read_text())
        flags = {f["flag"]: f for f in run["quality"]}
        assert set(flags) >= {"blank_fraction", "dark_fraction", "out_of_focus_fraction", "stain_shift", "mpp_overridden"}
        assert all({"flag", "value", "threshold", "message", "raised"} <= set(f) for f in flags.values())
        assert not any(f["raised"] for f in flags.values())  # clean generated smears
        assert run["report"]["html"] == "report.html"
        assert run["report"]["top_peak_probability"] == pytest.approx(res.regions[0].peak_probability)
        tiles = json.loads((Path(res.out_dir) / "tiles.geojson").read_text())
        assert tiles["features"] and all(f["properties"]["objectType"] == "tile" for f in tiles["features"])
    assert "report.gradcam is off" in adds[2]["report"]["gradcam"]


def test_batch_index_lists_every_sample_with_call_and_top_score(reports, tmp_path: Path) -> None:
    out, results, _ = reports
    index = out / "index.html"
    text = index.read_text()
    for res in results:
        assert f"href='{res.sample_id}/report.html'" in text
    dom = _chromium("--window-size=1200,800", "--dump-dom", index.as_uri()).stdout
    rows = re.findall(r'<tr class="sample" data-sample="([^"]+)">(.*?)</tr>', dom, re.S)
    assert [r[0] for r in rows] == sorted(r.sample_id for r in results)
    by_id = {r.sample_id: r for r in results}
    for sid, row in rows:
        top = float(re.search(r'<td class="top">([0-9.]+)</td>', row).group(1))
        assert top == pytest.approx(by_id[sid].regions[0].peak_probability, abs=1e-3)
        assert ("positive" in row) == (sid == results[1].sample_id)


def test_explanations_stop_when_their_budget_is_spent(scored_batch, tmp_path: Path) -> None:
    """A spent budget stops the explanations (a budget of 0 s: none); the report says from which rank on,
    and every region keeps its crop."""
    _, results = scored_batch
    res = results[0]
    model = load_model("builtin:smearnet", device="cpu")
    copy = tmp_path / "s"
    shutil.copytree(res.out_dir, copy)
    add = _report(dataclasses.replace(res, out_dir=str(copy)), ReportConfig(top_k=3, explain_budget_s=0.0), model)
    crops = add["report"]["regions"]
    assert len(crops) == min(3, len(res.regions)) >= 2
    explained = [c for c in crops if c.get("gradcam_peak_px") is not None]
    assert explained == [] and all(len(c["crop_box_px"]) == 4 for c in crops)
    assert "from region 1 on: the explanation budget of 0 s (report.explain_budget_s) was spent" in add["report"]["gradcam"]
    html = (copy / "report.html").read_text()
    assert "report.explain_budget_s" in html
