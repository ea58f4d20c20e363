"""``slidescore serve``: the web viewer's tiles over HTTP, and the page in headless Chromium.

A generated smear scored by the built-in model (``scored_batch``) is served on a loopback port from a
thread. Over HTTP: slide tiles are the reader's pixels at 256² (clipped at the edge), overlay tiles
are the class colour with alpha = round(255·p) of the mosaic cell under each pixel (0 where not
scored), and anything else — out-of-range tiles, ``..``, files of the sample folder — is 404. In
Chromium: the page lists the ranked regions, loads slide and overlay tiles, and ``#region=N``
centres the view on region N (read back from the viewer's ``data-view-*`` attributes).
``SLIDESCORE_WRITE_DOC_IMAGES=1`` also writes the screenshot to docs/img/webview.png.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from slidescore.cli import build_parser, cmd_serve, main
from slidescore.core.types import Box
from slidescore.io import mosaic as mz
from slidescore.io import open_image
from slidescore.report.webview import TILE_PX, TileLevel, ViewerServer, colorize, make_server

CHROMIUM = "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed at /usr/bin/chromium (.ci/run installs it)")
DOC_IMAGE = Path(__file__).resolve().parents[2] / "docs" / "img" / "webview.png"


@pytest.fixture(scope="module")
def served(scored_batch) -> Iterator[tuple[ViewerServer, Any]]:
    out, results = scored_batch
    res = results[0]
    server = make_server(out, res.sample_id)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server, res
    finally:
        server.shutdown()
        server.server_close()
        server.sample.close()
        thread.join(10)


def _get(server: ViewerServer, path: str) -> tuple[int, str, bytes]:
    """GET ``path`` exactly as written (http.client sends it unnormalised: ``..`` stays ``..``)."""
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(str(host), port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.getheader("Content-Type") or "", r.read()
    finally:
        conn.close()


def _image(server: ViewerServer, path: str) -> np.ndarray:
    status, ctype, body = _get(server, path)
    assert status == 200, (path, body[:200])
    img = Image.open(io.BytesIO(body))
    assert img.format == ("JPEG" if path.endswith(".jpg") else "PNG") and ctype.startswith("image/")
    return np.asarray(img)


def test_page_info_and_regions(served) -> None:
    server, res = served
    status, ctype, body = _get(server, "/")
    assert status == 200 and ctype.startswith("text/html") and b'src="/webview.js"' in body and b"http" not in body.replace(
        b'xmlns="http://www.w3.org/2000/svg"', b"")  # nothing fetched from elsewhere
    for path in ("/webview.js", "/webview.css"):
        assert _get(server, path)[0] == 200
    info = json.loads(_get(server, "/info.json")[2])
    src = open_image(res.uri)
    try:
        assert (info["height"], info["width"]) == (src.levels[0].height, src.levels[0].width) == (1536, 1536)
        assert [lv["downsample"] for lv in info["levels"][: len(src.levels)]] == [lv.downsample for lv in src.levels]
    finally:
        src.close()
    assert info["levels"][-1]["width"] <= TILE_PX  # virtual levels down to one tile
    attrs = json.loads((Path(res.out_dir) / "probabilities.ome.zarr" / ".zattrs").read_text())
    assert [c["color"].lstrip("#").upper() for c in info["classes"]] == [c["color"] for c in attrs["omero"]["channels"]]
    geo = json.loads(_get(server, "/regions.geojson")[2])
    assert geo == json.loads((Path(res.out_dir) / "regions.geojson").read_text()) and len(geo["features"]) == len(res.regions) >= 3


def test_slide_tiles_are_the_readers_pixels(served) -> None:
    server, res = served
    src = open_image(res.uri)
    try:
        png = _image(server, "/tile/0/1/2.png")  # lossless: exactly the reader's box
        assert png.shape == (TILE_PX, TILE_PX, 3)
        np.testing.assert_array_equal(png, np.asarray(src.read(0, Box(256, 512, 256, 256)))[..., :3])
        jpg = _image(server, "/tile/0/1/2.jpg")
        assert jpg.shape == png.shape and np.abs(jpg.astype(int) - png).mean() < 8
        info = json.loads(_get(server, "/info.json")[2])
        for lv in info["levels"]:
            ny, nx = -(-lv["height"] // TILE_PX), -(-lv["width"] // TILE_PX)
            last = _image(server, f"/tile/{lv['level']}/{ny - 1}/{nx - 1}.jpg")  # clipped at the bottom-right edge
            assert last.shape == (lv["height"] - (ny - 1) * TILE_PX, lv["width"] - (nx - 1) * TILE_PX, 3)
        # a virtual level is the area mean of the coarsest stored one
        coarse = len(src.levels) - 1
        virt = _image(server, f"/tile/{coarse + 1}/0/0.png").astype(float)
        stored = np.asarray(src.read(coarse, Box(0, 0, 2 * virt.shape[0], 2 * virt.shape[1])))[..., :3].astype(float)
        np.testing.assert_allclose(virt, stored.reshape(virt.shape[0], 2, virt.shape[1], 2, 3).mean(axis=(1, 3)), atol=0.51)
    finally:
        src.close()


def _cell_pixel(server: ViewerServer, level: int, cell: tuple[int, int], m: int) -> tuple[str, tuple[int, int]]:
    """The overlay tile and the pixel in it at the centre of mosaic level ``m``'s cell ``cell``."""
    ml = server.sample.mosaic_levels[m]
    ds = server.sample.tile_levels[level].downsample
    py, px = (int(((k + 0.5) * ml.cell_px0 + o) // ds) for k, o in zip(cell, ml.origin_px0, strict=True))
    return f"/overlay/0/{level}/{py // TILE_PX}/{px // TILE_PX}.png", (py % TILE_PX, px % TILE_PX)


@pytest.mark.parametrize("level", [0, 3])
def test_overlay_is_the_class_colour_with_alpha_from_p(served, level: int) -> None:
    server, res = served
    ds = server.sample.tile_levels[level].downsample
    m = server.sample.mosaic_level_for(ds)
    assert m == 0  # 8-µm cells of 32 level-0 px: coarser than the pixels of every tile level of this small image
    prob = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", m)[0]
    color = server.sample.colors[0]
    assert "#{:02x}{:02x}{:02x}".format(*color) == json.loads(_get(server, "/info.json")[2])["classes"][0]["color"]
    scored = np.argwhere(~np.isnan(prob))
    ps = prob[tuple(scored.T)]
    order = np.argsort(ps, kind="stable")
    picks = [scored[order[int(q * (len(ps) - 1))]] for q in (0.0, 0.3, 0.6, 0.9, 1.0)]  # low to high p
    alphas = []
    for cell in picks:
        path, (y, x) = _cell_pixel(server, level, tuple(cell), m)
        tile = _image(server, path)
        assert tile.shape[2] == 4
        p = float(prob[tuple(cell)])
        assert tuple(tile[y, x, :3]) == color and tile[y, x, 3] == round(255 * p), (cell, p, tile[y, x])
        alphas.append((p, int(tile[y, x, 3])))
    assert [a for _, a in sorted(alphas)] == sorted(a for _, a in alphas) and alphas[-1][1] > alphas[0][1]
    unscored = np.argwhere(np.isnan(prob))
    assert len(unscored)
    path, (y, x) = _cell_pixel(server, level, tuple(unscored[0]), m)
    assert _image(server, path)[y, x, 3] == 0


def test_overlay_reads_the_mosaic_level_matching_the_zoom(served) -> None:
    server, res = served
    ws = server.sample
    cells = [ml.cell_px0 for ml in ws.mosaic_levels]
    assert cells == [32.0, 64.0]  # stride 16 · level downsample 2 · 2^m
    assert [ws.mosaic_level_for(d) for d in (1, 8, 32, 63, 64, 1000)] == [0, 0, 0, 0, 1, 1]
    # a tile level of 64 level-0 px per pixel (a larger slide's): pixel (i, j) is mosaic level 1's cell (i, j)
    base = ws.tile_levels[1]
    ws.tile_levels.append(TileLevel(len(ws.tile_levels), 24, 24, 64.0, base.source_level, 32))
    try:
        got = ws.probabilities(0, len(ws.tile_levels) - 1, 0, 0)
        rgba = ws.overlay(0, len(ws.tile_levels) - 1, 0, 0)
    finally:
        ws.tile_levels.pop()
    want = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 1)[0]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(rgba[..., 3], np.rint(np.nan_to_num(want) * 255).astype(np.uint8))


def test_colorize_ramp() -> None:
    p = np.array([[np.nan, 0.0, 0.25, 0.5, 1.0]], np.float32)
    out = colorize(p, (10, 20, 30))
    assert (out[..., :3] == (10, 20, 30)).all()
    assert out[0, :, 3].tolist() == [0, 0, 64, 128, 255]


@pytest.mark.parametrize("path", [
    "/tile/4/0/0.jpg", "/tile/0/6/0.jpg", "/tile/0/0/6.jpg", "/tile/-1/0/0.jpg", "/tile/0/0/0.gif", "/tile/0/0/0",
    "/overlay/1/0/0/0.png", "/overlay/0/0/6/0.png", "/overlay/0/9/0/0.png", "/overlay/0/0/0/0.jpg",
    "/../run.json", "/tile/../../run.json", "/tile/0/../../run.json", "/%2e%2e/run.json", "/..%2frun.json",
    "/run.json", "/regions.json", "/probabilities.ome.zarr/.zattrs", "/webview_static/", "/webview_static/index.html",
    "/static/", "//etc/passwd", "/tile/0/0/", "/info.json/..",
])
def test_unknown_out_of_range_and_traversal_paths_are_404(served, path: str) -> None:
    status, _, body = _get(served[0], path)
    assert status == 404, (path, body[:200])


def test_cli_serve_arguments(tmp_path: Path, capsys) -> None:
    args = build_parser().parse_args(["serve", str(tmp_path), "--sample", "s1"])
    assert args.func is cmd_serve and (args.host, args.port, args.sample) == ("127.0.0.1", 0, "s1")
    assert main(["serve", str(tmp_path)]) == 2  # no sample output there
    assert "no sample output found" in capsys.readouterr().err


# -- headless Chromium ---------------------------------------------------------------------------------


def _chromium(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
           "--hide-scrollbars", "--force-device-scale-factor=1", "--window-size=1200,800", "--virtual-time-budget=5000",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True)


def _viewer_attrs(dom: str) -> dict[str, str]:
    m = re.search(r'<div id="viewer"([^>]*)>', dom)
    assert m, dom[-2000:]
    return dict(re.findall(r'([\w-]+)="([^"]*)"', m.group(1)))


@needs_chromium
def test_page_in_chromium_lists_regions_loads_tiles_and_screenshot(served, tmp_path: Path) -> None:
    server, res = served
    dom = _chromium(server.url, tmp_path, "--dump-dom").stdout
    attrs = _viewer_attrs(dom)
    assert attrs.get("data-ready") == "1" and "data-error" not in attrs, attrs
    ranks = [int(r) for r in re.findall(r'<li data-rank="(\d+)" class="region', dom)]
    assert ranks == [r.rank for r in res.regions] == list(range(1, len(res.regions) + 1))
    assert f"#1 {res.regions[0].class_name}" in dom
    tiles = re.findall(r'<img[^>]*class="tile[^"]*"[^>]*>', dom)
    overlays = re.findall(r'<img[^>]*class="overlay-tile"[^>]*>', dom)
    assert tiles and overlays and all('data-loaded="1"' in t for t in tiles + overlays), (tiles[:3], overlays[:3])
    assert dom.count("<path ") == len(res.regions)  # one outline per region
    shot = tmp_path / "webview.png"
    _chromium(server.url, tmp_path, f"--screenshot={shot}")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert img.shape == (800, 1200, 3)
    view = img[:, 300:]  # right of the 300-px side bar
    blank = (np.abs(view - (232, 232, 232)).sum(-1) < 6).mean()
    assert blank < 0.6, blank  # the slide fills most of the viewer
    color = np.array(server.sample.colors[0])
    assert (np.abs(view - color).sum(-1) < 40).sum() > 200  # region outlines (and the overlay at p ≈ 1) in the class colour
    if os.environ.get("SLIDESCORE_WRITE_DOC_IMAGES"):
        DOC_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, DOC_IMAGE)


@needs_chromium
@pytest.mark.parametrize("rank", [3])
def test_region_hash_centres_the_view_on_the_region(served, tmp_path: Path, rank: int) -> None:
    server, res = served
    region = next(r for r in res.regions if r.rank == rank)
    y, x, h, w = region.bbox_px
    dom = _chromium(f"{server.url}#region={rank}", tmp_path, "--dump-dom").stdout
    attrs = _viewer_attrs(dom)
    assert attrs.get("data-region") == str(rank)
    assert float(attrs["data-view-x"]) == pytest.approx(x + w / 2, abs=0.01)
    assert float(attrs["data-view-y"]) == pytest.approx(y + h / 2, abs=0.01)
    assert float(attrs["data-view-zoom"]) > float(_viewer_attrs(_chromium(server.url, tmp_path, "--dump-dom").stdout)["data-view-zoom"])
    assert re.search(rf'<li data-rank="{rank}" class="region selected"', dom)
    # the screenshot: the selected outline (yellow) is drawn around the viewer's centre
    shot = tmp_path / "region.png"
    _chromium(f"{server.url}#region={rank}", tmp_path, f"--screenshot={shot}")
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    yellow = np.abs(img - (255, 212, 0)).sum(-1) < 40
    ys, xs = np.nonzero(yellow)
    assert len(ys) > 200
    assert abs((xs.min() + xs.max()) / 2 - (300 + 900 / 2)) < 10 and abs((ys.min() + ys.max()) / 2 - 400) < 10
