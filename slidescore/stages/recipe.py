"""The block recipe: a block's pixels → its blended cell values, written once for every entry point.

:class:`BlockRecipe` is the one place where pixels become probabilities (docs/architecture.md,
"Where an output value comes from"):

1. **read** the block's box plus halo, padded past the image edge with the card's ``pad_value``
   (:func:`~slidescore.io.read_padded`; the border policy of the global patch grid) — of it, only the
   part the scoring of the block's valid patches looks at (:meth:`BlockRecipe.needed_box`);
2. **channels**: image channels → model channels (:func:`~slidescore.model.inputs.prepare_pixels`);
3. **normalise and score**: the classifier normalises on its device and scores every valid patch
   of the block, densely (one pass) or patch by patch
   (:meth:`~slidescore.model.scoring.PatchClassifier.score_block`);
4. **calibrate / shift priors**: the card's calibration and the config's prior shift act on patch
   probabilities (:meth:`~slidescore.decide.DecisionPolicy.transform`; identity without them);
5. **blend**: the normalised convolution of patch scores onto the block's own output cells
   (:func:`~slidescore.core.blend.blend_cells`).

The job's block stage (:mod:`slidescore.stages.block`, local and Ray runners alike) and
:func:`slidescore.score_array` call the same object, so an in-memory score equals level 0 of the
job's mosaic for the same pixels, model and settings. Steps 1–2 run in the read-ahead threads
(:meth:`BlockRecipe.read`), steps 3–5 in :meth:`BlockRecipe.cells`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from slidescore.config import DecisionConfig, JobConfig
from slidescore.core.blend import blend_cells, patch_weights
from slidescore.core.types import Box
from slidescore.decide import DecisionPolicy
from slidescore.io import SlideReader, read_padded
from slidescore.model.inputs import prepare_pixels


@dataclass(frozen=True)
class BlockRecipe:
    """How one job turns pixels into cell values (picklable apart from the classifier it holds).

    Parameters
    ----------
    model
        A :class:`~slidescore.model.scoring.PatchClassifier` (its card fixes channels, normalisation,
        ``patch_px`` and the calibration).
    stride_px
        Distance between patch origins: one output cell.
    policy
        Calibration and prior shift applied to patch probabilities before blending.
    kernel
        The (k, k) blending weights of one patch over its cells (:func:`~slidescore.core.blend.patch_weights`).
    fill
        Value of pixels past the image edge, in the image's units (the card's ``pad_value`` for uint8).
    mode, batch_size
        Dense or per-patch scoring (``auto`` chooses), and patches per forward pass per patch.
    """

    model: Any
    stride_px: int
    policy: DecisionPolicy
    kernel: np.ndarray
    fill: float
    mode: str = "auto"
    batch_size: int = 256

    @classmethod
    def for_job(cls, model: Any, cfg: JobConfig) -> BlockRecipe:
        """The recipe of a job: its stride, blending, scoring mode and decision settings."""
        return cls.create(model, cfg.tiling.stride_px, weights=cfg.blending.weights, sigma_frac=cfg.blending.sigma_frac,
                          decision=cfg.decision, mode=cfg.model.mode, batch_size=cfg.model.batch_size)

    @classmethod
    def create(cls, model: Any, stride_px: int, *, weights: str = "uniform", sigma_frac: float = 0.125,
               decision: DecisionConfig | None = None, mode: str = "auto", batch_size: int = 256,
               fill: float | None = None) -> BlockRecipe:
        """A recipe from its settings; ``decision`` defaults to the job default (the card's calibration, no prior shift)."""
        card = model.card
        policy = DecisionPolicy.from_card(card, decision if decision is not None else DecisionConfig())
        kernel = patch_weights(card.patch_px // stride_px, weights, sigma_frac)
        return cls(model, stride_px, policy, kernel, float(card.pad_value) if fill is None else float(fill), mode, batch_size)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """Image channels → model channels (step 2)."""
        return prepare_pixels(pixels, self.model.card)

    def read(self, reader: SlideReader, level: int, box: Box) -> np.ndarray:
        """Steps 1–2: the model-ready pixels of ``box`` (a block's read box or part of it), padded past the edge."""
        return self.prepare(read_padded(reader, level, box, self.fill))

    def needed_box(self, read: Box, valid: np.ndarray) -> Box:
        """The part of a block's read box ``read`` that scoring its (Py, Px) ``valid`` patches looks at (the
        dense tiles holding a valid patch, or the valid patches' bounding box:
        :meth:`~slidescore.model.scoring.PatchClassifier.patches_needed`); reading only it gives the same scores."""
        a0, b0, a1, b1 = self.model.patches_needed(valid, self.stride_px, self.mode)
        s, p = self.stride_px, self.model.card.patch_px
        return Box(read.y + a0 * s, read.x + b0 * s, (a1 - a0 - 1) * s + p, (b1 - b0 - 1) * s + p)

    def patch_probabilities(self, pixels: np.ndarray, valid: np.ndarray, first: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Steps 3–4: (K, Py, Px) calibrated probabilities of the block's patches (NaN where not valid)."""
        scores = self.model.score_block(pixels, valid, self.stride_px, mode=self.mode, batch_size=self.batch_size,
                                        first=first)
        return self.policy.transform(scores)

    def cells(self, pixels: np.ndarray, valid: np.ndarray, patch_origin: tuple[int, int], cells: Box,
              first: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Steps 3–5: the blended (K, h, w) values of the block's own ``cells``.

        ``pixels`` are the prepared pixels of the block's read box from its patch ``first`` on (the whole
        box, or :meth:`needed_box`), ``valid`` its (Py, Px) patches to score and ``patch_origin`` the
        global index of its first patch.
        """
        scores = self.patch_probabilities(pixels, valid, first)
        # patch index a covers cells [a − k + 1, a] (the centred grid): blend from the first cell it covers
        margin = self.kernel.shape[0] - 1
        first_cells = (patch_origin[0] - margin, patch_origin[1] - margin)
        return blend_cells(scores, valid, self.kernel, first_cells, (cells.y, cells.x, cells.h, cells.w))
