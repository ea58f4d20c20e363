"""Data-quality flags on generated smears: sharp and clean vs blurred, dark, resolution from config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.offline.synthetic import SmearSpec, plan_smear, render_region
from slidescore.report.quality import sample_quality
from tests.conftest import write_tiff


@pytest.fixture(scope="module")
def smear() -> np.ndarray:
    layout = plan_smear(SmearSpec(height_px=1024, width_px=1024, mpp=0.25, seed=4))
    return render_region(layout, 0, 0, 1024, 1024, downsample=1)


def _flags(tmp_path: Path, img: np.ndarray, name: str, mpp_source: str = "tiff:XResolution(cm)") -> dict[str, dict]:
    tif = write_tiff(tmp_path / f"{name}.tif", img, mpp=0.25, n_levels=3, compression="zlib", tile_px=256)
    card = load_model("builtin:smearnet", device="cpu").card
    reader = open_image(str(tif))
    try:
        assert reader.mpp == pytest.approx(0.25)
        run = {"input": {"mpp0": 0.25, "mpp_source": mpp_source}}
        return {f["flag"]: f for f in sample_quality(reader, run, card)}
    finally:
        reader.close()


def test_clean_smear_raises_nothing(tmp_path: Path, smear: np.ndarray) -> None:
    flags = _flags(tmp_path, smear, "clean")
    assert not [f for f in flags.values() if f["raised"]], flags
    assert "level 2 (1 µm/px)" in flags["out_of_focus_fraction"]["message"]


def test_blurred_smear_is_flagged_out_of_focus(tmp_path: Path, smear: np.ndarray) -> None:
    blurred = np.stack([ndimage.gaussian_filter(smear[..., c].astype(np.float32), 6) for c in range(3)], -1)
    flags = _flags(tmp_path, np.clip(blurred, 0, 255).astype(np.uint8), "blurred")
    f = flags["out_of_focus_fraction"]
    assert f["raised"] and f["value"] > 0.9 and "out of focus" in f["message"]
    assert not flags["dark_fraction"]["raised"]


def test_dark_area_stain_shift_and_config_resolution_are_flagged(tmp_path: Path, smear: np.ndarray) -> None:
    img = smear.copy()
    img[:512, :512] = (25, 20, 35)  # pen / fold: a quarter of the image (4 of the 16 quality tiles)
    img[600:, :, 1] = (img[600:, :, 1] * 0.55).astype(np.uint8)  # a strongly shifted stain in the lower part
    flags = _flags(tmp_path, img, "dark", mpp_source="config:input.mpp")
    assert flags["dark_fraction"]["raised"] and flags["dark_fraction"]["value"] == pytest.approx(0.25, abs=0.01)
    assert flags["stain_shift"]["raised"]
    assert flags["mpp_overridden"]["raised"] and flags["mpp_overridden"]["value"] == "config:input.mpp"
    assert not flags["blank_fraction"]["raised"]
