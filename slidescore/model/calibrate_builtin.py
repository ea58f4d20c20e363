"""Calibrate the built-in ``smearnet`` and store its operating points in its card (reproducibly).

Run ``python -m slidescore.model.calibrate_builtin [--seed 0]``. A validation smear (4096² px at
0.25 µm/px, seed ``1000·seed + 903``, 2 % parasitemia; like the training script's validation smear
but new) is rendered at 0.5 µm/px and JPEG'd at quality 90, 4:2:0, as ``slidescore demo`` writes
its pyramids. Its 64-px patches on the 16-px grid that the scorer would score (foreground fraction
>= 0.1 under the default brightfield mask) are labelled by the training rule (positive: a
chromatin dot >= 4 px inside; negative: none within 4 px around; ambiguous ones left out), and
``slidescore calibrate``'s own code fits the temperature and the operating points on them. A
second smear (seed ``1000·seed + 904``) reports the figures of every operating point on held-out
data. The weights are not touched; the card's calibration starts afresh each run, from the
thresholds the training script chose, so rerunning gives the same card.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from slidescore import synthetic as syn
from slidescore.decide import calibration as cal
from slidescore.decide.calibrate import calibrate_patchset, summary_lines
from slidescore.decide.datasets import PatchSet
from slidescore.mask import detect_foreground
from slidescore.model.scoring import PatchClassifier, builtin_dir, load_model
from slidescore.model.train_builtin import PAD_PX, PATCH_PX, STRIDE_PX, make_smear

PRECISIONS = ("0.90", "0.99")
RECALLS = ("0.99", "0.999")


def smear_patches(seed: int, parasitemia: float = 0.02, min_foreground_frac: float = 0.1) -> PatchSet:
    """Labelled, scoreable grid patches of one JPEG'd validation smear (one source image)."""
    spec = syn.SmearSpec(4096, 4096, seed=seed, parasitemia=parasitemia)
    sm = make_smear(spec)
    img = sm.images[1]  # JPEG quality 90, 4:2:0
    inner = np.arange(PAD_PX, img.shape[0] - PAD_PX - PATCH_PX + 1, STRIDE_PX)
    pos, near = sm.pos[np.ix_(inner, inner)], sm.near[np.ix_(inner, inner)]
    fg = detect_foreground(img, "brightfield").astype(np.float32)
    s = np.zeros((fg.shape[0] + 1, fg.shape[1] + 1))
    s[1:, 1:] = fg.cumsum(0).cumsum(1)
    y0, y1 = inner, inner + PATCH_PX
    frac = (s[np.ix_(y1, y1)] - s[np.ix_(y0, y1)] - s[np.ix_(y1, y0)] + s[np.ix_(y0, y0)]) / PATCH_PX**2
    keep = ((pos > 0) | (near == 0)) & (frac >= min_foreground_frac)
    iy, ix = np.nonzero(keep)
    images = np.stack([img[inner[a] : inner[a] + PATCH_PX, inner[b] : inner[b] + PATCH_PX] for a, b in zip(iy, ix, strict=True)])
    labels = (pos[iy, ix] > 0).astype(int)
    return PatchSet(images, labels, np.full(len(labels), f"smear{seed}"), ("uninfected", "parasitized"), 0.5,
                    f"synthetic smear seed {seed} (4096² px at 0.25 µm/px, parasitemia {parasitemia}, JPEG q90 4:2:0)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m slidescore.model.calibrate_builtin", description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
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

    check = smear_patches(1000 * args.seed + 904)
    from slidescore.train import predict_logits

    p = cal.apply_temperature(cal.sigmoid(predict_logits(clf.module, check.images, base.mean, base.std, clf.device)),
                              new.calibration["temperature"], base.head, axis=1)[:, 0]
    y = check.labels == 1
    held = {name: {k: (round(v, 6) if isinstance(v, float) else v) for k, v in cal.figures(p, y, op["thresholds"][0]).items()}
            for name, op in new.operating_points.items()}
    calib = {**new.calibration, "held_out": {"source": check.source, "patches": len(check), "counts": check.counts(),
                                             "ece": round(cal.expected_calibration_error(p, y), 6), "operating_points": held},
             "script": "python -m slidescore.model.calibrate_builtin", "seed": args.seed}
    new = dataclasses.replace(new, calibration=calib)
    (args.out / "card.json").write_text(json.dumps(new.to_dict(), indent=2, ensure_ascii=False) + "\n")
    print("\n".join(summary_lines(new)))
    for name, f in held.items():
        print(f"  held-out {name}: precision {f['precision']:.4f} recall {f['recall']:.4f} specificity {f['specificity']:.6f}")
    print(f"wrote {args.out / 'card.json'} in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
