"""Every link of the report pages names a file the run wrote, so it resolves wherever the output is browsed.

A link to a folder (``probabilities.ome.zarr/``) works on a local disk only: on an object store, its
static website or a presigned URL there is no object at a prefix. The pages link files (GeoJSON,
CSV, run.json, the OME-Zarr metadata files, other pages) and show the OME-Zarr folders as paths to
copy into napari or QuPath. Checked on one-image samples (``scored_batch``), a sample of several
images, their ``index.html``, locally and on S3.
"""

from __future__ import annotations

import posixpath
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from slidescore.config import JobConfig, SampleSpec
from slidescore.offline.demo import generate_smear
from slidescore.run.local import score_samples
from slidescore.stages.layout import MASK, MOSAIC


class _Hrefs(HTMLParser):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.hrefs: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for k, v in attrs:
            if k == "href" or (k == "src" and v and not v.startswith("data:")):
                self.hrefs.append(str(v))


def _relative_path(href: str) -> str:
    """The path of a relative link (asserted relative: no scheme, host or leading slash); "" for an anchor."""
    u = urlsplit(href)
    assert not u.scheme and not u.netloc and not u.path.startswith("/"), f"not a relative link: {href!r}"
    path = unquote(u.path)
    assert not path or not path.endswith("/"), f"a link to a folder: {href!r}"
    return path


def _check_local(page: Path, root: Path) -> list[Path]:
    """Every link of ``page`` names a regular file inside ``root``; the files."""
    targets = []
    for href in _Hrefs(page.read_text()).hrefs:
        path = _relative_path(href)
        if not path:
            continue
        target = (page.parent / path).resolve()
        assert target.is_relative_to(root.resolve()), f"{page}: {href!r} points outside the output ({target})"
        assert target.is_file(), f"{page}: {href!r} → {target} is {'a folder' if target.is_dir() else 'missing'}"
        targets.append(target)
    return targets


def _pages(root: Path) -> list[Path]:
    return sorted(root.rglob("*.html"))


def _folders_shown(page_text: str) -> list[tuple[str, str]]:
    """(folder, written-to location) of every OME-Zarr folder a page shows as text."""
    return re.findall(r"folder <code class='path'>([^<]+)/</code>(?: <span class='muted'>written to</span> "
                      r"<code class='path'>([^<]+)</code>)?", page_text)


def test_every_link_of_the_reports_and_the_index_names_a_file_of_the_run(scored_batch) -> None:
    out, results = scored_batch
    pages = _pages(out)
    assert out / "index.html" in pages and all(Path(r.out_dir) / "report.html" in pages for r in results)
    index_targets = _check_local(out / "index.html", out)
    assert {Path(r.out_dir).resolve() / "report.html" for r in results} <= set(index_targets)
    for res in results:
        sample = Path(res.out_dir)
        page = sample / "report.html"
        targets = set(_check_local(page, out))
        for name in ("regions.geojson", "regions.csv", "run.json", "tiles.geojson"):
            assert sample.resolve() / name in targets
        for folder in (MOSAIC, MASK):  # the folders: their metadata files linked, their paths shown as text
            assert sample.resolve() / folder / "OME" / "METADATA.ome.xml" in targets
            assert sample.resolve() / folder / ".zattrs" in targets
        text = page.read_text()
        shown = dict(_folders_shown(text))
        assert set(shown) == {MOSAIC, MASK}, shown
        for folder, where in shown.items():  # the location it was written to: the folder itself
            assert Path(where) == sample / folder and Path(where).is_dir()
        assert "napari" in text and "QuPath" in text


def _multi_cfg(out: str) -> JobConfig:
    return JobConfig.from_dict({"output": {"uri": out}, "tiling": {"chunk_cells": 16}, "report": {"top_k": 3}})


@pytest.fixture(scope="module")
def fields(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("fields")
    paths = []
    for seed in (21, 22):
        tif = d / f"field{seed}.tif"
        generate_smear(tif, 512, seed, progress=False)
        paths.append(str(tif))
    return paths[0], paths[1]


def test_every_link_of_a_multi_image_sample_names_a_file(fields: tuple[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    f1, f2 = fields
    results = score_samples([SampleSpec("smear", (f1, f2)), f2], _multi_cfg(str(out)), str(out))
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    pages = _pages(out)
    sample = out / "smear"
    assert {out / "index.html", sample / "report.html", out / "field22" / "report.html",
            sample / "images" / "field21" / "report.html", sample / "images" / "field22" / "report.html"} <= set(pages)
    for page in pages:
        _check_local(page, out)
    for image_id in ("field21", "field22"):  # an image's page: its own mosaic's files, the sample's page, tables and record
        page = sample / "images" / image_id / "report.html"
        targets = set(_check_local(page, out))
        assert {sample.resolve() / n for n in ("report.html", "regions.csv", "run.json")} <= targets
        assert sample.resolve() / "images" / image_id / MOSAIC / "OME" / "METADATA.ome.xml" in targets
        shown = dict(_folders_shown(page.read_text()))
        assert Path(shown[MOSAIC]) == sample / "images" / image_id / MOSAIC and Path(shown[MOSAIC]).is_dir()


@pytest.mark.s3
def test_on_s3_every_link_names_an_object(fields: tuple[str, str], tmp_path: Path, s3fs_client) -> None:
    bucket = f"links-{tmp_path.name[-6:].lower().replace('_', '-')}"
    s3fs_client.mkdir(bucket)
    root = f"{bucket}/run"
    f1, f2 = fields
    results = score_samples([SampleSpec("smear", (f1, f2)), f2], _multi_cfg(f"s3://{root}"), f"s3://{root}")
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    s3fs_client.invalidate_cache()
    pages = sorted(k for k in s3fs_client.find(root) if k.endswith(".html"))
    assert f"{root}/index.html" in pages and f"{root}/smear/images/field21/report.html" in pages and len(pages) == 5
    folders = 0
    for key in pages:
        text = s3fs_client.cat(key).decode()
        for href in _Hrefs(text).hrefs:
            path = _relative_path(href)
            if not path:
                continue
            target = posixpath.normpath(posixpath.join(posixpath.dirname(key), path))
            assert target.startswith(f"{root}/"), (key, href, target)
            # an object, not a prefix: what a static website or a presigned GET of this key returns
            assert s3fs_client.isfile(target), f"{key}: {href!r} → s3://{target} is not an object"
        for folder, where in _folders_shown(text):
            folders += 1
            assert where.startswith(f"s3://{root}/") and where.endswith(f"/{folder}")
            assert s3fs_client.isdir(where) and not s3fs_client.isfile(where)  # a prefix: shown as text, never linked
    assert folders == 2 * 3  # mosaic and mask of each image page (the sample page of several images shows none)
