"""DecisionPolicy: a card's calibration, prior shift and operating points, applied to probabilities."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from scipy.stats import norm

from slidescore.config import DecisionConfig, JobConfig
from slidescore.decide import DecisionPolicy
from slidescore.decide import calibration as cal
from slidescore.errors import ConfigError
from slidescore.model.card import ModelCard


def card(**kw: object) -> ModelCard:
    base: dict = dict(name="m", patch_px=64, mpp=0.5, classes=("parasitized",), thresholds=(0.5,))
    base.update(kw)
    return ModelCard(**base)


OPS = {
    "precision_0.9": {"kind": "precision", "target": 0.9, "thresholds": [0.7],
                      "validation": {"parasitized": {"recall": 0.8, "specificity": 0.99}}},
    "recall_0.999": {"kind": "recall", "target": 0.999, "thresholds": [0.1],
                     "validation": {"parasitized": {"recall": 0.999, "specificity": 0.9}}},
}


def test_temperature_is_applied_from_probabilities_and_nan_is_kept() -> None:
    pol = DecisionPolicy.from_card(card(calibration={"method": "temperature", "temperature": 2.0}), DecisionConfig())
    z = np.array([[[-3.0, 0.0], [1.0, np.nan]]])
    out = pol.transform(cal.sigmoid(z).astype(np.float32))
    assert out.dtype == np.float32 and np.isnan(out[0, 1, 1])
    np.testing.assert_allclose(out[0][~np.isnan(z[0])], cal.sigmoid(z[0][~np.isnan(z[0])] / 2), rtol=1e-6)
    assert DecisionPolicy.from_card(card(), None).identity  # no calibration, no shift: untouched
    assert pickle.loads(pickle.dumps(pol)) == pol


def test_prior_shift_of_a_calibrated_model_gives_the_bayes_posterior_at_the_target() -> None:
    x = np.linspace(-3, 3, 25)
    def post(pi: float) -> np.ndarray:
        return pi * norm.pdf(x, 1) / (pi * norm.pdf(x, 1) + (1 - pi) * norm.pdf(x, -1))
    pol = DecisionPolicy.from_card(card(training_prevalence=(0.5,)), DecisionConfig(target_prevalence=(0.02,)))
    np.testing.assert_allclose(pol.transform(post(0.5)[None]), post(0.02)[None], rtol=1e-9)
    # the default threshold moves with the probabilities: the same patches are called positive
    assert pol.thresholds[0] == pytest.approx(float(cal.prior_shift(0.5, 0.5, 0.02)))
    rec = pol.record()
    assert rec["prior_shift"] and rec["target_prevalence"] == {"parasitized": 0.02}


def test_softmax_prior_shift_is_bayes_too() -> None:
    pri_tr, pri_tg = np.array([0.5, 0.3, 0.2]), np.array([0.9, 0.05, 0.05])
    lik = np.random.default_rng(0).random((3, 10))  # p(x | class) for 10 points
    def post(pri: np.ndarray) -> np.ndarray:
        a = pri[:, None] * lik
        return a / a.sum(0)
    c = card(classes=("a", "b", "c"), head="softmax", thresholds=(0.5,) * 3, training_prevalence=tuple(pri_tr))
    pol = DecisionPolicy.from_card(c, DecisionConfig(target_prevalence=tuple(pri_tg)))
    np.testing.assert_allclose(pol.transform(post(pri_tr)), post(pri_tg), rtol=1e-9)


def test_operating_point_selects_thresholds_and_unknown_names_list_the_cards() -> None:
    c = card(operating_points=OPS)
    pol = DecisionPolicy.from_card(c, DecisionConfig(operating_point="recall_0.999"))
    assert pol.thresholds == (0.1,) and pol.record()["operating_point"] == "recall_0.999"
    assert pol.unit_figures["parasitized"] == {"sensitivity": 0.999, "specificity": 0.9}
    with pytest.raises(ConfigError, match=r"'precision_0.95'.*\['precision_0.9', 'recall_0.999'\]"):
        DecisionPolicy.from_card(c, DecisionConfig(operating_point="precision_0.95"))
    with pytest.raises(ConfigError, match="training_prevalence"):
        DecisionPolicy.from_card(c, DecisionConfig(target_prevalence=(0.1,)))
    # the job config carries the choice
    cfg = JobConfig.from_dict({"decision": {"operating_point": "precision_0.9"}})
    assert DecisionPolicy.from_card(c, cfg.decision).thresholds == (0.7,)


def test_multilabel_cards_get_per_class_thresholds_and_calls() -> None:
    ops = {"precision_0.9": {"kind": "precision", "target": 0.9, "thresholds": [0.6, 0.8],
                             "validation": {"a": {"recall": 0.9, "specificity": 0.999},
                                            "b": {"recall": 0.7, "specificity": 0.95}}}}
    c = card(classes=("a", "b"), head="multilabel_sigmoid", thresholds=(0.5, 0.5), operating_points=ops,
             training_prevalence=(0.1, 0.5))
    pol = DecisionPolicy.from_card(c, DecisionConfig(operating_point="precision_0.9", target_prevalence=(0.1, 0.2)))
    assert pol.thresholds[0] == pytest.approx(0.6)  # no shift for a: same prevalence
    assert pol.thresholds[1] == pytest.approx(float(cal.prior_shift(0.8, 0.5, 0.2)))
    p = np.array([[0.3, 0.9], [0.5, 0.5]])
    out = pol.transform(p)
    np.testing.assert_allclose(out[0], p[0])
    np.testing.assert_allclose(out[1], cal.prior_shift(p[1], 0.5, 0.2))
    call = pol.sample_call(300, {"a": 3, "b": 1})
    assert call["per_class"]["a"]["call"] == "positive" and call["per_class"]["b"]["call"] == "needs_review"
    assert call["call"] == "positive"
    with pytest.raises(ConfigError, match="one per class"):
        pol.sample_call(300, [1])


def test_precision_point_is_rechosen_at_the_target_prevalence_from_the_validation_roc() -> None:
    logits = np.r_[np.random.default_rng(0).normal(2, 1, 2000), np.random.default_rng(1).normal(-2, 1, 2000)]
    y = np.r_[np.ones(2000, bool), np.zeros(2000, bool)]
    p = cal.sigmoid(logits)
    th, _ = cal.threshold_at_precision(p, y, 0.9)
    ops = {"precision_0.9": {"kind": "precision", "target": 0.9, "thresholds": [th],
                             "validation": {"parasitized": cal.figures(p, y, th)}}}
    c = card(operating_points=ops, training_prevalence=(0.5,),
             calibration={"method": "none", "roc": {"parasitized": cal.compact_roc(p, y, max_points=4000)}})
    pol = DecisionPolicy.from_card(c, DecisionConfig(operating_point="precision_0.9", target_prevalence=(0.05,)))
    # at 5 % prevalence the threshold must rise; check the promised precision by reweighting negatives
    t_cal = float(cal.prior_shift(pol.thresholds[0], 0.05, 0.5))  # back on the validation scale
    assert t_cal > th
    f = cal.figures(p, y, t_cal)
    w = (0.05 / 0.95) / (2000 / 2000)
    assert f["tp"] * w / (f["tp"] * w + f["fp"]) >= 0.9 - 1e-9
    assert dataclasses.asdict(pol)["unit_figures"]["parasitized"]["precision_at_target_prevalence"] >= 0.9
