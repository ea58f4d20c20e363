"""Loading a model package and scoring blocks of pixels with it.

A block arrives as the level pixels of its read box (patch grid origin at its top-left corner) and
the boolean grid of patches to score. Dense mode runs the network once over the block and
subsamples the logit map to the scoring stride (valid for cards that declare ``dense``); per-patch
mode normalises the block once on the device and gathers the valid patches from a strided
(unfold) view of it, one batch at a time (memory bounded by the block plus ``batch_size``
patches; background patches never reach the model). Both return (C, Py, Px)
probabilities, NaN where a patch was not scored. Every batch the network returns is checked (shape,
NaN/inf, probabilities within [0, 1]) with one reduction on the device; a bad batch, or an exception
in the network's forward, raises :class:`~slidescore.errors.ModelOutputError`, a failure of the
sample being scored, instead of a complete-looking map of garbage.

Dense mode is verified once per classifier: the first dense block is also scored patch by patch
on a sample of its patches; if the two differ by more than ``DENSE_CHECK_TOLERANCE`` the card's
``dense`` claim is wrong (zero padding, misaligned strides) and the classifier falls back to
per-patch scoring with one warning (mode ``auto``) or refuses to go on (mode ``dense``).
:meth:`PatchClassifier.scoring_info` reports what happened, for ``run.json``.

The network runs in NHWC memory (``channels_last``, default on): oneDNN's convolutions and
poolings are 1.4–1.8× faster on CPU that way for the built-in networks (docs/benchmarks.md), and
the HWC block pixels already lie in that order, so the input needs no transposing copy. CUDA
options (``amp``, ``compile``, pinned host memory with non-blocking copies) apply on CUDA devices
only; on CPU they are ignored with one log line.
"""

from __future__ import annotations

import logging
import warnings
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from slidescore.errors import ConfigError, ModelLoadError, ModelOutputError
from slidescore.model.card import ModelCard

log = logging.getLogger(__name__)

DENSE_CHECK_TOLERANCE = 1e-4
#: default edge (px) of one dense pass (``model.dense_tile_px``), measured in docs/benchmarks.md
DENSE_TILE_PX_CPU = 1024
DENSE_TILE_PX_CUDA = 4096
"""Largest max-abs difference in probability between dense and per-patch scoring we accept."""
DENSE_CHECK_PATCHES = 32
"""Patches of the first dense block that are also scored one by one for the check."""
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
OUTPUTS = ("logits", "probabilities")
PROBABILITY_TOLERANCE = 1e-6
"""How far outside [0, 1] a module's own probabilities may stray (rounding) before they are refused; they are clipped."""


class PatchClassifier:
    """A torch module with its model card, ready to score pixels.

    Parameters
    ----------
    module
        Maps an (N, C, H, W) float batch to (N, K) or (N, K, H', W') outputs.
    card
        Patch size, normalisation, head, and whether the network is dense-capable.
    device
        ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
    outputs
        ``logits`` (the card's head turns them into probabilities) or ``probabilities`` (used as
        they come; for plain modules handed to :func:`slidescore.score_array`).
    channels_last
        Run the network in NHWC memory format (``None``: yes, on every device; ``False``: NCHW).
    amp, compile
        CUDA only: autocast to ``bf16``/``fp16``, ``torch.compile``.
    """

    def __init__(self, module: torch.nn.Module, card: ModelCard, *, device: str = "auto", checksum: str = "",
                 source: str = "", outputs: str = "logits", amp: str = "off", channels_last: bool | None = None,
                 compile: bool = False, dense_tile_px: int | None = None) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if outputs not in OUTPUTS:
            raise ConfigError(f"outputs: expected one of {OUTPUTS}, got {outputs!r}")
        if amp not in AMP_DTYPES:
            raise ConfigError(f"model.amp: expected one of {tuple(AMP_DTYPES)}, got {amp!r}")
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.card = card
        self.checksum = checksum
        self.source = source
        self.outputs = outputs
        mean = torch.tensor(card.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(card.std, dtype=torch.float32).view(1, -1, 1, 1)
        self._scale = (1.0 / (255.0 * std)).to(self.device)
        self._shift = (-mean / std).to(self.device)
        # what the dense self-check found (None until a dense block was scored)
        self.dense_checked = False
        self.dense_used: bool | None = None
        self.dense_max_diff: float | None = None
        self._pinned: dict[tuple[tuple[int, ...], np.dtype], torch.Tensor] = {}
        # dense passes over tiles of about this edge (plus the patch halo): on CPU activations of
        # ~1k-px tiles stay in cache (2k-px blocks run ~1.4x slower per pixel); on CUDA it bounds memory
        self.dense_tile_px = dense_tile_px or (DENSE_TILE_PX_CUDA if self.device.type == "cuda" else DENSE_TILE_PX_CPU)
        self._configure(amp, channels_last, compile)

    def _configure(self, amp: str, channels_last: bool | None, compile: bool) -> None:
        cuda = self.device.type == "cuda"
        asked = {k: v for k, v in (("amp", amp if amp != "off" else None), ("compile", compile)) if v}
        if asked and not cuda:
            log.info("model %r on %s: CUDA options %s are ignored on this device (CUDA only)",
                     self.card.name, self.device, sorted(asked))
        self.amp = amp if cuda else "off"
        self.channels_last = channels_last is None or bool(channels_last)
        self.compiled = bool(compile and cuda)
        self.pin_memory = cuda
        # scoring runs a copy with each BatchNorm folded into its convolution (the same function, up
        # to float rounding, ~20 % faster for SmearNet on CPU) in NHWC memory; the module itself
        # stays as loaded (the caller's weights untouched) for the dense self-check and Grad-CAM
        fused = fold_batchnorm(self.module)
        self.batchnorm_folded = fused is not None
        forward: Any = fused if fused is not None else self.module
        if self.channels_last and fused is not None:  # our copy: its weights NHWC too (a caller's own module
            forward = fused.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # is left as it is)
        self._forward_module = torch.compile(forward) if self.compiled else forward

    def scoring_info(self) -> dict[str, Any]:
        """How this classifier scored so far (dense self-check, device options), for run.json."""
        return {
            "device": str(self.device),
            "card_dense": self.card.dense,
            "network_stride_px": self.card.network_stride_px,
            "dense_checked": self.dense_checked,
            "dense_used": self.dense_used,
            "dense_max_diff": self.dense_max_diff,
            "dense_check_tolerance": DENSE_CHECK_TOLERANCE,
            "amp": self.amp,
            "batchnorm_folded": self.batchnorm_folded,
            "channels_last": self.channels_last,
            "compile": self.compiled,
            "pinned_memory": self.pin_memory,
        }

    # -- preprocessing / heads ------------------------------------------------------------
    def _to_device(self, arr: np.ndarray) -> torch.Tensor:
        """A host array → a tensor on the device (through a reused pinned buffer on CUDA)."""
        if not self.pin_memory:
            return torch.from_numpy(np.ascontiguousarray(arr)).to(self.device)
        key = (arr.shape, arr.dtype)
        buf = self._pinned.get(key)
        if buf is None:
            if len(self._pinned) >= 8:  # edge blocks and last batches have other shapes
                self._pinned.clear()
            buf = torch.empty(arr.shape, dtype=torch.from_numpy(arr[:0]).dtype).pin_memory()
            self._pinned[key] = buf
        # every forward ends in a device→host copy of its result, which waits for this copy,
        # so the buffer is free again when the next batch is staged in it
        buf.numpy()[...] = arr
        return buf.to(self.device, non_blocking=True)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) uint8 (0–255) or float (0–1) on any device → normalised float32 on ours."""
        x = x.to(self.device, non_blocking=True)
        scale = self._scale if x.dtype == torch.uint8 else self._scale * 255.0
        # one float copy, normalised in place (not three copies), in the memory order the network
        # runs in: an HWC view is NHWC already, so with channels_last the copy is a plain cast
        fmt = torch.channels_last if self.channels_last and x.ndim == 4 else torch.contiguous_format
        y = torch.empty(x.shape, dtype=torch.float32, device=self.device, memory_format=fmt)
        return y.copy_(x).mul_(scale).add_(self._shift)

    def _block_input(self, pixels: np.ndarray) -> torch.Tensor:
        """(h, w, c) block pixels → the normalised (1, c, h, w) network input on our device."""
        if self.pin_memory and self.channels_last:  # CUDA: HWC staged as it is in the pinned buffer, NHWC on the device
            return self.normalise(self._to_device(pixels[None]).permute(0, 3, 1, 2))
        if self.pin_memory or not pixels.flags.writeable:  # pinned NCHW staging, or a read-only array torch won't wrap
            return self.normalise(self._to_device(pixels.transpose(2, 0, 1)[None]))
        return self.normalise(torch.from_numpy(pixels).permute(2, 0, 1)[None])  # no transposed uint8 copy

    def _forward(self, x: torch.Tensor, *, amp: bool = True, dense: bool = False) -> torch.Tensor:
        """The network's checked float32 outputs for a normalised (N, c, H, W) input.

        Every batch passes here, so here is where a broken model is caught: an exception in its
        forward, outputs of the wrong shape, NaN/inf, or probabilities outside [0, 1] raise
        :class:`~slidescore.errors.ModelOutputError` (a failure of the sample being scored).
        """
        dtype = AMP_DTYPES[self.amp] if amp else None
        ctx = torch.autocast(device_type=self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        if self.channels_last and amp:
            x = x.contiguous(memory_format=torch.channels_last)
        try:
            with ctx:
                out = self._forward_module(x) if amp else self.module(x.contiguous())
        except torch.OutOfMemoryError:
            raise  # a resource limit (batch_size, dense_tile_px), not a broken model: the caller decides
        except Exception as e:  # a user's network may raise anything; report it as this model's failure
            kind, text = _error_line(e)
            raise ModelOutputError(
                f"model {self.card.name!r} raised {kind} while scoring {self._what(len(x), dense)}: {text}",
                model=self.card.name, error=kind,
            ) from e
        return self._check_output(out, len(x), dense=dense)

    def _what(self, n: int, dense: bool) -> str:
        return "a block in one dense pass" if dense else f"a batch of {n} patches"

    def _check_output(self, out: Any, n: int, *, dense: bool) -> torch.Tensor:
        """Shape, finiteness and (for ``outputs='probabilities'``) range of one batch of outputs.

        Costs one small reduction on the device and one scalar copy per batch; the counts for the
        message are computed only when the check fails.
        """
        name, k = self.card.name, self.card.n_classes
        expected = f"(1, {k}, h, w)" if dense else f"({n}, {k}) or ({n}, {k}, h, w)"
        if not isinstance(out, torch.Tensor):
            raise ModelOutputError(
                f"model {name!r} returned a {type(out).__name__} for {self._what(n, dense)}; expected a tensor of shape "
                f"{expected} (one score per class of its card)", model=name)
        shape = tuple(out.shape)
        if out.ndim not in ((4,) if dense else (2, 4)) or shape[0] != n or shape[1] != k:
            raise ModelOutputError(
                f"model {name!r} returned outputs of shape {shape} for {self._what(n, dense)}; expected {expected}: "
                f"one score per class of its card, which lists {k} ({list(self.card.classes)}) — the card's classes "
                "or the network's output layer are wrong", model=name, shape=list(shape))
        out = out.float()
        if out.numel() == 0:
            return out
        finite = torch.isfinite(out).all()
        if self.outputs == "probabilities":
            lo, hi = torch.aminmax(out)
            ok, low, high = torch.stack((finite.float(), lo, hi)).tolist()  # one device→host copy
        else:
            ok, low, high = float(finite.item()), 0.0, 1.0
        if not ok:
            raise self._nonfinite_error(out, dense)
        if low < -PROBABILITY_TOLERANCE or high > 1 + PROBABILITY_TOLERANCE:
            raise ModelOutputError(
                f"model {name!r} returned values in [{low:.6g}, {high:.6g}] for {self._what(n, dense)}; expected "
                "probabilities in [0, 1] (outputs='probabilities') — if the network returns logits, load it with "
                "outputs='logits' so the card's head turns them into probabilities", model=name, low=low, high=high)
        return out

    def _nonfinite_error(self, out: torch.Tensor, dense: bool) -> ModelOutputError:
        """The error for outputs holding NaN/inf, with how many patches (or dense map positions) are hit."""
        if dense:  # (1, K, h, w): count map positions
            nan, inf = (f(out).any(1).flatten() for f in (torch.isnan, torch.isinf))
            unit = f"positions of its dense output map ({out.shape[2]}×{out.shape[3]}) for a block"
        else:  # (N, K) or (N, K, h, w): count patches
            nan, inf = (f(out).flatten(1).any(1) for f in (torch.isnan, torch.isinf))
            unit = "patches in a batch"
        n_nan, n_inf = int(nan.sum()), int(inf.sum())
        found = " and ".join(f"{label} for {c}" for label, c in (("NaN", n_nan), ("±inf", n_inf)) if c)
        hint = "; the model is broken or its input normalisation (card mean/std) is wrong"
        if self.amp == "fp16":
            hint += ", or the network overflows in float16 (try model.amp bf16 or off)"
        return ModelOutputError(f"model {self.card.name!r} returned {found} of {len(nan)} {unit}{hint}",
                                model=self.card.name, nan=n_nan, inf=n_inf, total=len(nan))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Apply the card's head to (N, C, ...) logits (a module's own probabilities: clipped to [0, 1])."""
        if self.outputs == "probabilities":
            return logits.clamp(0.0, 1.0)
        if self.card.head == "softmax":
            return torch.softmax(logits, dim=1)
        return torch.sigmoid(logits)

    # -- scoring --------------------------------------------------------------------------
    def score_dense(self, pixels: np.ndarray, stride_px: int, *, amp: bool = True,
                    valid: np.ndarray | None = None, first: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Every patch of a block: (h, w, c) pixels → (C, Py, Px) float32.

        One pass per tile of about :attr:`dense_tile_px` pixels (each with its own patch halo): a
        valid-padding network whose stride divides ``stride_px`` gives every tile's patches as one
        pass over the whole block would, up to float rounding. With ``valid`` (the block's (Py, Px)
        patches to score), tiles holding none are skipped (NaN there) and ``pixels`` need only hold
        the tiles that run, from the block's patch ``first`` on (:meth:`patches_needed`). The tiles
        stay where they are, anchored at the block's first patch: a pass's rounding depends on its
        input's shape and on where in it a patch lies, so only the same tile gives the same bits.
        """
        card = self.card
        p = card.patch_px
        if valid is None:
            py = (pixels.shape[0] - p) // stride_px + 1
            px = (pixels.shape[1] - p) // stride_px + 1
        else:
            py, px = valid.shape
        n = self._dense_tile_patches(stride_px)
        if valid is None and py <= n and px <= n:
            return self._score_dense_pass(pixels, stride_px, amp=amp)
        out = np.full((card.n_classes, py, px), np.nan, np.float32)
        for a, b in dense_tiles((py, px), n, valid):
            na, nb = min(n, py - a), min(n, px - b)
            tile = _patch_pixels(pixels, (a - first[0], b - first[1], na, nb), stride_px, p)
            out[:, a : a + na, b : b + nb] = self._score_dense_pass(tile, stride_px, amp=amp)
        return out

    def _dense_tile_patches(self, stride_px: int) -> int:
        """Patches per edge of one dense tile: dense_tile_px of cells plus the k − 1 patches the centred grid
        adds around them (a block of c cells has c + k − 1 patches), so a block or image of dense_tile_px is
        one pass, not one pass and slivers of k − 1 patches (4× the passes, 3× slower)."""
        return max(1, self.dense_tile_px // stride_px + max(0, self.card.patch_px // stride_px - 1))

    def patches_needed(self, valid: np.ndarray, stride_px: int, mode: str = "auto") -> tuple[int, int, int, int]:
        """The block patches ``(a0, b0, a1, b1)`` (ends exclusive) whose pixels :meth:`score_block` reads to
        score ``valid``: the dense tiles holding a valid patch where scoring may run densely, else the valid
        patches' bounding box (which those tiles contain). A block's pixels may be read for this range only.

        It depends on the card, ``stride_px`` and ``mode`` alone, not on the one-time dense check, so boxes
        chosen before the check (read ahead) still hold what the scoring after it needs.
        """
        ys, xs = np.nonzero(valid)
        if not len(ys):
            raise ValueError("patches_needed: no valid patch")
        if mode != "per_patch" and self.card.dense and stride_px % self.card.network_stride_px == 0:
            py, px = valid.shape
            n = self._dense_tile_patches(stride_px)
            tiles = np.array(dense_tiles((py, px), n, valid))
            return (int(tiles[:, 0].min()), int(tiles[:, 1].min()),
                    min(py, int(tiles[:, 0].max()) + n), min(px, int(tiles[:, 1].max()) + n))
        return int(ys.min()), int(xs.min()), int(ys.max()) + 1, int(xs.max()) + 1

    @torch.inference_mode()
    def _score_dense_pass(self, pixels: np.ndarray, stride_px: int, *, amp: bool = True) -> np.ndarray:
        card = self.card
        t = card.network_stride_px
        if stride_px % t:
            raise ConfigError(f"tiling.stride_px={stride_px} is not a multiple of the network stride {t}; use per_patch mode")
        probs = self.probabilities(self._forward(self._block_input(pixels), amp=amp, dense=True))[0]
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
        return out.cpu().numpy()

    @torch.inference_mode()
    def _score_batch(self, batch: np.ndarray, *, amp: bool = True) -> np.ndarray:
        """(B, c, P, P) patches → (B, C) float32 probabilities."""
        logits = self._forward(self.normalise(self._to_device(batch)), amp=amp)
        if logits.ndim == 4:
            logits = logits.flatten(2).mean(-1) if logits.shape[-1] * logits.shape[-2] > 1 else logits[:, :, 0, 0]
        return self.probabilities(logits).cpu().numpy()

    def score_patches(self, patches: np.ndarray, batch_size: int) -> np.ndarray:
        """(N, c, P, P) patches → (N, C) float32 probabilities, in batches."""
        out = np.empty((len(patches), self.card.n_classes), np.float32)
        for i in range(0, len(patches), batch_size):
            out[i : i + batch_size] = self._score_batch(patches[i : i + batch_size])
        return out

    @torch.inference_mode()
    def _score_grid(self, pixels: np.ndarray, ys: np.ndarray, xs: np.ndarray, stride_px: int, batch_size: int,
                    *, amp: bool = True) -> np.ndarray:
        """Patches ``(ys, xs)`` of a block's patch grid → (N, C) probabilities, one batch at a time.

        The block goes to the device and is normalised once (not once per overlapping patch);
        each batch is then one vectorised gather from a strided (unfold) view of it, so memory
        stays at the block plus one batch, and only the listed patches reach the model.
        """
        p = self.card.patch_px
        block = self._block_input(pixels)[0]
        if self.channels_last:  # (H, W, c) memory → (Py', Px', P, P, c) view: a gathered batch is NHWC already
            windows = block.permute(1, 2, 0).unfold(0, p, stride_px).unfold(1, p, stride_px).permute(0, 1, 3, 4, 2)
        else:  # (c, H, W) → (Py', Px', c, P, P) view; indexing it copies just the patches asked for
            windows = block.unfold(1, p, stride_px).unfold(2, p, stride_px).permute(1, 2, 0, 3, 4)
        ys_t = torch.from_numpy(np.ascontiguousarray(ys, np.int64)).to(self.device)
        xs_t = torch.from_numpy(np.ascontiguousarray(xs, np.int64)).to(self.device)
        out = np.empty((len(ys), self.card.n_classes), np.float32)
        for i in range(0, len(ys), batch_size):
            batch = windows[ys_t[i : i + batch_size], xs_t[i : i + batch_size]]
            if self.channels_last:
                batch = batch.permute(0, 3, 1, 2)  # (B, c, P, P) in NHWC memory: no copy
            logits = self._forward(batch, amp=amp)
            if logits.ndim == 4:
                logits = logits.flatten(2).mean(-1) if logits.shape[-1] * logits.shape[-2] > 1 else logits[:, :, 0, 0]
            out[i : i + batch_size] = self.probabilities(logits).cpu().numpy()
        return out

    def _dense_wanted(self, mode: str, stride_px: int) -> bool:
        capable = self.card.dense and stride_px % self.card.network_stride_px == 0
        if mode == "per_patch":
            return False
        if mode == "dense":
            if not capable:
                raise ConfigError(
                    f"model.mode: dense needs a dense-capable model whose network stride ({self.card.network_stride_px}) "
                    f"divides tiling.stride_px={stride_px}; model {self.card.name!r} is "
                    f"{'dense' if self.card.dense else 'not dense'} — use auto"
                )
            return not self.dense_checked or bool(self.dense_used)
        if mode != "auto":
            raise ConfigError(f"model.mode: expected one of ('auto', 'dense', 'per_patch'), got {mode!r}")
        return capable and (not self.dense_checked or bool(self.dense_used))

    def _check_dense(self, pixels: np.ndarray, dense: np.ndarray | None, valid: np.ndarray,
                     stride_px: int, mode: str, batch_size: int, first: tuple[int, int] = (0, 0)) -> bool:
        """Compare dense scores with per-patch scores on a sample of this block's valid patches
        (``pixels`` hold the block's patches from ``first`` on, as in :meth:`score_block`)."""
        ys, xs = np.nonzero(valid)
        pick = np.unique(np.linspace(0, len(ys) - 1, min(len(ys), DENSE_CHECK_PATCHES)).round().astype(int))
        ys, xs = ys[pick], xs[pick]
        if dense is not None and self.amp != "off":  # the check is about the network, not precision
            dense = self.score_dense(pixels, stride_px, amp=False, valid=valid, first=first)
        # per patch first: a model that is broken per patch too (NaN, an error) fails here with its own
        # error, and the card's dense claim is not blamed for it
        single = self._score_grid(pixels, ys - first[0], xs - first[1], stride_px, batch_size, amp=False)
        if dense is None:
            diff = float("inf")
        else:
            diff = float(np.max(np.abs(dense[:, ys, xs].T - single)))
            if not np.isfinite(diff):
                diff = float("inf")
        self.dense_checked = True
        self.dense_max_diff = diff
        self.dense_used = diff <= DENSE_CHECK_TOLERANCE
        if self.dense_used:
            log.info("model %r: dense scoring checked against per-patch scoring on %d patches (max diff %.2g)",
                     self.card.name, len(ys), diff)
            return True
        msg = (f"model {self.card.name!r}: its card declares dense: true, but dense and per-patch scores differ "
               f"by up to {diff:.3g} (> {DENSE_CHECK_TOLERANCE:g}) on {len(ys)} patches; the network is not "
               "fully convolutional without zero padding at this stride")
        if mode == "dense":
            raise ConfigError(f"{msg} — use model.mode auto or per_patch, or set dense: false in the card")
        log.warning("%s — scoring per patch from now on (set dense: false in the card)", msg)
        return False

    def score_block(self, pixels: np.ndarray, valid: np.ndarray, stride_px: int, *, mode: str = "auto", batch_size: int = 256,
                    first: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Scores of the patches of a block; NaN where ``valid`` is False.

        ``valid`` is the block's (Py, Px) grid of patches to score; ``pixels`` hold its patches from patch
        ``first`` on (that patch at their top-left corner): the whole read box with ``first`` (0, 0), or
        only the patches :meth:`patches_needed` names (what the block stage reads). The scores are the same.
        """
        py, px = valid.shape
        out = np.full((self.card.n_classes, py, px), np.nan, np.float32)
        if not valid.any():
            return out
        if self._dense_wanted(mode, stride_px):
            checking = not self.dense_checked
            try:
                scores: np.ndarray | None = self.score_dense(pixels, stride_px, valid=valid, first=first)
            except (ModelLoadError, ModelOutputError) as e:
                if not checking or mode == "dense":
                    raise
                # a network that fails on a whole block (wrong-shaped map, an error on the larger input,
                # NaN) fails the check like wrong values do; per-patch scoring then shows whether the
                # model itself is broken
                log.info("model %r: the dense pass failed the dense check: %s", self.card.name, e)
                scores = None
            if not checking or self._check_dense(pixels, scores, valid, stride_px, mode, batch_size, first):
                assert scores is not None
                out[:, valid] = scores[:, valid]
                return out
        ys, xs = np.nonzero(valid)
        # only the pixels of the valid patches' bounding box go to the device: normalising is elementwise
        # and every batch holds the same patches in the same order, so the scores are those of the whole block
        a0, b0 = int(ys.min()), int(xs.min())
        box = _patch_pixels(pixels, (a0 - first[0], b0 - first[1], int(ys.max()) + 1 - a0, int(xs.max()) + 1 - b0),
                            stride_px, self.card.patch_px)
        out[:, ys, xs] = self._score_grid(box, ys - a0, xs - b0, stride_px, batch_size).T
        return out


def dense_tiles(shape: tuple[int, int], n: int, valid: np.ndarray | None = None) -> list[tuple[int, int]]:
    """First patch (a, b) of every dense tile of ``n``² patches of a block of ``shape`` patches, anchored at
    its first patch, row-major; with ``valid``, only the tiles holding at least one valid patch."""
    py, px = shape
    if valid is None:
        return [(a, b) for a in range(0, py, n) for b in range(0, px, n)]
    ty, tx = -(-py // n), -(-px // n)
    pad = np.zeros((ty * n, tx * n), bool)
    pad[:py, :px] = valid
    hit = pad.reshape(ty, n, tx, n).any(axis=(1, 3))
    return [(int(i) * n, int(j) * n) for i, j in zip(*np.nonzero(hit), strict=True)]


def _patch_pixels(pixels: np.ndarray, patches: tuple[int, int, int, int], stride_px: int, patch_px: int) -> np.ndarray:
    """The pixels of ``patches`` (a, b, rows, cols; ``pixels`` start at patch (0, 0)): a view, exactly their extent."""
    a, b, na, nb = patches
    y1, x1 = (a + na - 1) * stride_px + patch_px, (b + nb - 1) * stride_px + patch_px
    if a < 0 or b < 0 or y1 > pixels.shape[0] or x1 > pixels.shape[1]:
        raise ValueError(f"the block's pixels {pixels.shape[:2]} do not hold patches {patches} (rows, cols from the "
                         f"first patch they hold); read PatchClassifier.patches_needed's box")
    return pixels[a * stride_px : y1, b * stride_px : x1]


def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module | None:
    """An inference copy of ``module`` with every Conv → BatchNorm pair folded into one convolution
    (torch.fx), or ``None`` when it has no BatchNorm or cannot be traced (TorchScript, dynamic code)."""
    if isinstance(module, torch.jit.ScriptModule) or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                                            for m in module.modules()):
        return None
    try:
        with warnings.catch_warnings():  # importing fx's optimisation helpers touches deprecated torch.jit APIs
            warnings.simplefilter("ignore", DeprecationWarning)
            from torch.fx.experimental.optimization import fuse

            return fuse(module.eval())  # a copy: the loaded module is untouched
    except Exception as e:  # symbolic tracing fails on data-dependent control flow: score as loaded
        log.debug("BatchNorm folding skipped for %s: %s: %s", type(module).__name__, type(e).__name__, e)
        return None


def _error_line(err: BaseException) -> tuple[str, str]:
    """The error's type and one line of text. TorchScript wraps a module's error in ``torch.jit.Error``
    with the interpreter's traceback; its last line (``builtins.RuntimeError: boom``) is the error."""
    text = str(err).strip()
    kind = type(err).__name__
    if isinstance(err, torch.jit.Error) and text:
        last = text.splitlines()[-1].strip()
        name, sep, rest = last.partition(": ")
        if sep and name.replace(".", "").replace("_", "").isalnum():
            kind, text = name.rsplit(".", 1)[-1], rest.strip()
        else:
            text = last
    text = " ".join(text.split())
    return kind, text[:300] + ("…" if len(text) > 300 else "")
