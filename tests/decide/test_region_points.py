"""Operating points fitted on regions: counting rules, the choice of threshold, and that the built-in
card's region-level points keep their promise on a smear none of them was fitted on."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binom

from slidescore.config import DecisionConfig
from slidescore.decide import DecisionPolicy
from slidescore.decide import calibration as cal
from slidescore.decide import region_points as rp
from slidescore.errors import ConfigError
from slidescore.model.card import ModelCard

CELL = 16


def centre(cy: int, cx: int) -> list[float]:
    return [cy * CELL + CELL / 2, cx * CELL + CELL / 2]


def constructed() -> rp.RegionSample:
    """Blob A (0.9, two objects), blob B (0.6, one object), blob C (0.4, none), one object on no blob."""
    prob = np.zeros((20, 20))
    prob[2:5, 2:5] = 0.9
    prob[10:12, 10:12] = 0.6
    prob[15, 15] = 0.4
    prob[0, 19] = np.nan  # not scored: never part of a region
    pts = np.array([centre(2, 2), centre(4, 4), centre(10, 11), centre(18, 2)])
    return rp.RegionSample(prob, pts, n_fields=100.0)


def test_region_counts_follow_the_jobs_regions() -> None:
    s = constructed()
    c = rp.region_counts(s.prob, s.points, 0.5, cell_px=CELL)
    assert c == {"n_regions": 2, "true_regions": 2, "false_regions": 0, "found": 3, "n_objects": 4, "merged_objects": 2}
    c = rp.region_counts(s.prob, s.points, 0.3, cell_px=CELL)
    assert (c["n_regions"], c["false_regions"], c["found"]) == (3, 1, 3)
    f = rp.figures_from_counts(c, s.n_fields)
    assert f["precision"] == pytest.approx(2 / 3) and f["recall"] == pytest.approx(0.75)
    assert f["specificity"] == pytest.approx(1 - 1 / 96)  # one false region among 100 - 4 negative fields
    assert 0 < f["recall_lower_95"] < f["recall"]
    assert rp.region_counts(s.prob, s.points, 0.95, cell_px=CELL)["n_regions"] == 0


def test_thresholds_are_chosen_on_region_figures() -> None:
    sweep = rp.sweep_regions([constructed()], cell_px=CELL)
    # recall 0.75 holds up to 0.6 (blob B), and never above: the highest such threshold
    i, ok = rp.pick_region_threshold(sweep, "recall", 0.75)
    assert ok and sweep.thresholds[i] == 0.6
    # precision 0.99 needs blob C gone (t > 0.4); most recall up to 0.6; ties: closest to 0.5
    i, ok = rp.pick_region_threshold(sweep, "precision", 0.99)
    assert ok and sweep.thresholds[i] == 0.5
    i, ok = rp.pick_region_threshold(sweep, "recall", 0.9)  # the object on no blob is never found
    assert not ok
    pts = rp.region_operating_points(sweep, ["precision_0.99", "recall_0.75"], "parasitized", fitted_on="constructed",
                                     rule={"stride_px": CELL})
    assert pts["recall_0.75"]["unit"] == "region" and pts["recall_0.75"]["thresholds"] == [0.6]
    assert pts["precision_0.99"]["validation"]["parasitized"]["false_regions"] == 0


def consistent(failures: int, n: int, target: float, alpha: float = 0.01) -> bool:
    """Are ``failures`` of ``n`` plausible for a rate >= ``target`` (one-sided binomial test at ``alpha``)?"""
    return bool(binom.sf(failures - 1, n, 1 - target) >= alpha) if failures else True


@pytest.fixture(scope="module")
def fresh_smear() -> tuple[object, rp.RegionSample]:
    """The built-in model's calibrated map of a smear no operating point saw (seed 2024, 2048² px)."""
    from slidescore.model import load_model
    from slidescore.offline.calibrate_builtin import region_sample, smear_spec

    base = load_model("builtin:smearnet", device="cpu")  # score_array applies its card's calibration, as a job does
    return base.card, region_sample(base, smear_spec(2024, size_px=2048))


def test_builtin_region_points_hold_on_a_fresh_smear(fresh_smear: tuple[ModelCard, rp.RegionSample]) -> None:
    from slidescore.offline.calibrate_builtin import region_figures

    card, sample = fresh_smear
    assert len(sample.points) >= 40
    for name, op in card.operating_points.items():
        assert card.operating_point_unit(name) == "region"
        f = region_figures(sample, op["thresholds"][0])
        target = op["target"]
        if op["kind"] == "recall":
            assert consistent(f["n_objects"] - f["found"], f["n_objects"], target), (name, f)
        else:
            assert consistent(f["false_regions"], f["n_regions"], target), (name, f)
        # and no point gives away what its validation promised on the other figure
        v = op["validation"]["parasitized"]
        assert consistent(f["n_objects"] - f["found"], f["n_objects"], min(v["recall"], 0.999)), (name, f)
    # the patch-level point for patch precision 0.99 does not keep its validation recall on regions:
    # the same check fails there (blending loses parasites at cell edges above ~9/16)
    patch = card.calibration["patch_operating_points"]["precision_0.99"]
    assert patch["unit"] == "patch"
    f = region_figures(sample, patch["thresholds"][0])
    assert not consistent(f["n_objects"] - f["found"], f["n_objects"], patch["validation"]["parasitized"]["recall"])


def test_cards_record_the_unit_and_old_cards_load_as_patch() -> None:
    base = dict(name="m", patch_px=64, mpp=0.5, classes=["parasitized"], thresholds=[0.5])
    old = ModelCard.from_dict({**base, "operating_points": {"recall_0.99": {"kind": "recall", "thresholds": [0.2]}}})
    assert old.operating_point_unit("recall_0.99") == "patch" and old.to_dict()["operating_points"]["recall_0.99"]["unit"] == "patch"
    with pytest.raises(ConfigError, match="unit must be one of"):
        ModelCard.from_dict({**base, "operating_points": {"recall_0.99": {"unit": "cells", "thresholds": [0.2]}}})
    with pytest.raises(ConfigError, match="must be a mapping"):
        ModelCard.from_dict({**base, "operating_points": {"recall_0.99": [0.2]}})


def test_region_points_keep_their_threshold_under_a_prior_shift() -> None:
    p = cal.sigmoid(np.r_[np.random.default_rng(0).normal(2, 1, 500), np.random.default_rng(1).normal(-2, 1, 500)])
    y = np.r_[np.ones(500, bool), np.zeros(500, bool)]
    fig = {"recall": 0.99, "specificity": 0.999, "precision": 0.995}
    ops = {name: {"kind": "precision", "target": 0.9, "thresholds": [0.3], "unit": unit, "validation": {"parasitized": fig}}
           for name, unit in (("precision_0.9", "region"), ("patch_precision_0.9", "patch"))}
    c = ModelCard(name="m", patch_px=64, mpp=0.5, classes=("parasitized",), operating_points=ops,
                  training_prevalence=(0.5,), calibration={"method": "none", "roc": {"parasitized": cal.compact_roc(p, y)}})
    region = DecisionPolicy.from_card(c, DecisionConfig(operating_point="precision_0.9", target_prevalence=(0.05,)))
    patch = DecisionPolicy.from_card(c, DecisionConfig(operating_point="patch_precision_0.9", target_prevalence=(0.05,)))
    # the patch ROC says nothing about regions: the region point's threshold is only carried through the shift
    assert region.thresholds[0] == pytest.approx(float(cal.prior_shift(0.3, 0.5, 0.05)))
    assert patch.thresholds[0] != pytest.approx(region.thresholds[0])
    assert region.record()["operating_point_unit"] == "region" and patch.record()["operating_point_unit"] == "patch"
    assert region.unit_figures["parasitized"] == {"sensitivity": 0.99, "specificity": 0.999}


def test_a_region_point_under_other_region_settings_is_flagged(caplog: pytest.LogCaptureFixture) -> None:
    """The region figures on the card hold for the region rule they were fitted with; other settings get a warning."""
    import logging

    from slidescore.config import JobConfig
    from slidescore.model import load_model
    from slidescore.stages.plan import check_config_for_model

    card = load_model("builtin:smearnet").card
    with caplog.at_level(logging.WARNING, logger="slidescore.stages.plan"):
        check_config_for_model(JobConfig.from_dict({"decision": {"operating_point": "precision_0.90"}}), card)
        assert not caplog.records
        check_config_for_model(JobConfig.from_dict({"decision": {"operating_point": "precision_0.90"},
                                                    "regions": {"min_area_um2": 50.0}}), card)
    (rec,) = caplog.records
    assert "precision_0.90" in rec.getMessage() and "min_area_um2 50.0 (fitted with 0.0)" in rec.getMessage()
