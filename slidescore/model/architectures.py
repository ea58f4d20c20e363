"""Built-in patch classifier architectures, written for dense scoring.

Every built-in network uses only unpadded ("valid") convolutions and poolings aligned to its total
stride. Run on one ``patch_px`` patch it returns a 1 × 1 logit map; run on a larger block it
returns the logits of every patch on the stride grid at once (ARCHITECTURE invariant 5). The
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


ARCHITECTURES: dict[str, type[nn.Module]] = {"smearnet": SmearNet}


def build_architecture(name: str, **kwargs: object) -> nn.Module:
    """Instantiate a built-in architecture by name."""
    from slidescore.errors import ModelLoadError

    try:
        cls = ARCHITECTURES[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown architecture {name!r}; built-in architectures are {sorted(ARCHITECTURES)}",
            architecture=name,
        ) from None
    return cls(**kwargs)  # type: ignore[arg-type]
