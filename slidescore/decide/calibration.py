"""Calibration maps, ranking metrics and operating points, on plain numpy arrays.

Conventions: binary problems are per class (one sigmoid output, or one softmax class against the
rest); ``scores`` are probabilities, ``labels`` booleans. ``fit_temperature`` divides logits by a
scalar T fitted by maximum likelihood (Guo et al. 2017); ``fit_isotonic`` is the pool-adjacent-
violators fit of label on probability, stored as knots and applied by linear interpolation.
Operating points pick, per class, the lowest threshold whose validation precision reaches a
target (the largest recall at that precision) or the highest threshold whose recall reaches a
target. Prior shift adds ``logit(target) - logit(train)`` to a sigmoid logit: with a calibrated
model that is exactly Bayes' rule for a change of class prevalence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.special import expit, log_softmax, logsumexp

EPS = 1e-7


def logit(p: np.ndarray | float) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def sigmoid(z: np.ndarray | float) -> np.ndarray:
    return expit(np.asarray(z, np.float64))


def prior_shift(p: np.ndarray, train_prev: float, target_prev: float) -> np.ndarray:
    """Posterior under a new prevalence: ``sigmoid(logit(p) + logit(target) - logit(train))``."""
    return sigmoid(logit(p) + logit(target_prev) - logit(train_prev))


# -- calibration maps ---------------------------------------------------------------------------
def nll(logits: np.ndarray, labels: np.ndarray, head: str, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``logits / temperature``.

    Sigmoid heads: logits and labels (N, C), labels in {0, 1}. Softmax: logits (N, C), labels (N,)
    class indices.
    """
    z = np.asarray(logits, np.float64) / temperature
    if head == "softmax":
        lp = log_softmax(z, axis=1)
        return float(-lp[np.arange(len(z)), np.asarray(labels, int)].mean())
    y = np.asarray(labels, np.float64)
    # log(1 + e^-z) for positives, log(1 + e^z) for negatives, computed stably
    return float((np.logaddexp(0, -z) * y + np.logaddexp(0, z) * (1 - y)).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, head: str) -> float:
    """The temperature T > 0 that minimises the NLL of ``logits / T`` (searched over log T)."""
    # imported here, not at import: scipy.optimize costs ~0.3 s in every process that never calibrates
    from scipy.optimize import minimize_scalar

    res = minimize_scalar(lambda lt: nll(logits, labels, head, float(np.exp(lt))), bounds=(-4.0, 4.0),
                          method="bounded", options={"xatol": 1e-6})
    return float(np.exp(res.x))


def fit_isotonic(scores: np.ndarray, labels: np.ndarray, max_knots: int = 256) -> tuple[list[float], list[float]]:
    """Pool-adjacent-violators fit of ``labels`` on ``scores``: knots (x, y), both non-decreasing."""
    order = np.argsort(scores, kind="mergesort")
    x, y = np.asarray(scores, np.float64)[order], np.asarray(labels, np.float64)[order]
    # blocks: value, weight, first x, last x
    vals: list[float] = []
    wts: list[float] = []
    x0: list[float] = []
    x1: list[float] = []
    for xi, yi in zip(x, y, strict=True):
        vals.append(yi)
        wts.append(1.0)
        x0.append(xi)
        x1.append(xi)
        while len(vals) > 1 and vals[-2] >= vals[-1]:
            w = wts[-2] + wts[-1]
            v = (vals[-2] * wts[-2] + vals[-1] * wts[-1]) / w
            vals[-2:], wts[-2:], x1[-2:] = [v], [w], [x1[-1]]
            del x0[-1]
    kx = np.concatenate([[0.0], np.column_stack([x0, x1]).ravel(), [1.0]])
    ky = np.concatenate([[vals[0]], np.repeat(vals, 2), [vals[-1]]])
    if len(kx) > max_knots:  # keep the map small enough for the card; interpolation is monotone
        idx = np.unique(np.linspace(0, len(kx) - 1, max_knots).round().astype(int))
        kx, ky = kx[idx], ky[idx]
    # np.interp needs increasing x; nudge ties
    kx = np.maximum.accumulate(kx + np.arange(len(kx)) * 1e-12)
    return [float(v) for v in kx], [float(v) for v in ky]


def apply_isotonic(p: np.ndarray | float, knots_x: Sequence[float], knots_y: Sequence[float]) -> np.ndarray:
    return np.interp(np.asarray(p, np.float64), knots_x, knots_y)


def apply_temperature(probs: np.ndarray, temperature: float, head: str, axis: int = 0) -> np.ndarray:
    """Temperature scaling from probabilities: via logit (sigmoid) or log-probabilities (softmax)."""
    if head == "softmax":
        lp = np.log(np.clip(np.asarray(probs, np.float64), EPS, 1.0)) / temperature
        return np.exp(lp - logsumexp(lp, axis=axis, keepdims=True))
    return sigmoid(logit(probs) / temperature)


# -- calibration error ----------------------------------------------------------------------------
def reliability(scores: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> dict[str, list[float]]:
    """Equal-width bins of predicted probability: mean confidence, observed frequency, count."""
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels, np.float64).ravel()
    b = np.clip((s * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins).astype(float)
    conf = np.bincount(b, weights=s, minlength=n_bins) / np.maximum(count, 1)
    freq = np.bincount(b, weights=y, minlength=n_bins) / np.maximum(count, 1)
    return {"confidence": conf.tolist(), "frequency": freq.tolist(), "count": count.tolist()}


def expected_calibration_error(scores: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """Σ_bins (n_b / N) · |frequency_b − confidence_b| over equal-width probability bins."""
    r = reliability(scores, labels, n_bins)
    count = np.asarray(r["count"])
    gap = np.abs(np.asarray(r["frequency"]) - np.asarray(r["confidence"]))
    return float((count * gap).sum() / max(1.0, count.sum()))


# -- ranking metrics --------------------------------------------------------------------------
def roc_points(scores: np.ndarray, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Counts at every distinct threshold (descending): calling ``score >= threshold`` positive."""
    s, y = np.asarray(scores, np.float64).ravel(), np.asarray(labels, bool).ravel()
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each run of equal scores
    tp = np.cumsum(y)[last].astype(float)
    fp = (last + 1 - tp).astype(float)
    n_pos, n_neg = float(y.sum()), float(len(y) - y.sum())
    return {"threshold": s[last], "tp": tp, "fp": fp, "fn": n_pos - tp, "tn": n_neg - fp,
            "n_pos": np.array(n_pos), "n_neg": np.array(n_neg)}


def auc_roc(scores: np.ndarray, labels: np.ndarray) -> float:
    r = roc_points(scores, labels)
    if r["n_pos"] == 0 or r["n_neg"] == 0:
        return float("nan")
    tpr = np.r_[0, r["tp"] / r["n_pos"]]
    fpr = np.r_[0, r["fp"] / r["n_neg"]]
    return float(np.trapezoid(tpr, fpr))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision–recall curve as the step sum Σ (R_k − R_{k−1}) P_k."""
    r = roc_points(scores, labels)
    if r["n_pos"] == 0:
        return float("nan")
    recall = r["tp"] / r["n_pos"]
    precision = r["tp"] / (r["tp"] + r["fp"])
    return float(np.sum(np.diff(np.r_[0, recall]) * precision))


def confusion(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, int]:
    s, y = np.asarray(scores).ravel(), np.asarray(labels, bool).ravel()
    pred = s >= threshold
    return {"tp": int((pred & y).sum()), "fp": int((pred & ~y).sum()), "fn": int((~pred & y).sum()),
            "tn": int((~pred & ~y).sum())}


def figures(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict[str, Any]:
    """Confusion counts and precision / recall / specificity of ``score >= threshold``."""
    c = confusion(scores, labels, threshold)
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {"threshold": float(threshold), **c,
            "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "specificity": tn / (tn + fp) if tn + fp else float("nan")}


def threshold_at_precision(scores: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, bool]:
    """Lowest threshold whose precision is >= ``target`` (so the largest recall); attained?"""
    r = roc_points(scores, labels)
    prec = r["tp"] / np.maximum(r["tp"] + r["fp"], 1)
    ok = np.nonzero(prec >= target)[0]
    if len(ok) == 0:  # unreachable: the threshold of best precision
        return float(r["threshold"][int(np.argmax(prec))]), False
    return float(r["threshold"][ok[-1]]), True


def threshold_at_recall(scores: np.ndarray, labels: np.ndarray, target: float) -> tuple[float, bool]:
    """Highest threshold whose recall is >= ``target``; attained?"""
    r = roc_points(scores, labels)
    if r["n_pos"] == 0:
        return 0.0, False
    rec = r["tp"] / r["n_pos"]
    i = int(np.searchsorted(rec, target - 1e-12))  # rec is non-decreasing as the threshold falls
    if i >= len(rec):
        return float(r["threshold"][-1]), False
    return float(r["threshold"][i]), True


def compact_roc(scores: np.ndarray, labels: np.ndarray, max_points: int = 200) -> dict[str, Any]:
    """A small ROC table for the card (threshold, tpr, fpr), keeping both ends."""
    r = roc_points(scores, labels)
    n = len(r["threshold"])
    idx = np.unique(np.r_[np.linspace(0, n - 1, min(n, max_points)).round().astype(int)])
    tpr = r["tp"] / max(float(r["n_pos"]), 1.0)
    fpr = r["fp"] / max(float(r["n_neg"]), 1.0)
    return {"threshold": [round(float(v), 7) for v in r["threshold"][idx]],
            "tpr": [round(float(v), 7) for v in tpr[idx]], "fpr": [round(float(v), 7) for v in fpr[idx]],
            "n_pos": int(r["n_pos"]), "n_neg": int(r["n_neg"])}


def parse_operating_point(name: str) -> tuple[str, float]:
    """``precision_0.90`` → ("precision", 0.9); ``recall_0.999`` → ("recall", 0.999)."""
    kind, _, value = name.partition("_")
    try:
        v = float(value)
    except ValueError:
        v = float("nan")
    if kind not in ("precision", "recall") or not 0 < v <= 1:
        from slidescore.errors import ConfigError

        raise ConfigError(f"operating point {name!r}: expected precision_P or recall_R with 0 < P, R <= 1, "
                          "e.g. precision_0.90 or recall_0.999")
    return kind, v
