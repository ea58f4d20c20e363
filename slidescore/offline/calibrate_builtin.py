"""Calibrate the built-in ``smearnet`` and fit its operating points on regions (reproducibly).

Run ``python -m slidescore.offline.calibrate_builtin [--seed 0]``. Smears are 4096² px at 0.25 µm/px
with 2 % parasitemia, rendered at 0.5 µm/px and JPEG'd at quality 90, 4:2:0, as ``slidescore
demo`` writes its pyramids (set up by :mod:`slidescore.offline.train_builtin`'s helpers).

1. Temperature, on patches: the 64-px patches of smear ``1000·seed + 903`` on the 16-px grid that
   the scorer would score (foreground fraction >= 0.1 under the default brightfield mask) are
   labelled by the training rule, and ``slidescore calibrate``'s own code fits the temperature
   and patch-level operating points (kept under ``calibration.patch_operating_points``, ``unit:
   patch``).
2. Operating points, on regions (``unit: region``, what the card's named points are): the
   calibration smears (903, and ``1000·seed + 905 …``) are scored the way a job scores them —
   :func:`slidescore.score_array` (the job's grid, blocks, border padding, dense scoring and
   uniform blending) on a classifier whose patch probabilities pass through the card's
   calibration before blending, as the pipeline does — and every threshold of a 0.01 grid is
   swept with :func:`slidescore.core.regions.find_regions`, counting region precision and recall
   (:mod:`slidescore.decide.region_points`).
3. Held out: smear ``1000·seed + 904`` gives each point's region figures (and the patch figures
   of the patch-level points).

The weights are not touched; the calibration starts afresh each run from the thresholds the
training script chose, so rerunning gives the same card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.core.tiling import PatchGrid
from slidescore.decide import calibration as cal
from slidescore.decide import region_points as rp
from slidescore.model.loading import builtin_dir, load_model
from slidescore.model.scoring import PatchClassifier
from slidescore.offline import synthetic as syn
from slidescore.offline.calibrate import calibrate_patchset, summary_lines
from slidescore.offline.datasets import PatchSet
from slidescore.offline.train_builtin import (
    PATCH_PX,
    STRIDE_PX,
    cut_patches,
    foreground_fraction,
    grid_labels,
    inner_origins,
    make_smear,
    scoring_view,
)

PRECISIONS = ("0.90", "0.99")
RECALLS = ("0.99", "0.999")
MIN_FOREGROUND_FRAC = 0.1
# the job settings the region-level points hold for (the defaults of JobConfig)
MIN_AREA_UM2, CONNECTIVITY = 0.0, 2
REGION_RULE = {"patch_px": PATCH_PX, "stride_px": STRIDE_PX, "blending": "uniform", "min_area_um2": MIN_AREA_UM2,
               "connectivity": CONNECTIVITY, "mask": f"brightfield, min_foreground_frac {MIN_FOREGROUND_FRAC}",
               "holds": "a parasite's chromatin-dot centre inside the region's bounding box"}


def smear_spec(seed: int, size_px: int = 4096, parasitemia: float = 0.02) -> syn.SmearSpec:
    return syn.SmearSpec(size_px, size_px, seed=seed, parasitemia=parasitemia)


def describe(spec: syn.SmearSpec) -> str:
    return (f"synthetic smear seed {spec.seed} ({spec.height_px}² px at {spec.mpp} µm/px, parasitemia "
            f"{spec.parasitemia}, JPEG q90 4:2:0)")


def smear_patches(seed: int, parasitemia: float = 0.02, min_foreground_frac: float = MIN_FOREGROUND_FRAC) -> PatchSet:
    """Labelled, scoreable grid patches of one JPEG'd validation smear (one source image)."""
    spec = smear_spec(seed, parasitemia=parasitemia)
    sm = make_smear(spec)
    img = sm.images[1]  # JPEG quality 90, 4:2:0
    gy, gx = inner_origins(sm)
    positive, usable = grid_labels(sm, gy, gx)
    keep = usable & (foreground_fraction(img, gy, gx) >= min_foreground_frac)
    iy, ix = np.nonzero(keep)
    labels = positive[iy, ix].astype(int)
    return PatchSet(cut_patches(img, gy[iy], gx[ix]), labels, np.full(len(labels), f"smear{seed}"),
                    ("uninfected", "parasitized"), 0.5, describe(spec))


def region_sample(clf: PatchClassifier, spec: syn.SmearSpec) -> rp.RegionSample:
    """The blended (calibrated) map of one smear as a job computes it, with its parasite positions."""
    from slidescore.api import score_array

    view = scoring_view(make_smear(spec), version=1, min_foreground_frac=MIN_FOREGROUND_FRAC)
    prob = score_array(view.image, clf, stride_px=STRIDE_PX, valid=view.valid)[0]
    k2 = (PATCH_PX // STRIDE_PX) ** 2
    # fields examined as the job counts them: the scored area (cells a scored patch covers) in fields of k² cells
    grid = PatchGrid(int(view.image.shape[0]), int(view.image.shape[1]), PATCH_PX, STRIDE_PX)
    return rp.RegionSample(prob, view.dots, float(grid.covered_cells(view.valid).sum()) / k2, describe(spec))


def region_figures(sample: rp.RegionSample, threshold: float, mpp: float = 0.5) -> dict[str, Any]:
    """Region figures of one scored smear at ``threshold`` under :data:`REGION_RULE`."""
    return rp.held_out_figures([sample], threshold, cell_px=STRIDE_PX, mpp=mpp, min_area_um2=MIN_AREA_UM2,
                               connectivity=CONNECTIVITY)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slidescore.offline.calibrate_builtin", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--region-smears", type=int, default=3, help="calibration smears pooled for the region-level fit")
    ap.add_argument("--out", type=Path, default=builtin_dir("smearnet"), help="package folder whose card.json is rewritten")
    ap.add_argument("--plots", type=Path, default=Path("calibrate-builtin-plots"), help="folder for the reliability diagram")
    args = ap.parse_args(argv)
    t0 = time.time()
    loaded = load_model(str(args.out), device="cpu")
    card = loaded.card
    # start afresh: the training script's thresholds, no earlier calibration
    base = dataclasses.replace(card, calibration={}, operating_points={}, training_prevalence=(),
                               thresholds=tuple(card.calibration.get("thresholds_before", card.thresholds)))
    clf = PatchClassifier(loaded.module, base, device="cpu", checksum=loaded.checksum, source=loaded.source)
    val = smear_patches(1000 * args.seed + 903)
    print(f"validation smear: {len(val)} patches {val.counts()} ({time.time() - t0:.0f} s)", flush=True)
    new = calibrate_patchset(clf, val, args.out, precisions=PRECISIONS, recalls=RECALLS, plot_dir=args.plots)
    patch_points = new.operating_points

    # held-out patch figures of the patch-level points
    check = smear_patches(1000 * args.seed + 904)
    from slidescore.offline.train import predict_logits

    p = cal.apply_temperature(cal.sigmoid(predict_logits(clf.module, check.images, base.mean, base.std, clf.device)),
                              new.calibration["temperature"], base.head, axis=1)[:, 0]
    y = check.labels == 1
    for op in patch_points.values():
        op["held_out"] = {base.classes[0]: {k: (round(v, 6) if isinstance(v, float) else v)
                                            for k, v in cal.figures(p, y, op["thresholds"][0]).items()}}
        op["held_out_on"] = check.source

    # region-level points on the calibrated, blended maps of the calibration smears
    # the same network under the calibrated card: score_array applies its calibration as a job does
    scorer = PatchClassifier(clf.module, new, device=str(clf.device), checksum=clf.checksum, source=clf.source,
                             outputs=clf.outputs)
    seeds = [1000 * args.seed + 903] + [1000 * args.seed + 905 + i for i in range(args.region_smears - 1)]
    fit = [region_sample(scorer, smear_spec(s)) for s in seeds]
    print(f"region fit: {len(fit)} smears, {sum(len(s.points) for s in fit)} parasites ({time.time() - t0:.0f} s)",
          flush=True)
    sweep = rp.sweep_regions(fit, cell_px=STRIDE_PX, mpp=base.mpp, min_area_um2=MIN_AREA_UM2,
                             connectivity=CONNECTIVITY)
    fitted_on = "; ".join(s.name for s in fit)
    names = [f"precision_{v}" for v in PRECISIONS] + [f"recall_{v}" for v in RECALLS]
    points = rp.region_operating_points(sweep, names, base.classes[0], fitted_on=fitted_on, rule=REGION_RULE)
    held = region_sample(scorer, smear_spec(1000 * args.seed + 904))
    for op in points.values():
        op["held_out"] = {base.classes[0]: region_figures(held, op["thresholds"][0], base.mpp)}
        op["held_out_on"] = held.name
    default_i = sweep.index(new.thresholds[0])

    calib = {**new.calibration,
             "held_out": {"source": check.source, "patches": len(check), "counts": check.counts(),
                          "ece": round(cal.expected_calibration_error(p, y), 6)},
             "patch_operating_points": patch_points,
             "region_fit": {"fitted_on": fitted_on, "rule": REGION_RULE, "parasites": sweep.counts[0]["n_objects"],
                            "patch_fields": round(sweep.n_fields, 3),
                            "default_threshold": {"validation": {base.classes[0]: rp.rounded(sweep.figures(default_i))},
                                                  "held_out": {base.classes[0]: region_figures(held, new.thresholds[0], base.mpp)}}},
             "script": "python -m slidescore.offline.calibrate_builtin", "seed": args.seed,
             "region_smears": args.region_smears}
    new = dataclasses.replace(new, calibration=calib, operating_points=points)
    (args.out / "card.json").write_text(json.dumps(new.to_dict(), indent=2, ensure_ascii=False) + "\n")
    print("\n".join(summary_lines(new)))
    for name, op in points.items():
        f = op["held_out"][base.classes[0]]
        print(f"  held-out {name}: region precision {f['precision']:.4f} recall {f['recall']:.4f} "
              f"({f['n_regions']} regions, {f['false_regions']} false, {f['found']}/{f['n_objects']} parasites)")
    print(f"wrote {args.out / 'card.json'} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
