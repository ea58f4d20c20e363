"""The model card: everything the scorer must know about a patch classifier besides its weights.

A card is a small YAML/JSON document stored beside the weights. It fixes the patch size and
resolution the model was trained at, how pixels are normalised, what the outputs mean (classes and
head), default decision thresholds, and whether the network can be run densely (fully
convolutional, no zero padding, total stride dividing the scoring stride). This module is plain
Python: it does not import torch, so configs and plans can be validated without it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from slidescore.errors import ConfigError

HEADS = ("binary_sigmoid", "softmax", "multilabel_sigmoid")
# what an operating point was fitted on: single patches, or the job's regions on the blended map
OPERATING_POINT_UNITS = ("patch", "region")
COLOR_SPACES = ("RGB", "HSV", "GRAY")


@dataclass(frozen=True)
class ModelCard:
    """Metadata of a patch classifier.

    Attributes
    ----------
    patch_px
        Edge of the square input patch, in pixels at ``mpp``.
    mpp
        Resolution the model expects, in µm per pixel.
    classes
        One name per output channel. A binary sigmoid model has one class (the positive one).
    head
        ``binary_sigmoid``, ``softmax`` or ``multilabel_sigmoid``: how logits become probabilities.
    thresholds
        Default decision threshold per class, used for the label image and the suspect regions.
    mean, std
        Per-channel normalisation applied after scaling pixels to [0, 1].
    dense
        The network is fully convolutional without zero padding, so one pass over a block gives the
        score of every patch in it (see ``network_stride_px``).
    network_stride_px
        Total stride of the network; dense scoring needs it to divide the scoring stride.
    pad_value
        Pixel value used where a patch extends past the image border (the background colour).
    calibration
        How logits are calibrated before thresholds apply, e.g. ``{"method": "temperature",
        "temperature": 1.3}`` (empty: none). Written by ``slidescore calibrate``.
    operating_points
        Named decision points, e.g. ``{"precision_0.90": {"thresholds": [0.71], "unit": "region",
        ...}}``, with the validation figures behind them. A job picks one with
        ``decision.operating_point``. ``unit`` says what the figures count: ``patch`` (single
        patches, what ``slidescore calibrate`` fits on a patch table; the default for cards
        without it) or ``region`` (suspect regions on the blended map, as a job reports them).
    training_prevalence
        Positive fraction per class in the training data (for prior-shift correction).
    input_conversion
        Explicit rule for non-uint8 inputs, e.g. ``{"uint16": {"low": 0, "high": 4095}}``; images
        of other pixel types are refused rather than silently rescaled.
    """

    name: str
    patch_px: int
    mpp: float
    classes: tuple[str, ...]
    head: str = "binary_sigmoid"
    thresholds: tuple[float, ...] = (0.5,)
    color_space: str = "RGB"
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    architecture: str | None = None
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    dense: bool = False
    network_stride_px: int = 1
    pad_value: int = 255
    colors: tuple[tuple[int, int, int], ...] = ()
    version: str = "0"
    description: str = ""
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    operating_points: dict[str, Any] = field(default_factory=dict)
    training_prevalence: tuple[float, ...] = ()
    input_conversion: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.patch_px, int) or self.patch_px <= 0:
            raise ConfigError(f"model card {self.name!r}: patch_px must be a positive int, got {self.patch_px!r}")
        if not self.mpp or self.mpp <= 0:
            raise ConfigError(f"model card {self.name!r}: mpp must be a positive number of µm/px, got {self.mpp!r}")
        if self.head not in HEADS:
            raise ConfigError(f"model card {self.name!r}: head must be one of {HEADS}, got {self.head!r}")
        if self.color_space not in COLOR_SPACES:
            raise ConfigError(
                f"model card {self.name!r}: color_space must be one of {COLOR_SPACES}, got {self.color_space!r}"
            )
        if not self.classes:
            raise ConfigError(f"model card {self.name!r}: classes must name at least one class")
        if len(self.thresholds) != len(self.classes):
            raise ConfigError(
                f"model card {self.name!r}: thresholds has {len(self.thresholds)} values for "
                f"{len(self.classes)} classes; give one threshold per class"
            )
        n_channels = 1 if self.color_space == "GRAY" else 3
        if len(self.mean) != n_channels or len(self.std) != n_channels:
            raise ConfigError(
                f"model card {self.name!r}: mean/std need {n_channels} values for color_space {self.color_space}"
            )

        for name, op in self.operating_points.items():
            if not isinstance(op, dict):
                raise ConfigError(f"model card {self.name!r}: operating point {name!r} must be a mapping "
                                  f"(thresholds, kind, target, unit, validation), got {type(op).__name__}")
            if op.get("unit", "patch") not in OPERATING_POINT_UNITS:
                raise ConfigError(f"model card {self.name!r}: operating point {name!r}: unit must be one of "
                                  f"{OPERATING_POINT_UNITS}, got {op.get('unit')!r}")

    def operating_point_unit(self, name: str) -> str:
        """``patch`` or ``region``: what operating point ``name`` was fitted on (older cards: patch)."""
        return str(self.operating_points[name].get("unit", "patch"))

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_channels(self) -> int:
        return 1 if self.color_space == "GRAY" else 3

    def class_colors(self) -> list[tuple[int, int, int]]:
        """One RGB colour per class (the card's, or a fixed palette)."""
        palette = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240)]
        if len(self.colors) == self.n_classes:
            return [tuple(c) for c in self.colors]  # type: ignore[misc]
        return [palette[i % len(palette)] for i in range(self.n_classes)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model card: unknown keys {unknown}; known keys are {sorted(known)}")
        kw = dict(data)
        for key in ("classes", "thresholds", "mean", "std", "training_prevalence"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "colors" in kw:
            kw["colors"] = tuple(tuple(c) for c in kw["colors"])
        if isinstance(kw.get("operating_points"), dict):  # cards written before units: patch-level points
            kw["operating_points"] = {n: ({"unit": "patch", **op} if isinstance(op, dict) else op)
                                      for n, op in kw["operating_points"].items()}
        try:
            return cls(**kw)
        except TypeError as e:
            raise ConfigError(f"model card: {e}; required keys are name, patch_px, mpp, classes") from e
