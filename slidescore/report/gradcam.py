"""Grad-CAM and guided Grad-CAM for the patch classifier, on the report's region crops.

Grad-CAM (Selvaraju et al., 2017) weighs the activation maps ``A_k`` of a convolution layer by the
spatial mean of the gradient of the class logit, ``cam = ReLU(Σ_k α_k A_k)``, and upsamples it to
the input. Guided Grad-CAM multiplies it with guided backpropagation (gradients through ReLUs
clipped to positive), which applies where the network's non-linearities are ``nn.ReLU`` modules.

The target layer is the last ``Conv2d`` whose output on one patch is still at least 4 × 4 (the
last one before the map collapses to the patch's single score). A dense-capable model (see the
card) explains a whole crop in one pass, the class logit being the sum over every patch position
of the crop; other models explain the crop as overlapping patches (stride half a patch), batched,
and the maps are averaged where patches overlap. TorchScript modules take no hooks: no map then.

torch is imported here (and in :mod:`slidescore.model`) only; the report imports this module
lazily, when Grad-CAM is asked for.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidescore.model.inputs import prepare_pixels


@dataclass
class CamResult:
    """Maps in [0, 1] over the crop's pixels (``None`` where not available, with the reason)."""

    cam: np.ndarray | None
    guided: np.ndarray | None
    layer: str
    method: str
    note: str = ""


def find_target_layer(module: nn.Module, patch_px: int, n_channels: int, device: torch.device | str = "cpu") -> str:
    """Name of the last ``Conv2d`` whose output on one patch is at least 4 × 4 (else 2 × 2, else the last)."""
    shapes: dict[str, tuple[int, ...]] = {}
    convs = [(n, m) for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ValueError("the model has no Conv2d layer to explain")
    with ExitStack() as stack:
        for name, m in convs:
            h = m.register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, tuple(out.shape)))
            stack.callback(h.remove)
        with torch.no_grad():
            module(torch.zeros(1, n_channels, patch_px, patch_px, device=device))
    for min_side in (4, 2):
        ok = [n for n, _ in convs if n in shapes and min(shapes[n][-2:]) >= min_side]
        if ok:
            return ok[-1]
    return convs[-1][0]


def grad_cam(module: nn.Module, x: torch.Tensor, class_index: int, layer: str, *, guided: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Grad-CAM (and guided Grad-CAM) of ``x`` (N, C, H, W), already normalised for the model.

    The explained score is the class logit summed over the output's spatial positions. Returns
    unnormalised maps of shape (N, H, W); the guided map is ``None`` without ``nn.ReLU`` modules.
    """
    target = dict(module.named_modules())[layer]
    relus = [m for m in module.modules() if isinstance(m, nn.ReLU)]
    saved: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for r in relus:  # in-place ReLUs would overwrite the saved activations and break backward hooks
            stack.callback(setattr, r, "inplace", r.inplace)
            r.inplace = False
        h = target.register_forward_hook(lambda _m, _i, out: saved.__setitem__("a", out))
        stack.callback(h.remove)
        with torch.enable_grad():
            xg = x.detach().clone().requires_grad_(True)  # keeps a graph even for frozen parameters
            logits = module(xg)
            score = logits[:, class_index].reshape(len(x), -1).sum()
            (grads,) = torch.autograd.grad(score, saved["a"])
        a = saved["a"].detach()
        alpha = grads.mean(dim=(2, 3), keepdim=True)
        cam = F.relu((alpha * a).sum(dim=1, keepdim=True))
        cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
        guided_map = None
        if guided and relus:
            for r in relus:
                hr = r.register_full_backward_hook(_positive_grad)
                stack.callback(hr.remove)
            with torch.enable_grad():
                xi = x.detach().clone().requires_grad_(True)
                out = module(xi)
                (gx,) = torch.autograd.grad(out[:, class_index].reshape(len(x), -1).sum(), xi)
            guided_map = (gx.clamp(min=0).sum(dim=1) * cam).detach()
    return cam.cpu().numpy(), None if guided_map is None else guided_map.cpu().numpy()


def _positive_grad(_m: nn.Module, grad_in: Any, _grad_out: Any) -> tuple[torch.Tensor, ...]:
    """Guided backpropagation: only positive gradients pass back through a ReLU."""
    return tuple(g.clamp(min=0) for g in grad_in)


def _normalise(v: np.ndarray, q: float = 100.0) -> np.ndarray:
    top = float(np.percentile(v, q)) if v.size else 0.0
    if top <= 0 and v.size:  # sparse maps (e.g. guided gradients through max pooling): use the maximum
        top = float(v.max())
    return np.clip(v / top, 0, 1).astype(np.float32) if top > 0 else np.zeros_like(v, np.float32)


def explain_crop(model: Any, pixels: np.ndarray, class_index: int = 0, *, guided: bool = True, batch_size: int = 64) -> CamResult:
    """Grad-CAM of one crop read at the model's scoring level.

    ``model`` is a :class:`~slidescore.model.PatchClassifier`; ``pixels`` is (h, w, c) uint8 with h
    and w at least the model's ``patch_px`` (smaller crops are padded with the card's pad value).
    """
    module: nn.Module = model.module
    card = model.card
    method = "guided Grad-CAM" if guided else "Grad-CAM"
    if isinstance(module, torch.jit.ScriptModule):
        return CamResult(None, None, "", method, "not available: TorchScript modules take no hooks (ship a state dict to get maps)")
    p = card.patch_px
    pix = prepare_pixels(pixels, card)
    h, w = pix.shape[:2]
    if h < p or w < p:
        padded = np.full((max(h, p), max(w, p), pix.shape[2]), card.pad_value, np.uint8)
        padded[:h, :w] = pix
        pix = padded
    layer = find_target_layer(module, p, pix.shape[2], model.device)
    x_all = model.normalise(torch.from_numpy(np.ascontiguousarray(pix.transpose(2, 0, 1)))[None])
    if card.dense:
        cam, gmap = grad_cam(module, x_all, class_index, layer, guided=guided)
        cam_full, g_full = cam[0], None if gmap is None else gmap[0]
    else:
        step = max(1, p // 2)
        ys = sorted({*range(0, pix.shape[0] - p + 1, step), pix.shape[0] - p})
        xs = sorted({*range(0, pix.shape[1] - p + 1, step), pix.shape[1] - p})
        origins = [(y, x) for y in ys for x in xs]
        total = np.zeros(pix.shape[:2], np.float32)
        gtotal = np.zeros(pix.shape[:2], np.float32)
        count = np.zeros(pix.shape[:2], np.float32)
        has_guided = True
        for i in range(0, len(origins), batch_size):
            chunk = origins[i : i + batch_size]
            xb = torch.cat([x_all[:, :, y : y + p, x : x + p] for y, x in chunk])
            cam, gmap = grad_cam(module, xb, class_index, layer, guided=guided)
            has_guided = gmap is not None
            for j, (y, x) in enumerate(chunk):
                total[y : y + p, x : x + p] += cam[j]
                count[y : y + p, x : x + p] += 1
                if gmap is not None:
                    gtotal[y : y + p, x : x + p] += gmap[j]
        cam_full = total / np.maximum(count, 1)
        g_full = gtotal / np.maximum(count, 1) if has_guided else None
    cam_full = cam_full[:h, :w]
    note = "" if g_full is not None or not guided else "guided backpropagation needs nn.ReLU modules; plain Grad-CAM shown"
    return CamResult(
        _normalise(cam_full),
        None if g_full is None else _normalise(g_full[:h, :w], 99.5),
        layer,
        method if g_full is not None else "Grad-CAM",
        note,
    )
