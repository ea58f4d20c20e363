"""Train the built-in ``fieldnet`` cloud-pattern model on synthetic field scenes and write weights + card.

Run ``python -m slidescore.offline.train_field [--out DIR] [--seed 0]``. Scenes come from
:mod:`slidescore.offline.field` (4096² px at 10 m/px) and are area-averaged 2× to 20 m/px, exactly
what the scorer reads from level 1 of their pyramid. A 64-px patch (1.28 km) carries class *c* when
at least ``MIN_COVER`` of it lies on a planted pattern of that class — any subset of the four
classes, none included: a multi-label set. Training goes through ``slidescore train``'s own code
(:func:`slidescore.offline.train.train_model`: split by scene, a sigmoid per class, each output's
bias at its class prior, hue-keeping augmentation, early stopping), on the patches of the 16-px
scoring grid with the ambiguous ones left out (a class covering between ``AMBIGUOUS`` of the patch)
and a fifth of those without any class (open ocean, the no-data border). The card is then
calibrated by ``slidescore calibrate``'s code (:func:`slidescore.offline.calibrate.calibrate_patchset`)
on every scored patch position (32-px step, no selection) of a further scene, which fixes the
temperature and the per-class operating points ``precision_0.90`` (the lowest threshold with
patch precision >= 0.9, per class) and ``recall_0.90``. Last, a held-out scene is scored end to end
(the job's pipeline, as ``slidescore demo --kind field`` does) and its per-class recall of the
planted patterns printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from slidescore.offline.datasets import PatchSet
from slidescore.offline.field import FIELD_CLASSES, FIELD_COLORS, FieldSpec, downsample, make_scene

PATCH_PX, STRIDE_PX = 64, 16
DOWNSAMPLE = 2  # 10 m/px level 0 → 20 m/px model resolution
MODEL_MPP = 20.0 * 1e6  # µm per pixel at the model's resolution (20 m)
PAD_VALUE = 0  # the no-data value: beyond the border as outside the footprint
MIN_COVER = 0.5  # a patch carries a class when this share of it lies on the class's patterns
AMBIGUOUS = (0.2, 0.7)  # coverages left out of training (patches neither clearly with nor without)
MIN_FOREGROUND_FRAC = 0.1  # the scorer's default: patches with less scene than this are not scored
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "model" / "builtin" / "fieldnet"


def _box_fractions(frac: np.ndarray, oy: np.ndarray, ox: np.ndarray) -> np.ndarray:
    """Mean of ``frac`` (H, W) over the PATCH_PX boxes at origins (oy, ox) (outside the image: 0)."""
    h, w = frac.shape
    pad = np.zeros((h + 2 * PATCH_PX + 1, w + 2 * PATCH_PX + 1), np.float64)
    pad[PATCH_PX + 1 : PATCH_PX + 1 + h, PATCH_PX + 1 : PATCH_PX + 1 + w] = frac
    ii = pad.cumsum(0).cumsum(1)
    y0, x0 = oy[:, None] + PATCH_PX, ox[None, :] + PATCH_PX
    y1, x1 = y0 + PATCH_PX, x0 + PATCH_PX
    return (ii[y1, x1] - ii[y0, x1] - ii[y1, x0] + ii[y0, x0]) / PATCH_PX**2


def scene_patches(spec: FieldSpec, *, step: int, negatives: float = 1.0, drop_ambiguous: bool = False,
                  rng: np.random.Generator | None = None) -> PatchSet:
    """Multi-label patches of one scene at 20 m/px, origins every ``step`` px from the centred grid's first.

    Patches with less than ``MIN_FOREGROUND_FRAC`` scene are skipped (the scorer skips them);
    patches with no class are kept with probability ``negatives``."""
    sc = make_scene(spec)
    img = downsample(sc.image, DOWNSAMPLE)
    h, w = img.shape[:2]
    first = -(PATCH_PX - STRIDE_PX)
    oy, ox = np.arange(first, h - STRIDE_PX, step), np.arange(first, w - STRIDE_PX, step)
    fg = _box_fractions(downsample(sc.footprint.astype(np.float32), DOWNSAMPLE), oy, ox)
    cover = np.stack([_box_fractions(downsample(m.astype(np.float32), DOWNSAMPLE), oy, ox) for m in sc.masks], -1)
    keep = fg >= MIN_FOREGROUND_FRAC
    if drop_ambiguous:
        keep &= ~((cover > AMBIGUOUS[0]) & (cover < AMBIGUOUS[1])).any(-1)
    labels = cover >= MIN_COVER
    if negatives < 1.0:
        gen = rng or np.random.default_rng([spec.seed, 31])
        keep &= labels.any(-1) | (gen.random(keep.shape) < negatives)
    ay, ax = np.nonzero(keep)
    pad = np.full((h + 2 * PATCH_PX, w + 2 * PATCH_PX, 3), PAD_VALUE, np.uint8)
    pad[PATCH_PX : PATCH_PX + h, PATCH_PX : PATCH_PX + w] = img
    py, px = oy[ay] + PATCH_PX, ox[ax] + PATCH_PX
    win = np.lib.stride_tricks.sliding_window_view(pad, (PATCH_PX, PATCH_PX), axis=(0, 1))
    patches = np.ascontiguousarray(win[py, px].transpose(0, 2, 3, 1))
    return PatchSet(patches, labels[ay, ax].astype(np.uint8), np.full(len(ay), f"scene{spec.seed}"), FIELD_CLASSES,
                    MODEL_MPP, f"field scene seed {spec.seed}")


def concat(sets: list[PatchSet], source: str) -> PatchSet:
    return PatchSet(np.concatenate([s.images for s in sets]), np.concatenate([s.labels for s in sets]),
                    np.concatenate([s.groups for s in sets]), FIELD_CLASSES, MODEL_MPP, source)


def install(work: Path, out: Path) -> None:
    """Copy the trained weights into the package as ``weights.safetensors`` (tensors only, no pickle)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(work / "weights.pt", map_location="cpu", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "weights.safetensors"))
    (out / "weights.safetensors").chmod(0o644)  # package data, readable by every user of an install
    (out / "weights.pt").unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    from slidescore.model.card import ModelCard
    from slidescore.model.loading import load_model
    from slidescore.offline.calibrate import calibrate_patchset, summary_lines
    from slidescore.offline.train import Augmentation, TrainOptions, train_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the model package (card.json, weights.safetensors)")
    ap.add_argument("--work", type=Path, help="folder for training outputs (plots; default: a temporary folder)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenes", type=int, default=5, help="training scenes (one of them validates)")
    ap.add_argument("--epochs", type=int, default=12)
    ap.add_argument("--width", type=int, default=16, help="SmearNet channel width")
    ap.add_argument("--check-seed", type=int, default=7, help="held-out scene scored end to end at the end (-1: none)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared machine more threads wait on each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    rng = np.random.default_rng([args.seed, 41])
    train_specs = [FieldSpec(seed=1000 * args.seed + 100 + i) for i in range(args.scenes)]
    work: Path = args.work or Path(tempfile.mkdtemp(prefix="fieldnet-"))
    cache = work / f"patches-{'-'.join(str(s.seed) for s in train_specs)}.npz"  # a rerun in the same work folder
    if cache.exists():
        z = np.load(cache)
        data = PatchSet(z["images"], z["labels"], z["groups"], FIELD_CLASSES, MODEL_MPP, str(z["source"]))
    else:
        data = concat([scene_patches(s, step=16, negatives=0.2, drop_ambiguous=True, rng=rng) for s in train_specs],
                      f"field scenes {[s.seed for s in train_specs]} (slidescore.offline.field)")
        work.mkdir(parents=True, exist_ok=True)
        np.savez(cache, images=data.images, labels=data.labels, groups=data.groups, source=data.source)
    print(f"training patches: {len(data)} from {args.scenes} scenes, per class {data.counts()} ({time.time() - t0:.0f} s)")
    opts = TrainOptions(epochs=args.epochs, patience=3, batch_size=64, lr=2e-3, width=args.width, balance="bias_init",
                        val_frac=0.2, seed=args.seed, pad_value=PAD_VALUE, name="fieldnet",
                        augmentation=Augmentation(flips=True, rot90=True, brightness=0.1, contrast=0.1, saturation=0.1,
                                                  sharpness=0.2))
    out: Path = args.out
    card = train_model(data, work, opts)  # writes weights.pt, card.json and plots/ (ROC, PR, counts per class)
    del data
    for c, m in card.metrics["validation"]["per_class"].items():
        print(f"  {c}: validation AUC-ROC {m['auc_roc']:.4f}, AUC-PR {m['auc_pr']:.4f}, at 0.5 precision "
              f"{m['precision']:.3f} recall {m['recall']:.3f}")
    card = dataclasses.replace(
        card, colors=FIELD_COLORS, version="1",
        description="Cloud patterns Fish, Flower, Sugar and Gravel (a sigmoid each: they overlap) in field scenes at "
                    "20 m/px, trained only on slidescore.offline.field synthetic scenes (a demonstration model).",
        training={**card.training, "script": "python -m slidescore.offline.train_field", "command": None,
                  "label_rule": f"class c: >= {MIN_COVER:.0%} of the 64-px patch on class c's planted patterns; "
                                f"training leaves out patches with a class covering {AMBIGUOUS[0]:.0%}–{AMBIGUOUS[1]:.0%}",
                  "scenes": [dataclasses.asdict(s) for s in train_specs]})
    (work / "card.json").write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")

    calib_spec = FieldSpec(seed=1000 * args.seed + 903)
    calib = scene_patches(calib_spec, step=32)
    print(f"calibration patches: {len(calib)} (every scored position at a 32-px step of scene {calib_spec.seed}), "
          f"per class {calib.counts()}")
    new = calibrate_patchset(load_model(str(work), device="cpu"), calib, work, precisions=("0.90",), recalls=("0.90",))
    new = dataclasses.replace(new, calibration={**new.calibration, "scene": dataclasses.asdict(calib_spec)})
    ModelCard.from_dict(new.to_dict())  # valid before it is written
    install(work, out)  # the package: weights and card (the plots stay in work)
    (out / "card.json").write_text(json.dumps(new.to_dict(), indent=2, ensure_ascii=False) + "\n")
    print("\n".join(summary_lines(new)))
    print(f"wrote {out} (plots in {work}) in {time.time() - t0:.0f} s")
    if args.check_seed >= 0:
        from slidescore.offline.demo_field import run_field_demo

        run_field_demo(out_root=str(work / "check"), seed=args.check_seed, progress=False, model=str(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
