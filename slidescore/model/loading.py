"""Loading models: every source a user brings, turned into one :class:`PatchClassifier` with its card.

:func:`load_model` = :func:`resolve_model` (the reference → a :class:`ModelFiles`: card, kind of
network file, checksum) + :func:`load_files` (the network built, wrapped with its card). Sources:

- ``builtin:NAME`` and package folders: ``card.json`` plus ``weights.safetensors`` or ``weights.pt``
  (a state dict of the card's built-in ``architecture``), ``model.onnx``, ``model.pt2``
  (``torch.export``) or ``model.ts`` / ``model.pt`` (TorchScript);
- WSInfer-zoo folders as published: ``config.json`` (→ the card, :mod:`slidescore.model.wsinfer`)
  and ``torchscript_model.pt``;
- a lone ``.onnx``, ``.pt2``, ``.safetensors``, ``.pt``/``.ts`` file with its card beside it
  (``<file>.card.json``, ``<stem>.card.json`` or ``card.json``) or named by ``model.card``.

No loader runs pickled code: state dicts load with ``weights_only=True``, safetensors and ONNX
(protobuf) hold no code, ``.pt2`` archives are checked before :func:`torch.export.load` so that it
unpickles nothing (:func:`~slidescore.model.sources.check_pt2_archive`), and TorchScript archives
hold TorchScript code (run by torch's interpreter, not by pickle; their constants load through
torch's restricted unpickler). Every card is validated on read (:mod:`slidescore.model.card`). The
checksum of the network file goes into run keys: a changed file is a new run. A
:class:`ModelFiles` with its bytes read in pickles, so a classifier can be rebuilt from it in another
process (:meth:`ModelFiles.with_data`). The scoring copy of a network has its BatchNorm folded into
its convolutions (:func:`~slidescore.model.scoring.fold_batchnorm`).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from collections.abc import Mapping
from typing import Any

import torch

from slidescore.errors import ConfigError, ModelLoadError
from slidescore.model.architectures import ARCHITECTURES, build_architecture
from slidescore.model.card import ModelCard
from slidescore.model.scoring import PatchClassifier
from slidescore.model.sources import (
    ChannelsLastInput,
    ExportedModule,
    OnnxModule,
    check_pt2_archive,
    onnx_providers,
)

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


from slidescore.model.files import (  # noqa: E402,F401 — resolution lives in the torch-free module
    FILE_SUFFIXES,
    KINDS,
    PACKAGE_FILES,
    WSINFER_CONFIG,
    WSINFER_MODEL,
    ModelFiles,
    _card_from,
    _kind_of,
    _read_card,
    _read_json,
    _sha256,
    builtin_dir,
    builtin_names,
    resolve_model,
)


# -- building the network ------------------------------------------------------------------------
def load_model(name: str, *, card: str | Mapping[str, Any] | ModelCard | None = None, device: str = "auto",
               amp: str = "off", channels_last: bool | None = None, compile: bool = False,
               dense_tile_px: int | None = None) -> PatchClassifier:
    """Load ``builtin:<name>``, a package or WSInfer folder, or a model file (see the module docstring).

    ``card`` (``model.card``) gives the card of a model file that has none beside it: a path to its
    JSON, its document, or a :class:`ModelCard`. ``channels_last`` (default on) and the CUDA options
    ``amp`` and ``compile`` are those of :class:`PatchClassifier`; ``dense_tile_px`` the edge of one
    dense pass (default: 1024 on CPU, 4096 on CUDA).
    """
    return load_files(resolve_model(name, card=card), device=device, amp=amp, channels_last=channels_last,
                      compile=compile, dense_tile_px=dense_tile_px)


def load_files(files: ModelFiles, *, device: str = "auto", amp: str = "off", channels_last: bool | None = None,
               compile: bool = False, dense_tile_px: int | None = None) -> PatchClassifier:
    """The classifier of resolved model files (options as :func:`load_model`)."""
    card, label = files.card, files.path
    opts: dict[str, Any] = {"device": device, "amp": amp, "channels_last": channels_last, "compile": compile,
                            "dense_tile_px": dense_tile_px}
    nhwc = card.input_layout == "nhwc"
    module: torch.nn.Module
    if files.kind == "onnx":
        opts["device"], providers = onnx_providers(device)
        onnx_module = OnnxModule(files.read(), label=label, providers=providers, nhwc=nhwc)
        _check_input_shape(onnx_module.spatial_shape(), card, label)
        if card.dense:  # the network runs in onnxruntime on single patches
            log.info("model %s: ONNX models are scored per patch; the card's dense: true is not used", label)
            card = dataclasses.replace(card, dense=False)
        # onnxruntime takes contiguous input: normalise straight into its layout; torch.compile has nothing to compile
        opts.update(channels_last=nhwc if channels_last is None else channels_last, compile=False)
        module = onnx_module
    elif files.kind == "export":
        data = files.read()
        check_pt2_archive(data, label)
        exported = ExportedModule(data, label=label)
        shape = exported.spatial_shape()
        _check_input_shape(shape, card, label)
        if card.dense and (isinstance(shape[1], int) or isinstance(shape[2], int)):
            log.info("model %s: the exported program has a fixed input size; scored per patch (card dense: true not used)", label)
            card = dataclasses.replace(card, dense=False)
        module = ChannelsLastInput(exported) if nhwc else exported
    else:
        module = _torch_module(files)
        if nhwc:
            module = ChannelsLastInput(module)
    return PatchClassifier(module, card, checksum=files.checksum, source=files.source, outputs=card.outputs, **opts)


def _check_input_shape(shape: tuple[Any, Any, Any], card: ModelCard, label: str) -> None:
    """Refuse a network whose fixed input size or channels contradict the card."""
    c, h, w = shape
    want = (card.n_channels, card.patch_px, card.patch_px)
    fixed = [(got, exp) for got, exp in zip((c, h, w), want, strict=True) if isinstance(got, int)]
    if all(got == exp for got, exp in fixed):
        return
    layout = card.input_layout
    other = "nhwc" if layout == "nchw" else "nchw"
    hint = (f"; the input looks {other.upper()}: set input_layout: {other} in the card"
            if sorted(x for x in shape if isinstance(x, int)) == sorted(want) else
            "; make the card's patch_px and color_space match the network")
    raise ModelLoadError(f"model {label}: the network takes (channels, height, width) = {tuple(shape)} in {layout.upper()} "
                         f"order, but its card says {want} (patch_px {card.patch_px}, color_space {card.color_space}){hint}",
                         path=label)


def _torch_module(files: ModelFiles) -> torch.nn.Module:
    """A state-dict (``.pt`` / safetensors) or TorchScript network."""
    path, card = files.path, files.card
    src: Any = io.BytesIO(files.data) if files.data is not None else path
    if files.kind == "torchscript":
        try:
            with warnings.catch_warnings():
                # TorchScript is deprecated in favour of torch.export, but it is what users ship today.
                warnings.simplefilter("ignore", DeprecationWarning)
                return torch.jit.load(src, map_location="cpu")
        except (RuntimeError, ValueError) as e:
            raise ModelLoadError(f"model {path}: TorchScript archive cannot be loaded ({e})", path=path) from None
    if not card.architecture:
        what = "a safetensors file" if files.kind == "safetensors" else "not TorchScript but a state dict: it"
        raise ModelLoadError(
            f"model {path}: {what} holds weights only, and the card names no built-in architecture to load them into; "
            f"set the card's architecture (one of {sorted(ARCHITECTURES)}) and arch_kwargs, or bring the network as "
            "ONNX, a torch.export .pt2 or TorchScript", path=path, key="architecture",
        ) from None
    state = _read_state_dict(files, src)
    try:
        module = build_architecture(card.architecture, **card.arch_kwargs)
    except ModelLoadError as e:  # unknown name
        raise ModelLoadError(f"model {path}: card key architecture: {e}", path=path, key="architecture") from None
    except (TypeError, ValueError, RuntimeError) as e:  # arguments the architecture refuses
        raise ModelLoadError(
            f"model {path}: card key arch_kwargs: architecture {card.architecture!r} does not accept "
            f"{card.arch_kwargs} ({type(e).__name__}: {e}); fix arch_kwargs in the card", path=path,
            key="arch_kwargs") from None
    head = getattr(module, "head", None)  # the built-ins end in a 1×1 conv with one output per class
    if isinstance(head, torch.nn.Conv2d) and head.out_channels != card.n_classes:
        raise ModelLoadError(
            f"model {path}: card key arch_kwargs: architecture {card.architecture!r} built with {card.arch_kwargs} "
            f"has {head.out_channels} outputs, but the card lists {card.n_classes} classes {list(card.classes)}; "
            "make arch_kwargs.n_outputs equal the number of classes", path=path, key="arch_kwargs") from None
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ModelLoadError(
            f"model {path}: weights do not fit architecture {card.architecture!r} ({e})", path=path
        ) from None
    return module


def _read_state_dict(files: ModelFiles, src: Any) -> dict[str, torch.Tensor]:
    """The tensors of a ``.pt`` state dict (``weights_only``) or a safetensors file."""
    path = files.path
    try:
        if files.kind == "safetensors":
            from safetensors.torch import load, load_file

            return load(files.data) if files.data is not None else load_file(path)
        state = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # torch / safetensors raise pickle, zip, header and runtime errors for bad files
        raise ModelLoadError(f"model {path}: cannot be loaded ({type(e).__name__}: {e})", path=path) from None
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"model {path}: expected a state dict (parameter name → tensor), got {type(state).__name__}",
                             path=path)
    return dict(state)
