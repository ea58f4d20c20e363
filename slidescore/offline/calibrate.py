"""``slidescore calibrate MODEL VALSET``: calibration and named operating points into the card.

The model scores the validation patches (a class folder, an annotation table — multi-label with
a ``labels`` column — or ``synthetic[:SEED]``, as for ``slidescore train``). A temperature T (or, with ``--method
isotonic``, a monotone map per class) is fitted by maximum likelihood; the expected calibration
error before and after and a reliability diagram (``plots/reliability_<class>.png``) are written.
On the calibrated probabilities each requested operating point is chosen per class (each class of
a multi-label model gets its own threshold) — the lowest
threshold with validation precision >= P (``precision_P``) or the highest with recall >= R
(``recall_R``) — and stored with its validation figures and ``"unit": "patch"`` (a patch table
cannot tell regions apart; a job's regions see other figures at the same threshold, see
:mod:`slidescore.decide.region_points` for points fitted on regions), together with a compact validation ROC
(for prior-shifted precision targets and the sample-level call). The card's default thresholds are
carried through the calibration map, so default decisions on single patches do not change.
Calibrating a calibrated package starts again from its uncalibrated thresholds and replaces its
operating points. The result is a new model package (weights copied), or the same one with
``in_place``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.decide import calibration as cal
from slidescore.errors import ConfigError
from slidescore.offline import plots
from slidescore.offline.datasets import PatchSet, load_patches


def _package_dir(model_ref: str) -> Path:
    if model_ref.startswith("builtin:"):
        from slidescore.model.loading import builtin_dir

        return builtin_dir(model_ref.split(":", 1)[1])
    p = Path(model_ref)
    if not (p.is_dir() and (p / "card.json").exists()):
        raise ConfigError(f"calibrate: {model_ref!r} is not a model package folder (card.json + weights.pt) "
                          "or builtin:NAME; calibrate writes its results into a package")
    return p


def _targets(card: Any, ps: PatchSet) -> np.ndarray:
    """Validation labels in the card's terms: (N, C) 0/1 for sigmoid heads, (N,) indices for softmax."""
    names = list(ps.class_names)
    if ps.multilabel and card.head == "softmax":
        raise ConfigError(f"validation set {ps.source} is multi-label (a labels column); model {card.name!r} has a softmax "
                          "head (one class per patch); calibrate it on a table with one label per patch")
    if card.head == "softmax":
        missing = [c for c in names if c not in card.classes]
        if missing:
            raise ConfigError(f"validation classes {missing} are not classes of model {card.name!r} {list(card.classes)}")
        return np.asarray([card.classes.index(names[i]) for i in ps.labels])
    out = np.zeros((len(ps), card.n_classes))
    for j, c in enumerate(card.classes):
        if c not in names:
            raise ConfigError(f"validation set {ps.source}: has no class {c!r} of model {card.name!r}; its classes are "
                              f"{names} (one subfolder / label per class)")
        out[:, j] = ps.onehot()[:, names.index(c)]
    return out


def fmt_name(kind: str, value: str | float) -> str:
    return f"{kind}_{value}" if isinstance(value, str) else f"{kind}_{value:g}"


def calibrate_patchset(classifier: Any, ps: PatchSet, out: Path, *, method: str = "temperature",
                       precisions: tuple[str, ...] = ("0.90",), recalls: tuple[str, ...] = ("0.999",),
                       n_bins: int = 15, prevalence: str = "auto", plot_dir: Path | None = None) -> Any:
    """Fit, evaluate and return the calibrated card; writes plots under ``plot_dir`` (``out / 'plots'``)."""
    from slidescore.offline.train import predict_logits

    card = classifier.card
    if method not in ("temperature", "isotonic"):
        raise ConfigError(f"--method: expected temperature or isotonic, got {method!r}")
    if ps.images.shape[1] != card.patch_px:
        raise ConfigError(f"validation patches are {ps.images.shape[1]} px; model {card.name!r} takes {card.patch_px} px "
                          f"(pass --resize {card.patch_px} or cut patches at that size)")
    y = _targets(card, ps)
    logits = predict_logits(classifier.module, ps.images, card.mean, card.std, classifier.device)
    head = card.head
    if getattr(classifier, "outputs", "logits") == "probabilities":  # a module that ends in its own head
        logits = np.log(np.clip(logits, cal.EPS, 1.0)) if head == "softmax" else cal.logit(logits)
    if head == "softmax":
        before = np.exp(logits - logits.max(1, keepdims=True))
        before /= before.sum(1, keepdims=True)
        y_cls = np.stack([y == j for j in range(card.n_classes)], axis=1)
    else:
        before, y_cls = cal.sigmoid(logits), y > 0.5
    calib: dict[str, Any] = {"method": method}
    if method == "temperature":
        t = cal.fit_temperature(logits, y, "softmax" if head == "softmax" else "sigmoid")
        calib["temperature"] = round(t, 6)
        after = cal.apply_temperature(before, t, head, axis=1)
        calib["nll_before"], calib["nll_after"] = (round(cal.nll(logits, y, head, tt), 6) for tt in (1.0, t))
    else:
        knots = [cal.fit_isotonic(before[:, j], y_cls[:, j]) for j in range(card.n_classes)]
        calib["isotonic"] = {"x": [k[0] for k in knots], "y": [k[1] for k in knots]}
        after = np.stack([cal.apply_isotonic(before[:, j], *knots[j]) for j in range(card.n_classes)], axis=1)
    plot_dir = plot_dir or out / "plots"
    plot_files, ece_b, ece_a = [], {}, {}
    for j, c in enumerate(card.classes):
        ece_b[c] = round(cal.expected_calibration_error(before[:, j], y_cls[:, j], n_bins), 6)
        ece_a[c] = round(cal.expected_calibration_error(after[:, j], y_cls[:, j], n_bins), 6)
        f = plots.reliability_plot(plot_dir / f"reliability_{c}.png", cal.reliability(before[:, j], y_cls[:, j], n_bins),
                                   cal.reliability(after[:, j], y_cls[:, j], n_bins), ece_b[c], ece_a[c], f"reliability: {c}")
        plot_files.append(str(f.relative_to(out)) if f.is_relative_to(out) else f.name)
    calib.update(ece_before=ece_b, ece_after=ece_a, n_bins=n_bins, plots=plot_files,
                 fitted_on={"source": ps.source, "patches": len(ps), "counts": ps.counts(),
                            "source_images": int(len(np.unique(ps.groups)))},
                 roc={c: cal.compact_roc(after[:, j], y_cls[:, j]) for j, c in enumerate(card.classes)})

    # a new calibration changes the probability scale: earlier operating points are dropped, and the
    # default thresholds are mapped from the uncalibrated ones the card started with
    base_thresholds = tuple(float(t) for t in (card.calibration or {}).get("thresholds_before", card.thresholds))
    points: dict[str, Any] = {}
    for kind, values in (("precision", precisions), ("recall", recalls)):
        for v in values:
            name = fmt_name(kind, v)
            target = cal.parse_operating_point(name)[1]
            ths, val, attained = [], {}, {}
            for j, c in enumerate(card.classes):
                pick = cal.threshold_at_precision if kind == "precision" else cal.threshold_at_recall
                th, ok = pick(after[:, j], y_cls[:, j], target)
                ths.append(round(th, 7))
                val[c] = {k: (round(x, 6) if isinstance(x, float) else x)
                          for k, x in cal.figures(after[:, j], y_cls[:, j], th).items()}
                attained[c] = ok
            points[name] = {"kind": kind, "target": target, "unit": "patch", "thresholds": ths, "attained": attained,
                            "validation": val, "fitted_on": ps.source}
    prev_val = tuple(round(float(y_cls[:, j].mean()), 6) for j in range(card.n_classes))
    from_earlier_calibration = (card.calibration or {}).get("prevalence_reference") == "calibration set"
    if prevalence == "calibration" or (prevalence == "auto" and (not card.training_prevalence or from_earlier_calibration)):
        train_prev, calib["prevalence_reference"] = prev_val, "calibration set"
    else:
        train_prev, calib["prevalence_reference"] = tuple(card.training_prevalence), "training"
    calib["calibration_set_prevalence"] = list(prev_val)
    if head == "softmax":
        new_thresholds = base_thresholds
    elif method == "temperature":
        new_thresholds = tuple(round(float(cal.sigmoid(cal.logit(t) / calib["temperature"])), 6) for t in base_thresholds)
    else:
        new_thresholds = tuple(round(float(cal.apply_isotonic(t, *knots[j])), 6) for j, t in enumerate(base_thresholds))
    calib["thresholds_before"] = list(base_thresholds)
    return dataclasses.replace(card, calibration=calib, operating_points=points, thresholds=new_thresholds,
                               training_prevalence=train_prev)


def run_calibrate(model_ref: str, valset: str | PatchSet, *, out: str | None = None, in_place: bool = False,
                  method: str = "temperature", precisions: tuple[str, ...] = ("0.90",),
                  recalls: tuple[str, ...] = ("0.999",), resize: int | None = None, group_regex: str | None = None,
                  device: str = "auto", seed: int = 0, prevalence: str = "auto") -> tuple[Any, Path]:
    """Calibrate ``model_ref`` on ``valset``; write the package to ``out`` (or in place)."""
    from slidescore.model import load_model
    from slidescore.offline.datasets import DEFAULT_GROUP_REGEX

    src = _package_dir(model_ref)
    if in_place == (out is not None):
        raise ConfigError("calibrate: give either --out DIR (a new model package) or --in-place")
    dest = src if in_place else Path(str(out))
    if not in_place and dest.resolve() == src.resolve():
        raise ConfigError(f"calibrate: --out {out} is the model's own folder; use --in-place to update it")
    classifier = load_model(model_ref, device=device)
    card = classifier.card
    ps = valset if isinstance(valset, PatchSet) else load_patches(
        valset, patch_px=card.patch_px, mpp=card.mpp, resize=resize, group_regex=group_regex or DEFAULT_GROUP_REGEX,
        seed=seed, pad_value=card.pad_value)
    dest.mkdir(parents=True, exist_ok=True)
    new = calibrate_patchset(classifier, ps, dest, method=method, precisions=precisions, recalls=recalls,
                             prevalence=prevalence)
    if not in_place:
        for f in src.iterdir():
            if f.is_file() and f.name != "card.json":
                shutil.copy2(f, dest / f.name)
    (dest / "card.json").write_text(json.dumps(new.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return new, dest


def summary_lines(card: Any) -> list[str]:
    c = card.calibration
    lines = [f"calibration: {c['method']}" + (f", T = {c['temperature']:.4f}" if "temperature" in c else "")]
    for name in card.classes:
        lines.append(f"  {name}: ECE {c['ece_before'][name]:.4f} → {c['ece_after'][name]:.4f}")
    for name, op in card.operating_points.items():
        figs = "; ".join(f"{k}: t={v['threshold']:.4f} precision {v['precision']:.4f} recall {v['recall']:.4f} "
                         f"specificity {v['specificity']:.6f}" for k, v in op["validation"].items())
        lines.append(f"  operating point {name} (unit: {op.get('unit', 'patch')}): {figs}")
    return lines
