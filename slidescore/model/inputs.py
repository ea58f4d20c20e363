"""Image channels → model channels, the first step of the block recipe (numpy only, no torch).

The card decides what the network sees: RGBA drops alpha, an RGB image scored by a gray model is
converted by luminance. Normalisation (mean / std) happens on the device, in
:meth:`~slidescore.model.scoring.PatchClassifier.normalise`, so the uint8 block crosses to the GPU
at a quarter of the float size.
"""

from __future__ import annotations

import numpy as np

from slidescore.model.card import ModelCard

LUMA = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601, as PIL's "L" mode


def prepare_pixels(pixels: np.ndarray, card: ModelCard) -> np.ndarray:
    """Image channels → model channels (RGBA drops alpha; RGB → gray by luminance for gray models)."""
    if pixels.shape[-1] == 4:
        pixels = pixels[..., :3]
    if card.color_space == "GRAY" and pixels.shape[-1] == 3:
        gray = pixels.astype(np.float32) @ LUMA
        pixels = np.rint(gray)[..., None].astype(np.uint8)
    return pixels
