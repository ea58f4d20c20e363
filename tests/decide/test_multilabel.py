"""Multi-label training and calibration: a table where a patch carries any subset of the classes.

The set is generated here: 64-px patches of grey noise on which each of three marks is drawn or not
(a red disc, dark stripes, black dots), so a patch carries any subset of {Red, Stripes, Dots},
none included. Training gives a sigmoid per class; per-class metrics, plots and operating points
are checked against figures recomputed here from the model's own scores.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidescore.cli import main
from slidescore.decide import calibration as cal
from slidescore.errors import ConfigError
from slidescore.model import load_model
from slidescore.offline.datasets import load_table
from slidescore.offline.train import TrainOptions, balance_indices, run_train, split_by_group
from tests.conftest import write_tiff

CLASSES = ("Dots", "Red", "Stripes")  # sorted: the order a labels column gives
FAST = TrainOptions(epochs=5, patience=3, width=8, batch_size=32, lr=5e-3, progress=False)


def _patch(rng: np.random.Generator, marks: np.ndarray) -> np.ndarray:
    img = rng.normal(150, 12, (64, 64, 3))
    yy, xx = np.mgrid[:64, :64]
    if marks[0]:  # dots: a few small black discs
        for _ in range(6):
            cy, cx = rng.integers(6, 58, 2)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4] = 20
    if marks[1]:  # red: one large red disc
        cy, cx = rng.integers(20, 44, 2)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= 100] = (220, 40, 40)
    if marks[2]:  # stripes: dark bands, horizontal or vertical
        band = ((yy if rng.random() < 0.5 else xx) // 4) % 2 == 0
        img[band] *= 0.55
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def multilabel_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """``root/table.csv`` (image, labels, group) over PNG patches of 6 source images; and the 0/1 truth."""
    root = tmp_path_factory.mktemp("multilabel")
    rng = np.random.default_rng(4)
    truth = (rng.random((180, 3)) < 0.4).astype(np.uint8)
    rows = []
    for i, marks in enumerate(truth):
        Image.fromarray(_patch(rng, marks)).save(root / f"p{i}.png")
        rows.append({"image": f"p{i}.png", "labels": ";".join(c for c, m in zip(CLASSES, marks, strict=True) if m),
                     "group": f"img{i % 6}"})
    with open(root / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "labels", "group"])
        w.writeheader()
        w.writerows(rows)
    return root, truth


def test_a_labels_column_gives_a_multilabel_set(multilabel_set: tuple[Path, np.ndarray]) -> None:
    root, truth = multilabel_set
    ps = load_table(root / "table.csv", mpp=0.5)
    assert ps.multilabel and ps.class_names == CLASSES and ps.labels.shape == (180, 3)
    np.testing.assert_array_equal(ps.labels, truth)
    assert ps.counts() == {c: int(truth[:, i].sum()) for i, c in enumerate(CLASSES)}
    assert (truth.sum(1) == 0).any() and (truth.sum(1) >= 2).any()  # patches of none and of several classes
    assert set(ps.groups) == {f"img{i}" for i in range(6)}
    # the split keeps images whole and gives every class to both sides
    tr, va = split_by_group(ps.groups, ps.labels, 0.3, seed=0)
    assert not set(ps.groups[tr]) & set(ps.groups[va])
    assert ps.labels[tr].any(0).all() and ps.labels[va].any(0).all()
    with pytest.raises(ConfigError, match="cannot be downsampled per class"):
        balance_indices(ps.labels, "downsample", np.random.default_rng(0))


def test_boxes_in_a_large_image_carry_several_labels(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    truth = np.array([[1, 0, 1], [0, 0, 0], [1, 1, 1], [0, 1, 0]], np.uint8)
    big = np.full((256, 256, 3), 150, np.uint8)
    patches = [_patch(rng, m) for m in truth]
    rows = []
    for i, p in enumerate(patches):
        y, x = 32 + 128 * (i // 2), 32 + 128 * (i % 2)
        big[y : y + 64, x : x + 64] = p
        # boxes of any size: the patch is read around the box centre
        rows.append({"image": "big.tif", "x": x + 16, "y": y + 8, "w": 32, "h": 48,
                     "labels": ";".join(c for c, m in zip(CLASSES, truth[i], strict=True) if m)})
    write_tiff(tmp_path / "big.tif", big)
    with open(tmp_path / "boxes.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "x", "y", "w", "h", "labels"])
        w.writeheader()
        w.writerows(rows)
    ps = load_table(tmp_path / "boxes.csv", patch_px=64)
    assert ps.multilabel and ps.class_names == CLASSES
    np.testing.assert_array_equal(ps.labels, truth)
    np.testing.assert_array_equal(ps.images, np.stack(patches))  # read with slidescore's TIFF reader, lossless


@pytest.mark.slow
def test_multilabel_training_and_per_class_operating_points(multilabel_set: tuple[Path, np.ndarray], tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    root, truth = multilabel_set
    card = run_train(str(root / "table.csv"), str(tmp_path / "pkg"), FAST, mpp=0.5)
    assert card.head == "multilabel_sigmoid" and card.classes == CLASSES and card.arch_kwargs["n_outputs"] == 3
    assert card.thresholds == (0.5, 0.5, 0.5)
    # bias_init: the prior each output starts from is the class's share of the training patches
    ps = load_table(root / "table.csv", mpp=0.5)
    tr, va = split_by_group(ps.groups, ps.labels, 0.2, seed=0)
    assert card.training_prevalence == pytest.approx(tuple(ps.labels[tr].mean(0)), abs=1e-6)
    val = card.metrics["validation"]
    assert set(val["per_class"]) == set(CLASSES)
    # per-class figures recomputed from the model's own scores of the validation patches
    model = load_model(str(tmp_path / "pkg"))
    probs = model.score_patches(ps.images[va].transpose(0, 3, 1, 2), 64)
    assert probs.shape == (int(va.sum()), 3)
    for i, c in enumerate(CLASSES):
        y, p = ps.labels[va, i] > 0, probs[:, i] >= 0.5
        m = val["per_class"][c]
        assert m["auc_roc"] == pytest.approx(cal.auc_roc(probs[:, i], y), abs=1e-3)
        assert m["confusion"] == [[int((~y & ~p).sum()), int((~y & p).sum())], [int((y & ~p).sum()), int((y & p).sum())]]
        assert m["n_pos"] == int(y.sum())
    assert val["per_class"]["Red"]["auc_roc"] > 0.9  # a red disc is learned in a few tiny epochs
    for f in card.training["plots"]:
        with Image.open(tmp_path / "pkg" / f) as im:
            assert im.format == "PNG" and im.size[0] > 100

    # calibrate at a target precision per class, through the command line
    rc = main(["calibrate", str(tmp_path / "pkg"), str(root / "table.csv"), "--in-place", "--target-precision", "0.9",
               "--target-recall", "0.8"])
    assert rc == 0, capsys.readouterr().err
    cal_card = json.loads((tmp_path / "pkg" / "card.json").read_text())
    op = cal_card["operating_points"]["precision_0.9"]
    assert op["unit"] == "patch" and len(op["thresholds"]) == 3 and len(set(op["thresholds"])) > 1  # one per class
    calibrated = load_model(str(tmp_path / "pkg"))
    from slidescore.decide import DecisionPolicy

    policy = DecisionPolicy.from_card(calibrated.card)
    q = policy.transform(calibrated.score_patches(ps.images.transpose(0, 3, 1, 2), 64).T).T  # every patch, calibrated
    for i, c in enumerate(CLASSES):
        y, p = ps.labels[:, i] > 0, q[:, i] >= op["thresholds"][i] - 1e-6  # the card rounds thresholds to 1e-7
        precision, recall = (y & p).sum() / max(1, p.sum()), (y & p).sum() / max(1, y.sum())
        assert op["validation"][c]["precision"] == pytest.approx(precision, abs=2e-3)
        assert op["validation"][c]["recall"] == pytest.approx(recall, abs=2e-3)
        assert precision >= 0.9 or not op["attained"][c]
        rp = cal_card["operating_points"]["recall_0.8"]
        assert ((y & (q[:, i] >= rp["thresholds"][i] - 1e-6)).sum() / y.sum()) >= 0.8 - 1e-9


def test_class_weights_give_each_class_a_pos_weight(multilabel_set: tuple[Path, np.ndarray], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root, _ = multilabel_set
    rc = main(["train", str(root / "table.csv"), "-o", str(tmp_path / "w"), "--mpp", "0.5", "--epochs", "1", "--width", "8",
               "--balance", "class_weights", "-q"])
    out = capsys.readouterr().out
    assert rc == 0, out
    card = json.loads((tmp_path / "w" / "card.json").read_text())
    assert card["head"] == "multilabel_sigmoid"
    assert card["training_prevalence"] == [0.5, 0.5, 0.5]  # reweighted: each class as if balanced
    for c in CLASSES:  # each class's own figures at 0.5, as the card has them
        m = card["metrics"]["validation"]["per_class"][c]
        assert f"{c}: at threshold 0.5 precision {m['precision']:.3f}, recall {m['recall']:.3f}" in out


def test_a_multilabel_model_scores_maps_and_regions_per_class(tmp_path: Path) -> None:
    """K sigmoid classes through the job: K channels, each thresholded alone, overlapping regions."""
    from slidescore.config import JobConfig
    from slidescore.io import mosaic as mz
    from slidescore.run.local import score_samples
    from tests.conftest import make_model_package, textured_image

    pkg = make_model_package(tmp_path / "ml", n_outputs=3, head="multilabel_sigmoid", constant=0.7)
    card = json.loads((pkg / "card.json").read_text())
    card["thresholds"] = [0.5, 0.6, 0.9]  # class2's threshold above the constant 0.7: no region
    (pkg / "card.json").write_text(json.dumps(card))
    src = write_tiff(tmp_path / "img.tif", textured_image(256, 256, seed=1, fg_box=(64, 64, 128, 128)))
    cfg = JobConfig.from_dict({"tiling": {"chunk_cells": 8}, "report": {"gradcam": False}})
    (res,) = score_samples([str(src)], cfg, str(tmp_path / "out"), model=load_model(str(pkg)))
    assert res.status == "ok", res.error
    prob = mz.read_level(Path(res.out_dir) / "probabilities.ome.zarr", 0)
    assert prob.shape[0] == 3 and np.nanmax(np.abs(prob - 0.7)) < 1e-5
    classes = sorted(r.class_name for r in res.regions)
    assert classes == ["class0", "class1"]  # the same cells are a region of two classes at once
    a, b = res.regions
    assert a.bbox_px == b.bbox_px and a.n_cells == b.n_cells
    run = json.loads((Path(res.out_dir) / "run.json").read_text())
    assert run["thresholds"] == {"class0": 0.5, "class1": 0.6, "class2": 0.9}


def test_bad_multilabel_tables_give_clear_errors(multilabel_set: tuple[Path, np.ndarray], tmp_path: Path) -> None:
    root, _ = multilabel_set

    def table(name: str, rows: list[dict[str, str]]) -> Path:
        path = root / name
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        return path

    with pytest.raises(ConfigError, match="names no class"):
        load_table(table("none.csv", [{"image": "p0.png", "labels": ""}, {"image": "p1.png", "labels": " ; "}]))
    with pytest.raises(ConfigError, match=r"row 2: patch file .*missing\.png.* cannot be read"):
        load_table(table("missing.csv", [{"image": "p0.png", "labels": "Red"}, {"image": "missing.png", "labels": "Red"}]))
    Image.new("RGB", (32, 32)).save(root / "small.png")
    with pytest.raises(ConfigError, match="expected square patches of one size"):
        load_table(table("sizes.csv", [{"image": "p0.png", "labels": "Red"}, {"image": "small.png", "labels": "Dots"}]))
    everywhere = table("all.csv", [{"image": f"p{i}.png", "labels": "Red;Dots" if i % 2 else "Red", "group": f"g{i % 3}"}
                                   for i in range(12)])
    with pytest.raises(ConfigError, match="with it and without it"):
        run_train(str(everywhere), str(tmp_path / "x"), FAST, mpp=0.5)
