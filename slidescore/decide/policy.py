"""The decision policy of a job: a model card's calibration and operating point, applied.

``DecisionPolicy.from_card(card, cfg.decision)`` resolves, once per job, everything a decision
needs: the calibration map (temperature or isotonic, from ``card.calibration``), the prior shift
(``card.training_prevalence`` → ``decision.target_prevalence``), the thresholds of the named
operating point (or the card's default ``thresholds``) and the unit-level sensitivity and
specificity behind them. ``transform`` is applied to patch probabilities before blending, so maps,
regions and reports all see the same calibrated, prior-corrected numbers; thresholds are
expressed on that same scale.

Thresholds under a prior shift: every threshold is carried through the same monotone map as the
probabilities, so a recall-targeted operating point keeps its recall; a precision-targeted one is
re-chosen from the validation ROC stored in the card at the target prevalence (precision =
π·TPR / (π·TPR + (1 − π)·FPR)), since precision depends on prevalence and recall does not. That
ROC counts patches, so only patch-level points (``unit: patch``) are re-chosen; a region-level
point (``unit: region``, fitted on the blended map's regions) keeps its threshold, carried
through the shift, and the record says its precision was fitted at the calibration smears'
prevalence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from slidescore.decide import calibration as cal
from slidescore.decide.sample_call import call_sample
from slidescore.errors import ConfigError


@dataclass(frozen=True)
class DecisionPolicy:
    """Calibration + prior shift + thresholds + sample call of one job (picklable, numpy only)."""

    classes: tuple[str, ...]
    head: str
    thresholds: tuple[float, ...]
    operating_point: str | None = None
    unit: str = "patch"  # what the operating point's figures count: patch | region
    method: str = "none"  # none | temperature | isotonic
    temperature: float = 1.0
    isotonic: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()
    training_prevalence: tuple[float, ...] = ()
    target_prevalence: tuple[float, ...] = ()
    unit_figures: dict[str, dict[str, float]] = field(default_factory=dict)
    sample_call_enabled: bool = True
    call_alpha: float = 0.05
    min_positive_units: int = 1

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_card(cls, card: Any, decision: Any = None) -> DecisionPolicy:
        """Build from a :class:`~slidescore.model.card.ModelCard` and a ``DecisionConfig`` (or None)."""
        n = card.n_classes
        calib = dict(card.calibration or {})
        method = str(calib.get("method", "none"))
        if method not in ("none", "temperature", "isotonic"):
            raise ConfigError(f"model card {card.name!r}: calibration.method must be temperature or isotonic, got {method!r}")
        iso: tuple[tuple[tuple[float, ...], tuple[float, ...]], ...] = ()
        if method == "isotonic":
            xs, ys = calib.get("isotonic", {}).get("x", []), calib.get("isotonic", {}).get("y", [])
            if len(xs) != n or len(ys) != n:
                raise ConfigError(f"model card {card.name!r}: calibration.isotonic needs x and y knots for each of {n} classes")
            iso = tuple((tuple(x), tuple(y)) for x, y in zip(xs, ys, strict=True))
        temperature = float(calib.get("temperature", 1.0)) if method == "temperature" else 1.0

        train_prev = tuple(float(p) for p in card.training_prevalence)
        target = tuple(getattr(decision, "target_prevalence", None) or ())
        if target:
            if len(target) == 1 and n > 1:
                target = target * n
            if len(target) != n:
                raise ConfigError(f"decision.target_prevalence: {len(target)} values for model {card.name!r} with "
                                  f"{n} classes {list(card.classes)}; give one value, or one per class")
            if len(train_prev) != n:
                raise ConfigError(f"decision.target_prevalence: model card {card.name!r} records no training_prevalence "
                                  "per class, so the prior shift is undefined; set training_prevalence in its card.json "
                                  "(slidescore train writes it) or drop decision.target_prevalence")
        base = cls(classes=tuple(card.classes), head=card.head, thresholds=tuple(card.thresholds), method=method,
                   temperature=temperature, isotonic=iso, training_prevalence=train_prev,
                   target_prevalence=tuple(float(t) for t in target),
                   sample_call_enabled=bool(getattr(decision, "sample_call", True)),
                   call_alpha=float(getattr(decision, "call_alpha", 0.05)),
                   min_positive_units=int(getattr(decision, "min_positive_units", 1)))
        name = getattr(decision, "operating_point", None)
        if name is None:
            figs = base._figures_at(calib, card.thresholds)
            return base._replace(thresholds=base._shift_thresholds(card.thresholds), unit_figures=figs)
        points = card.operating_points or {}
        if name not in points:
            raise ConfigError(f"decision.operating_point: {name!r} is not an operating point of model {card.name!r}; "
                              f"its card has {sorted(points) or 'none (run slidescore calibrate)'}")
        op = points[name]
        ths = [float(t) for t in op.get("thresholds", [])]
        if len(ths) != n:
            raise ConfigError(f"model card {card.name!r}: operating point {name!r} has {len(ths)} thresholds for {n} classes")
        validation = op.get("validation", {})
        figs = {c: {"sensitivity": float(validation[c]["recall"]), "specificity": float(validation[c]["specificity"])}
                for c in card.classes if c in validation}
        unit = str(op.get("unit", "patch"))
        if op.get("kind") == "precision" and base.target_prevalence and "roc" in calib and unit == "patch":
            ths, figs = base._precision_at_prevalence(calib["roc"], float(op["target"]), ths, figs)
        return base._replace(operating_point=name, unit=unit, thresholds=base._shift_thresholds(ths), unit_figures=figs)

    def _replace(self, **kw: Any) -> DecisionPolicy:
        import dataclasses

        return dataclasses.replace(self, **kw)

    # -- applying ---------------------------------------------------------------------------
    @property
    def prior_shift(self) -> bool:
        return bool(self.target_prevalence)

    @property
    def identity(self) -> bool:
        return self.method == "none" and not self.prior_shift

    def calibrate(self, probs: np.ndarray) -> np.ndarray:
        """Calibration only (no prior shift); class axis first."""
        p = np.asarray(probs, np.float64)
        if self.method == "temperature" and self.temperature != 1.0:
            return cal.apply_temperature(p, self.temperature, self.head, axis=0)
        if self.method == "isotonic":
            return np.stack([cal.apply_isotonic(p[i], *self.isotonic[i]) for i in range(len(self.classes))])
        return p

    def transform(self, probs: np.ndarray) -> np.ndarray:
        """Calibrated, prior-corrected probabilities; ``probs`` is (C, ...), NaN where not scored."""
        if self.identity:
            return probs
        p = np.asarray(probs)
        scored = np.isfinite(p)
        q = self.calibrate(np.where(scored, p, 0.5))
        if self.prior_shift:
            tr = np.asarray(self.training_prevalence).reshape((-1,) + (1,) * (p.ndim - 1))
            tg = np.asarray(self.target_prevalence).reshape(tr.shape)
            if self.head == "softmax":
                lp = np.log(np.clip(q, cal.EPS, 1.0)) + np.log(tg) - np.log(tr)
                q = np.exp(lp - np.log(np.exp(lp).sum(axis=0, keepdims=True)))
            else:
                q = cal.sigmoid(cal.logit(q) + cal.logit(tg) - cal.logit(tr))
        return np.where(scored, q, np.nan).astype(p.dtype if p.dtype.kind == "f" else np.float32)

    def _shift_thresholds(self, ths: Any) -> tuple[float, ...]:
        """Thresholds on the calibrated scale → the prior-shifted scale (the same monotone map)."""
        ths = [float(t) for t in ths]
        if not self.prior_shift:
            return tuple(ths)
        return tuple(float(cal.prior_shift(t, a, b))
                     for t, a, b in zip(ths, self.training_prevalence, self.target_prevalence, strict=True))

    def _precision_at_prevalence(self, roc: dict[str, Any], target: float, ths: list[float],
                                 figs: dict[str, dict[str, float]]) -> tuple[list[float], dict[str, dict[str, float]]]:
        out_t, out_f = list(ths), dict(figs)
        for i, c in enumerate(self.classes):
            r = roc.get(c)
            if not r:
                continue
            pi = self.target_prevalence[i]
            tpr, fpr = np.asarray(r["tpr"]), np.asarray(r["fpr"])
            prec = pi * tpr / np.maximum(pi * tpr + (1 - pi) * fpr, 1e-300)
            ok = np.nonzero((prec >= target) & (tpr > 0))[0]
            j = int(ok[-1]) if len(ok) else int(np.argmax(np.where(tpr > 0, prec, -1)))
            out_t[i] = float(r["threshold"][j])
            out_f[c] = {"sensitivity": float(tpr[j]), "specificity": float(1 - fpr[j]),
                        "precision_at_target_prevalence": float(prec[j])}
        return out_t, out_f

    def _figures_at(self, calib: dict[str, Any], ths: Any) -> dict[str, dict[str, float]]:
        """Unit sensitivity/specificity at the default thresholds, read off the card's validation ROC."""
        out: dict[str, dict[str, float]] = {}
        for c, t in zip(self.classes, ths, strict=True):
            r = (calib.get("roc") or {}).get(c)
            if not r:
                continue
            th = np.asarray(r["threshold"])
            ok = np.nonzero(th >= float(t))[0]  # thresholds are descending
            if len(ok):
                j = int(ok[-1])
                out[c] = {"sensitivity": float(r["tpr"][j]), "specificity": float(1 - r["fpr"][j])}
        return out

    # -- reporting --------------------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """What run.json records under ``decision``."""
        return {
            "operating_point": self.operating_point,
            "operating_point_unit": self.unit if self.operating_point else None,
            "thresholds": dict(zip(self.classes, self.thresholds, strict=True)),
            "calibration": {"method": self.method, "temperature": self.temperature if self.method == "temperature" else None},
            "training_prevalence": dict(zip(self.classes, self.training_prevalence, strict=False)) or None,
            "target_prevalence": dict(zip(self.classes, self.target_prevalence, strict=False)) or None,
            "prior_shift": self.prior_shift,
            "unit_figures": self.unit_figures,
        }

    def sample_call(self, n_examined: int, n_positive_units: int | dict[str, int] | list[int], *, unit: str = "patch",
                    alpha: float | None = None, min_positive: int | None = None, min_examined: int = 1) -> dict[str, Any]:
        """The sample's call (positive / negative / needs_review) per class and overall.

        ``n_positive_units``: one count (binary models) or one per class (by name or in order).
        Overall: positive if any class is positive, else needs_review if any needs review.
        """
        if isinstance(n_positive_units, dict):
            counts = [int(n_positive_units.get(c, 0)) for c in self.classes]
        elif isinstance(n_positive_units, list | tuple):
            counts = [int(k) for k in n_positive_units]
        else:
            counts = [int(n_positive_units)] * (1 if len(self.classes) == 1 else 0)
        if len(counts) != len(self.classes):
            raise ConfigError(f"sample_call: {len(counts)} positive counts for classes {list(self.classes)}; give one per class")
        alpha = self.call_alpha if alpha is None else alpha
        min_positive = self.min_positive_units if min_positive is None else min_positive
        per_class: dict[str, Any] = {}
        for c, k in zip(self.classes, counts, strict=True):
            f = self.unit_figures.get(c)
            if f is None:
                per_class[c] = {"call": "needs_review", "n_examined": int(n_examined), "n_positive": k, "unit": unit,
                                "reason": "the model card has no validation sensitivity/specificity for this class "
                                          "(run slidescore calibrate on a validation set)"}
                continue
            per_class[c] = call_sample(n_examined, k, f["sensitivity"], f["specificity"], min_positive=min_positive,
                                       alpha=alpha, min_examined=min_examined, unit=unit)
        calls = [v["call"] for v in per_class.values()]
        overall = "positive" if "positive" in calls else "needs_review" if "needs_review" in calls else "negative"
        return {"call": overall, "operating_point": self.operating_point, "per_class": per_class}
