"""Bad inputs: each gives a clear per-sample error; the other samples finish; nothing is damaged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile

from slidescore.config import JobConfig
from slidescore.model import load_model
from slidescore.run.local import score_samples
from tests.conftest import textured_image, write_tiff


def _corrupt_middle_tile(path: Path) -> None:
    with tifffile.TiffFile(path) as t:
        page = t.pages[0]
        i = len(page.dataoffsets) // 2
        offset, count = page.dataoffsets[i], page.databytecounts[i]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x00\xff" * (count // 2))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    img = textured_image(400, 400, seed=8)
    good = write_tiff(d / "good.tif", img, mpp=0.5)
    trunc = write_tiff(d / "truncated.tif", img, mpp=0.5, compression="jpeg")
    data = trunc.read_bytes()
    trunc.write_bytes(data[: len(data) // 3])
    corrupt = write_tiff(d / "corrupt.tif", img, mpp=0.5, compression="jpeg")
    _corrupt_middle_tile(corrupt)
    one = d / "onepixel.tif"
    tifffile.imwrite(one, np.zeros((1, 1, 3), np.uint8), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    u16 = d / "sixteen.tif"
    tifffile.imwrite(u16, np.zeros((300, 300, 3), np.uint16), photometric="rgb", tile=(64, 64), resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    weird = d / "implausible.tif"
    tifffile.imwrite(weird, img, photometric="rgb", tile=(64, 64), resolution=(1e-5, 1e-5), resolutionunit="CENTIMETER")
    dpi = d / "screenshot.tif"
    tifffile.imwrite(dpi, img, photometric="rgb", tile=(64, 64), resolution=(72, 72), resolutionunit="INCH")
    return {"screenshot": dpi, "good": good, "truncated": trunc, "corrupt": corrupt, "onepixel": one, "sixteen": u16, "implausible": weird}


def test_each_bad_input_fails_alone_with_a_clear_message(tmp_path: Path, bad_inputs: dict[str, Path], random_model_dir: Path) -> None:
    order = ["screenshot", "truncated", "good", "corrupt", "onepixel", "sixteen", "implausible"]
    results = score_samples([str(bad_inputs[k]) for k in order], JobConfig.from_dict({"tiling": {"chunk_cells": 8}}),
                            str(tmp_path), model=load_model(str(random_model_dir)))
    by_id = {r.sample_id: r for r in results}
    assert by_id["good"].status == "ok" and (tmp_path / "good" / "_SUCCESS").exists()
    expected = {
        "truncated": ("truncated or corrupt", "not a readable TIFF"),
        "corrupt": ("failed to decode level 0", "truncated or corrupt"),
        "onepixel": ("smaller than one 64×64 patch",),
        "sixteen": ("pixel type uint16 needs an explicit conversion",),
        "implausible": ("implausible resolution metadata", "set input.mpp"),
        "screenshot": ("no resolution metadata", "72 dpi looks like a software default"),
    }
    for sid, fragments in expected.items():
        r = by_id[sid]
        assert r.status == "failed", sid
        assert any(f in r.error for f in fragments), (sid, r.error)
        if sid == "sixteen":  # the fix: where the explicit rule goes
            assert "input_conversion" in r.error and "input.conversion" in r.error, r.error
        assert sid in r.error or str(bad_inputs[sid]) in r.error, r.error  # names the sample
        assert not (tmp_path / sid / "_SUCCESS").exists()
    lines = [json.loads(x) for x in (tmp_path / "failures.jsonl").read_text().splitlines()]
    assert sorted(x["sample_id"] for x in lines) == sorted(expected)
