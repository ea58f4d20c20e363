"""The intake poller loads the job's model as the job does: with ``model.card`` from the config.

An ONNX file without a card beside it gets its card from the job config; the poller (which computes
run keys from the card and checksum) must load it so, or every poll stops on "no card" before it
lists a sample. Here the poll gets past the model and stops only at the unreachable Ray address.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from slidescore.model import load_model
from slidescore.model.loading import builtin_dir
from tests.model.sources_fixtures import export_onnx

REPO = Path(__file__).resolve().parents[1]
EXIT_USAGE, EXIT_BACKEND = 2, 3


def _poll(tmp_path: Path, model: dict) -> subprocess.CompletedProcess[str]:
    (tmp_path / "job.yaml").write_text(yaml.safe_dump({"model": model, "output": {"uri": str(tmp_path / "out")}}))
    (tmp_path / "in").mkdir(exist_ok=True)
    intake = tmp_path / "intake.yaml"
    intake.write_text(yaml.safe_dump({"intake_prefix": str(tmp_path / "in"), "output": str(tmp_path / "out"),
                                      "job_config": "job.yaml", "submit": "ray_jobs", "ray_address": "http://127.0.0.1:9"}))
    return subprocess.run([sys.executable, "-m", "jobs.intake", "--config", str(intake)], capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_the_poller_loads_an_onnx_model_with_the_card_from_the_config(tmp_path: Path) -> None:
    onnx = export_onnx(load_model("builtin:smearnet", device="cpu").module, tmp_path / "net.onnx")
    card = shutil.copy(builtin_dir("smearnet") / "card.json", tmp_path / "the-card.json")
    without = _poll(tmp_path, {"name": str(onnx)})
    assert without.returncode == EXIT_USAGE and "card" in without.stderr, without.stderr
    p = _poll(tmp_path, {"name": str(onnx), "card": str(card)})
    assert p.returncode != EXIT_USAGE, p.stderr  # past the model: stops (if at all) at the unreachable Ray address
