"""The plain summary at the top of a report: the call in words, the caution, the numbers for the rule applied.

What a pathologist reads first (issue "What the specialist can trust", item 8): the call, what it is
based on in clinical units, the sample-level sensitivity and specificity of the rule actually
applied (``slidescore.decide.sample_call``), and the demonstration-model caution beside the call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slidescore.report.markup import _e, _num, _pct
from slidescore.stages.records import SampleRecord

DEMO_MARKERS = ("demonstration model", "not for diagnosis")  # a card whose description says so is a demonstration model


CALL_COLORS = {"positive": "#c0392b", "negative": "#1e8449", "needs review": "#d68910", "not computed": "#7f8c8d",
               "failed": "#7b241c"}


def call_of(run: SampleRecord) -> tuple[str, dict[str, Any]]:
    """The sample-level call and the numbers behind it (``not computed`` without ``run.decision``).

    The call is ``decision.sample_call``'s; a hand-made or older decision may carry its own ``call``
    or ``label`` instead (kept in ``decision.extra``)."""
    dec = run.decision
    if dec is None:
        return "not computed", {}
    numbers = dec.to_dict()
    call: Any = dec.extra.get("call") or (dec.sample_call.to_dict() if dec.sample_call else None) or dec.extra.get("label")
    if isinstance(call, dict):  # the sample call's numbers join the decision's ({"call": {"label": ...}} of older records too)
        numbers.update(call)
        call = call.get("label") or call.get("call")
    call = str(call or "not computed").replace("_", " ")
    return call, {k: v for k, v in numbers.items() if k not in ("call", "sample_call", "label")}


def _call_badge(call: str) -> str:
    color = CALL_COLORS.get(call.lower(), "#34495e")
    return f"<span id='call' class='call' data-call='{_e(call)}' style='background:{color}'>{_e(call)}</span>"


def is_demonstration(card: Any, run: SampleRecord | None = None) -> bool:
    """Whether the model is a demonstration model (its card says "demonstration model" or "not for
    diagnosis" in its description, as the built-in SmearNet's does, or it is a ``builtin:`` model)."""
    text = str(getattr(card, "description", "") or "").lower()
    src = str(run.model.source if run is not None else "")
    return any(m in text for m in DEMO_MARKERS) or src.startswith("builtin:")


def caution_html(card: Any, run: SampleRecord | None = None) -> str:
    """The caution shown right beside the call: a demonstration model's, or decision support's."""
    if is_demonstration(card, run):
        return ("<p id='caution' class='caution demo'><b>Demonstration model — not for diagnosis.</b> "
                f"{_e(card.name)} was trained only on synthetic smears; this call shows what the software does and "
                "must not be used for patient care.</p>")
    return ("<p id='caution' class='caution'><b>Decision support only.</b> The call is the model's; a specialist "
            "reviews the regions below before any result is reported.</p>")


def _p_text(p: float) -> str:
    return "< 0.001" if p < 1e-3 else f"{p:.2g}"


def field_um(card: Any) -> float:
    """The side of one examined field (a model patch) in µm."""
    return float(card.patch_px) * float(card.mpp)


def _class_summary(cls: str, f: Mapping[str, Any], card: Any) -> str:
    """One class's call in clinical units: suspected fields, the rule applied and what its figures mean."""
    unit = str(f.get("unit") or "field")
    side = field_um(card)
    n, k = f.get("n_examined"), f.get("n_positive")
    what = "fields" if "field" in unit else f"{unit}s"
    lines = [f"<li class='basis' data-class='{_e(cls)}'>Suspected <b>{_e(cls)}</b> in <b class='n-positive'>{_num(k)}</b> of "
             f"<b class='n-examined'>{_num(n)}</b> examined {what} (patch fields of {side:g} × {side:g} µm).</li>"]
    if "positive_from" not in f:  # no validation figures for this class: the reason says so
        lines.append(f"<li class='reason'>{_e(f.get('reason', ''))}</li>")
        return "".join(lines)
    need, se, sp = int(f["positive_from"]), float(f.get("sample_sensitivity") or 0.0), float(f.get("sample_specificity") or 0.0)
    if need > int(n or 0):
        lines.append(f"<li class='rule'>Rule applied: with only {_num(n)} {what} examined no count of suspected {what} "
                     "is beyond what false positives explain; the sample cannot be called positive.</li>")
    else:
        lines.append(f"<li class='rule' data-positive-from='{need}'>Rule applied: <b>positive from {need} suspected "
                     f"{'field' if need == 1 and 'field' in unit else what} on</b> (fewer are explained by the model's false "
                     f"positives too often). A parasite-free sample shows {_num(k)} or more with probability "
                     f"{_e(_p_text(float(f.get('p_false_positives', 1.0))))}.</li>")
    lines.append(
        f"<li class='figures'>For this rule, sample-level sensitivity <b class='sample-sensitivity' data-value='{float(se):.9g}'>"
        f"{_pct(se)}</b> and specificity <b class='sample-specificity' data-value='{float(sp):.9g}'>{_pct(sp)}</b>: a sample "
        f"with a single infected field among the {_num(n)} examined is called positive {_pct(se)} of the time, and a "
        f"parasite-free sample is called positive {_pct(1 - float(sp))} of the time (from the model's validation figures "
        f"per field, sensitivity {_pct(f.get('unit_sensitivity'))} and specificity {_pct(f.get('unit_specificity'))}, "
        "fields taken as independent).</li>")
    return "".join(lines)


def roi_html(roi: Mapping[str, Any] | None) -> str:
    """The line saying which region of interest was scored (``input.roi`` of the run record); ``""`` without one."""
    if not roi:
        return ""
    area = float(roi.get("inside_area_um2") or 0.0)
    return (f"<li id='roi' data-sha256='{_e(roi.get('sha256', ''))}' data-area-um2='{area:.9g}'>Scored only inside the "
            f"region of interest <code>{_e(roi.get('uri', ''))}</code> ({_e(roi.get('kind', ''))}, SHA-256 "
            f"{_e(str(roi.get('sha256', ''))[:12])}…): {area / 1e6:.4g} mm² inside, {_e(roi.get('mode', ''))} with the "
            f"automatic mask, patches at least {float(roi.get('min_inside_frac', 0.0)):g} inside; the counts, regions and "
            "call below cover this region only.</li>")


def summary_html(run: SampleRecord, card: Any, call: str, n_regions: int) -> str:
    """The first section of a page: the call in words, what it rests on, and the caution beside it."""
    dec = run.decision
    sc = dec.sample_call if dec is not None else None
    if sc is not None and sc.per_class:
        basis = "".join(_class_summary(c, f, card) for c, f in sc.per_class.items())
    elif dec is None:
        basis = ("<li>No sample-level call was computed for this run (its record has no decision); review the regions "
                 "below.</li>")
    else:
        basis = "<li>The call was recorded without its basis in fields; its numbers are under Technical details.</li>"
    regions = f"{n_regions:,} suspected region{'s' if n_regions != 1 else ''} found, listed below for review."
    basis += roi_html(getattr(run.input, "roi", None))
    words = {"positive": "Parasites suspected", "negative": "No parasites suspected", "needs review": "Needs review by a specialist",
             "not computed": "No call computed"}.get(call.lower(), call)
    return (f"<section id='summary'><h2>Result: {_call_badge(call)} <span class='call-words'>{_e(words)}</span></h2>"
            f"{caution_html(card, run)}<ul class='basis-list'>{basis}<li>{_e(regions)}</li></ul></section>")
