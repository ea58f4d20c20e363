"""In-memory scoring for notebooks and benchmarks: :func:`score_array`.

``score_array(image, model, patch_px=…, stride_px=…)`` scores an (H, W, C) array with a
:class:`~slidescore.model.scoring.PatchClassifier` or any torch module and returns the blended
stride-resolution map, (K, cells_h, cells_w) float32 with NaN where no scored patch covers a cell.
It walks the same steps as a job, block by block: the global :class:`~slidescore.core.tiling.PatchGrid`,
output-chunk-aligned blocks with their halo (:func:`~slidescore.core.tiling.plan_blocks`), and the
job's own :class:`~slidescore.stages.recipe.BlockRecipe` (border padding, channel preparation,
dense or per-patch scoring, the card's calibration and the prior shift, blending); so for the same
pixels, model and settings its result equals level 0 of the job's probability mosaic.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from slidescore.config import DecisionConfig
from slidescore.core.tiling import PatchGrid, plan_blocks
from slidescore.core.types import Box, LevelInfo
from slidescore.errors import ConfigError
from slidescore.stages.recipe import BlockRecipe


class ArrayReader:
    """A :class:`~slidescore.io.SlideReader` over one in-memory (H, W, C) array (one level)."""

    def __init__(self, image: np.ndarray, uri: str = "<array>") -> None:
        self.image = image
        self.uri = uri
        self.levels: tuple[LevelInfo, ...] = (LevelInfo(0, image.shape[0], image.shape[1], 1.0),)
        self.mpp: float | None = None
        self.mpp_source = "none (in-memory array)"
        self.n_channels = image.shape[2]
        self.dtype = image.dtype

    def read(self, level: int, box: Box) -> np.ndarray:
        return self.image[box.y : box.y1, box.x : box.x1]

    def close(self) -> None:
        pass


def _as_image(image: Any) -> np.ndarray:
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ConfigError(f"image: expected an (H, W) or (H, W, C) array with C in 1, 3, 4, got shape {arr.shape}")
    if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"image: expected uint8 (0–255) or float (0–1) pixels, got {arr.dtype}; convert it first")
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    return arr


# Long only by its docstring (every argument of the public API documented); the body is ~40 lines.
def score_array(
    image: Any,
    model: Any,
    *,
    patch_px: int | None = None,
    stride_px: int,
    weights: str = "uniform",
    sigma_frac: float = 0.125,
    mode: str = "auto",
    batch_size: int = 256,
    valid: np.ndarray | None = None,
    pad_value: float | None = None,
    chunk_cells: int = 128,
    dense: bool = False,
    network_stride_px: int | None = None,
    outputs: str = "probabilities",
    device: str = "auto",
    decision: DecisionConfig | None = None,
) -> np.ndarray:
    """Score an in-memory image and return the blended map at stride resolution.

    Parameters
    ----------
    image
        (H, W, C) or (H, W) array: uint8 in 0–255 or float in 0–1 (C = 1, 3, or 4 with alpha dropped).
    model
        A :class:`~slidescore.model.scoring.PatchClassifier` (e.g. from
        :func:`~slidescore.model.load_model`; its card fixes normalisation and ``patch_px``), or a
        ``torch.nn.Module`` that maps an (N, C, patch_px, patch_px) float batch in [0, 1] to (N, K)
        (or (N, K, 1, 1)) ``outputs``. With ``dense=True`` the module is fully convolutional without
        zero padding (total stride ``network_stride_px``, default its ``stride_px`` attribute) and
        is run once per block.
    patch_px, stride_px
        Patch edge and distance between patch origins (the output cell), in pixels;
        ``stride_px`` must divide ``patch_px``.
    weights, sigma_frac
        Blending kernel: ``uniform``, ``gaussian`` or ``cosine`` (see :mod:`slidescore.core.blend`).
    mode
        ``auto``, ``dense`` or ``per_patch`` (as ``model.mode`` in a job).
    batch_size
        Patches per forward pass in per-patch mode (bounds memory).
    valid
        (Py, Px) bool grid of the patches to score (``PatchGrid.patches_shape``); default all.
        Cells no valid patch covers are NaN.
    pad_value
        Fill for patches reaching past the bottom/right edge, in the image's units; default the
        card's ``pad_value`` for a classifier, 0 for a plain module.
    chunk_cells
        Block edge in cells (a block reads ``chunk_cells · stride_px`` pixels plus its halo).
    outputs
        Plain modules only: ``probabilities`` (used as they come) or ``logits`` (sigmoid).
    device
        Plain modules only: where to run them (``auto`` = CUDA when available).
    decision
        The job's ``decision`` settings (operating point, prior shift); default a job's default: the
        card's calibration applied, no prior shift. Patch probabilities are calibrated and shifted
        before blending exactly as in a job (:class:`~slidescore.stages.recipe.BlockRecipe`).

    Returns
    -------
    (K, ceil(H / stride_px), ceil(W / stride_px)) float32, NaN where nothing was scored.
    """
    from slidescore.model.loading import classifier_from_module
    from slidescore.model.scoring import PatchClassifier

    img = _as_image(image)
    if isinstance(model, PatchClassifier):
        clf = model
        if patch_px is not None and patch_px != clf.card.patch_px:
            raise ConfigError(f"patch_px: model {clf.card.name!r} scores {clf.card.patch_px}-px patches, got patch_px={patch_px}; leave it out")
        fill = float(clf.card.pad_value) if pad_value is None else float(pad_value)
    else:
        if patch_px is None:
            raise ConfigError("patch_px: required for a plain torch module (the edge of its input patches)")
        if dense and network_stride_px is None:
            network_stride_px = getattr(model, "stride_px", None)
            if not isinstance(network_stride_px, int):
                raise ConfigError("network_stride_px: required with dense=True (the module's total stride)")
        clf = classifier_from_module(model, patch_px=patch_px, n_channels=1 if img.shape[2] == 1 else 3,
                                     dense=dense, network_stride_px=network_stride_px or 1, outputs=outputs,
                                     device=device)
        fill = 0.0 if pad_value is None else float(pad_value)
    if img.dtype != np.uint8 and pad_value is None and isinstance(model, PatchClassifier):
        fill /= 255.0  # the card's pad value is in 0–255
    try:
        grid = PatchGrid(img.shape[0], img.shape[1], clf.card.patch_px, stride_px)
    except ValueError as e:
        raise ConfigError(f"score_array: {e}") from None
    if valid is None:
        valid = np.ones(grid.patches_shape, bool)
    valid = np.asarray(valid, bool)
    if valid.shape != grid.patches_shape:
        raise ConfigError(f"valid: expected the ({grid.patches_shape[0]}, {grid.patches_shape[1]}) patch grid of this image, got {valid.shape}")
    recipe = BlockRecipe.create(clf, stride_px, weights=weights, sigma_frac=sigma_frac, decision=decision, mode=mode,
                                batch_size=batch_size, fill=fill)
    reader = ArrayReader(img)
    out = np.full((clf.card.n_classes, *grid.cells_shape), np.nan, np.float32)
    for block in plan_blocks(grid, chunk_cells):
        p, c = block.patches, block.cells
        v = valid[p.y : p.y1, p.x : p.x1]
        if not v.any():
            continue
        out[:, c.y : c.y1, c.x : c.x1] = recipe.cells(recipe.read(reader, 0, block.read), v, (p.y, p.x), c)
    return out
