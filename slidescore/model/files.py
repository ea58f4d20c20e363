"""Resolving a model reference to its files, card and checksum, without torch (the Ray driver plans with these)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from slidescore.errors import ConfigError, ModelLoadError
from slidescore.model.card import ModelCard
from slidescore.model.wsinfer import card_from_wsinfer

# -- resolving a reference ----------------------------------------------------------------------
KINDS = ("state_dict", "safetensors", "torchscript", "onnx", "export")
#: network files of a package folder, in the order they are looked for
PACKAGE_FILES = ("weights.safetensors", "weights.pt", "model.onnx", "model.pt2", "model.ts", "model.pt")
WSINFER_CONFIG, WSINFER_MODEL = "config.json", "torchscript_model.pt"
FILE_SUFFIXES = (".onnx", ".pt2", ".safetensors", ".pt", ".ts", ".pth")


@dataclass(frozen=True)
class ModelFiles:
    """A model reference resolved: its card, what kind of network file it has, and that file.

    ``checksum`` is the sha256 of the network file (the card goes into run keys on its own).
    ``data`` holds the file's bytes once :meth:`with_data` read them: then the object is
    self-contained and pickles, and :func:`load_files` builds the same classifier from it in any
    process (a Ray actor on another node) without the path existing there.
    """

    source: str
    card: ModelCard
    kind: str
    path: str
    checksum: str
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        try:
            return Path(self.path).read_bytes()
        except OSError as e:
            raise ModelLoadError(f"model {self.path}: cannot be read ({e})", path=self.path) from None

    def with_data(self) -> ModelFiles:
        """A copy holding the network file's bytes (checked against the checksum)."""
        data = self.read()
        if hashlib.sha256(data).hexdigest() != self.checksum:
            raise ModelLoadError(f"model {self.path}: the file changed while it was being loaded; load it again",
                                 path=self.path)
        return dataclasses.replace(self, data=data)


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


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: invalid JSON or not UTF-8
        raise ModelLoadError(f"{what} {path}: cannot be read as JSON ({e}); the {what.split()[-1]} must be a UTF-8 JSON "
                             "object", path=str(path)) from None


def _read_card(path: Path) -> ModelCard:
    """Read and validate a card file; any problem is a :class:`ModelLoadError` naming the file and key."""
    return ModelCard.from_dict(_read_json(path, "model card"), source=str(path))


def _card_from(card: str | Mapping[str, Any] | ModelCard) -> ModelCard:
    """A card given with the model reference (``model.card``): a card, its document, or a path to its JSON file."""
    if isinstance(card, ModelCard):
        return card
    if isinstance(card, Mapping):
        return ModelCard.from_dict(dict(card), source="model.card")
    path = Path(card)
    if not path.is_file():
        raise ConfigError(f"model.card: {card!r} is not a file; give the path of the model's card (JSON)", key="model.card")
    return _read_card(path)


def _kind_of(path: Path) -> str:
    """The kind of a network file, from its suffix and, for zip archives, its contents."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".safetensors":
        return "safetensors"
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        names = []
    if suffix == ".pt2" or any(n.endswith("/archive_format") or n == "archive_format" for n in names):
        return "export"
    # TorchScript archives carry compiled ``code/``; state dicts saved with torch.save do not
    return "torchscript" if any("/code/" in n for n in names) else "state_dict"


def resolve_model(name: str, *, card: str | Mapping[str, Any] | ModelCard | None = None) -> ModelFiles:
    """The card, network file and checksum behind a model reference (``model.name``, ``model.card``).

    Raises :class:`~slidescore.errors.ConfigError` for a reference that names nothing, and
    :class:`~slidescore.errors.ModelLoadError` (naming the file) for a folder or file that is not a
    usable model.
    """
    given = _card_from(card) if card is not None else None
    if name.startswith("builtin:"):
        folder = builtin_dir(name.split(":", 1)[1])
        if not (folder / "card.json").exists():
            raise ConfigError(f"model.name: unknown built-in model {name!r}; built-in models are {['builtin:' + n for n in builtin_names()]}")
        return _resolve_folder(folder, name, given)
    path = Path(name)
    if not path.exists():
        raise ConfigError(
            f"model.name: {name!r} is neither a built-in model ({['builtin:' + n for n in builtin_names()]}) "
            "nor an existing model package folder, WSInfer folder or model file (" + ", ".join(FILE_SUFFIXES) + ")"
        )
    if path.is_dir():
        return _resolve_folder(path, name, given)
    if given is None:
        beside = (path.with_name(path.name + ".card.json"), path.with_name(path.stem + ".card.json"), path.with_name("card.json"))
        found = next((p for p in beside if p.is_file()), None)
        if found is None:
            raise ModelLoadError(f"model {name}: no model card found; put {path.name}.card.json, {path.stem}.card.json or "
                                 "card.json beside it, or name one with model.card", path=name)
        given = _read_card(found)
    return ModelFiles(name, given, _kind_of(path), str(path), _sha256(path))


def _resolve_folder(folder: Path, source: str, given: ModelCard | None) -> ModelFiles:
    network = next((folder / f for f in PACKAGE_FILES if (folder / f).is_file()), None)
    if (folder / "card.json").is_file() or network is not None:
        card = given or _read_card(folder / "card.json")
        if network is None:
            raise ModelLoadError(f"model package {folder}: no network file inside; expected one of {list(PACKAGE_FILES)} "
                                 "beside card.json", path=str(folder))
        return ModelFiles(source, card, _kind_of(network), str(network), _sha256(network))
    if (folder / WSINFER_CONFIG).is_file():
        config_path = folder / WSINFER_CONFIG
        card = given or card_from_wsinfer(_read_json(config_path, "WSInfer config"), source=str(config_path),
                                          name=folder.resolve().name)
        network = folder / WSINFER_MODEL
        if not network.is_file():
            raise ModelLoadError(f"WSInfer model {folder}: no {WSINFER_MODEL} beside {WSINFER_CONFIG}; only TorchScript "
                                 "zoo models are read (download torchscript_model.pt with the config)", path=str(folder))
        return ModelFiles(source, card, "torchscript", str(network), _sha256(network))
    raise ModelLoadError(f"model folder {folder}: neither a model package (card.json + one of {list(PACKAGE_FILES)}) nor a "
                         f"WSInfer-zoo folder ({WSINFER_CONFIG} + {WSINFER_MODEL})", path=str(folder))


