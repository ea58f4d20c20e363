"""Built-in patch classifier architectures, written for dense scoring.

Every built-in network uses only unpadded ("valid") convolutions and poolings aligned to its total
stride. Run on one ``patch_px`` patch it returns a 1 × 1 logit map; run on a larger block it
returns the logits of every patch on the stride grid at once (docs/architecture.md, invariant 5). The
returned tensor is always logits of shape (N, n_outputs, H', W').
"""

from __future__ import annotations

import torch
from torch import nn


class SmearNet(nn.Module):
    """Small CNN for 64-px blood-smear patches at ~0.5 µm/px; total stride 16, no zero padding.

    Sizes for one patch: 64 → stem k4 s4 → 16 → conv3 → 14 → conv3 → 12 → pool → 6 → conv3 → 4
    → pool → 2 → conv2 → 1. For a block of 64 + 16·m pixels every pooling input is even, so the
    pooling windows of each patch line up with those of the block.
    """

    patch_px = 64
    stride_px = 16

    def __init__(self, n_outputs: int = 1, width: int = 32, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, kernel_size=4, stride=4),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, kernel_size=3),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, kernel_size=3),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, kernel_size=3),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 2 * w, kernel_size=2),
            nn.ReLU(inplace=True),
        )
        self.head = nn.Conv2d(2 * w, n_outputs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class _ValidBasicBlock(nn.Module):
    """ResNet BasicBlock with unpadded 3 × 3 convolutions and a cropped shortcut.

    The main branch shrinks the map by 4 (stride 1) or to ``(n − 3) // 2 − 1`` (stride 2). Output
    position ``j`` sees input ``[s·j, s·j + 2s + 2]``; the shortcut samples that window's centre
    (offset 2 for stride 1, 3 for stride 2), through a 1 × 1 convolution when the shape changes.
    """

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        h, w = out.shape[-2:]
        s = self.stride
        o = 2 if s == 1 else 3
        ident = x[..., o : o + s * (h - 1) + 1 : s, o : o + s * (w - 1) + 1 : s]
        return self.relu(out + self.shortcut(ident))


class ValidResNet18(nn.Module):
    """ResNet-18-style network for 224-px patches without zero padding; total stride 16.

    Stem: 8 × 8 convolution, stride 2, then a 3 × 3 max-pool with stride 1 (so that the total stride,
    16, divides a scoring stride of 112 and the receptive field is exactly 224 px). Four stages of
    two BasicBlocks (widths ``w, 2w, 4w, 8w``) at strides 2, 4, 8, 16; a 1 × 1 convolution head
    instead of global pooling, so the network stays fully convolutional. Sizes for one patch:
    224 → 109 → 107 → 103 → 99 │ 47 → 43 │ 19 → 15 │ 5 → 1. For a block of ``224 + 16·m`` pixels
    every strided layer sees the patch windows at even offsets, so dense output equals per-patch.
    No pretrained weights ship with it (train your own; the card must say ``dense: true`` and
    ``network_stride_px: 16``).
    """

    patch_px = 224
    stride_px = 16

    def __init__(self, n_outputs: int = 1, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, w, kernel_size=8, stride=2, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, stride=1),
        )
        stages: list[nn.Module] = []
        c_in = w
        for i, c_out in enumerate((w, 2 * w, 4 * w, 8 * w)):
            s = 1 if i == 0 else 2
            stages += [_ValidBasicBlock(c_in, c_out, s), _ValidBasicBlock(c_out, c_out, 1)]
            c_in = c_out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Conv2d(c_in, n_outputs, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


ARCHITECTURES: dict[str, type[nn.Module]] = {"smearnet": SmearNet, "resnet18_valid": ValidResNet18}


def build_architecture(name: str, **kwargs: object) -> nn.Module:
    """Instantiate a built-in architecture by name."""
    from slidescore.errors import ModelLoadError

    if "+" in name:  # a ViT encoder with a head, e.g. vit_small_patch16_224+linear (slidescore.model.vit)
        from slidescore.model.vit import build_encoder_classifier

        return build_encoder_classifier(name, **kwargs)  # type: ignore[arg-type]
    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown architecture {name!r}; built-in architectures are {sorted(ARCHITECTURES)}",
            architecture=name,
        ) from None
    return cls(**kwargs)  # type: ignore[arg-type]
