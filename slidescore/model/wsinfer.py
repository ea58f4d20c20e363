"""WSInfer model-zoo folders read as they are: ``config.json`` → a :class:`ModelCard` (plain Python, no torch).

A WSInfer-zoo model (https://github.com/SBU-BMI/wsinfer-zoo, config spec 1.0) is a folder holding
``config.json`` and ``torchscript_model.pt``. The config names the classes, the patch size in pixels
at ``spacing_um_px`` and the torchvision transforms applied to every patch: ``Resize`` (optional),
``ToTensor`` (uint8 / 255) and ``Normalize`` (mean, std). Its keys, from the spec's JSON schema::

    spec_version "1.0", architecture (a timm name; informational), num_classes ≥ 1,
    class_names (num_classes unique strings), patch_size_pixels ≥ 1, spacing_um_px > 0,
    transform [{name: Resize | ToTensor | Normalize, arguments: {...}}]

WSInfer cuts ``patch_size_pixels`` at ``spacing_um_px`` and resizes each patch to ``Resize.size``.
Here the resize happens once, not per patch: the card says the network sees ``size`` pixels at
``spacing_um_px · patch_size_pixels / size`` µm/px (the same field of view), so planning scores at
the pyramid level of that resolution, or reads a level resampled to it once per block
(:mod:`slidescore.io.adapt`: area averaging down, linear up). WSInfer's head is reproduced: softmax
over several classes, a sigmoid for one.
"""

from __future__ import annotations

import math
from typing import Any

from slidescore.errors import ModelLoadError
from slidescore.model.card import ModelCard

SPEC_VERSIONS = ("1.0",)
KEYS = ("spec_version", "architecture", "num_classes", "class_names", "patch_size_pixels", "spacing_um_px", "transform")
TRANSFORMS = ("Resize", "ToTensor", "Normalize")
# Resize arguments that change nothing here: the interpolation is ours (see the module docstring)
RESIZE_IGNORED = ("interpolation", "antialias", "max_size")


def card_from_wsinfer(config: Any, *, source: str, name: str) -> ModelCard:
    """The model card of a WSInfer-zoo ``config.json`` document.

    Parameters
    ----------
    config
        The parsed ``config.json``.
    source
        The file, named in every error.
    name
        The model's name for the card (the folder's name).

    Raises
    ------
    ModelLoadError
        Naming the file and key, when the document does not follow spec 1.0 or uses a transform
        that cannot be reproduced (a non-square resize, an unknown transform).
    """

    def fail(key: str, text: str) -> ModelLoadError:
        return ModelLoadError(f"WSInfer config {source}: {key}: {text} (WSInfer-zoo config spec 1.0)", path=source, key=key)

    if not isinstance(config, dict):
        raise fail("(document)", f"expected a JSON object with the keys {list(KEYS)}, got {type(config).__name__}")
    missing = [k for k in KEYS if k not in config]
    if missing:
        raise fail(missing[0], f"required key missing (missing: {missing})")
    if config["spec_version"] not in SPEC_VERSIONS:
        raise fail("spec_version", f"expected one of {list(SPEC_VERSIONS)}, got {config['spec_version']!r}")
    n = config["num_classes"]
    if not _is_int(n) or n < 1:
        raise fail("num_classes", f"expected an int >= 1, got {n!r}")
    names = config["class_names"]
    if not isinstance(names, list) or len(names) != n or not all(isinstance(c, str) and c for c in names):
        raise fail("class_names", f"expected {n} non-empty class names (num_classes), got {names!r}")
    patch = config["patch_size_pixels"]
    if not _is_int(patch) or patch < 1:
        raise fail("patch_size_pixels", f"expected an int >= 1, got {patch!r}")
    spacing = config["spacing_um_px"]
    if not _is_number(spacing) or spacing <= 0:
        raise fail("spacing_um_px", f"expected a finite number > 0 (µm per pixel), got {spacing!r}")
    size, mean, std = _transforms(config["transform"], patch, fail)
    card: dict[str, Any] = {
        "name": name, "patch_px": size, "mpp": float(spacing) * patch / size, "classes": list(names),
        "head": "softmax" if n > 1 else "binary_sigmoid", "thresholds": [0.5] * n,
        "mean": mean, "std": std, "dense": False, "pad_value": 255, "version": str(config["spec_version"]),
        "description": f"WSInfer-zoo model ({config['architecture']}); patches of {patch} px at {spacing} µm/px"
                       + (f", resized to {size} px" if size != patch else ""),
    }
    return ModelCard.from_dict(card, source=source)


def _transforms(items: Any, patch: int, fail: Any) -> tuple[int, list[float], list[float]]:
    """(network input size, mean, std) of the transform list."""
    if not isinstance(items, list):
        raise fail("transform", f"expected a list of {{name, arguments}} objects, got {items!r}")
    size, mean, std = patch, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
    seen: list[str] = []
    for i, item in enumerate(items):
        key = f"transform[{i}]"
        if not isinstance(item, dict) or item.get("name") not in TRANSFORMS or set(item) - {"name", "arguments"}:
            raise fail(key, f"expected {{name: one of {list(TRANSFORMS)}, arguments: {{...}}}}, got {item!r}")
        args = item.get("arguments") or {}
        if not isinstance(args, dict):
            raise fail(f"{key}.arguments", f"expected an object, got {args!r}")
        name = item["name"]
        seen.append(name)
        if name == "Resize":
            size = _resize_size(args, key, fail)
        elif name == "Normalize":
            mean, std = (_three(args.get(k), f"{key}.arguments.{k}", fail, positive=k == "std") for k in ("mean", "std"))
            if set(args) - {"mean", "std", "inplace"}:
                raise fail(f"{key}.arguments", f"unknown arguments {sorted(set(args) - {'mean', 'std', 'inplace'})}")
        elif args:
            raise fail(f"{key}.arguments", f"ToTensor takes no arguments, got {args!r}")
    if "ToTensor" not in seen:
        raise fail("transform", "expected a ToTensor step (pixels scaled to [0, 1]); found " + (", ".join(seen) or "none"))
    if "Normalize" in seen and seen.index("Normalize") < seen.index("ToTensor"):
        raise fail("transform", "Normalize must come after ToTensor, as torchvision requires")
    return size, mean, std


def _resize_size(args: dict[str, Any], key: str, fail: Any) -> int:
    size: Any = args.get("size")
    if isinstance(size, list) and len(size) == 1:
        size = size[0]
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not _is_int(size) or size < 1:
        raise fail(f"{key}.arguments.size", f"expected one edge in pixels (an int >= 1, or [h, w] with h = w: patches are "
                                            f"square), got {args.get('size')!r}")
    unknown = sorted(set(args) - {"size", *RESIZE_IGNORED})
    if unknown:
        raise fail(f"{key}.arguments", f"unknown Resize arguments {unknown}")
    return int(size)


def _three(value: Any, key: str, fail: Any, *, positive: bool) -> list[float]:
    if not (isinstance(value, list) and len(value) == 3 and all(_is_number(v) and (v > 0 or not positive) for v in value)):
        raise fail(key, f"expected 3 finite numbers{' > 0' if positive else ''} (one per RGB channel), got {value!r}")
    return [float(v) for v in value]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
