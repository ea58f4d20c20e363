"""Static checks of the Dockerfile and .dockerignore (no container engine here to build them)."""

from __future__ import annotations

import re
from pathlib import Path

import ray

REPO = Path(__file__).resolve().parents[2]


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", (REPO / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


def test_base_image_carries_the_installed_ray() -> None:
    args = dict(a.split("=", 1) for i, a in instructions() if i == "ARG" and "=" in a)
    assert args["RAY_VERSION"] == ray.__version__
    assert args["BASE_IMAGE"].startswith("rayproject/ray:${RAY_VERSION}-py311")


def test_runs_as_uid_1000_from_app_and_copies_the_sources() -> None:
    steps = instructions()
    final_stage = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    users = [a for k, a in final_stage if k == "USER"]
    assert users and users[-1] == "1000:100"
    assert ("WORKDIR", "/app") in final_stage
    copied = {a.split()[0] for k, a in final_stage if k == "COPY" and not a.startswith("--")}
    assert {"jobs/", "slidescore/"} <= copied


def test_no_credentials_in_the_image() -> None:
    for keyword, argument in instructions():
        if keyword in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(aws_|secret|token|password)", argument), argument


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules[0] == "*"  # allow-list: .venv, .git, tests and outputs stay out
    allowed = {rule[1:].rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "slidescore", "jobs", "constraints.txt"}  # the lock: the versions CI passed with
    # Every build-context source the Dockerfile copies is allowed in.
    for keyword, argument in instructions():
        if keyword == "COPY" and "--from" not in argument:
            sources = [s for s in argument.split()[:-1] if not s.startswith("--")]
            for source in sources:
                assert source.rstrip("/").replace("README.m[d]", "README.md") in allowed, source
