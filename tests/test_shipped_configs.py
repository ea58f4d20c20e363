"""What ships beside the code stays true: the example job configs and docs/architecture.md.

Every ``jobs/configs/*.yaml`` loads with the strict config reader and passes the checks a run makes
before any sample; the demo config names the file ``slidescore demo`` writes and plans it in a dry
run; the manifest example parses. Every module, file and section of the package that
docs/architecture.md names exists, and every section or invariant a docstring cites is in it.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from slidescore.config import JobConfig, SampleSpec, load_config

REPO = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO / "jobs" / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
DEMO_CONFIG = CONFIG_DIR / "demo-smear.yaml"
ARCH = REPO / "docs" / "architecture.md"


# -- the shipped job configs ---------------------------------------------------------------------
def test_configs_are_shipped() -> None:
    assert CONFIGS, f"no job configs in {CONFIG_DIR}"
    assert DEMO_CONFIG in CONFIGS


@pytest.fixture(scope="module")
def builtin_card() -> Any:
    from slidescore.model import load_model

    return load_model("builtin:smearnet", device="cpu").card


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_loads_and_passes_the_checks_before_any_sample(
    path: Path, builtin_card: Any
) -> None:
    from slidescore.run.ray import actor_device
    from slidescore.stages.plan import check_config_for_model

    cfg = load_config(path)  # unknown keys and bad values raise ConfigError
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#"), (
        "a shipped config opens with a comment: when to use it and the command"
    )
    assert f"--config jobs/configs/{path.name}" in text, "the header's command names this very file"
    assert cfg.samples.uris or cfg.samples.manifest or cfg.samples.prefix or cfg.samples.groups, (
        "a job needs samples"
    )
    actor_device(cfg)  # GPUs reserved ⇔ a device that can use them
    if cfg.model.name == "builtin:smearnet":
        check_config_for_model(cfg, builtin_card)


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if load_config(p).samples.manifest], ids=lambda p: p.name
)
def test_manifest_of_a_shipped_config_parses_from_the_repository_root(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a relative samples.manifest is resolved against the working directory: the repository root
    # (or Ray's copy of it, with `ray job submit --working-dir .`)
    monkeypatch.chdir(REPO)
    samples = load_config(path).samples.list_samples()
    assert samples
    assert any(isinstance(s, SampleSpec) and len(s.uris) > 1 for s in samples), (
        "show a sample of several images"
    )


class _Generated(Exception):
    """Stops ``slidescore demo`` right after it chose the smear's path."""


def _demo_image_path(monkeypatch: pytest.MonkeyPatch) -> Path:
    """The image ``slidescore demo`` (what ``make demo`` runs) writes, relative to where it runs."""
    from slidescore import cli
    from slidescore.offline import demo

    seen: list[Path] = []

    def fake_generate(path: Path, *args: Any, **kwargs: Any) -> Any:
        seen.append(Path(path))
        raise _Generated

    monkeypatch.setattr(demo, "generate_smear", fake_generate)
    with pytest.raises(_Generated):
        cli.main(["demo", "--quiet"])
    (path,) = seen
    return path


def test_demo_config_scores_the_image_make_demo_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # `slidescore demo` creates its output folder where it runs
    written = _demo_image_path(monkeypatch)
    cfg = load_config(DEMO_CONFIG)
    assert [Path(u) for u in cfg.samples.uris] == [written]
    assert (
        not Path(cfg.output.uri).is_absolute() and Path(cfg.output.uri).parts[0] == written.parts[0]
    )


@pytest.mark.slow
def test_demo_config_dry_run_plans_a_generated_smear(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    """``python -m jobs.score --config jobs/configs/demo-smear.yaml --dry-run`` from a folder that holds a
    (small) smear where ``make demo`` puts it: the sample is found and planned; nothing is written."""
    from jobs.score import main
    from slidescore.offline.demo import generate_smear

    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO_CONFIG)
    (uri,) = cfg.samples.uris
    Path(uri).parent.mkdir(parents=True)
    generate_smear(Path(uri), 1024, 7, progress=False)
    assert main(["--config", str(DEMO_CONFIG), "--dry-run"]) == 0
    out = capsys.readouterr().out
    sample = Path(uri).name.removesuffix(".tif")
    assert f"to score  {sample}: level 1 (0.5 µm/px, 512×512 px)" in out
    assert "0 would fail; nothing written" in out
    assert not Path(cfg.output.uri).exists()


# -- docs/architecture.md ------------------------------------------------------------------------
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
PATH_REF = re.compile(r"(?<![\w./<>-])((?:slidescore|jobs|tests|docs|k8s|benchmarks)/[\w./*-]*)")
DOTTED_REF = re.compile(r"(?<![\w./-])(slidescore(?:\.\w+)+)")


def _code_spans(text: str) -> list[str]:
    """Inline code spans and whole fenced blocks of a Markdown text."""
    blocks = FENCE.findall(text)
    return blocks + INLINE.findall(FENCE.sub("", text))


def _module_file(parts: list[str]) -> Path | None:
    base = REPO.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


@cache
def _names(path: Path) -> dict[str, set[str]]:
    """Top-level names of a module (defined, imported, or in ``__all__``); for classes, their members."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: dict[str, set[str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            out[node.name] = {
                n.name
                for n in node.body
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            }
            out[node.name] |= {
                t.id
                for n in node.body
                if isinstance(n, ast.AnnAssign | ast.Assign)
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Name)
            }
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = set()
        elif isinstance(node, ast.Import | ast.ImportFrom):
            out.update({(a.asname or a.name).split(".")[0]: set() for a in node.names})
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                if isinstance(t, ast.Name):
                    out[t.id] = set()
                    if t.id == "__all__" and isinstance(node.value, ast.List | ast.Tuple):
                        out.update(
                            {e.value: set() for e in node.value.elts if isinstance(e, ast.Constant)}
                        )
    return out


def _dotted_problem(ref: str) -> str | None:
    parts = ref.split(".")
    for i in range(len(parts), 0, -1):
        path = _module_file(parts[:i])
        if path is None:
            continue
        attrs = parts[i:]
        if not attrs:
            return None
        names = _names(path)
        if attrs[0] not in names:
            return f"{ref}: {'.'.join(parts[:i])} has no {attrs[0]!r}"
        if len(attrs) > 1 and names[attrs[0]] and attrs[1] not in names[attrs[0]]:
            return f"{ref}: {attrs[0]} has no member {attrs[1]!r}"
        return None
    return f"{ref}: no such module"


def _path_problem(ref: str) -> str | None:
    ref = ref.rstrip(".,")
    if "*" in ref:
        return None if any(REPO.glob(ref)) else f"{ref}: matches no file"
    return None if (REPO / ref).exists() else f"{ref}: no such file or folder"


def test_architecture_doc_names_only_modules_that_exist() -> None:
    spans = _code_spans(ARCH.read_text(encoding="utf-8"))
    paths = {m for s in spans for m in PATH_REF.findall(s)}
    dotted = {m for s in spans for m in DOTTED_REF.findall(s)}
    assert len(paths) >= 10 and len(dotted) >= 10, "the doc's module references were not found"
    problems = [
        p for p in (*map(_path_problem, sorted(paths)), *map(_dotted_problem, sorted(dotted))) if p
    ]
    assert not problems, "docs/architecture.md names what does not exist:\n" + "\n".join(problems)


CITED_SECTION = re.compile(r'docs/architecture\.md[,\s(]*"([^"]+)"')
CITED_INVARIANTS = re.compile(
    r"docs/architecture\.md,\s*invariants?\s+(\d+(?:(?:,|\s+and)\s*\d+)*)"
)


def test_docstring_citations_of_the_architecture_doc_resolve() -> None:
    text = ARCH.read_text(encoding="utf-8")
    headings = {line.lstrip("#").strip() for line in text.splitlines() if line.startswith("#")}
    invariants = {
        int(n)
        for n in re.findall(
            r"^(\d+)\. \*\*", text.split("## Invariants", 1)[1].split("\n## ", 1)[0], re.M
        )
    }
    assert invariants == set(range(1, 7))
    missing = []
    for src in sorted((REPO / "slidescore").rglob("*.py")) + sorted((REPO / "jobs").rglob("*.py")):
        code = src.read_text(encoding="utf-8")
        for section in CITED_SECTION.findall(code):
            if section not in headings:
                missing.append(f"{src.relative_to(REPO)} cites section {section!r}")
        for group in CITED_INVARIANTS.findall(code):
            missing += [
                f"{src.relative_to(REPO)} cites invariant {n}"
                for n in map(int, re.findall(r"\d+", group))
                if n not in invariants
            ]
    assert not missing, "docs/architecture.md lacks what the code cites:\n" + "\n".join(missing)
