"""Config parsing, error messages and the exception tree."""

from __future__ import annotations

import pickle

import pytest

from slidescore.config import JobConfig, load_config
from slidescore.errors import (
    ConfigError,
    InputError,
    ModelLoadError,
    ResolutionError,
    SampleNotFoundError,
    TransientStorageError,
    UnsupportedImageError,
)


def test_defaults_round_trip() -> None:
    cfg = JobConfig().validate()
    assert JobConfig.from_dict(cfg.to_dict()) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"tiling": {"stride": 16}}, "tiling.stride: unknown key"),
        ({"tiling": {"stride_px": 0}}, "tiling.stride_px: expected a positive integer"),
        ({"tiling": {"stride_px": "16"}}, "tiling.stride_px: expected an integer"),
        ({"blending": {"weights": "box"}}, "blending.weights: expected one of"),
        ({"mask": {"min_foreground_frac": 2}}, "mask.min_foreground_frac: expected a fraction"),
        ({"regions": {"thresholds": [1.5]}}, "regions.thresholds"),
        ({"modle": {}}, "modle: unknown key"),
        ({"tiling": 3}, "tiling: expected a mapping"),
    ],
)
def test_bad_values_name_the_dotted_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        JobConfig.from_dict(data)


def test_load_config_errors(tmp_path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: {stride_px: 16\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    good = tmp_path / "good.yaml"
    good.write_text("tiling:\n  stride_px: 32\nblending:\n  weights: gaussian\n")
    cfg = load_config(good)
    assert cfg.tiling.stride_px == 32 and cfg.blending.weights == "gaussian"


@pytest.mark.parametrize(
    "cls", [ConfigError, InputError, SampleNotFoundError, UnsupportedImageError, ResolutionError, ModelLoadError, TransientStorageError]
)
def test_errors_survive_pickle(cls: type) -> None:
    e = cls("sample 'x': something is wrong; do this", uri="s3://b/x.tif")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is cls and str(back) == str(e) and back.context == {"uri": "s3://b/x.tif"}


def test_error_tree() -> None:
    assert issubclass(ConfigError, ValueError)
    assert issubclass(SampleNotFoundError, FileNotFoundError) and issubclass(SampleNotFoundError, InputError)
    assert not issubclass(TransientStorageError, InputError)
