"""``index.html`` of a run: every sample of an output folder or object-store prefix, with its call and top score.

Samples are the sub-folders holding a run.json (one listing of the root, one of each sample);
failed samples come from ``failures.jsonl``. Links are relative (``<sample>/report.html``), so the
page works in a local folder and from an object store (``s3://…``) alike; it is written with one
PUT through :mod:`slidescore.io.outputs`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from slidescore.io.outputs import join, list_children, read_json, read_text, write_text
from slidescore.report.html import REPORT
from slidescore.report.markup import CSS, _e, _kv, _num
from slidescore.report.summary import CALL_COLORS, DEMO_MARKERS, call_of
from slidescore.stages.records import SampleRecord

INDEX = "index.html"
SUCCESS = "_SUCCESS"


def _sample_row(d: str, name: str) -> dict[str, Any] | None:
    files = {k: loc for k, (loc, _) in list_children(d).items()}
    if "run.json" not in files:
        return None
    run = SampleRecord.from_dict(read_json(files["run.json"]))  # an older run.json reads with defaults
    call, _ = call_of(run)
    sc = run.decision.sample_call if run.decision else None
    basis = "; ".join(f"{f.get('n_positive')} of {f.get('n_examined')} fields ({c})" for c, f in (sc.per_class.items() if sc else [])
                      if f.get("n_examined") is not None)
    card = run.model.card or {}
    model = f"{card.get('name', '?')} v{card.get('version', '?')} (sha256 {run.model.sha256[:12]}…)" if run.model.sha256 else ""
    op = (run.decision.operating_point if run.decision else None) or (run.config.get("decision") or {}).get("operating_point") \
        or "card thresholds"
    top = run.report.top_peak_probability if run.report else None
    if top is None and "regions.json" in files:
        regs = read_json(files["regions.json"]).get("regions") or []
        top = regs[0]["peak_probability"] if regs else None
    return {"sample_id": run.sample_id or name, "status": "ok" if SUCCESS in files else "incomplete",
            "call": call, "top": top, "regions": run.regions.total if run.regions else None,
            "raised": [f.flag for f in run.quality or [] if f.raised],
            "report": f"{name}/{REPORT}" if REPORT in files else None, "error": "", "basis": basis, "model": model,
            "op": str(op), "demo": any(m in str(card.get("description", "")).lower() for m in DEMO_MARKERS)}


def write_index(out_root: str | Path) -> str:
    """Write ``index.html`` at a run's output root (a local folder or a URL): every sample with its call and top score.

    Samples are the sub-folders holding a run.json; failed samples come from failures.jsonl (the
    latest entry per sample, unless the sample has since succeeded). Links are relative
    (``<sample>/report.html``), so the page works in a folder and from an object store alike.
    Returns the page's location.
    """
    root = str(out_root)
    entries = list_children(root)
    rows = [r for name, (loc, is_dir) in sorted(entries.items()) if is_dir and (r := _sample_row(loc, name)) is not None]
    ok = {r["sample_id"] for r in rows}
    failed: dict[str, dict[str, Any]] = {}
    if "failures.jsonl" in entries:
        for line in read_text(entries["failures.jsonl"][0]).splitlines():
            if line.strip():
                f = json.loads(line)
                if f.get("sample_id") not in ok:
                    failed[f["sample_id"]] = f
    rows += [{"sample_id": sid, "status": "failed", "call": "failed", "top": None, "regions": None, "raised": [],
              "report": None, "error": f"{f.get('error_type', '')}: {f.get('error', '')}", "basis": "", "model": "", "op": "",
              "demo": False} for sid, f in sorted(failed.items())]
    n = len(rows)
    calls: dict[str, int] = {}
    for r in rows:
        calls[r["call"]] = calls.get(r["call"], 0) + 1
    models = sorted({r["model"] for r in rows if r["model"]})
    ops = sorted({r["op"] for r in rows if r["op"]})
    caution = ("<p id='caution' class='caution demo'><b>Demonstration model — not for diagnosis.</b> These calls show what "
               "the software does and must not be used for patient care.</p>") if any(r["demo"] for r in rows) else ""
    summary = _kv([("date", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())),
                   ("model", _e("; ".join(models)) or "—"), ("operating point", _e(", ".join(ops)) or "—"),
                   ("samples", f"{n:,} sample{'s' if n != 1 else ''}: " + _e(", ".join(f"{v} {k}" for k, v in sorted(calls.items()))))])
    body = "".join(
        f"<tr class='sample' data-sample='{_e(r['sample_id'])}'><td>"
        + (f"<a href='{_e(r['report'])}'>{_e(r['sample_id'])}</a>" if r["report"] else _e(r["sample_id"]))
        + f"</td><td><span class='call' style='font-size:13px;padding:2px 10px;background:{CALL_COLORS.get(r['call'].lower(), '#34495e')}'>"
        f"{_e(r['call'])}</span></td><td class='basis'>{_e(r['basis']) or '—'}</td><td class='top'>{_num(r['top'])}</td><td>{_num(r['regions'])}</td>"
        f"<td>{_e(', '.join(r['raised']) or '—')}</td><td>{_e(r['status'])} <span class='muted'>{_e(r['error'])}</span></td></tr>"
        for r in rows
    )
    text = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>slidescore run — {_e(root.rstrip("/").rsplit("/", 1)[-1])}</title><style>{CSS}</style></head>
<body><header><h1>slidescore run: {n:,} sample{'s' if n != 1 else ''}</h1></header><main><section id="run">{caution}{summary}</section><section>
<table id="samples"><tr><th>sample</th><th>call</th><th>suspected fields of examined</th><th>highest region probability</th><th>regions</th>
<th>quality flags raised</th><th>status</th></tr>
{body}</table></section></main></body></html>
"""
    write_text(join(root, INDEX), text)
    return join(root, INDEX)
