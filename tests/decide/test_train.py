"""``slidescore train`` / ``calibrate``: small generated data end to end, and bad data."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from slidescore.cli import main
from slidescore.errors import ConfigError
from slidescore.model import load_model
from slidescore.offline.datasets import load_folder, load_table
from slidescore.offline.train import Augmentation, TrainOptions, run_train, split_by_group
from tests.conftest import write_tiff

FAST = TrainOptions(epochs=4, patience=2, width=8, batch_size=32, progress=False)


def test_training_on_a_small_patch_folder_gives_a_loadable_package(patch_folder: Path, tmp_path: Path) -> None:
    card = run_train(str(patch_folder), str(tmp_path / "pkg"), FAST, mpp=0.5)
    assert card.classes == ("parasitized",) and card.head == "binary_sigmoid" and card.dense and card.patch_px == 64
    val = card.metrics["validation"]
    assert val["per_class"]["parasitized"]["auc_roc"] > 0.6  # it learned something in 4 tiny epochs
    assert sum(map(sum, val["confusion"])) == sum(card.training["patches"]["val"].values())
    # no source image in two splits; plots are real PNGs
    assert card.training["source_images"]["train"] + card.training["source_images"]["val"] == 4
    for f in card.training["plots"]:
        with Image.open(tmp_path / "pkg" / f) as im:
            assert im.format == "PNG" and im.size[0] > 100
    m = load_model(str(tmp_path / "pkg"))
    assert m.card == card
    probs = m.score_patches(np.asarray(Image.open(next((patch_folder / "parasitized").iterdir())))[None].transpose(0, 3, 1, 2), 8)
    assert probs.shape == (1, 1) and 0 <= probs[0, 0] <= 1
    assert 0 < card.training_prevalence[0] < 1


def test_split_is_by_source_image() -> None:
    groups = np.repeat(np.array(["a", "b", "c", "d", "e"]), 10)
    labels = np.tile(np.r_[np.zeros(5, int), np.ones(5, int)], 5)
    tr, va = split_by_group(groups, labels, 0.3, seed=1)
    assert not set(groups[tr]) & set(groups[va]) and va.any() and tr.any()
    with pytest.raises(ConfigError, match="one source image"):
        split_by_group(np.array(["x"] * 4), np.array([0, 1, 0, 1]), 0.3, seed=0)


def test_balance_by_downsampling_and_bias_init(patch_folder: Path, tmp_path: Path) -> None:
    down = run_train(str(patch_folder), str(tmp_path / "down"), TrainOptions(epochs=1, width=8, balance="downsample",
                                                                            progress=False), mpp=0.5)
    used = down.training["patches"]["train_used"]
    assert used["parasitized"] == used["uninfected"] and down.training_prevalence == (0.5,)


def test_augmentation_keeps_hue() -> None:
    import colorsys

    import torch

    rgb = torch.tensor([0.8, 0.3, 0.5]).view(1, 3, 1, 1).repeat(4, 1, 8, 8)
    aug = Augmentation(flips=True, rot90=True, brightness=0.2, contrast=0.0, saturation=0.3, sharpness=0.0)
    out = aug.apply(rgb, torch.Generator().manual_seed(0))
    h0 = colorsys.rgb_to_hsv(0.8, 0.3, 0.5)[0]
    for px in out[:, :, 0, 0]:
        assert colorsys.rgb_to_hsv(*px.tolist())[0] == pytest.approx(h0, abs=1e-4)
    assert not torch.allclose(out, rgb)
    assert Augmentation.parse("none").brightness == 0 and not Augmentation.parse("flips=0").flips
    with pytest.raises(ConfigError, match="unknown key"):
        Augmentation.parse("hue=0.1")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_folders_give_clear_errors(patch_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such folder"):
        load_folder(tmp_path / "missing")
    one = _copy(patch_folder, tmp_path / "one")
    shutil.rmtree(one / "uninfected")
    with pytest.raises(ConfigError, match=r"1 class subfolder\(s\) \['parasitized'\]; expected at least two"):
        load_folder(one)
    empty = _copy(patch_folder, tmp_path / "empty")
    for f in (empty / "uninfected").iterdir():
        f.unlink()
    (empty / "uninfected" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(ConfigError, match="class folder 'uninfected' holds no images"):
        load_folder(empty)
    mixed = _copy(patch_folder, tmp_path / "mixed")
    Image.new("RGB", (80, 80), (200, 100, 100)).save(mixed / "uninfected" / "zz_cell_1.png")
    with pytest.raises(ConfigError, match=r"mixed sizes \(64×64 px.*80×80 px.*--resize"):
        load_folder(mixed)
    assert load_folder(mixed, resize=64).images.shape[1:] == (64, 64, 3)
    bad = _copy(patch_folder, tmp_path / "bad")
    (bad / "uninfected" / "broken_cell_1.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match=r"broken_cell_1.png' cannot be read as an image.*replace or delete"):
        load_folder(bad)


def test_annotation_table_reads_patches_with_slidescore_readers(tmp_path: Path) -> None:
    from slidescore.offline import synthetic as syn

    rows = []
    for i in range(2):
        layout = syn.plan_smear(syn.SmearSpec(1024, 1024, seed=40 + i, parasitemia=0.03))
        img = syn.render_image(layout, 1)
        write_tiff(tmp_path / f"s{i}.tif", img, mpp=0.25, n_levels=2)
        for y, x in syn.parasite_positions(layout)[:5]:
            rows.append({"image": f"s{i}.tif", "y": y - 8, "x": x - 8, "h": 16, "w": 16, "label": "parasitized"})
        for y, x in np.random.default_rng(i).integers(100, 900, (5, 2)):
            rows.append({"image": f"s{i}.tif", "y": y, "x": x, "h": 16, "w": 16, "label": "uninfected"})
    table = tmp_path / "boxes.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    ps = load_table(table, patch_px=64, mpp=0.5)
    assert ps.images.shape == (len(rows), 64, 64, 3) and ps.mpp == 0.5
    assert set(ps.groups) == {"s0.tif", "s1.tif"} and ps.class_names == ("parasitized", "uninfected")
    # the patch is centred on the box: the parasite's dark chromatin dot is in the middle
    pos = ps.images[ps.labels == 0].astype(float)
    assert pos[:, 24:40, 24:40].min(axis=(1, 2, 3)).mean() < pos[:, :8, :8].min(axis=(1, 2, 3)).mean()
    (tmp_path / "nolabel.csv").write_text("image,y,x,h,w\ns0.tif,1,1,4,4\n")
    with pytest.raises(ConfigError, match=r"missing columns \['label'\]"):
        load_table(tmp_path / "nolabel.csv")


def test_cli_train_then_calibrate_then_score_with_an_operating_point(patch_folder: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pkg, cal_pkg = tmp_path / "pkg", tmp_path / "cal"
    rc = main(["train", str(patch_folder), "-o", str(pkg), "--mpp", "0.5", "--epochs", "3", "--width", "8", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "validation AUC-ROC" in out
    rc = main(["calibrate", str(pkg), str(patch_folder), "-o", str(cal_pkg), "--precision", "0.90", "--recall", "0.99"])
    out = capsys.readouterr().out
    assert rc == 0 and "ECE" in out and "precision_0.90" in out
    card = json.loads((cal_pkg / "card.json").read_text())
    assert set(card["operating_points"]) == {"precision_0.90", "recall_0.99"}
    # a patch table cannot tell regions apart: its points say they count patches
    assert {op["unit"] for op in card["operating_points"].values()} == {"patch"}
    op = card["operating_points"]["recall_0.99"]["validation"]["parasitized"]
    assert op["recall"] >= 0.99
    # temperature scaling never worsens the validation likelihood it was fitted on (T = 1 is a candidate)
    assert card["calibration"]["nll_after"] <= card["calibration"]["nll_before"] + 1e-6
    assert (cal_pkg / "plots" / "reliability_parasitized.png").stat().st_size > 1000
    m = load_model(str(cal_pkg))
    from slidescore.config import DecisionConfig
    from slidescore.decide import DecisionPolicy

    pol = DecisionPolicy.from_card(m.card, DecisionConfig(operating_point="precision_0.90"))
    assert pol.thresholds == tuple(card["operating_points"]["precision_0.90"]["thresholds"])
    with pytest.raises(SystemExit):  # neither --output nor --in-place: argparse usage error
        main(["calibrate", str(pkg), str(patch_folder)])
    # isotonic, in place: the package itself is updated, and its map is monotone
    assert main(["calibrate", str(pkg), str(patch_folder), "--in-place", "--method", "isotonic"]) == 0
    iso = load_model(str(pkg)).card
    assert iso.calibration["method"] == "isotonic" and "recall_0.999" in iso.operating_points
    pol = DecisionPolicy.from_card(iso, DecisionConfig())
    q = pol.transform(np.linspace(0, 1, 101)[None])
    assert np.all(np.diff(q[0]) >= 0) and q.min() >= 0 and q.max() <= 1
    assert iso.calibration["ece_after"]["parasitized"] <= iso.calibration["ece_before"]["parasitized"]


def test_cli_reports_bad_data_as_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "d" / "only").mkdir(parents=True)
    assert main(["train", str(tmp_path / "d"), "-o", str(tmp_path / "o"), "--mpp", "0.5", "-q"]) == 2
    assert "expected at least two" in capsys.readouterr().err
