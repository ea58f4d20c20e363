"""Loading a model package and scoring blocks of pixels with it.

A block arrives as the level pixels of its read box (patch grid origin at its top-left corner) and
the boolean grid of patches to score. Dense mode runs the network once over the block and
subsamples the logit map to the scoring stride (valid for cards that declare ``dense``); per-patch
mode cuts the valid patches out with a strided view and scores them in large batches. Both return
(C, Py, Px) probabilities, NaN where a patch was not scored.
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

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from slidescore.errors import ConfigError, ModelLoadError
from slidescore.model.architectures import build_architecture
from slidescore.model.card import ModelCard

log = logging.getLogger(__name__)


class PatchClassifier:
    """A torch module with its model card, ready to score pixels."""

    def __init__(self, module: torch.nn.Module, card: ModelCard, *, device: str = "auto", checksum: str = "", source: str = "") -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.card = card
        self.checksum = checksum
        self.source = source
        mean = torch.tensor(card.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(card.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)

    # -- preprocessing / heads ------------------------------------------------------------
    def _normalise(self, x_u8: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 → normalised float32 on the device."""
        x = x_u8.to(self.device, non_blocking=True).float()
        return x * self._scale + self._shift

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the card's head to (N, C, ...) logits."""
        if self.card.head == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    # -- scoring --------------------------------------------------------------------------
    @torch.inference_mode()
    def score_dense(self, pixels: np.ndarray, stride_px: int) -> np.ndarray:
        """Every patch of a block in one pass: (h, w, c) uint8 → (C, Py, Px) float32."""
        card = self.card
        t = card.network_stride_px
        if stride_px % t:
            raise ConfigError(f"tiling.stride_px={stride_px} is not a multiple of the network stride {t}; use per_patch mode")
        x = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))[None]
        probs = self.probabilities(self.module(self._normalise(x)))[0]
        step = stride_px // t
        py = (pixels.shape[0] - card.patch_px) // stride_px + 1
        px = (pixels.shape[1] - card.patch_px) // stride_px + 1
        out = probs[:, ::step, ::step][:, :py, :px]
        if out.shape[1:] != (py, px):
            raise ModelLoadError(
                f"model {card.name!r} is declared dense but returned a {tuple(probs.shape[1:])} map for a "
                f"{pixels.shape[:2]} block; expected {(py, px)} — set dense: false in its card",
                model=card.name,
            )
        return out.float().cpu().numpy()

    @torch.inference_mode()
    def score_patches(self, patches: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, c, P, P) uint8 patches → (N, C) float32 probabilities, in batches."""
        out = np.empty((len(patches), self.card.n_classes), np.float32)
        for i in range(0, len(patches), batch_size):
            x = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size]))
            logits = self.module(self._normalise(x))
            if logits.ndim == 4:
                logits = logits.flatten(2).mean(-1) if logits.shape[-1] * logits.shape[-2] > 1 else logits[:, :, 0, 0]
            out[i : i + len(x)] = self.probabilities(logits).float().cpu().numpy()
        return out

    def score_block(self, pixels: np.ndarray, valid: np.ndarray, stride_px: int, *, mode: str = "auto", batch_size: int = 256) -> np.ndarray:
        """Scores of the patches of a block; NaN where ``valid`` is False.

        ``pixels`` is the block's read box (patch (0, 0) of the block at its top-left corner);
        ``valid`` is the (Py, Px) grid of patches to score.
        """
        p = self.card.patch_px
        py, px = valid.shape
        out = np.full((self.card.n_classes, py, px), np.nan, np.float32)
        if not valid.any():
            return out
        dense = mode == "dense" or (mode == "auto" and self.card.dense and stride_px % self.card.network_stride_px == 0)
        if dense:
            scores = self.score_dense(pixels, stride_px)
            out[:, valid] = scores[:, valid]
            return out
        windows = sliding_window_view(pixels, (p, p), axis=(0, 1))[::stride_px, ::stride_px][:py, :px]
        patches = windows[valid]  # (N, c, P, P): the view's window axes come last
        out[:, valid] = self.score_patches(patches, batch_size).T
        return out


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
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"model card {path}: cannot be read as JSON ({e})", path=str(path)) from None
    return ModelCard.from_dict(data)


def load_model(name: str, *, device: str = "auto") -> PatchClassifier:
    """Load ``builtin:<name>``, a model package folder, or a TorchScript / state-dict file.

    A package folder holds ``card.json`` and either ``weights.pt`` (a state dict of the card's
    built-in ``architecture``, loaded with ``weights_only=True``) or ``model.ts`` (TorchScript).
    A lone ``.pt``/``.ts`` file needs its card beside it as ``<file>.card.json`` or ``card.json``.
    """
    if name.startswith("builtin:"):
        folder = builtin_dir(name.split(":", 1)[1])
        if not (folder / "card.json").exists():
            raise ConfigError(f"model.name: unknown built-in model {name!r}; built-in models are {['builtin:' + n for n in builtin_names()]}")
        return _load_package(folder, device, source=name)
    path = Path(name)
    if not path.exists():
        raise ConfigError(
            f"model.name: {name!r} is neither a built-in model ({['builtin:' + n for n in builtin_names()]}) "
            "nor an existing model package folder or .pt/.ts file"
        )
    if path.is_dir():
        return _load_package(path, device, source=name)
    for card_path in (path.with_name(path.name + ".card.json"), path.with_name("card.json")):
        if card_path.exists():
            return _load_file(path, _read_card(card_path), device, source=name)
    raise ModelLoadError(f"model {name}: no model card found; put {path.name}.card.json or card.json beside it", path=name)


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives carry compiled ``code/``; state dicts saved with torch.save do not."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _load_package(folder: Path, device: str, source: str) -> PatchClassifier:
    card = _read_card(folder / "card.json")
    for fname in ("weights.pt", "model.ts", "model.pt"):
        if (folder / fname).exists():
            return _load_file(folder / fname, card, device, source)
    raise ModelLoadError(f"model package {folder}: no weights.pt or model.ts inside", path=str(folder))


def _load_file(path: Path, card: ModelCard, device: str, source: str) -> PatchClassifier:
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
        module = build_architecture(card.architecture, **card.arch_kwargs)
        try:
            module.load_state_dict(state)
        except RuntimeError as e:
            raise ModelLoadError(
                f"model {path}: weights do not fit architecture {card.architecture!r} ({e})", path=str(path)
            ) from None
    return PatchClassifier(module, card, device=device, checksum=checksum, source=source)
