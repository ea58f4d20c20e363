"""``slidescore demo --kind field``: the second embedded default — several labels at once, in map coordinates.

Generates a synthetic field scene (:mod:`slidescore.offline.field`: a 4096² px GeoTIFF at 10 m/px
in UTM 33N with a no-data border and overlapping cloud patterns of four kinds), scores it with the
built-in multi-label model ``builtin:fieldnet`` (a sigmoid per class) through the same pipeline as
``slidescore score`` — the no-data mask, level 1 at 20 m/px, each class thresholded at its own
``precision_0.90`` operating point — and prints, per class, the recall of the planted patterns (a
pattern is found when at least a quarter of its area lies in regions of its class) and the share
of the regions' area that lies on planted patterns of the class. The regions are written in
level-0 pixels (``regions.geojson``, for QuPath) and in the scene's CRS (``regions.map.geojson``,
EPSG:32633, for GIS tools).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.config import JobConfig
from slidescore.io import mosaic as mz
from slidescore.io.outputs import write_json
from slidescore.offline.field import (
    FIELD_CLASSES,
    FieldSpec,
    make_scene,
    pattern_recall,
    write_field_geotiff,
)
from slidescore.run.local import score_samples

OPERATING_POINT = "precision_0.90"
MIN_COVERED = 0.25  # a planted pattern is found when this share of its area lies in regions of its class


def field_config(out: str, model: str = "builtin:fieldnet", operating_point: str | None = OPERATING_POINT) -> JobConfig:
    """The demo's job: no-data mask read at 80 m/px, every region written, the per-class operating point.

    The report leaves out the explanation maps: integrated gradients over kilometre-wide texture
    regions cost most of a minute on two cores and say little (``report.gradcam: true`` turns them on)."""
    return JobConfig().replace(
        output={"uri": out, "overwrite": True}, model={"name": model},
        mask={"method": "nodata", "nodata_value": 0, "mask_mpp": 80e6}, regions={"top_k": 100000},
        decision={"operating_point": operating_point}, report={"gradcam": False})


def cell_truth(labels: np.ndarray, cell_px0: float, cells_shape: tuple[int, int]) -> np.ndarray:
    """Instance labels (K, H, W) at level-0 pixels → at the mosaic's cells (the label at each cell's centre)."""
    c = float(cell_px0)
    ys = np.minimum(((np.arange(cells_shape[0]) + 0.5) * c).astype(int), labels.shape[1] - 1)
    xs = np.minimum(((np.arange(cells_shape[1]) + 0.5) * c).astype(int), labels.shape[2] - 1)
    return labels[:, ys][:, :, xs]


def run_field_demo(size_px: int = 4096, out_root: str = "demo-output", seed: int = 7, progress: bool = True,
                   model: str = "builtin:fieldnet", operating_point: str | None = OPERATING_POINT) -> int:
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    tif = out / f"demo-field-{size_px}-seed{seed}.tif"
    t0 = time.perf_counter()
    spec = FieldSpec(size_px=size_px, seed=seed)
    scene = make_scene(spec)
    write_field_geotiff(tif, scene)
    t_gen = time.perf_counter() - t0
    print(f"generated {tif} ({size_px}×{size_px} px at {spec.pixel_m:g} m/px, EPSG:{spec.epsg}, "
          f"{len(scene.patterns)} planted patterns of {len(FIELD_CLASSES)} kinds, "
          f"{overlapping(scene.labels)} overlapping another kind) in {t_gen:.1f} s")
    make_bar = None
    if progress:
        from tqdm import tqdm

        def make_bar(n_blocks: int, n_patches: int) -> Any:
            return tqdm(total=n_blocks, unit="block", desc=f"scoring {n_patches:,} patch positions", leave=False, dynamic_ncols=True)

    t1 = time.perf_counter()
    (result,) = score_samples([str(tif)], field_config(str(out), model, operating_point), str(out), progress=make_bar)
    seconds = time.perf_counter() - t1
    if result.status == "failed":
        print(f"demo failed: {result.error}")
        return 1
    run = result.run
    sample = Path(result.out_dir)
    prob = mz.read_level(sample / "probabilities.ome.zarr", 0)
    thresholds = [float(run["thresholds"][c]) for c in FIELD_CLASSES]
    detected = np.nan_to_num(prob, nan=-1.0) >= np.asarray(thresholds, np.float32)[:, None, None]
    cell_px0 = float(run["grid"]["stride_px"]) * size_px / run["input"]["level_shape"][0]
    figures = pattern_recall(cell_truth(scene.labels, cell_px0, prob.shape[1:]), detected, MIN_COVERED)
    pt = run["patches"]
    print(f"scored {pt['scored']:,} patches ({pt['skipped_background']:,} skipped as no-data) at level "
          f"{run['input']['level']} ({run['input']['level_mpp'] / 1e6:g} m/px) in {seconds:.1f} s; model "
          f"{run['model']['card']['name']}, operating point {run['decision']['operating_point'] or 'default thresholds'}")
    print("  class    threshold  planted  found  recall  regions  region area on the class's patterns")
    for f, t in zip(figures, thresholds, strict=True):
        f["threshold"], f["regions"] = t, sum(1 for r in result.regions if r.class_name == f["class"])
        print(f"  {f['class']:<8} {t:>9.3f}  {f['planted']:>7}  {f['found']:>5}  {f['recall']:>6.3f}  {f['regions']:>7}  "
              f"{f['area_precision']:.3f}")
    worst = min(f["recall"] for f in figures)
    print(f"per-class recall of the planted patterns at the per-class {operating_point or 'default'} operating points: "
          f"lowest {worst:.3f} (found: at least {MIN_COVERED:.0%} of a pattern's area in regions of its class)")
    print(f"outputs: {sample} (report.html, probabilities.ome.zarr with {len(FIELD_CLASSES)} channels, "
          f"regions.geojson in level-0 pixels, regions.map.geojson in EPSG:{spec.epsg}, run.json)")
    write_json(sample / "demo.json", {"kind": "field", "seed": seed, "size_px": size_px, "operating_point": operating_point,
                                      "min_covered": MIN_COVERED, "classes": figures, "generate_s": t_gen,
                                      "score_s": seconds})
    return 0


def overlapping(labels: np.ndarray) -> int:
    """How many planted patterns share pixels with a pattern of another kind (``labels``: (K, H, W) ids)."""
    n = 0
    for k in range(labels.shape[0]):
        others = (np.delete(labels, k, axis=0) > 0).any(axis=0)
        n += len(np.setdiff1d(np.unique(labels[k][others]), [0]))
    return n
