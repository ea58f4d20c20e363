"""``slidescore demo``: the embedded default, end to end on one machine.

Generates a synthetic blood smear (pyramidal JPEG-tiled TIFF in the Aperio SVS layout at 0.25 µm/px,
plus the true parasite positions), scores it with the built-in model through the same pipeline as
``slidescore score``, and prints patches scored and skipped, throughput, the top regions and the
recall of the planted parasites among the reported regions.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.config import JobConfig
from slidescore.core.regions import Region
from slidescore.io.outputs import write_json
from slidescore.io.tiff import write_tiff_pyramid
from slidescore.offline.synthetic import SmearSpec, parasite_positions, plan_smear, render_region
from slidescore.run.local import score_samples

DEMO_MPP = 0.25


def generate_smear(path: Path, size_px: int, seed: int, *, progress: bool = True, tile_px: int = 512) -> np.ndarray:
    """Write the synthetic smear TIFF and its truth file; returns parasite positions (level-0 y, x)."""
    spec = SmearSpec(height_px=size_px, width_px=size_px, mpp=DEMO_MPP, seed=seed)
    layout = plan_smear(spec)
    n_levels = 1 + max(0, math.ceil(math.log2(size_px / 1024)))
    n_tiles = sum(math.ceil(size_px / 2**lvl / tile_px) ** 2 for lvl in range(n_levels))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=n_tiles, unit="tile", desc=f"generating {size_px}×{size_px} smear", leave=False, dynamic_ncols=True)

    def render(y: int, x: int, h: int, w: int, ds: int) -> np.ndarray:
        return render_region(layout, y, x, h, w, downsample=ds)

    # the Aperio SVS layout: tifffile, OpenSlide and Bio-Formats (QuPath) all see the pyramid (SubIFDs
    # without OME-XML are a pyramid to tifffile alone); the pixels of every level are those of the SubIFD layout
    write_tiff_pyramid(str(path), (size_px, size_px), render, mpp=DEMO_MPP, n_levels=n_levels, tile_px=tile_px,
                       compression="jpeg", progress=bar.update if bar else None, layout="svs")
    if bar:
        bar.close()
    parasites = parasite_positions(layout)
    write_json(path.with_suffix(".truth.json"), {
        "coordinates": "level-0 pixels (y, x)", "mpp": DEMO_MPP, "seed": seed, "size_px": size_px,
        "n_red_cells": int(len(layout.rbc_centers)), "parasites": parasites.tolist(),
    })
    return parasites


def parasite_recall(parasites: np.ndarray, regions: list[Region], margin_px: float = 0.0) -> tuple[float, int]:
    """Fraction of parasites inside some region's box (grown by ``margin_px``); and regions hit."""
    if len(parasites) == 0:
        return float("nan"), 0
    found = np.zeros(len(parasites), bool)
    hit = 0
    for r in regions:
        y, x, h, w = r.bbox_px
        inside = (parasites[:, 0] >= y - margin_px) & (parasites[:, 0] < y + h + margin_px) & \
                 (parasites[:, 1] >= x - margin_px) & (parasites[:, 1] < x + w + margin_px)
        hit += bool(inside.any())
        found |= inside
    return float(found.mean()), hit


def run_demo(size_px: int = 8192, out_root: str = "demo-output", seed: int = 7, progress: bool = True,
             config: JobConfig | None = None) -> int:
    out = Path(out_root)
    out.mkdir(parents=True, exist_ok=True)
    tif = out / f"demo-smear-{size_px}-seed{seed}.tif"
    t0 = time.perf_counter()
    parasites = generate_smear(tif, size_px, seed, progress=progress)
    t_gen = time.perf_counter() - t0
    print(f"generated {tif} ({size_px}×{size_px} px at {DEMO_MPP} µm/px, {len(parasites)} planted parasites) in {t_gen:.1f} s")
    cfg = config or JobConfig().replace(output={"uri": str(out), "overwrite": True}, regions={"top_k": 100000})
    make_bar = None
    if progress:
        from tqdm import tqdm

        def make_bar(n_blocks: int, n_patches: int) -> Any:
            return tqdm(total=n_blocks, unit="block", desc=f"scoring {n_patches:,} patch positions", leave=False, dynamic_ncols=True)

    t1 = time.perf_counter()
    (result,) = score_samples([str(tif)], cfg, str(out), progress=make_bar)
    seconds = time.perf_counter() - t1
    if result.status == "failed":
        print(f"demo failed: {result.error}")
        return 1
    run = result.run
    pt = run["patches"]
    recall, hit = parasite_recall(parasites, result.regions)
    n_reg = len(result.regions)
    print(f"scored {pt['scored']:,} patches, skipped {pt['skipped_background']:,} as background "
          f"({pt['skipped_background'] / max(1, pt['total']):.0%}) at level {run['input']['level']} "
          f"({run['input']['level_mpp']:g} µm/px); model {run['model']['card']['name']} on {run['model']['device']}")
    mpx = size_px * size_px / 1e6
    print(f"throughput: {pt['scored'] / max(1e-9, run['timings_s']['score_s']):,.0f} patches/s in the model, "
          f"{mpx / seconds:.1f} level-0 Mpx/s end to end ({seconds:.1f} s)")
    print(f"regions: {n_reg} above threshold {run['thresholds']}; top 5:")
    print("  rank  peak   mean   area µm²   centre (y, x) level-0 px")
    for r in result.regions[:5]:
        print(f"  {r.rank:>4}  {r.peak_probability:.3f}  {r.mean_probability:.3f}  {r.area_um2:>8.0f}   "
              f"({r.centroid_px[0]:.0f}, {r.centroid_px[1]:.0f})")
    print(f"planted-parasite recall among reported regions: {recall:.3f} ({round(recall * len(parasites))}/{len(parasites)}); "
          f"regions containing a parasite: {hit}/{n_reg}")
    sc = run.get("decision", {}).get("sample_call")
    if sc:
        per = sc["per_class"][card_classes[0]] if (card_classes := run["model"]["card"]["classes"]) else {}
        print(f"sample call: {sc['call'].upper()} at operating point {sc.get('operating_point') or 'default'} "
              f"({per.get('reason', '')})")
    print(f"outputs: {result.out_dir} (report.html, probabilities.ome.zarr, mask.ome.zarr, regions.json/.csv/.geojson, run.json)")
    write_json(Path(result.out_dir) / "demo.json", {"recall": recall, "n_parasites": int(len(parasites)), "n_regions": n_reg,
                                                    "regions_with_parasite": hit, "generate_s": t_gen, "score_s": seconds})
    return 0
