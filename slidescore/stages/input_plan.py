"""Planning an image's conversion to model input: pixel type, channels, resampling (an :class:`InputRecipe`).

The rules come from the model card's ``input_conversion``, overridden key by key by the config's
``input.conversion``; :class:`~slidescore.io.adapt.AdaptedReader` applies the recipe while reading
(see :mod:`slidescore.io.adapt` for what each rule means).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import numpy as np

from slidescore.config import InputConfig, check_conversion
from slidescore.core.tiling import choose_level
from slidescore.errors import UnsupportedImageError
from slidescore.io.adapt import InputRecipe
from slidescore.io.base import SlideReader
from slidescore.model.card import ModelCard


def _rules(card: ModelCard, cfg: InputConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """Card rules overridden key by key by the config's; and where each rule came from."""
    check_conversion(card.input_conversion, f"model card {card.name!r}: input_conversion")  # a bad card: ConfigError
    rules = dict(card.input_conversion)
    source = {k: f"model card input_conversion.{k}" for k in rules}
    for k, v in (cfg.conversion or {}).items():
        rules[k] = v
        source[k] = f"config input.conversion.{k}"
    return rules, source


def plan_input(reader: SlideReader, card: ModelCard, cfg: InputConfig, sample_id: str, mpp0: float) -> InputRecipe:
    """Decide conversion, channels and resampling for one image, or refuse it with the fix."""
    uri = reader.uri
    rules, source = _rules(card, cfg)
    dt = np.dtype(reader.dtype)
    window: tuple[float, float] | None = None
    window_source = ""
    if dt != np.uint8:
        key = dt.name if dt.name in rules else ("float" if dt.kind == "f" and "float" in rules else None)
        if key is None or dt.kind not in "uif":
            generic = "float" if dt.kind == "f" else dt.name
            raise UnsupportedImageError(
                f"sample {sample_id!r} ({uri}): pixel type {dt.name} needs an explicit conversion to 8 bits and model "
                f"{card.name!r} gives none; add a window to the model card's input_conversion or the config's "
                f"input.conversion, e.g. {{{generic}: {{low: <value shown black>, high: <value shown white>}}}}, "
                "or convert the image to uint8",
                uri=uri, dtype=dt.name)
        window = (float(rules[key]["low"]), float(rules[key]["high"]))
        window_source = source[key]
    n = reader.n_channels
    gray_to_rgb = False
    if n == 1 and card.n_channels == 3:
        if not rules.get("gray_to_rgb", False):
            raise UnsupportedImageError(
                f"sample {sample_id!r} ({uri}): single-channel image, model {card.name!r} expects {card.color_space}; "
                "set gray_to_rgb: true in the model card's input_conversion (or the config's input.conversion) if the "
                "model may score gray images replicated to RGB, or export an RGB image",
                uri=uri)
        gray_to_rgb = True
    elif n not in (1, 3, 4):
        raise UnsupportedImageError(
            f"sample {sample_id!r} ({uri}): {n} channels; model {card.name!r} expects {card.color_space} "
            "(1, 3 or 4 channels are read: gray, RGB, RGBA) — export an RGB image",
            uri=uri)
    recipe = InputRecipe(dtype=dt.name, window=window, window_source=window_source, gray_to_rgb=gray_to_rgb)
    level_mpps = [mpp0 * lv.downsample for lv in reader.levels]
    level, scale = choose_level(level_mpps, card.mpp, cfg.mpp_tolerance)
    if scale == 1.0:
        return recipe
    factor = card.mpp / level_mpps[level]
    return InputRecipe(**{**asdict(recipe), "resample_from_level": level, "resample_factor": factor,
                          "resample_method": "area average" if factor > 1 else "linear interpolation"})
