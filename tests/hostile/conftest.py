"""Hostile-input suite (issue "Unattended means unbreakable", item 8): broken models, bad cards,
hostile file names and YAML, corrupt run state, unwritable outputs, corrupt images.

Shared here: small images, broken models (TorchScript files with a card beside them, and state-dict
packages built like ``tests.conftest.make_model_package``), a subprocess runner for the CLI, and the
checks every run must pass whatever it was fed: no Python traceback, one parseable
``failures.jsonl`` row per failed sample, nothing written outside the output folder, and no sample
marked complete (``_SUCCESS``) whose mosaic holds non-finite or out-of-range probabilities.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO, make_model_package, textured_image, write_tiff

TRACEBACK = "Traceback (most recent call last)"
# small and quick: 256 px images at the model's 0.5 µm/px, 4 blocks of 8×8 cells each, no report
JOB_YAML = "tiling: {chunk_cells: 8}\nreport: {enabled: false}\nmodel: {batch_size: 16}\nmask: {min_foreground_frac: 0.05}\n"
CLI = [sys.executable, "-m", "slidescore.cli"]


# -- images ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def good_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two small valid slides (256×256 px at 0.5 µm/px, all foreground: 169 patches, 4 blocks each)."""
    d = tmp_path_factory.mktemp("hostile-images")
    return {
        "a": write_tiff(d / "a.tif", textured_image(256, 256, seed=11), mpp=0.5),
        "b": write_tiff(d / "b.tif", textured_image(256, 256, seed=12), mpp=0.5),
    }


def write_bad_images(d: Path, good: Path) -> dict[str, Path]:
    """Corrupt inputs that look like images: random bytes, a TIFF header then garbage, a truncated
    TIFF, an empty file, a directory named ``x.tif``."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(99)
    (d / "random.tif").write_bytes(rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    (d / "header.tif").write_bytes(b"II*\x00" + rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    data = good.read_bytes()
    (d / "truncated.tif").write_bytes(data[: len(data) // 3])
    (d / "empty.tif").write_bytes(b"")
    (d / "x.tif").mkdir(exist_ok=True)
    return {k: d / f"{k}.tif" for k in ("random", "header", "truncated", "empty", "x")}


# -- broken models --------------------------------------------------------------------------------
# module level: torch.jit.script reads their source
class NaNModel(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, :1] * float("nan")


class NaNFirst(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x.mean(dim=(2, 3))[:, :1] - 0.5
        out[0] = float("nan")
        return out


class RaiseOnThird(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if int(self.calls) == 3:
            raise RuntimeError("boom on call 3")
        return (x.mean(dim=(2, 3))[:, :1] - 0.5) * 4.0


class WrongShape(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))[:, :2]


def _card(name: str, **kw) -> dict:
    from slidescore.model.card import ModelCard

    return ModelCard(name=name, patch_px=64, mpp=0.5, classes=("parasitized",), dense=False, pad_value=235, **kw).to_dict()


def _torchscript(path: Path, module, card: dict) -> Path:
    with warnings.catch_warnings():  # TorchScript is deprecated in favour of torch.export; users still ship it
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(module).save(str(path))
    path.with_name(path.name + ".card.json").write_text(json.dumps(card))
    return path


@pytest.fixture(scope="session")
def hostile_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model files / packages, by name:

    - ``nan``: TorchScript, NaN for every patch; ``nan_one``: NaN for the first patch of each batch only;
    - ``nan_dense``: a SmearNet state-dict package (dense card) whose head bias is NaN;
    - ``raise3``: TorchScript that raises ``RuntimeError('boom on call 3')`` on its third forward call
      (a counter buffer, per loaded copy) and works before and after;
    - ``wrong_shape``: TorchScript returning (N, 2) for a one-class card;
    - ``card_<key>``: state-dict packages whose card has a bad ``network_stride_px`` / ``std`` / ``classes``.
    """
    d = tmp_path_factory.mktemp("hostile-models")
    models = {
        "nan": _torchscript(d / "nan.ts", NaNModel(), _card("nan")),
        "nan_one": _torchscript(d / "nan_one.ts", NaNFirst(), _card("nan_one")),
        "raise3": _torchscript(d / "raise3.ts", RaiseOnThird(), _card("raise3")),
        "wrong_shape": _torchscript(d / "wrong_shape.ts", WrongShape(), _card("wrong_shape")),
    }
    pkg = make_model_package(d / "nan_dense", seed=1)
    state = torch.load(pkg / "weights.pt", weights_only=True)
    state["head.bias"].fill_(float("nan"))
    torch.save(state, pkg / "weights.pt")
    models["nan_dense"] = pkg
    for key, value in (("network_stride_px", 0), ("std", [0, 0, 0]), ("classes", "abc")):
        p = make_model_package(d / f"card_{key}", seed=1)
        card = json.loads((p / "card.json").read_text())
        card[key] = value
        (p / "card.json").write_text(json.dumps(card))
        models[f"card_{key}"] = p
    return models


# -- running the CLI ------------------------------------------------------------------------------
@dataclass
class Run:
    rc: int
    stdout: str
    stderr: str
    seconds: float


def run_cli(args: list[str], cwd: Path, *, timeout: float = 120, env: dict[str, str] | None = None,
            module: list[str] | None = None) -> Run:
    """``python -m slidescore.cli ARGS`` in ``cwd`` (the repository on PYTHONPATH for ``jobs``)."""
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), full_env.get("PYTHONPATH", "")]))
    t0 = time.perf_counter()
    proc = subprocess.run([*(module or CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    return Run(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - t0)


def write_job(folder: Path, text: str = JOB_YAML, name: str = "job.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_text(text)
    return p


def assert_no_traceback(run: Run) -> None:
    for stream, text in (("stderr", run.stderr), ("stdout", run.stdout)):
        assert TRACEBACK not in text, f"a Python traceback on {stream}:\n{text[-4000:]}"


def failure_rows(out: Path) -> list[dict]:
    """Every row of ``failures.jsonl``; each line must be one JSON object naming its sample."""
    path = out / "failures.jsonl"
    if not path.exists():
        return []
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except ValueError as e:
            raise AssertionError(f"failures.jsonl line {i} is not JSON ({e}): {line[:300]!r}") from None
        assert isinstance(row, dict) and row.get("sample_id"), f"failures.jsonl line {i} names no sample: {line[:300]!r}"
        rows.append(row)
    return rows


def assert_one_line(msg: str) -> None:
    assert msg and "\n" not in msg and "\r" not in msg, repr(msg)


def sample_folders(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.is_dir() else []


def assert_complete_outputs_are_sane(out: Path) -> None:
    """Every sample marked complete has a readable ``_SUCCESS`` with its run key and a mosaic holding
    only probabilities in [0, 1] or NaN (= not scored), with at least one finite value when patches were scored."""
    from slidescore.io import mosaic as mz

    for success in out.rglob("_SUCCESS"):
        folder = success.parent
        marker = json.loads(success.read_text())
        assert isinstance(marker, dict) and marker.get("run_key"), f"{success}: {marker!r}"
        run = json.loads((folder / "run.json").read_text())
        for mosaic in folder.rglob("probabilities.ome.zarr"):
            prob = mz.read_level(mosaic, 0)
            finite = prob[np.isfinite(prob)]
            assert not np.isinf(prob).any(), f"{mosaic}: ±inf in a mosaic marked complete"
            assert ((finite >= 0) & (finite <= 1)).all(), f"{mosaic}: values outside [0, 1] in a mosaic marked complete"
            if run.get("patches", {}).get("scored"):
                assert finite.size, f"{mosaic}: all NaN although {run['patches']['scored']} patches were scored"


def snapshot(folder: Path, exclude: Path | None = None) -> dict[str, tuple[int, int]]:
    """Files and folders under ``folder`` (path → size, mtime) except those under ``exclude``."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        if exclude is not None and (here == exclude or exclude in here.parents):
            dirnames[:] = []
            continue
        for name in [*filenames, *dirnames]:
            p = here / name
            if exclude is not None and p == exclude:
                continue
            st = p.lstat()
            out[str(p.relative_to(folder))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns if p.is_file() else 0)
    return out
