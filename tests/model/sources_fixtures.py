"""Networks for the model-source tests and their files in every format, written at test time by their own tools.

Two networks: the built-in SmearNet (its shipped weights; dense, unpadded) and :class:`PaddedResNet`, a
small ResNet-style classifier with zero padding, BatchNorm, a strided residual block and global
pooling (the layout of most networks people bring). Files are written by ``torch.onnx.export``
(the dynamo exporter, and the legacy TorchScript one for a fixed batch), ``torch.export.save``,
``torch.jit.save`` and safetensors.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slidescore.model.card import ModelCard
from slidescore.model.loading import builtin_dir


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short: nn.Module = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + self.short(x))


class PaddedResNet(nn.Module):
    """ResNet-style patch classifier: padded convolutions, residual blocks, global average pool, linear head."""

    def __init__(self, n_classes: int = 2, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.Sequential(_Block(width, width, 1), _Block(width, 2 * width, 2))
        self.fc = nn.Linear(2 * width, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class NHWCInput(nn.Module):
    """``inner`` taking (N, H, W, C) input, as a Keras network exported to ONNX does."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.permute(0, 3, 1, 2))


class Softmaxed(nn.Module):
    """``inner`` ending in its own softmax (card ``outputs: probabilities``)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.inner(x), dim=1)


class NaNAfter(nn.Module):
    """``inner`` whose outputs turn NaN (log of a negative number)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + torch.log(x.mean() * 0 - 1)


def smearnet() -> nn.Module:
    from slidescore.model.architectures import SmearNet

    net = SmearNet()
    net.load_state_dict(torch.load(builtin_dir("smearnet") / "weights.pt", weights_only=True))
    return net.eval()


def smearnet_card(**changes: Any) -> ModelCard:
    doc = json.loads((builtin_dir("smearnet") / "card.json").read_text())
    doc.update(changes)
    return ModelCard.from_dict(doc)


def resnet(seed: int = 0, n_classes: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    net = PaddedResNet(n_classes)
    for m in net.modules():  # BatchNorm statistics that matter (not the identity of a fresh layer)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    return net.eval()


def resnet_card(**changes: Any) -> ModelCard:
    doc: dict[str, Any] = {"name": "padded-resnet", "patch_px": 64, "mpp": 0.5, "classes": ["other", "parasitized"],
                           "head": "softmax", "thresholds": [0.5, 0.5], "mean": [0.6, 0.5, 0.55], "std": [0.2, 0.25, 0.3],
                           "pad_value": 235}
    doc.update(changes)
    return ModelCard.from_dict(doc)


def write_card(card: ModelCard, path: Path) -> Path:
    path.write_text(json.dumps(card.to_dict()))
    return path


def example(nhwc: bool = False, batch: int = 2, size: int = 64) -> torch.Tensor:
    return torch.rand(batch, size, size, 3) if nhwc else torch.rand(batch, 3, size, size)


def export_onnx(net: nn.Module, path: Path, *, nhwc: bool = False, fixed_batch: int | None = None,
                dynamo: bool = False, size: int = 64) -> Path:
    """``net`` as ONNX with a dynamic batch axis (or a fixed one): torch's dynamo exporter (the default since
    torch 2.9; ~5 s a model here) or its legacy TorchScript-based one (deprecated, still in 2.13; fast)."""
    net.eval()  # a wrapper is born in training mode: exported so, its BatchNorm would use (and update) batch statistics
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # exporter deprecations and progress notes
        if dynamo:
            torch.onnx.export(net, (example(nhwc),), str(path), dynamo=True, opset_version=18, external_data=False,
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            batch = {} if fixed_batch is not None else {"dynamic_axes": {"x": {0: "n"}, "y": {0: "n"}}}
            torch.onnx.export(net, (example(nhwc, fixed_batch or 2, size),), str(path), dynamo=False, input_names=["x"],
                              output_names=["y"], opset_version=17, **batch)
    return path


def export_program(net: nn.Module, path: Path, *, fixed_batch: int | None = None) -> Path:
    net.eval()
    if fixed_batch is not None:
        program = torch.export.export(net, (example(batch=fixed_batch),))
    else:
        program = torch.export.export(net, (example(),), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(path))
    return path


def safetensors_package(net: nn.Module, folder: Path, card: ModelCard) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / "weights.safetensors"))
    write_card(card, folder / "card.json")
    return folder


def wsinfer_folder(net: nn.Module, folder: Path, config: dict[str, Any]) -> Path:
    """A WSInfer-zoo folder: ``config.json`` and ``torchscript_model.pt``."""
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(net), str(folder / "torchscript_model.pt"))
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def wsinfer_config(patch_px: int, spacing: float, resize: int | None, classes: list[str], mean: list[float],
                   std: list[float]) -> dict[str, Any]:
    transform: list[dict[str, Any]] = [{"name": "Resize", "arguments": {"size": resize}}] if resize else []
    transform += [{"name": "ToTensor"}, {"name": "Normalize", "arguments": {"mean": mean, "std": std}}]
    return {"spec_version": "1.0", "architecture": "custom", "num_classes": len(classes), "class_names": classes,
            "patch_size_pixels": patch_px, "spacing_um_px": spacing, "transform": transform}


def copy_with(src: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(src, dest)
    return dest
