"""The page of a multi-image sample, index.html on S3, and Grad-CAM with the scoring model handed in."""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from torch import nn

from slidescore.config import JobConfig, SampleSpec
from slidescore.core.regions import Region
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.model.card import ModelCard
from slidescore.model.scoring import PatchClassifier
from slidescore.report import write_report
from slidescore.run.local import score_samples
from slidescore.stages.layout import MOSAIC
from tests.conftest import textured_image, write_tiff

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Page(HTMLParser):
    """The links, element ids and region blocks of one page."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.ids: set[str] = set()
        self.regions: list[tuple[int, str]] = []  # (rank, data-image) in page order
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(str(a["id"]))
        if tag == "a" and a.get("href"):
            self.hrefs.append(str(a["href"]))
        if tag == "div" and a.get("class") == "region":
            self.regions.append((int(str(a["id"]).split("-")[1]), str(a.get("data-image", ""))))


def _split(href: str) -> tuple[str, str]:
    u = urlsplit(href)
    assert not u.scheme and not u.netloc, f"not a relative link: {href}"
    return unquote(u.path), u.fragment


def _check_local_links(page: Path) -> list[Path]:
    """Every link of a local page resolves to an existing file or folder (and its #anchor to an element there)."""
    targets = []
    for href in _Page(page.read_text()).hrefs:
        path, frag = _split(href)
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page}: link {href!r} → {target} does not exist"
        if frag:
            assert frag in _Page(target.read_text()).ids, f"{page}: link {href!r} names no element of {target}"
        targets.append(target)
    return targets


def _fields(d: Path) -> tuple[str, str]:
    f1 = write_tiff(d / "field1.tif", textured_image(300, 280, seed=11, fg_box=(40, 30, 220, 200)), mpp=0.5)
    f2 = write_tiff(d / "field2.tif", textured_image(260, 300, seed=12, fg_box=(20, 60, 200, 200)), mpp=0.5)
    return str(f1), str(f2)


def _cfg(out: str, **report: object) -> JobConfig:
    return JobConfig.from_dict({"output": {"uri": out}, "mask": {"min_foreground_frac": 0.05}, "tiling": {"chunk_cells": 8},
                                "regions": {"thresholds": [0.45]}, "report": {"top_k": 6, **report}})


@pytest.fixture(scope="module")
def multi(tmp_path_factory: pytest.TempPathFactory, random_model_dir: Path) -> tuple[Path, dict]:
    d = tmp_path_factory.mktemp("multi")
    f1, f2 = _fields(d)
    out = d / "out"
    (res,) = score_samples([SampleSpec("smear-1", (f1, f2))], _cfg(str(out)), str(out), model=load_model(str(random_model_dir)))
    assert res.status == "ok", res.error
    return out / "smear-1", {"uris": (f1, f2), "result": res}


def test_multi_image_sample_page_ranks_regions_across_images(multi) -> None:
    sample, info = multi
    page = sample / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text and text.count("<script>") == 1  # offline, its own script only
    doc = json.loads((sample / "regions.json").read_text())
    iid = {img["uri"]: img["image_id"] for img in doc["images"]}
    top = doc["regions"][:6]
    # the same regions, in the same (sample-wide) order, each on the image regions.json says
    parsed = _Page(text)
    assert parsed.regions == [(r["rank"], iid[r["image"]]) for r in top]
    assert {img for _, img in parsed.regions} == {"field1", "field2"}  # regions of both images on one page
    for r in top:  # every crop says which image it lies on and links to the region on that image's page
        block = re.search(rf"<div class='region' id='region-{r['rank']}'.*?</table></div>", text, re.S)
        assert block, r["rank"]
        href = f"images/{iid[r['image']]}/report.html#region-{r['rank']}"
        assert f"href='{href}'" in block.group(0) and block.group(0).count("class='crop'") == 1
        assert "class='explanation'" in block.group(0)
    # the image pages show the same regions under the same ranks
    for image_id in ("field1", "field2"):
        ranks = [rank for rank, img in _Page((sample / "images" / image_id / "report.html").read_text()).regions]
        assert ranks and set(ranks) >= {r["rank"] for r in top if iid[r["image"]] == image_id}
    # every link of the sample page and of the image pages resolves to an existing file (anchors included)
    targets = _check_local_links(page)
    assert {sample / "images" / i / "report.html" for i in ("field1", "field2")} <= set(targets)
    assert {sample / n for n in ("regions.json", "regions.csv", "regions.geojson", "run.json")} <= set(targets)
    for image_id in ("field1", "field2"):
        back = _check_local_links(sample / "images" / image_id / "report.html")
        assert page in back and sample / "images" / image_id / MOSAIC / "OME" / "METADATA.ome.xml" in back
    # run.json names the sample page; the index at the output root links to it
    run = json.loads((sample / "run.json").read_text())
    assert run["outputs"]["report"] == "report.html" and run["report"]["html"] == "report.html"
    assert [r["image_id"] for r in run["report"]["images"]] == ["field1", "field2"]
    assert run["report"]["top_peak_probability"] == pytest.approx(doc["regions"][0]["peak_probability"])
    assert "href='smear-1/report.html'" in (sample.parent / "index.html").read_text()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_multi_image_sample_page_renders_in_chromium(multi) -> None:
    sample, _ = multi
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
           "--window-size=1400,1000", "--dump-dom", (sample / "report.html").as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    assert re.search(r'<span id="call"[^>]*>(positive|negative|needs review)</span>', dom)
    rows = re.findall(r'<tr class="image" data-image="([^"]+)">', dom)
    assert rows == ["field1", "field2"]
    n = len(json.loads((sample / "regions.json").read_text())["regions"][:6])
    assert len(re.findall(r'<img class="thumb"', dom)) == 2 and len(re.findall(r'<img class="crop"', dom)) == n >= 2
    total = len(json.loads((sample / "regions.json").read_text())["regions"])
    assert len(re.findall(r'<img class="gallery-thumb"', dom)) == total  # every region of both images in the gallery
    assert re.search(r'<section id="summary">.*?id="caution"', dom, re.S)


class RecordingNet(nn.Module):
    """The scoring network, counting the forward passes that build a graph (Grad-CAM; scoring runs without grad)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.grad_forwards = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_forwards += 1
        return self.inner(x)


def test_gradcam_uses_the_scoring_model_passed_through(tmp_path: Path, random_model_dir: Path) -> None:
    # the model package is deleted once loaded: the report could not load it again, only use the object
    pkg = tmp_path / "model"
    shutil.copytree(random_model_dir, pkg)
    loaded = load_model(str(pkg), device="cpu")
    shutil.rmtree(pkg)
    net = RecordingNet(loaded.module)
    model = PatchClassifier(net, loaded.card, device="cpu", checksum=loaded.checksum, source=loaded.source)
    f1, _ = _fields(tmp_path)
    out = tmp_path / "out"
    (res,) = score_samples([f1], _cfg(str(out)), str(out), model=model)
    assert res.status == "ok", res.error
    assert net.grad_forwards > 0  # Grad-CAM ran on the object that scored the sample
    run = json.loads((Path(res.out_dir) / "run.json").read_text())
    n = run["report"]["top_k"]
    assert n > 0 and run["report"]["gradcam_model"] == "passed in" and "not computed" not in run["report"]["gradcam"]
    text = (Path(res.out_dir) / "report.html").read_text()
    assert text.count("class='explanation'") == n and "class='guided'" not in text
    # the control: without the object, the report has to load the (now deleted) model and cannot
    before = net.grad_forwards
    reader = open_image(f1)
    try:
        card = ModelCard.from_dict(run["model"]["card"])
        prob = mz.read_level(Path(res.out_dir) / MOSAIC, 0)
        added = write_report(tmp_path / "again", run, list(res.regions), reader, prob, card, cfg=_cfg(str(out)).report)
    finally:
        reader.close()
    assert "could not be loaded again" in added["report"]["gradcam"] and added["report"]["gradcam_model"] == "none"
    assert net.grad_forwards == before


def test_a_model_that_did_not_score_the_sample_is_refused(tmp_path: Path, random_model_dir: Path, constant_model_dir: Path) -> None:
    f1, _ = _fields(tmp_path)
    out = tmp_path / "out"
    (res,) = score_samples([f1], _cfg(str(out), gradcam=False), str(out), model=load_model(str(random_model_dir)))
    other = load_model(str(constant_model_dir), device="cpu")
    reader = open_image(f1)
    try:
        run = res.run
        regions: list[Region] = list(res.regions)
        added = write_report(tmp_path / "again", run, regions, reader, mz.read_level(Path(res.out_dir) / MOSAIC, 0),
                             other.card, cfg=_cfg(str(out)).report, model=other)
    finally:
        reader.close()
    assert "not the scoring model" in added["report"]["gradcam"]
    assert "class='explanation'" not in (tmp_path / "again" / "report.html").read_text()


@pytest.mark.s3
def test_index_and_sample_pages_on_s3_link_to_existing_objects(tmp_path: Path, s3fs_client, random_model_dir: Path) -> None:
    bucket = f"out-{os.getpid()}-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(bucket)
    f1, f2 = _fields(tmp_path)
    out_uri = f"s3://{bucket}/run"
    samples = [SampleSpec("smear", (f1, f2)), f2, str(tmp_path / "nope.tif")]
    results = score_samples(samples, _cfg(out_uri, gradcam=False), out_uri, model=load_model(str(random_model_dir)))
    assert [r.status for r in results] == ["ok", "ok", "failed"]
    assert not (tmp_path / "run").exists() and not Path("run").exists()  # nothing written locally

    def check_links(key: str) -> list[str]:
        """Every link of the page at ``key`` resolves to an existing object or prefix; the resolved keys."""
        text = s3fs_client.cat(key).decode()
        keys = []
        for href in _Page(text).hrefs:
            path, frag = _split(href)
            target = posixpath.normpath(posixpath.join(posixpath.dirname(key), path)) if path else key
            assert target.startswith(f"{bucket}/run/"), (href, target)
            assert s3fs_client.exists(target), f"{key}: link {href!r} → s3://{target} does not exist"
            if frag:
                assert frag in _Page(s3fs_client.cat(target).decode()).ids, (key, href)
            keys.append(target)
        return keys

    s3fs_client.invalidate_cache()
    index = f"{bucket}/run/index.html"
    assert s3fs_client.exists(index)
    text = s3fs_client.cat(index).decode()
    rows = dict(re.findall(r"<tr class='sample' data-sample='([^']+)'>.*?<td>(ok|failed|incomplete) ", text, re.S))
    assert rows == {"smear": "ok", "field2": "ok", "nope": "failed"}
    assert sorted(check_links(index)) == [f"{bucket}/run/field2/report.html", f"{bucket}/run/smear/report.html"]
    sample_targets = check_links(f"{bucket}/run/smear/report.html")
    assert {f"{bucket}/run/smear/images/{i}/report.html" for i in ("field1", "field2")} <= set(sample_targets)
    for image_id in ("field1", "field2"):
        back = check_links(f"{bucket}/run/smear/images/{image_id}/report.html")
        assert f"{bucket}/run/smear/report.html" in back and f"{bucket}/run/smear/images/{image_id}/{MOSAIC}/OME/METADATA.ome.xml" in back
    check_links(f"{bucket}/run/field2/report.html")
