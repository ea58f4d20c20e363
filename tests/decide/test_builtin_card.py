"""The built-in demo model carries calibration and operating points computed by ``calibrate``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from slidescore.config import DecisionConfig
from slidescore.decide import DecisionPolicy
from slidescore.model import load_model
from slidescore.model.scoring import builtin_dir


def test_builtin_card_has_operating_points_that_meet_their_targets() -> None:
    card = load_model("builtin:smearnet").card
    assert card.calibration["method"] == "temperature" and 0.5 < card.calibration["temperature"] < 2
    assert card.thresholds == (0.5,)  # the training script's default is unchanged by temperature scaling
    assert set(card.operating_points) == {"precision_0.90", "precision_0.99", "recall_0.99", "recall_0.999"}
    for name, op in card.operating_points.items():
        fig = op["validation"]["parasitized"]
        assert fig[op["kind"]] >= op["target"], name
        held = card.calibration["held_out"]["operating_points"][name]
        assert held["recall"] > 0.95 and held["specificity"] > 0.98, name
        pol = DecisionPolicy.from_card(card, DecisionConfig(operating_point=name))
        assert pol.thresholds == tuple(op["thresholds"]) and pol.record()["calibration"]["method"] == "temperature"
    assert 0 < card.training_prevalence[0] < 0.5


@pytest.mark.slow
def test_calibrate_builtin_is_reproducible(tmp_path: Path) -> None:
    from slidescore.model.calibrate_builtin import main

    pkg = tmp_path / "smearnet"
    shutil.copytree(builtin_dir("smearnet"), pkg)
    assert main(["--out", str(pkg), "--plots", str(tmp_path / "plots")]) == 0
    new, shipped = (json.loads(p.read_text()) for p in (pkg / "card.json", builtin_dir("smearnet") / "card.json"))
    assert (tmp_path / "plots" / "reliability_parasitized.png").exists()
    assert new["calibration"]["temperature"] == pytest.approx(shipped["calibration"]["temperature"], abs=1e-5)
    for name, op in shipped["operating_points"].items():
        assert new["operating_points"][name]["thresholds"] == pytest.approx(op["thresholds"], abs=1e-5)
        got = new["operating_points"][name]["validation"]["parasitized"]
        assert got == pytest.approx(op["validation"]["parasitized"], abs=1e-5)
    assert new["thresholds"] == shipped["thresholds"] and new["metrics"] == shipped["metrics"]
