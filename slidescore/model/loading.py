"""Loading models: built-in packages, package folders (card + weights), TorchScript files, plain modules.

:func:`load_model` turns a model reference from the config (``builtin:NAME``, a folder with
``card.json`` and weights, or a ``.pt``/``.ts`` TorchScript file with a card beside it) into a
:class:`~slidescore.model.scoring.PatchClassifier`; weights are read with ``weights_only`` (no
pickled code runs) and every card is validated on read (:mod:`slidescore.model.card`). The scoring
copy of a network has its BatchNorm folded into its convolutions (:func:`fold_batchnorm`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
import zipfile
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from slidescore.errors import ConfigError, ModelLoadError
from slidescore.model.architectures import build_architecture
from slidescore.model.card import ModelCard
from slidescore.model.scoring import PatchClassifier

log = logging.getLogger(__name__)


def classifier_from_module(module: torch.nn.Module, *, patch_px: int, n_channels: int, n_classes: int | None = None,
                           dense: bool = False, network_stride_px: int = 1, outputs: str = "probabilities",
                           pad_value: int = 0, device: str = "auto", name: str | None = None) -> PatchClassifier:
    """Wrap a plain torch module: input scaled to [0, 1] (uint8 / 255; float images as they are).

    ``n_classes`` is probed with one blank patch when not given; a module that fails that probe, or
    returns no (1, K) or (1, K, h, w) tensor for it, raises :class:`~slidescore.errors.ModelLoadError`.
    """
    if n_channels not in (1, 3):
        raise ConfigError(f"image: expected 1 or 3 channels (4 = RGBA, alpha dropped), got {n_channels}")
    if n_classes is None:
        label = name or type(module).__name__
        try:
            with torch.inference_mode():
                dev = next((p.device for p in module.parameters()), torch.device("cpu"))
                probe = module.eval()(torch.zeros(1, n_channels, patch_px, patch_px, device=dev))
        except torch.OutOfMemoryError:
            raise
        except Exception as e:  # a user's network may raise anything
            raise ModelLoadError(f"model {label!r} raised {type(e).__name__} on one blank {n_channels}×{patch_px}×{patch_px} "
                                 f"patch (probing its number of classes): {e}; check patch_px and the module, or pass "
                                 "n_classes", model=label) from e
        if not isinstance(probe, torch.Tensor) or probe.ndim not in (2, 4) or probe.shape[0] != 1 or probe.shape[1] < 1:
            found = tuple(probe.shape) if isinstance(probe, torch.Tensor) else type(probe).__name__
            raise ModelLoadError(f"model {label!r} returned {found} for one patch; expected a tensor of shape (1, K) or "
                                 "(1, K, h, w) with one score per class", model=label)
        n_classes = int(probe.shape[1])
    card = ModelCard(
        name=name or type(module).__name__, patch_px=patch_px, mpp=1.0,
        classes=tuple(f"class_{i}" for i in range(n_classes)), thresholds=(0.5,) * n_classes,
        color_space="RGB" if n_channels == 3 else "GRAY", mean=(0.0,) * n_channels, std=(1.0,) * n_channels,
        dense=dense, network_stride_px=network_stride_px, pad_value=pad_value,
    )
    return PatchClassifier(module, card, device=device, outputs=outputs)


# -- loading ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def builtin_dir(name: str) -> Path:
    return Path(str(resources.files("slidescore.model") / "builtin" / name))


def builtin_names() -> list[str]:
    root = Path(str(resources.files("slidescore.model") / "builtin"))
    return sorted(p.name for p in root.iterdir() if (p / "card.json").exists())


def _read_card(path: Path) -> ModelCard:
    """Read and validate a card file; any problem is a :class:`ModelLoadError` naming the file and key."""
    try:
        data: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise ModelLoadError(f"model card {path}: cannot be read as JSON ({e}); the card must be a UTF-8 JSON "
                             "object", path=str(path)) from None
    return ModelCard.from_dict(data, source=str(path))


def load_model(name: str, *, device: str = "auto", amp: str = "off", channels_last: bool | None = None,
               compile: bool = False, dense_tile_px: int | None = None) -> PatchClassifier:
    """Load ``builtin:<name>``, a model package folder, or a TorchScript / state-dict file.

    A package folder holds ``card.json`` and either ``weights.pt`` (a state dict of the card's
    built-in ``architecture``, loaded with ``weights_only=True``) or ``model.ts`` (TorchScript).
    A lone ``.pt``/``.ts`` file needs its card beside it as ``<file>.card.json`` or ``card.json``.
    ``channels_last`` (default on) and the CUDA options ``amp`` and ``compile`` are those of :class:`PatchClassifier`;
    ``dense_tile_px`` the edge of one dense pass (default: 1024 on CPU, 4096 on CUDA).
    """
    opts: dict[str, Any] = {"device": device, "amp": amp, "channels_last": channels_last, "compile": compile,
                            "dense_tile_px": dense_tile_px}
    if name.startswith("builtin:"):
        folder = builtin_dir(name.split(":", 1)[1])
        if not (folder / "card.json").exists():
            raise ConfigError(f"model.name: unknown built-in model {name!r}; built-in models are {['builtin:' + n for n in builtin_names()]}")
        return _load_package(folder, opts, source=name)
    path = Path(name)
    if not path.exists():
        raise ConfigError(
            f"model.name: {name!r} is neither a built-in model ({['builtin:' + n for n in builtin_names()]}) "
            "nor an existing model package folder or .pt/.ts file"
        )
    if path.is_dir():
        return _load_package(path, opts, source=name)
    for card_path in (path.with_name(path.name + ".card.json"), path.with_name("card.json")):
        if card_path.exists():
            return _load_file(path, _read_card(card_path), opts, source=name)
    raise ModelLoadError(f"model {name}: no model card found; put {path.name}.card.json or card.json beside it", path=name)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled ``code/``; state dicts saved with torch.save do not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_package(folder: Path, opts: dict[str, Any], source: str) -> PatchClassifier:
    card = _read_card(folder / "card.json")
    for fname in ("weights.pt", "model.ts", "model.pt"):
        if (folder / fname).exists():
            return _load_file(folder / fname, card, opts, source)
    raise ModelLoadError(f"model package {folder}: no weights.pt or model.ts inside", path=str(folder))


def _load_file(path: Path, card: ModelCard, opts: dict[str, Any], source: str) -> PatchClassifier:
    checksum = _sha256(path)
    module: torch.nn.Module
    if _is_torchscript(path):
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in favour of torch.export, but it is what users ship today.
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"model {path}: TorchScript archive cannot be loaded ({e})", path=str(path)) from None
    else:
        if not card.architecture:
            raise ModelLoadError(
                f"model {path}: not TorchScript and the card names no built-in architecture to load a state dict into",
                path=str(path),
            ) from None
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises pickle/zip/runtime errors for bad files
            raise ModelLoadError(f"model {path}: cannot be loaded ({type(e).__name__}: {e})", path=str(path)) from None
        try:
            module = build_architecture(card.architecture, **card.arch_kwargs)
        except ModelLoadError as e:  # unknown name
            raise ModelLoadError(f"model {path}: card key architecture: {e}", path=str(path), key="architecture") from None
        except (TypeError, ValueError, RuntimeError) as e:  # arguments the architecture refuses
            raise ModelLoadError(
                f"model {path}: card key arch_kwargs: architecture {card.architecture!r} does not accept "
                f"{card.arch_kwargs} ({type(e).__name__}: {e}); fix arch_kwargs in the card", path=str(path),
                key="arch_kwargs") from None
        head = getattr(module, "head", None)  # the built-ins end in a 1×1 conv with one output per class
        if isinstance(head, torch.nn.Conv2d) and head.out_channels != card.n_classes:
            raise ModelLoadError(
                f"model {path}: card key arch_kwargs: architecture {card.architecture!r} built with {card.arch_kwargs} "
                f"has {head.out_channels} outputs, but the card lists {card.n_classes} classes {list(card.classes)}; "
                "make arch_kwargs.n_outputs equal the number of classes", path=str(path), key="arch_kwargs") from None
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(
                f"model {path}: weights do not fit architecture {card.architecture!r} ({e})", path=str(path)
            ) from None
    return PatchClassifier(module, card, checksum=checksum, source=source, **opts)
