"""End to end on one machine: TIFF in, OME-Zarr mosaic and regions out; invariants of the output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from slidescore.config import JobConfig
from slidescore.core.tiling import PatchGrid
from slidescore.io import mosaic as mz
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff
from tests.test_blend import full_res_reference


def _cfg(out: Path, **sections: dict) -> JobConfig:
    base = {"output": {"uri": str(out)}, "mask": {"min_foreground_frac": 0.05}}
    for k, v in sections.items():
        base.setdefault(k, {}).update(v)
    return JobConfig.from_dict(base)


@pytest.fixture(scope="module")
def smear_like(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img = textured_image(600, 520, seed=5, fg_box=(90, 60, 380, 300))
    return write_tiff(tmp_path_factory.mktemp("img") / "slide.tif", img, mpp=0.5), img


def test_constant_model_blends_to_constant_everywhere_it_scored(tmp_path: Path, smear_like, constant_model_dir: Path) -> None:
    tif, _ = smear_like
    model = load_model(str(constant_model_dir))
    (res,) = score_samples([str(tif)], _cfg(tmp_path), str(tmp_path), model=model)
    prob = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    scored = ~np.isnan(prob[0])
    assert 0 < scored.mean() < 1  # background cells are marked not scored, not 0
    np.testing.assert_allclose(prob[0][scored], 0.7, atol=1e-6)
    assert res.run["patches"]["scored"] + res.run["patches"]["skipped_background"] == res.run["patches"]["total"]


def test_uniform_blend_equals_bruteforce_full_resolution_mean(tmp_path: Path, smear_like, random_model_dir: Path) -> None:
    tif, img = smear_like
    model = load_model(str(random_model_dir))
    cfg = _cfg(tmp_path, mask={"method": "none"}, tiling={"chunk_cells": 8})
    (res,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    prob = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    # brute force: crop every patch (padded with the card's pad value), score it alone, sum/count per pixel
    grid = PatchGrid(*img.shape[:2], 64, 16)
    py, px = grid.patches_shape
    padded = np.full((img.shape[0] + 128, img.shape[1] + 128, 3), 235, np.uint8)  # 64 px of pad on every side
    padded[64 : 64 + img.shape[0], 64 : 64 + img.shape[1]] = img
    # the centred grid: patch a starts at (a − 3) · 16, before the image for the first three
    crops = np.stack([padded[64 + (a - 3) * 16 : 64 + (a - 3) * 16 + 64, 64 + (b - 3) * 16 : 64 + (b - 3) * 16 + 64]
                      for a in range(py) for b in range(px)])
    with torch.no_grad():
        x = (torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
        scores = torch.sigmoid(model.module(x))[:, 0, 0, 0].numpy().reshape(1, py, px)
    ref = full_res_reference(scores, np.ones((py, px), bool), grid)
    up = np.repeat(np.repeat(prob, 16, axis=1), 16, axis=2)[:, : img.shape[0], : img.shape[1]]
    np.testing.assert_allclose(up, ref, atol=1e-5)


@pytest.mark.parametrize("weights", ["uniform", "gaussian"])
def test_small_blocks_equal_one_block_covering_the_image(tmp_path: Path, smear_like, random_model_dir: Path, weights: str) -> None:
    tif, _ = smear_like
    model = load_model(str(random_model_dir))
    maps = []
    for chunk in (16, 64):  # 16 cells = 256 px blocks; 64 cells covers the whole 600×520 image in one block
        out = tmp_path / f"c{chunk}"
        (res,) = score_samples([str(tif)], _cfg(out, tiling={"chunk_cells": chunk}, blending={"weights": weights}), str(out), model=model)
        assert res.run["blocks"]["total"] == (1 if chunk == 64 else 3 * 3)
        pt = res.run["patches"]
        assert pt["scored"] + pt["skipped_background"] == pt["total"]  # each patch counted by one block
        assert pt["evaluated_with_halo"] >= pt["scored"]
        maps.append(mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0))
    assert np.nanmax(np.abs(maps[0] - maps[1])) <= 1e-6
    assert np.array_equal(np.isnan(maps[0]), np.isnan(maps[1]))


def test_dense_equals_per_patch(tmp_path: Path, smear_like, random_model_dir: Path) -> None:
    tif, _ = smear_like
    model = load_model(str(random_model_dir))
    maps = []
    for mode in ("dense", "per_patch"):
        out = tmp_path / mode
        (res,) = score_samples([str(tif)], _cfg(out, model={"mode": mode, "batch_size": 37}), str(out), model=model)
        maps.append(mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0))
    assert np.nanmax(np.abs(maps[0] - maps[1])) <= 1e-5


def test_rerun_is_skipped_and_outputs_unchanged(tmp_path: Path, smear_like, random_model_dir: Path) -> None:
    tif, _ = smear_like
    model = load_model(str(random_model_dir))
    cfg = _cfg(tmp_path)
    (first,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    before = (Path(first.out_dir) / "regions.geojson").read_bytes()
    (second,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    assert first.status == "ok" and second.status == "skipped"
    assert (Path(first.out_dir) / "regions.geojson").read_bytes() == before


def test_resume_scores_only_missing_blocks_and_matches(tmp_path: Path, smear_like, random_model_dir: Path) -> None:
    tif, _ = smear_like
    model = load_model(str(random_model_dir))
    cfg = _cfg(tmp_path, tiling={"chunk_cells": 16})
    (first,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    out = Path(first.out_dir)
    clean = mz.read_level(out / "probabilities.ome.zarr", 0)
    # simulate an interrupted run: no completion marker, two block markers lost (their chunks rewritten)
    (out / "_SUCCESS").unlink()
    markers = sorted((out / ".blocks").rglob("*.json"))
    for m in markers[:2]:
        m.unlink()
    (res,) = score_samples([str(tif)], cfg, str(tmp_path), model=model)
    assert res.run["blocks"]["resumed"] == len(markers) - 2
    np.testing.assert_array_equal(mz.read_level(out / "probabilities.ome.zarr", 0), clean)


def test_run_json_records_what_was_done(tmp_path: Path, smear_like, random_model_dir: Path) -> None:
    tif, _ = smear_like
    model = load_model(str(random_model_dir))
    (res,) = score_samples([str(tif)], _cfg(tmp_path), str(tmp_path), model=model)
    run = json.loads((Path(res.out_dir) / "run.json").read_text())
    assert run["model"]["sha256"] == model.checksum and len(run["model"]["sha256"]) == 64
    assert run["input"]["mpp0"] == pytest.approx(0.5) and run["input"]["mpp_source"].startswith("tiff:")
    assert run["config"]["tiling"]["stride_px"] == 16
    assert set(run["timings_s"]) >= {"open_s", "mask_s", "score_s", "total_s"}
    assert (Path(res.out_dir) / "_SUCCESS").exists()


def test_overview_shows_the_overlay_where_the_model_fired(tmp_path: Path, smear_like, constant_model_dir: Path) -> None:
    from PIL import Image

    tif, img = smear_like
    (res,) = score_samples([str(tif)], _cfg(tmp_path), str(tmp_path), model=load_model(str(constant_model_dir)))
    ov = np.asarray(Image.open(Path(res.out_dir) / "overview.png"))
    assert ov.shape[:2] == img.shape[:2]  # the image is small: the thumbnail is level 0
    prob = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)[0]
    # constant 0.7 where scored: those thumbnail pixels are tinted, background pixels are the source
    cy, cx = np.argwhere(~np.isnan(prob))[len(np.argwhere(~np.isnan(prob))) // 2]
    y, x = cy * 16 + 8, cx * 16 + 8
    assert not np.array_equal(ov[y, x], img[y, x])
    assert np.array_equal(ov[5, 5], img[5, 5])  # background corner untouched


def test_overview_outlines_the_top_regions(tmp_path: Path, smear_like, random_model_dir: Path) -> None:
    """The overview is started before the regions are known; its boxes are the written regions'."""
    from PIL import Image

    tif, img = smear_like
    cfg = _cfg(tmp_path, regions={"top_k": 3})
    (res,) = score_samples([str(tif)], cfg, str(tmp_path), model=load_model(str(random_model_dir)))
    assert res.status == "ok" and 1 <= len(res.regions) <= 3
    ov = np.asarray(Image.open(Path(res.out_dir) / "overview.png")).astype(int)
    box_colour = np.array([255, 200, 0])
    for r in res.regions:  # each written region's box is drawn 3 px outside its bounding box
        y, x, h, w = (int(v) for v in r.bbox_px)
        top = ov[max(0, y - 3), x : x + w]
        assert (np.abs(top - box_colour).sum(axis=1) == 0).mean() > 0.5, r.rank


def test_a_failure_while_finding_regions_fails_the_sample_without_hanging(tmp_path: Path, smear_like, random_model_dir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The overview threads wait for the regions: an error on the way ends them and fails the sample."""
    import slidescore.stages.finish as finish
    from slidescore.errors import SlideScoreError

    def broken(*args: object, **kwargs: object) -> None:
        raise SlideScoreError("regions exploded")

    monkeypatch.setattr(finish, "find_regions", broken)
    tif, _ = smear_like
    (res,) = score_samples([str(tif)], _cfg(tmp_path), str(tmp_path), model=load_model(str(random_model_dir)))
    assert res.status == "failed" and "regions exploded" in res.error
    assert not (Path(res.out_dir) / "_SUCCESS").exists()


def test_changed_parameter_never_reuses_old_blocks(tmp_path: Path, smear_like, random_model_dir: Path, constant_model_dir: Path) -> None:
    tif, _ = smear_like
    cfg = _cfg(tmp_path, tiling={"chunk_cells": 16})
    (first,) = score_samples([str(tif)], cfg, str(tmp_path), model=load_model(str(random_model_dir)))
    out = Path(first.out_dir)
    (out / "_SUCCESS").unlink()  # an interrupted run of the old parameters, all block markers present
    changed = cfg.replace(blending={"weights": "gaussian"})
    (res,) = score_samples([str(tif)], changed, str(tmp_path), model=load_model(str(random_model_dir)))
    assert res.run["run_key"] != first.run["run_key"] and res.run["blocks"]["resumed"] == 0
    # a different model (checksum) with finished outputs present: refused unless --overwrite
    (other,) = score_samples([str(tif)], changed, str(tmp_path), model=load_model(str(constant_model_dir)))
    assert other.status == "failed" and "different run" in other.error and "--overwrite" in other.error
    (redo,) = score_samples([str(tif)], changed.replace(output={"overwrite": True}), str(tmp_path), model=load_model(str(constant_model_dir)))
    assert redo.status == "ok" and redo.run["blocks"]["resumed"] == 0
    prob = mz.read_level(out / "probabilities.ome.zarr", 0)
    np.testing.assert_allclose(prob[~np.isnan(prob)], 0.7, atol=1e-6)
