"""The shape of the code: no import circles, short runtime modules, long functions only with a reason beside them.

The layers themselves are import-linter's contracts (pyproject.toml, run by ``make lint``); these
checks cover what a contract cannot state (docs/architecture.md, "Module map").
"""

from __future__ import annotations

import ast
from pathlib import Path

import grimp
import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "slidescore"
MAX_RUNTIME_MODULE_LINES = 550  # "a few hundred lines"; offline tools (training scripts, generators) are exempt
MAX_FUNCTION_LINES = 80


def _cycles(adj: dict[str, list[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = 0
    for root in adj:
        if root in index:
            continue
        work = [(root, iter(adj[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(adj[w])))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["a"]}) == [["a", "b", "c"]]
    assert _cycles({"a": ["b"], "b": [], "c": ["b"]}) == []


def test_no_import_circles() -> None:
    g = grimp.build_graph("slidescore")
    adj = {m: sorted(i for i in g.find_modules_directly_imported_by(m) if i in g.modules) for m in sorted(g.modules)}
    assert _cycles(adj) == []


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", [p for p in _modules() if "offline" not in p.parts], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_runtime_modules_are_short(path: Path) -> None:
    n = len(path.read_text().splitlines())
    assert n <= MAX_RUNTIME_MODULE_LINES, f"{path.relative_to(PACKAGE)}: {n} lines; split it by responsibility"


def test_long_functions_say_why() -> None:
    unexplained = []
    for path in _modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES:
                above = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 2
                reasons = []
                while above >= 0 and lines[above].lstrip().startswith("#"):  # the comment block right above it
                    reasons.append(lines[above].lstrip())
                    above -= 1
                if not any(r.startswith("# Long") for r in reasons):
                    unexplained.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert unexplained == [], "functions over 80 lines need a '# Long …' comment above them saying why"
