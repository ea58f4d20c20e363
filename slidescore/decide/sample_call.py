"""From per-unit (cell or patch) accuracy to a per-sample call, with the numbers behind it.

Model: the ``n`` units examined in a sample are independent Bernoulli trials and the sample is
called positive when at least ``m`` units (default 1) are called positive.

* Negative sample: each unit is a false positive with probability ``1 − c`` (``c`` = unit
  specificity), so ``Sp = P(Bin(n, 1 − c) < m)``; for ``m = 1``, ``Sp = c^n``.
* Positive sample (``convention="binomial"``): ``k`` of its ``n`` units carry the target (default
  1, the hardest case: one infected cell among those examined), each found with probability ``s``
  (unit sensitivity); the others behave as in a negative sample. ``Se = P(Bin(k, s) +
  Bin(n − k, 1 − c) >= m)``; for ``m = k = 1``, ``Se = 1 − (1 − s)·c^(n − 1)``.
* ``convention="reference"`` is the rule of thumb the issue quotes (WHO-style per-field targets):
  the same n-th-root rule for both error rates, ``Sp = c^n`` and ``Se = 1 − s^n``. Its inverse
  gives, for 350 cells, ``Se = 0.95`` and ``Sp = 0.85``: ``c = 0.85^(1/350) = 0.999536`` and
  ``s = 0.05^(1/350) = 0.991477``. ``c`` is exact under the model above; ``s`` is stricter than
  the binomial model needs for any ``k >= 1`` in this high-accuracy regime (``s = 0.991477``
  gives ``Se = 0.9927`` with ``k = 1``), so a model meeting it meets the sample-level target.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slidescore.errors import ConfigError

CONVENTIONS = ("binomial", "reference")


def _binom() -> Any:
    """scipy.stats.binom, imported on first use: scipy.stats costs ~0.3 s at start-up in every process
    (the driver, each Ray actor, ``slidescore score``), and most never make a sample call."""
    from scipy.stats import binom

    return binom


def _check(name: str, v: float, lo_open: bool = False) -> None:
    if not (0 < v <= 1 if lo_open else 0 <= v <= 1):
        raise ConfigError(f"{name}: expected a probability in {'(0, 1]' if lo_open else '[0, 1]'}, got {v!r}")


def _p_at_least(m: int, n: int, k: int, s: float, fpr: float) -> float:
    """P(Bin(k, s) + Bin(n − k, fpr) >= m), by convolving the two pmfs."""
    if m <= 0:
        return 1.0
    a = _binom().pmf(np.arange(k + 1), k, s)
    b = _binom().pmf(np.arange(n - k + 1), n - k, fpr)
    below = sum(float(a[i] * b[: max(0, m - i)].sum()) for i in range(min(k, m - 1) + 1))
    return float(min(1.0, max(0.0, 1.0 - below)))


def sample_level(unit_sensitivity: float, unit_specificity: float, n_units: int, *, n_target_units: int = 1,
                 min_positive: int = 1, convention: str = "binomial") -> dict[str, float]:
    """Sample-level sensitivity and specificity from unit-level ones (see the module docstring)."""
    s, c = float(unit_sensitivity), float(unit_specificity)
    _check("unit_sensitivity", s)
    _check("unit_specificity", c)
    if n_units < 0 or min_positive < 1:
        raise ConfigError(f"need n_units >= 0 and min_positive >= 1, got {n_units}, {min_positive}")
    if convention == "reference":
        return {"sensitivity": 1.0 - s**n_units, "specificity": c**n_units}
    if convention != "binomial":
        raise ConfigError(f"convention: expected one of {list(CONVENTIONS)}, got {convention!r}")
    k = min(max(int(n_target_units), 1), max(n_units, 1))
    spec = float(_binom().cdf(min_positive - 1, n_units, 1.0 - c))
    sens = _p_at_least(min_positive, max(n_units, k), k, s, 1.0 - c) if n_units else 0.0
    return {"sensitivity": sens, "specificity": spec}


def unit_level(sample_sensitivity: float, sample_specificity: float, n_units: int, *, n_target_units: int = 1,
               min_positive: int = 1, convention: str = "binomial") -> dict[str, float]:
    """The unit-level sensitivity and specificity needed for a sample-level pair under the rule
    "positive when at least ``min_positive`` units are positive" (the inverse of :func:`sample_level`).

    ``binomial``, ``min_positive`` 1: ``c = Sp^(1/n)`` and ``s`` solves ``1 − (1 − s)^k · c^(n − k) = Se``
    (0 when false positives alone already reach ``Se``); larger ``min_positive``: both solved numerically
    (each figure is monotone in its unit-level counterpart). ``reference``: ``c = Sp^(1/n)``,
    ``s = (1 − Se)^(1/n)`` (rule: >= 1 unit).
    """
    se, sp = float(sample_sensitivity), float(sample_specificity)
    _check("sample_sensitivity", se)
    _check("sample_specificity", sp, lo_open=True)
    if n_units < 1:
        raise ConfigError(f"n_units: expected a positive number of examined units, got {n_units}")
    if min_positive < 1 or min_positive > n_units:
        raise ConfigError(f"min_positive: expected 1 … n_units={n_units}, got {min_positive}")
    if convention == "reference":
        if min_positive != 1:
            raise ConfigError("convention 'reference' is the rule '>= 1 unit'; use convention 'binomial' for min_positive > 1")
        c = sp ** (1.0 / n_units)
        return {"sensitivity": (1.0 - se) ** (1.0 / n_units), "specificity": c}
    if convention != "binomial":
        raise ConfigError(f"convention: expected one of {list(CONVENTIONS)}, got {convention!r}")
    k = min(max(int(n_target_units), 1), n_units)
    if min_positive == 1:
        c = sp ** (1.0 / n_units)
        # 1 − (1 − s)^k · c^(n − k) = Se  ⇒  (1 − s) = ((1 − Se) / c^(n − k))^(1/k)
        # (a miss above 1 means false positives alone reach Se: any unit sensitivity will do)
        s = max(0.0, 1.0 - ((1.0 - se) / c ** (n_units - k)) ** (1.0 / k))
        return {"sensitivity": float(s), "specificity": float(c)}
    from scipy.optimize import brentq

    # specificity: P(Bin(n, 1 − c) < m) rises with c from 0 (c = 0, m <= n) to 1 (c = 1)
    c = 1.0 if sp >= 1.0 else float(brentq(lambda x: _binom().cdf(min_positive - 1, n_units, 1.0 - x) - sp, 0.0, 1.0, xtol=1e-15))
    at_zero = _p_at_least(min_positive, n_units, k, 0.0, 1.0 - c)
    if at_zero >= se:  # false positives alone reach Se
        return {"sensitivity": 0.0, "specificity": c}
    if _p_at_least(min_positive, n_units, k, 1.0, 1.0 - c) < se:
        raise ConfigError(f"sample sensitivity {se} is out of reach for {k} target unit(s) among {n_units} under the rule "
                          f">= {min_positive} positive units; lower it or the rule")
    s = float(brentq(lambda x: _p_at_least(min_positive, n_units, k, x, 1.0 - c) - se, 0.0, 1.0, xtol=1e-15))
    return {"sensitivity": s, "specificity": c}


def effective_min_positive(n_examined: int, unit_specificity: float, *, alpha: float, min_positive: int = 1) -> int:
    """The fewest positive units that :func:`call_sample` calls positive: at least ``min_positive`` and
    few enough false positives that a negative sample reaches that count with probability <= ``alpha``
    (``n_examined + 1``, never, when no count qualifies)."""
    n, fpr = int(n_examined), 1.0 - float(unit_specificity)
    counts = np.arange(max(1, int(min_positive)), n + 1)
    ok = counts[_binom().sf(counts - 1, n, fpr) <= alpha]
    return int(ok[0]) if ok.size else n + 1


def call_sample(n_examined: int, n_positive_units: int, unit_sensitivity: float, unit_specificity: float, *,
                min_positive: int = 1, alpha: float = 0.05, min_examined: int = 1,
                unit: str = "unit") -> dict[str, Any]:
    """Positive / negative / needs_review for one sample, with the numbers behind the call.

    ``positive``: at least ``min_positive`` units are positive and a negative sample would give that
    many false positives with probability <= ``alpha``. ``needs_review``: positive units that false
    positives alone explain too often (p > ``alpha``), or fewer than ``min_examined`` units were
    examined. ``negative``: fewer than ``min_positive`` positive units among enough examined ones.
    """
    n, k = int(n_examined), int(n_positive_units)
    if n < 0 or k < 0:
        raise ConfigError(f"call_sample: counts must be >= 0, got n_examined={n}, n_positive_units={k}")
    c = float(unit_specificity)
    # the rule actually applied: positive from `needed` positive units on (>= min_positive, and p <= alpha);
    # the sample-level figures are those of that rule, not of ">= min_positive"
    needed = effective_min_positive(n, c, alpha=alpha, min_positive=min_positive)
    perf = sample_level(unit_sensitivity, c, n, min_positive=needed) if needed <= n else {"sensitivity": 0.0, "specificity": 1.0}
    p_fp = float(_binom().sf(k - 1, n, 1.0 - c)) if k > 0 else 1.0  # P(>= k false positives | negative)
    if n < min_examined:
        call, reason = "needs_review", f"only {n} {unit}s examined (< {min_examined})"
    elif k >= min_positive and p_fp <= alpha:
        call, reason = "positive", f"{k} positive {unit}s; a negative sample gives that many with p = {p_fp:.3g} <= {alpha}"
    elif k >= min_positive:
        call, reason = "needs_review", f"{k} positive {unit}s, explained by false positives with p = {p_fp:.3g} > {alpha}"
    else:
        call, reason = "negative", f"{k} positive {unit}s among {n} examined (< {min_positive})"
    return {
        "call": call, "reason": reason, "unit": unit, "n_examined": n, "n_positive": k,
        "unit_sensitivity": float(unit_sensitivity), "unit_specificity": c,
        "expected_false_positives": n * (1.0 - c), "p_false_positives": p_fp,
        "sample_sensitivity": perf["sensitivity"], "sample_specificity": perf["specificity"],
        "positive_from": needed,
        "rule": f"positive if >= {min_positive} positive {unit}(s) and p(false positives) <= {alpha}, "
                f"i.e. >= {needed} of {n} examined",
        "figures_for": f"the rule applied: positive from {needed} positive {unit}(s) on (one target {unit} in a positive sample)",
        "model": "independent Bernoulli units; one target unit in a positive sample (binomial)",
    }
