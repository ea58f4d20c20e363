"""Sample-level sensitivity / specificity from unit-level figures, their inverse, and the call."""

from __future__ import annotations

import numpy as np
import pytest

from slidescore.decide.sample_call import call_sample, sample_level, unit_level
from slidescore.errors import ConfigError


def test_issue_reference_numbers_reproduce_to_six_decimals() -> None:
    # 350 cells, sample sensitivity 0.95 and specificity 0.85 ⇒ cell sensitivity 0.991477, specificity 0.999536
    u = unit_level(0.95, 0.85, 350, convention="reference")
    assert round(u["sensitivity"], 6) == 0.991477
    assert round(u["specificity"], 6) == 0.999536
    back = sample_level(u["sensitivity"], u["specificity"], 350, convention="reference")
    assert back["sensitivity"] == pytest.approx(0.95, abs=1e-12)
    assert back["specificity"] == pytest.approx(0.85, abs=1e-12)


def test_binomial_specificity_is_exact_and_reference_is_sufficient() -> None:
    u = unit_level(0.95, 0.85, 350)  # one target cell among the 350
    assert round(u["specificity"], 6) == 0.999536
    s = sample_level(u["sensitivity"], u["specificity"], 350)
    assert s["sensitivity"] == pytest.approx(0.95, abs=1e-9) and s["specificity"] == pytest.approx(0.85, abs=1e-9)
    # the reference cell sensitivity is stricter: a model meeting it beats the sample-level target
    r = sample_level(0.991477, 0.999536, 350)
    assert r["sensitivity"] > 0.95 and r["specificity"] == pytest.approx(0.85, abs=1e-4)


@pytest.mark.parametrize(("n", "k", "m"), [(350, 1, 1), (60, 3, 2), (20, 20, 1)])
def test_binomial_model_matches_simulated_bernoulli_trials(n: int, k: int, m: int) -> None:
    s, c = 0.8, 0.99
    rng = np.random.default_rng(1)
    trials = 200_000
    neg_calls = (rng.random((trials, n)) < 1 - c).sum(1) >= m
    pos_units = np.concatenate([rng.random((trials, k)) < s, rng.random((trials, n - k)) < 1 - c], axis=1)
    pos_calls = pos_units.sum(1) >= m
    f = sample_level(s, c, n, n_target_units=k, min_positive=m)
    tol = 4 * np.sqrt(0.25 / trials)
    assert f["specificity"] == pytest.approx(1 - neg_calls.mean(), abs=tol)
    assert f["sensitivity"] == pytest.approx(pos_calls.mean(), abs=tol)


def test_calls_positive_negative_and_needs_review_with_numbers() -> None:
    c = 0.999536
    two = call_sample(350, 2, 0.99, c)  # P(>= 2 false positives | negative) ≈ 0.012
    assert two["call"] == "positive" and two["p_false_positives"] == pytest.approx(0.0118, abs=5e-4)
    one = call_sample(350, 1, 0.99, c)  # one positive cell happens in 15 % of negative samples
    assert one["call"] == "needs_review" and one["p_false_positives"] == pytest.approx(0.15, abs=1e-3)
    neg = call_sample(350, 0, 0.99, c)
    # the figures are those of the rule applied (positive from 2 cells on), not of ">= 1 cell" (0.85)
    assert neg["call"] == "negative" and neg["positive_from"] == 2
    assert neg["sample_specificity"] == pytest.approx(0.9882, abs=5e-4)
    assert call_sample(0, 0, 0.99, c)["call"] == "needs_review"
    with pytest.raises(ConfigError, match="probability"):
        sample_level(1.5, 0.9, 10)


@pytest.mark.parametrize(("n", "c", "s", "alpha", "m"), [(350, 0.999536, 0.99, 0.05, 1), (953, 0.998, 0.9, 0.05, 1),
                                                          (200, 0.99, 0.8, 0.01, 3)])
def test_printed_figures_are_those_of_the_applied_rule(n: int, c: float, s: float, alpha: float, m: int) -> None:
    """Simulate the whole procedure: draw unit outcomes, call each simulated sample with call_sample, and
    compare how often it is called positive with the sample-level figures call_sample prints."""
    rng = np.random.default_rng(7)
    trials = 40_000
    neg_counts = rng.binomial(n, 1 - c, trials)
    pos_counts = rng.binomial(1, s, trials) + rng.binomial(n - 1, 1 - c, trials)  # one target unit
    calls: dict[int, str] = {}

    def called_positive(k: int) -> bool:
        if k not in calls:
            calls[k] = call_sample(n, k, s, c, min_positive=m, alpha=alpha)["call"]
        return calls[k] == "positive"

    spec = 1 - np.mean([called_positive(int(k)) for k in neg_counts])
    sens = np.mean([called_positive(int(k)) for k in pos_counts])
    printed = call_sample(n, 0, s, c, min_positive=m, alpha=alpha)
    tol = 4 * np.sqrt(0.25 / trials)
    assert printed["sample_specificity"] == pytest.approx(spec, abs=tol)
    assert printed["sample_sensitivity"] == pytest.approx(sens, abs=tol)
    # the applied threshold, found independently: the fewest positives a negative sample reaches with p <= alpha
    from scipy.stats import binom

    needed = next(k for k in range(m, n + 1) if binom.sf(k - 1, n, 1 - c) <= alpha)
    assert printed["positive_from"] == needed and str(needed) in printed["rule"]


@pytest.mark.parametrize(("n", "k", "m"), [(350, 2, 2), (60, 3, 3), (500, 5, 4)])
def test_inverse_for_the_applied_rule_round_trips_and_matches_simulation(n: int, k: int, m: int) -> None:
    u = unit_level(0.9, 0.95, n, n_target_units=k, min_positive=m)
    back = sample_level(u["sensitivity"], u["specificity"], n, n_target_units=k, min_positive=m)
    assert back["sensitivity"] == pytest.approx(0.9, abs=1e-9) and back["specificity"] == pytest.approx(0.95, abs=1e-9)
    rng = np.random.default_rng(3)
    trials = 100_000
    neg = rng.binomial(n, 1 - u["specificity"], trials) >= m
    pos = rng.binomial(k, u["sensitivity"], trials) + rng.binomial(n - k, 1 - u["specificity"], trials) >= m
    tol = 4 * np.sqrt(0.25 / trials)
    assert 1 - neg.mean() == pytest.approx(0.95, abs=tol) and pos.mean() == pytest.approx(0.9, abs=tol)


def test_inverse_says_when_the_rule_cannot_reach_the_sensitivity() -> None:
    # one target cell, two needed: a positive sample needs a false positive too, which Sp = 0.95 makes rare
    with pytest.raises(ConfigError, match="out of reach"):
        unit_level(0.9, 0.95, 350, n_target_units=1, min_positive=2)
