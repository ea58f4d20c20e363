"""Calibration, operating points and prior shift on generated data with known truth."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import norm

from slidescore.decide import calibration as cal


def overconfident(n: int, seed: int, prevalence: float = 0.3, scale: float = 3.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels from true log-odds z; the 'model' outputs scale·z (overconfident). Returns logits, labels, true p."""
    rng = np.random.default_rng(seed)
    y = rng.random(n) < prevalence
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)  # two unit Gaussians at ±1
    z = 2 * x + np.log(prevalence / (1 - prevalence))  # exact posterior log-odds
    return scale * z, y, cal.sigmoid(z)


def test_temperature_scaling_lowers_ece_and_recovers_the_distortion() -> None:
    logits, y, _ = overconfident(20_000, 0)
    t = cal.fit_temperature(logits[:, None], y[:, None], "sigmoid")
    assert t == pytest.approx(3.0, rel=0.05)
    test_logits, test_y, _ = overconfident(20_000, 1)
    before = cal.expected_calibration_error(cal.sigmoid(test_logits), test_y)
    after = cal.expected_calibration_error(cal.sigmoid(test_logits / t), test_y)
    assert before > 0.05 and after < 0.015 and after < before / 4


def test_isotonic_lowers_ece_on_held_out_data() -> None:
    logits, y, _ = overconfident(20_000, 2)
    kx, ky = cal.fit_isotonic(cal.sigmoid(logits), y)
    assert np.all(np.diff(ky) >= 0) and np.all(np.diff(kx) > 0)
    t_logits, t_y, _ = overconfident(20_000, 3)
    p = cal.sigmoid(t_logits)
    assert cal.expected_calibration_error(cal.apply_isotonic(p, kx, ky), t_y) < cal.expected_calibration_error(p, t_y) / 3


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_threshold_at_target_precision_holds_on_held_out_data(target: float) -> None:
    logits, y, _ = overconfident(30_000, 4)
    th, ok = cal.threshold_at_precision(cal.sigmoid(logits), y, target)
    assert ok
    t_logits, t_y, _ = overconfident(30_000, 5)
    f = cal.figures(cal.sigmoid(t_logits), t_y, th)
    n_called = f["tp"] + f["fp"]
    margin = 3 * np.sqrt(target * (1 - target) / n_called)  # 3 binomial standard errors of the precision
    assert f["precision"] >= target - margin
    assert f["recall"] > 0.2  # not a degenerate threshold


def test_threshold_at_target_recall_holds_on_held_out_data() -> None:
    logits, y, _ = overconfident(30_000, 6)
    th, ok = cal.threshold_at_recall(cal.sigmoid(logits), y, 0.99)
    assert ok and cal.figures(cal.sigmoid(logits), y, th)["recall"] >= 0.99
    t_logits, t_y, _ = overconfident(30_000, 7)
    f = cal.figures(cal.sigmoid(t_logits), t_y, th)
    assert f["recall"] >= 0.99 - 3 * np.sqrt(0.99 * 0.01 / (f["tp"] + f["fn"]))


def test_prior_shift_equals_the_analytic_bayes_posterior() -> None:
    x = np.linspace(-4, 4, 101)
    def posterior(pi: float) -> np.ndarray:  # Bayes' rule with the class-conditional densities
        a, b = pi * norm.pdf(x, 1, 1), (1 - pi) * norm.pdf(x, -1, 1)
        return a / (a + b)
    p_train = posterior(0.5)
    for target in (0.001, 0.02, 0.3, 0.9):
        np.testing.assert_allclose(cal.prior_shift(p_train, 0.5, target), posterior(target), rtol=1e-9, atol=1e-12)


def test_auc_and_average_precision_of_known_rankings() -> None:
    y = np.array([0, 0, 1, 1], bool)
    assert cal.auc_roc(np.array([0.1, 0.2, 0.3, 0.4]), y) == 1.0
    assert cal.auc_roc(np.array([0.4, 0.3, 0.2, 0.1]), y) == 0.0
    assert cal.auc_roc(np.array([0.1, 0.3, 0.2, 0.4]), y) == 0.75
    assert cal.average_precision(np.array([0.1, 0.3, 0.2, 0.4]), y) == pytest.approx((1 + 2 / 3) / 2)
