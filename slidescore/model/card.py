"""The model card: everything the scorer must know about a patch classifier besides its weights.

A card is a small YAML/JSON document stored beside the weights. It fixes the patch size and
resolution the model was trained at, how pixels are normalised, what the outputs mean (classes and
head), default decision thresholds, and whether the network can be run densely (fully
convolutional, no zero padding, total stride dividing the scoring stride). Every field is checked
when a card is built (:func:`card_problem`): a card file with a bad value fails to load with the
file, the dotted key, what was expected and what was found, instead of scoring garbage later
(``std: [0, 0, 0]`` would divide by zero into a complete-looking map of NaN). This module is plain
Python: it does not import torch, so configs and plans can be validated without it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from slidescore.errors import ConfigError, ModelLoadError, SlideScoreError

HEADS = ("binary_sigmoid", "softmax", "multilabel_sigmoid")
REQUIRED_KEYS = ("name", "patch_px", "mpp", "classes")
CALIBRATION_METHODS = ("none", "temperature", "isotonic")
# what an operating point was fitted on: single patches, or the job's regions on the blended map
OPERATING_POINT_UNITS = ("patch", "region")
COLOR_SPACES = ("RGB", "HSV", "GRAY")
# what the network returns (``probabilities``: it ends in its own sigmoid/softmax, as Keras models
# usually do; the card's head is then not applied again) and the layout of its input tensor
OUTPUT_KINDS = ("logits", "probabilities")
INPUT_LAYOUTS = ("nchw", "nhwc")


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
    outputs
        ``logits`` (the card's ``head`` turns them into probabilities) or ``probabilities`` (the
        network ends in its own sigmoid/softmax, as exported Keras models usually do; its outputs
        are checked to lie in [0, 1] and used as they are).
    input_layout
        ``nchw`` (PyTorch's order) or ``nhwc`` (channels last, as Keras/TensorFlow models and their
        ONNX exports take it): the normalised batch is handed to the network in this order.
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
    outputs: str = "logits"
    input_layout: str = "nchw"

    def __post_init__(self) -> None:
        problem = card_problem({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})
        if problem is not None:
            key, text = problem
            raise ConfigError(f"model card {self.name!r}: {key}: {text}", key=key)

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
    def from_dict(cls, data: Any, *, source: str | None = None) -> ModelCard:
        """Build a card from its parsed JSON document, checking every field.

        Parameters
        ----------
        data
            The card document (a mapping of the dataclass fields; lists for tuples).
        source
            Where the card was read from (its file). A card file belongs to the model, so its problems
            raise :class:`~slidescore.errors.ModelLoadError` naming the file and the key; without a
            source (a card built by the caller) they raise :class:`~slidescore.errors.ConfigError`.

        Returns
        -------
        ModelCard
            The validated card.
        """

        def fail(key: str, text: str) -> SlideScoreError:
            if source is None:
                name = data.get("name") if isinstance(data, dict) else None
                where = f"model card {name!r}" if isinstance(name, str) and name else "model card"
                return ConfigError(f"{where}: {key}: {text}", key=key)
            return ModelLoadError(f"model card {source}: {key}: {text}; fix this value in the card file (or get a "
                                  "corrected card from the model's provider)", path=source, key=key)

        if not isinstance(data, dict):
            raise fail("(document)", f"expected a JSON object with the keys {list(REQUIRED_KEYS)} and optional "
                                     f"others, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise fail(str(unknown[0]), f"unknown key (all unknown: {unknown}); known keys are {sorted(known)}")
        missing = [k for k in REQUIRED_KEYS if k not in data]
        if missing:
            raise fail(missing[0], f"required key missing (missing: {missing}; required: {list(REQUIRED_KEYS)})")
        problem = card_problem(data)
        if problem is not None:
            raise fail(*problem)
        kw = dict(data)
        for key in ("classes", "thresholds", "mean", "std", "training_prevalence"):
            if key in kw:
                kw[key] = tuple(kw[key])
        if "colors" in kw:
            kw["colors"] = tuple(tuple(c) for c in kw["colors"])
        if "operating_points" in kw:  # cards written before units: patch-level points
            kw["operating_points"] = {n: {"unit": "patch", **op} for n, op in kw["operating_points"].items()}
        return cls(**kw)


# -- validation -----------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    """A finite real number (JSON's NaN / Infinity and booleans are not)."""
    return isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_list(v: Any) -> bool:
    return isinstance(v, list | tuple)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _numbers(key: str, value: Any, n: int, what: str, ok: Callable[[float], bool],
             expected: str) -> Iterator[tuple[str, str]]:
    """Problems of a list that must hold ``n`` finite numbers each passing ``ok``."""
    if not _is_list(value):
        yield key, f"expected a list of {n} {what}, got {_show(value)}"
    elif len(value) != n:
        yield key, f"expected {n} {what}, got {len(value)}: {_show(value)}"
    else:
        for i, x in enumerate(value):
            if not (_is_number(x) and ok(x)):
                yield f"{key}[{i}]", f"expected {expected}, got {_show(x)}"


def _int_in(key: str, value: Any, lo: int, hi: int | None, what: str) -> Iterator[tuple[str, str]]:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        yield key, f"expected an int {bound} ({what}), got {_show(value)}"


def card_problem(values: Mapping[str, Any]) -> tuple[str, str] | None:
    """The first invalid field of a card, as ``(key, what was expected and found)``, or ``None``.

    Parameters
    ----------
    values
        The card's fields, as a parsed document (lists) or a :class:`ModelCard`'s attributes
        (tuples); missing optional fields take the dataclass defaults.

    Returns
    -------
    tuple of str or None
        The dotted key (``std[1]``, ``operating_points.recall_0.99.thresholds``) and the problem.
    """
    return next(_problems(values), None)


def _problems(v: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Every problem of a card, in field order; a field's checks stop at its first problem, and
    checks that depend on an earlier field run only once that field is valid (the caller takes the
    first problem, so the generator never runs past it)."""
    name = v.get("name")
    if not isinstance(name, str) or not name.strip():
        yield "name", f"expected a non-empty string naming the model, got {_show(name)}"
    yield from _int_in("patch_px", v.get("patch_px"), 1, None, "the edge of the square input patch, in pixels")
    mpp: Any = v.get("mpp")
    if not (_is_number(mpp) and mpp > 0):
        yield "mpp", f"expected a finite number > 0 (the µm per pixel the model was trained at), got {_show(mpp)}"

    classes: Any = v.get("classes")
    if not _is_list(classes):
        yield "classes", f'expected a list of class names such as ["parasitized"], got {_show(classes)}'
        return
    if not classes:
        yield "classes", "expected at least one class name, got an empty list"
    for i, c in enumerate(classes):
        if not isinstance(c, str) or not c:
            yield f"classes[{i}]", f"expected a non-empty string, got {_show(c)}"
    if len(set(classes)) != len(classes):
        yield "classes", f"expected unique class names, got {sorted({c for c in classes if classes.count(c) > 1})} more than once"
    n = len(classes)
    head = v.get("head", "binary_sigmoid")
    if not isinstance(head, str) or head not in HEADS:
        yield "head", f"expected one of {list(HEADS)}, got {_show(head)}"
    if head == "softmax" and n < 2:
        yield "head", "softmax needs at least 2 classes (a one-class softmax is always 1), got 1; use binary_sigmoid"
    yield from _numbers("thresholds", v.get("thresholds", (0.5,)), n, "decision thresholds (one per class)",
                        lambda x: 0 <= x <= 1, "a finite number in [0, 1]")

    space = v.get("color_space", "RGB")
    if not isinstance(space, str) or space not in COLOR_SPACES:
        yield "color_space", f"expected one of {list(COLOR_SPACES)}, got {_show(space)}"
    n_channels = 1 if space == "GRAY" else 3
    per_channel = f"values (one per channel of color_space {space})"
    yield from _numbers("mean", v.get("mean", (0.5,) * n_channels), n_channels, per_channel,
                        lambda x: True, "a finite number (pixels scaled to 0–1)")
    yield from _numbers("std", v.get("std", (0.25,) * n_channels), n_channels, per_channel,
                        lambda x: x > 0, "a finite number > 0 (pixels are divided by it)")

    arch = v.get("architecture")
    if arch is not None and (not isinstance(arch, str) or not arch):
        yield "architecture", f"expected the name of a built-in architecture or null, got {_show(arch)}"
    kwargs = v.get("arch_kwargs", {})
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        yield "arch_kwargs", f"expected a mapping of argument names to values, got {_show(kwargs)}"
    dense = v.get("dense", False)
    if not isinstance(dense, bool):
        yield "dense", f"expected true or false, got {_show(dense)}"
    yield from _int_in("network_stride_px", v.get("network_stride_px", 1), 1, None, "the network's total stride")
    yield from _int_in("pad_value", v.get("pad_value", 255), 0, 255, "the 8-bit background value for pixels past the border")

    colors = v.get("colors", ())
    if not _is_list(colors) or len(colors) not in (0, n):
        yield "colors", f"expected an empty list or {n} [r, g, b] colours (one per class), got {_show(colors)}"
    for i, c in enumerate(colors):
        if not (_is_list(c) and len(c) == 3 and all(_is_int(x) and 0 <= x <= 255 for x in c)):
            yield f"colors[{i}]", f"expected [r, g, b] with ints in [0, 255], got {_show(c)}"
    for key in ("version", "description"):
        if not isinstance(v.get(key, ""), str):
            yield key, f"expected a string, got {_show(v.get(key))}"
    for key in ("training", "metrics", "input_conversion"):
        if not isinstance(v.get(key, {}), Mapping):
            yield key, f"expected a mapping, got {_show(v.get(key))}"

    for key, allowed in (("outputs", OUTPUT_KINDS), ("input_layout", INPUT_LAYOUTS)):
        value = v.get(key, allowed[0])
        if not isinstance(value, str) or value not in allowed:
            yield key, f"expected one of {list(allowed)}, got {_show(value)}"

    yield from _calibration_problems(v.get("calibration", {}), n)
    yield from _operating_point_problems(v.get("operating_points", {}), n)
    prevalence = v.get("training_prevalence", ())
    if not (_is_list(prevalence) and len(prevalence) == 0):
        yield from _numbers("training_prevalence", prevalence, n, "positive fractions (one per class), or an empty list",
                            lambda x: 0 < x < 1, "a finite number in (0, 1)")


def _calibration_problems(calib: Any, n: int) -> Iterator[tuple[str, str]]:
    if not isinstance(calib, Mapping):
        yield "calibration", f'expected a mapping such as {{"method": "temperature", "temperature": 1.3}}, got {_show(calib)}'
        return
    method = calib.get("method", "none")
    if not isinstance(method, str) or method not in CALIBRATION_METHODS:
        yield "calibration.method", f"expected one of {list(CALIBRATION_METHODS)}, got {_show(method)}"
    if method == "temperature":
        t = calib.get("temperature", 1.0)
        if not (_is_number(t) and t > 0):
            yield "calibration.temperature", f"expected a finite number > 0, got {_show(t)}"
    if method != "isotonic":
        return
    iso = calib.get("isotonic")
    if not isinstance(iso, Mapping):
        yield "calibration.isotonic", f"expected a mapping {{x: [knots per class], y: [knots per class]}}, got {_show(iso)}"
        return
    for axis in ("x", "y"):
        knots: Any = iso.get(axis)
        if not (_is_list(knots) and len(knots) == n):
            yield f"calibration.isotonic.{axis}", f"expected {n} lists of knots (one per class), got {_show(knots)}"
    for i, (xs, ys) in enumerate(zip(iso["x"], iso["y"], strict=True)):
        m = len(xs) if _is_list(xs) else 0
        yield from _numbers(f"calibration.isotonic.x[{i}]", xs, max(m, 1), "knots", lambda x: True, "a finite number")
        if any(b < a for a, b in zip(xs, xs[1:], strict=False)):
            yield f"calibration.isotonic.x[{i}]", f"expected non-decreasing knots, got {_show(xs)}"
        yield from _numbers(f"calibration.isotonic.y[{i}]", ys, m, "knots (as many as x)", lambda x: 0 <= x <= 1,
                            "a finite number in [0, 1]")


def _operating_point_problems(points: Any, n: int) -> Iterator[tuple[str, str]]:
    if not isinstance(points, Mapping):
        yield "operating_points", f"expected a mapping of named operating points, got {_show(points)}"
        return
    for name, op in points.items():
        key = f"operating_points.{name}"
        if not isinstance(op, Mapping):
            yield key, f"must be a mapping (thresholds, kind, target, unit, validation), got {type(op).__name__}"
            continue
        unit = op.get("unit", "patch")
        if not isinstance(unit, str) or unit not in OPERATING_POINT_UNITS:
            yield key, f"unit must be one of {OPERATING_POINT_UNITS}, got {_show(unit)}"
        yield from _numbers(f"{key}.thresholds", op.get("thresholds"), n, "thresholds (one per class)",
                            lambda x: 0 <= x <= 1, "a finite number in [0, 1]")
        target = op.get("target")
        if target is not None and not (_is_number(target) and 0 <= target <= 1):
            yield f"{key}.target", f"expected a finite number in [0, 1], got {_show(target)}"
        validation = op.get("validation", {})
        if not isinstance(validation, Mapping):
            yield f"{key}.validation", f"expected a mapping of per-class figures, got {_show(validation)}"
