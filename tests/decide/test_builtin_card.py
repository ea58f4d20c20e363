"""The built-in demo model carries calibration and operating points computed by ``calibrate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slidescore.config import DecisionConfig
from slidescore.decide import DecisionPolicy
from slidescore.model import load_model
from slidescore.model.loading import builtin_dir


def test_builtin_card_has_operating_points_that_meet_their_targets() -> None:
    card = load_model("builtin:smearnet").card
    assert card.calibration["method"] == "temperature" and 0.5 < card.calibration["temperature"] < 2
    assert card.thresholds == (0.5,)  # the training script's default is unchanged by temperature scaling
    assert set(card.operating_points) == {"precision_0.90", "precision_0.99", "recall_0.99", "recall_0.999"}
    for name, op in card.operating_points.items():
        # fitted where the job uses them: regions of the blended map, under the job's default region rule
        assert op["unit"] == "region" and op["region_rule"]["stride_px"] == 16, name
        fig = op["validation"]["parasitized"]
        assert fig[op["kind"]] >= op["target"], name
        held = op["held_out"]["parasitized"]  # a smear the fit never saw (seed 904)
        assert held[op["kind"]] >= op["target"], (name, held)
        assert held["recall"] > 0.95 and held["precision"] > 0.95 and held["n_objects"] > 200, name
        if op["kind"] == "recall":  # a parasite at a cell edge is in 9/16 of the patches covering its cell
            assert op["thresholds"][0] < 9 / 16, name
        pol = DecisionPolicy.from_card(card, DecisionConfig(operating_point=name))
        assert pol.thresholds == tuple(op["thresholds"]) and pol.record()["calibration"]["method"] == "temperature"
        assert pol.record()["operating_point_unit"] == "region"
    for name, op in card.calibration["patch_operating_points"].items():  # the patch-level fit, kept for reference
        assert op["unit"] == "patch" and op["validation"]["parasitized"][op["kind"]] >= op["target"], name
        held = op["held_out"]["parasitized"]
        assert held["recall"] > 0.95 and held["specificity"] > 0.98, name
    assert 0 < card.training_prevalence[0] < 0.5


@pytest.mark.slow
def test_calibrate_builtin_is_reproducible(tmp_path: Path) -> None:
    from slidescore.offline.calibrate_builtin import main

    pkg = tmp_path / "smearnet"
    shutil.copytree(builtin_dir("smearnet"), pkg)
    assert main(["--out", str(pkg), "--plots", str(tmp_path / "plots")]) == 0
    new, shipped = (json.loads(p.read_text()) for p in (pkg / "card.json", builtin_dir("smearnet") / "card.json"))
    assert (tmp_path / "plots" / "reliability_parasitized.png").exists()
    assert new["calibration"]["temperature"] == pytest.approx(shipped["calibration"]["temperature"], abs=1e-5)
    for points in ("operating_points", "patch_operating_points"):
        ship = shipped[points] if points == "operating_points" else shipped["calibration"][points]
        got_all = new[points] if points == "operating_points" else new["calibration"][points]
        for name, op in ship.items():
            assert got_all[name]["thresholds"] == pytest.approx(op["thresholds"], abs=1e-5)
            for key in ("validation", "held_out"):
                assert got_all[name][key]["parasitized"] == pytest.approx(op[key]["parasitized"], abs=1e-5)
    assert new["thresholds"] == shipped["thresholds"] and new["metrics"] == shipped["metrics"]
