"""Markup helpers every report page shares: the style sheet, escaping, numbers, key/value tables."""

from __future__ import annotations

import html
from typing import Any

import numpy as np

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1b1f23;background:#f6f7f9}
header{background:#1f2d3d;color:#fff;padding:14px 24px;display:flex;align-items:center;gap:24px;flex-wrap:wrap}
header h1{font-size:20px;margin:0;font-weight:600}
main{padding:16px 24px;max-width:1400px}
section{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:12px 16px;margin:0 0 16px}
h2{font-size:16px;margin:0 0 10px}
table{border-collapse:collapse}
td,th{padding:3px 10px 3px 0;text-align:left;vertical-align:top}
th{font-weight:600;color:#444}
.call{display:inline-block;padding:8px 18px;border-radius:6px;color:#fff;font-weight:700;font-size:18px;
      letter-spacing:.03em;text-transform:uppercase}
.kv td:first-child{color:#555;white-space:nowrap}
.flags tr.raised td{background:#fdebd0}
.flags tr.raised td:first-child{font-weight:700;color:#a04000}
.ovw{display:flex;gap:16px;flex-wrap:wrap;align-items:flex-start}
.ovw img{max-width:min(100%,900px);border:1px solid #ccc;image-rendering:auto}
.region{display:grid;grid-template-columns:50px minmax(0,600px) 250px 250px;gap:10px;align-items:start;border-top:1px solid #eee;padding:10px 0}
.region .kv{grid-column:2 / -1}
.region figure{margin:0;text-align:center}
.region img{height:auto;border:1px solid #ccc;display:block}
.region img.crop{max-width:min(100%,600px)}
.region img.overlay,.region img.explanation{width:250px;max-width:100%}
img.thumb{max-width:240px;border:1px solid #ccc}
.region figcaption{font-size:12px;color:#555}
.rank{font-size:22px;font-weight:700;width:40px}
.legend span{display:inline-block;width:14px;height:14px;vertical-align:middle;margin-right:4px;border:1px solid #999}
a{color:#1a5fb4}
.muted{color:#666}
code.path{user-select:all;background:#eef1f4;padding:0 4px;border-radius:3px;word-break:break-all}
h2 .call{font-size:20px;vertical-align:middle;margin-right:10px}
.call-words{font-size:18px;vertical-align:middle}
.caution{border-left:6px solid #d68910;background:#fef5e7;padding:8px 12px;margin:10px 0;font-size:15px}
.caution.demo{border-color:#c0392b;background:#fdedec}
.basis-list{font-size:15px;margin:6px 0;padding-left:20px}
h3{font-size:14px;margin:14px 0 6px}
.gallery{display:flex;flex-wrap:wrap;gap:6px}
.tile{margin:0;text-align:center;font-size:12px;width:100px}
.tile img{width:96px;height:96px;object-fit:contain;border:1px solid #ccc;display:block;background:#eee}
.review button{font-size:13px;padding:0 6px;margin:2px 1px;border:1px solid #aaa;background:#fff;border-radius:3px;cursor:pointer}
.review[data-mark=accepted] .accept{background:#1e8449;color:#fff;border-color:#1e8449}
.review[data-mark=rejected] .reject{background:#c0392b;color:#fff;border-color:#c0392b}
.rank .review{display:block;margin-top:4px}
details#technical{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:10px 16px;margin:0 0 16px}
details#technical summary{cursor:pointer;font-weight:600}
details#technical section{border:0;padding:8px 0;margin:0}
"""


def _e(v: Any) -> str:
    return html.escape(str(v), quote=True)


def _num(v: Any, digits: int = 4) -> str:
    """A value for the page: numbers with thousands separators, ``None`` as "—", booleans as yes / no."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if not np.isfinite(v):
            return "—"
        return f"{v:,.{digits}g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return _e(v)


def _kv(rows: list[tuple[str, Any]]) -> str:
    return "<table class='kv'>" + "".join(f"<tr><td>{_e(k)}</td><td>{v}</td></tr>" for k, v in rows) + "</table>"


def _pct(v: Any) -> str:
    """A probability as a percentage with enough decimals not to round to 0 % or 100 %."""
    if v is None or not np.isfinite(float(v)):
        return "—"
    x = 100.0 * float(v)
    for d in (1, 2, 3):
        t = f"{x:.{d}f}"
        if 0 < x < 100 and float(t) in (0.0, 100.0):
            continue
        return f"{t}%"
    return f"{x:.3f}%"


def _flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        else:
            out.append((key, v))
    return out
