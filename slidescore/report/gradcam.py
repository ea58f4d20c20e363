"""What drove a region's score: integrated gradients of the patch classifier, on the report's crops.

The report explains a region with **integrated gradients** (Sundararajan et al., 2017) at the
scoring level's pixel resolution. The explained score ``S`` is the class probability (the card's
head) summed over the patches of the scoring grid that cover the crop — the patches whose
probabilities were blended into the crop's cells. The baseline ``b`` is an empty field (the card's
``pad_value``, its background everywhere), and with ``m`` midpoint steps ``α_k = (k + ½)/m``::

    attribution(pixel) = Σ_channels (x − b) · mean_k ∂S/∂x (b + α_k (x − b))

so the attributions add up to ``S(x) − S(b)`` (completeness, up to the m-step quadrature): a
pixel's value is its share of how far the score rose above what empty background scores. The map
shown is the positive part (what raised the score) after a Gaussian smoothing of about patch/32
pixels (2 px = 1 µm for the built-in SmearNet), divided by its maximum over the crop.

Why not Grad-CAM, as before: on the built-in SmearNet, Grad-CAM at the last convolution with a
spatial output (``features.8``: 40-px receptive fields every 8 px) put its peak 12–26 px (6–13 µm)
from the parasite in all 12 top regions of a generated smear, the parasite colder than a ring around
it (heat at the parasite 0.3–0.9 × the ring's 8–16 px out). Two causes, measured on planted
parasites: (1) the map was stretched onto the crop by a plain resize, while cell ``j`` of this
valid-convolution network is centred on input pixel ``8j + 20`` (the valid margins, 20 px a side,
are not in the map), which moved a cell's heat by up to ±14 px on a 96-px crop; (2) mapped to
receptive-field centres the ring stays (peak 11 px off, median, at most 12.5, in 12 of 12 crops;
heat at the parasite 0.6–1.1 ×, median 0.85 ×, the ring's; per-cell gradient × activation there:
15 px, 0.2–0.6 ×): the network carries "a parasite somewhere in this patch" in cells that see the
dot off-centre (its 2 × 2 max-pool and 2 × 2 head convolution combine the corners of a 4 × 4
window), and one weight per channel averaged over the crop cannot undo that. Layers before a
max-pool get gradient at one cell of four, which quantises their maps to 8 px. Guided Grad-CAM,
drawn on black, left the reader no cells to place it on; it is gone. Integrated gradients need no
layer, no upsampling and no hooks (TorchScript modules work too) and put the peak within 1–4 px of
planted parasites at any offset in the crop
(``tests/report/test_gradcam.py``).

A dense model (its card says so) runs once per batch of steps over the whole read box, its outputs
kept on the scoring grid; other models run every patch of the grid, batched. torch is imported
here (and in :mod:`slidescore.model`) only; the report imports this module lazily, when an
explanation is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from slidescore.core.tiling import PatchGrid
from slidescore.core.types import Box
from slidescore.model.inputs import prepare_pixels

METHOD = "integrated gradients"
STEPS = 16


@dataclass
class Explanation:
    """The explanation of one crop.

    ``heat`` is in [0, 1] over the crop's pixels at the scoring level (``None`` where not
    available, with the reason in ``note``); ``peak_px`` is its argmax (y, x) in the crop.
    ``score`` is ``S(x)``, ``baseline_score`` is ``S(b)`` and ``attribution_sum`` the sum of every
    attribution of the read box, which completeness makes ≈ ``score − baseline_score``.
    """

    heat: np.ndarray | None
    method: str = METHOD
    note: str = ""
    peak_px: tuple[int, int] | None = None
    score: float = float("nan")
    baseline_score: float = float("nan")
    attribution_sum: float = float("nan")
    n_patches: int = 0


def _dense_score(model: Any, x: torch.Tensor, class_index: int, keep: int) -> torch.Tensor:
    """Σ over the kept output positions (every ``keep``-th of the network stride) of the class probability, per input."""
    out = model.module(x)
    if out.ndim == 2:  # a network that pools to one score: one patch
        out = out[:, :, None, None]
    prob = model.probabilities(out[:, :, ::keep, ::keep])
    return prob[:, class_index].flatten(1).sum(1)


def _patch_score(model: Any, patches: torch.Tensor, class_index: int) -> torch.Tensor:
    """Class probability of each patch (a spatial output is averaged, as in scoring)."""
    out = model.module(patches)
    if out.ndim == 4:
        out = out.flatten(2).mean(-1)
    return model.probabilities(out)[:, class_index]


def _origins(n: int, p: int, stride: int) -> list[int]:
    """Patch origins along one axis: the grid from 0, plus the last patch that fits if the grid misses it."""
    return sorted({*range(0, n - p + 1, stride), n - p})


def _integrated_gradients(model: Any, x: torch.Tensor, b: torch.Tensor, class_index: int, *, stride_px: int,
                          steps: int, batch_size: int) -> tuple[torch.Tensor, float, float, int]:
    """Mean path gradient (C, H, W) of ``S`` from ``b`` to ``x`` (both (1, C, H, W)); S(x), S(b), patches."""
    card = model.card
    p = card.patch_px
    alphas = (torch.arange(steps, dtype=torch.float32, device=x.device) + 0.5) / steps
    grad = torch.zeros_like(x[0])
    h, w = x.shape[-2:]
    if card.dense:
        t = max(1, int(card.network_stride_px))
        keep = stride_px // t if stride_px % t == 0 else 1
        per = max(1, batch_size * p * p // (h * w))  # steps per pass: about batch_size patches' pixels
        n_patches = len(range(0, h - p + 1, t * keep)) * len(range(0, w - p + 1, t * keep))
        for i in range(0, steps, per):
            a = alphas[i : i + per].view(-1, 1, 1, 1)
            xs = (b + a * (x - b)).requires_grad_(True)
            (g,) = torch.autograd.grad(_dense_score(model, xs, class_index, keep).sum(), xs)
            grad += g.sum(0)
        with torch.no_grad():
            s_x, s_b = (float(_dense_score(model, v, class_index, keep)[0]) for v in (x, b))
        return grad / steps, s_x, s_b, n_patches
    origins = [(y, xo) for y in _origins(h, p, stride_px) for xo in _origins(w, p, stride_px)]
    s_x = s_b = 0.0
    for i in range(0, len(origins), max(1, batch_size // steps)):
        chunk = origins[i : i + max(1, batch_size // steps)]
        px = torch.stack([x[0, :, y : y + p, xo : xo + p] for y, xo in chunk])  # (n, C, p, p)
        pb = torch.stack([b[0, :, y : y + p, xo : xo + p] for y, xo in chunk])
        xs = (pb[None] + alphas.view(-1, 1, 1, 1, 1) * (px - pb)[None]).flatten(0, 1).requires_grad_(True)
        (g,) = torch.autograd.grad(_patch_score(model, xs, class_index).sum(), xs)
        g = g.view(steps, len(chunk), *g.shape[1:]).sum(0)
        for j, (y, xo) in enumerate(chunk):
            grad[:, y : y + p, xo : xo + p] += g[j]
        with torch.no_grad():
            s_x += float(_patch_score(model, px, class_index).sum())
            s_b += float(_patch_score(model, pb, class_index).sum())
    return grad / steps, s_x, s_b, len(origins)


def patch_read_box(crop: Box, level_hw: tuple[int, int], patch_px: int, stride_px: int) -> Box:
    """The level box holding every patch of the scoring grid (the centred grid of invariant 1) that
    covers a pixel of ``crop``; near the image edges it reaches past them as the grid's patches do
    (read it with ``read_padded``)."""
    grid = PatchGrid(max(level_hw[0], patch_px), max(level_hw[1], patch_px), patch_px, stride_px)
    cy, cx = crop.y // stride_px, crop.x // stride_px
    cells = Box(cy, cx, -(-crop.y1 // stride_px) - cy, -(-crop.x1 // stride_px) - cx)
    return grid.read_box(grid.patches_touching(cells))


def explain_crop(model: Any, pixels: np.ndarray, class_index: int = 0, *, inner: Box | None = None,
                 stride_px: int | None = None, steps: int = STEPS, batch_size: int = 64,
                 smooth_px: float | None = None) -> Explanation:
    """Integrated gradients of one crop read at the model's scoring level.

    ``model`` is a :class:`~slidescore.model.PatchClassifier`; ``pixels`` is (h, w, c) uint8: the
    crop with its halo, ideally the read box of the scoring grid's patches that touch the crop
    (origin on the grid; smaller than a patch: padded with the card's ``pad_value``). ``inner`` is
    the crop's box inside ``pixels`` (default: all of it): the map is returned, normalised and
    peaked over it. ``stride_px`` is the scoring stride (default: the network stride for a dense
    model, half a patch otherwise): the patches explained are those on that grid.
    """
    card = model.card
    if not getattr(model.module, "differentiable", True):  # e.g. an ONNX network, run by onnxruntime
        return Explanation(None, note=f"not computed: model {card.name!r} gives no gradients (not a torch network)")
    p = card.patch_px
    pix = prepare_pixels(pixels, card)
    h, w = pix.shape[:2]
    inner = inner or Box(0, 0, h, w)
    if h < p or w < p:
        padded = np.full((max(h, p), max(w, p), pix.shape[2]), card.pad_value, np.uint8)
        padded[:h, :w] = pix
        pix = padded
    if stride_px is None:
        stride_px = max(1, int(card.network_stride_px)) if card.dense else max(1, p // 2)
    x = model.normalise(torch.from_numpy(np.ascontiguousarray(pix.transpose(2, 0, 1)))[None])
    b = model.normalise(torch.from_numpy(np.full((1, *x.shape[1:]), card.pad_value, np.uint8)))
    with torch.enable_grad():  # the module is in eval mode (PatchClassifier); only the input gets gradients
        grad, s_x, s_b, n = _integrated_gradients(model, x, b, class_index, stride_px=stride_px, steps=steps,
                                                  batch_size=batch_size)
    attr = ((x - b)[0] * grad).sum(0).detach().cpu().numpy().astype(np.float64)
    sigma = max(1.0, p / 32) if smooth_px is None else smooth_px
    smooth = ndimage.gaussian_filter(attr, sigma) if sigma > 0 else attr
    crop = np.maximum(smooth[inner.y : inner.y1, inner.x : inner.x1], 0)
    top = float(crop.max()) if crop.size else 0.0
    res = Explanation(None, score=s_x, baseline_score=s_b, attribution_sum=float(attr.sum()), n_patches=n)
    if top <= 0:
        res.heat = np.zeros(crop.shape, np.float32)
        res.note = "nothing in the crop raised the score above what empty background scores"
        return res
    res.heat = (crop / top).astype(np.float32)
    peak = np.unravel_index(int(np.argmax(crop)), crop.shape)
    res.peak_px = (int(peak[0]), int(peak[1]))
    return res
