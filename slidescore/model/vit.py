"""Vision-transformer patch encoders in timm's layout, encoder + head classifiers, and the embedding runner.

:class:`VisionTransformer` has exactly the parameter names and shapes of timm's ``vit_*`` models
(``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed``, ``blocks.N.norm1 / attn.qkv /
attn.proj / ls1.gamma / norm2 / mlp.fc1 / mlp.fc2 / ls2.gamma``, ``norm`` or ``fc_norm``), so the
published weights of pathology foundation models (UNI, Virchow, Prov-GigaPath, H-optimus, all timm
ViTs) load from a local safetensors file with ``load_state_dict``: no timm, no hub, no pickled code.
The variants those models use are options: register tokens, no class token, position embeddings
without the prefix tokens (``no_embed_class``), layer scale (``init_values``), SwiGLU-packed MLPs
(``mlp: swiglu_packed``) and the pooled output (class token, mean of patch tokens, or both
concatenated, as Virchow recommends). Attention runs through ``scaled_dot_product_attention``
(flash / memory-efficient kernels on CUDA). When a patch holds another number of ViT patches than
the position embedding was trained for, the embedding is resampled as timm's
``resample_abs_pos_embed`` does (bicubic, antialiased).

:class:`EncoderClassifier` is an encoder with a linear or small-MLP head (state-dict keys
``encoder.*`` and ``head.*``); its card names it ``<preset>+linear`` or ``<preset>+mlp``
(:func:`build_encoder_classifier`, reached through
:func:`slidescore.model.architectures.build_architecture`). :class:`PatchEncoder` runs an encoder
over blocks of pixels (normalised once per block on the device, patches gathered from a strided
view in large batches, bf16/fp16 autocast on CUDA) and returns one vector per patch;
:func:`load_encoder` reads it from a safetensors file with a JSON config, or from an encoder + head
package.
"""

from __future__ import annotations

import hashlib
import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slidescore.errors import ConfigError, ModelLoadError, ModelOutputError
from slidescore.model.card import ModelCard

#: timm's presets (same names, same shapes); any key can be overridden in ``arch_kwargs``
VIT_PRESETS: dict[str, dict[str, Any]] = {
    "vit_tiny_patch16_224": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small_patch16_224": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base_patch16_224": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large_patch16_224": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "vit_huge_patch14_224": {"patch_size": 14, "embed_dim": 1280, "depth": 32, "num_heads": 16},
    "vit_giant_patch14_224": {"patch_size": 14, "embed_dim": 1408, "depth": 40, "num_heads": 16, "mlp_ratio": 48 / 11},
    "vit_small_patch14_dinov2": {"patch_size": 14, "img_size": 518, "embed_dim": 384, "depth": 12, "num_heads": 6,
                                 "init_values": 1e-5},
    "vit_base_patch14_dinov2": {"patch_size": 14, "img_size": 518, "embed_dim": 768, "depth": 12, "num_heads": 12,
                                "init_values": 1e-5},
    "vit_large_patch14_dinov2": {"patch_size": 14, "img_size": 518, "embed_dim": 1024, "depth": 24, "num_heads": 16,
                                 "init_values": 1e-5},
    "vit_giant_patch14_dinov2": {"patch_size": 14, "img_size": 518, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                 "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "mlp": "swiglu_packed"},
    "vit_giant_patch14_reg4_dinov2": {"patch_size": 14, "img_size": 518, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                                      "init_values": 1e-5, "mlp_ratio": 2.66667 * 2, "mlp": "swiglu_packed",
                                      "reg_tokens": 4, "no_embed_class": True},
}
POOLS = ("token", "avg", "token+avg")
HEADS = ("linear", "mlp")
MLPS = ("mlp", "swiglu_packed")
LN_EPS = 1e-6  # timm's ViTs: partial(nn.LayerNorm, eps=1e-6)


class Attention(nn.Module):
    """timm's ``Attention``: one qkv projection, scaled-dot-product attention, an output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """timm's ``Mlp`` (fc1 → GELU → fc2) or ``SwiGLUPacked`` (fc1 to 2h, SiLU(first half) · second half, fc2)."""

    def __init__(self, dim: int, hidden: int, kind: str) -> None:
        super().__init__()
        self.glu = kind == "swiglu_packed"
        if self.glu and hidden % 2:
            raise ValueError(f"swiglu_packed needs an even hidden width, got {hidden}")
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden // 2 if self.glu else hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        if self.glu:
            x1, x2 = x.chunk(2, dim=-1)
            return self.fc2(F.silu(x1) * x2)
        return self.fc2(F.gelu(x))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, init_values: float | None,
                 mlp: str) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls1: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=LN_EPS)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), mlp)
        self.ls2: nn.Module = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, patch_size: int, in_chans: int, dim: int, bias: bool) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)  # (N, D, gh, gw)


class VisionTransformer(nn.Module):
    """A ViT encoder with timm's parameter layout; ``forward`` returns the pooled (N, D') embedding.

    Parameters
    ----------
    img_size, patch_size
        The image edge the position embedding was trained for and the ViT patch edge (pixels).
    global_pool
        ``token`` (class token), ``avg`` (mean of the patch tokens) or ``token+avg`` (both,
        concatenated: 2·D values, Virchow's recommended embedding).
    fc_norm
        Final LayerNorm after pooling (``fc_norm``) instead of before (``norm``); timm's default:
        yes for ``avg``.
    """

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 init_values: float | None = None, class_token: bool = True, reg_tokens: int = 0,
                 no_embed_class: bool = False, global_pool: str = "token", fc_norm: bool | None = None,
                 mlp: str = "mlp", pre_norm: bool = False) -> None:
        super().__init__()
        if global_pool not in POOLS:
            raise ValueError(f"global_pool: expected one of {POOLS}, got {global_pool!r}")
        if mlp not in MLPS:
            raise ValueError(f"mlp: expected one of {MLPS}, got {mlp!r}")
        if global_pool != "avg" and not class_token:
            raise ValueError(f"global_pool {global_pool!r} needs the class token; use avg with class_token false")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        self.patch_size, self.embed_dim, self.global_pool = patch_size, embed_dim, global_pool
        self.no_embed_class = no_embed_class
        self.grid = img_size // patch_size
        self.num_prefix_tokens = int(class_token) + reg_tokens
        self.out_dim = 2 * embed_dim if global_pool == "token+avg" else embed_dim
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, bias=not pre_norm)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, reg_tokens, embed_dim)) if reg_tokens else None
        n_pos = self.grid**2 + (0 if no_embed_class else self.num_prefix_tokens)
        self.pos_embed = nn.Parameter(torch.randn(1, n_pos, embed_dim) * 0.02)
        self.norm_pre: nn.Module = nn.LayerNorm(embed_dim, eps=LN_EPS) if pre_norm else nn.Identity()
        self.blocks = nn.Sequential(*(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, init_values, mlp)
                                      for _ in range(depth)))
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm: nn.Module = nn.Identity() if use_fc_norm else nn.LayerNorm(embed_dim, eps=LN_EPS)
        self.fc_norm: nn.Module = nn.LayerNorm(embed_dim, eps=LN_EPS) if use_fc_norm else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        """A usable random start (truncated normal linears, small tokens); published weights replace it."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.cls_token, self.reg_token):
            if p is not None:
                nn.init.normal_(p, std=1e-6)

    def pos_embed_for(self, gh: int, gw: int) -> torch.Tensor:
        """The position embedding for a gh × gw grid of ViT patches (resampled when it differs from training)."""
        pos = self.pos_embed
        if (gh, gw) == (self.grid, self.grid):
            return pos
        n_prefix = 0 if self.no_embed_class else self.num_prefix_tokens
        prefix, grid = pos[:, :n_prefix], pos[:, n_prefix:]
        g = int(math.isqrt(grid.shape[1]))
        grid = grid.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False, antialias=True)
        grid = grid.permute(0, 2, 3, 1).reshape(1, gh * gw, -1).to(pos.dtype)
        return torch.cat([prefix, grid], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) normalised pixels → (N, prefix + patches, D) tokens after the final norm."""
        p = self.patch_size
        if x.shape[-1] % p or x.shape[-2] % p:
            raise ValueError(f"input of {tuple(x.shape[-2:])} px is not a multiple of the ViT patch size {p}")
        x = self.patch_embed(x)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        pos = self.pos_embed_for(gh, gw)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.reg_token) if t is not None]
        if self.no_embed_class:
            x = torch.cat([*prefix, x + pos], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos
        return self.norm(self.blocks(self.norm_pre(x)))

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return self.fc_norm(tokens[:, 0])
        mean = tokens[:, self.num_prefix_tokens :].mean(1)
        if self.global_pool == "avg":
            return self.fc_norm(mean)
        return self.fc_norm(torch.cat([tokens[:, 0], mean], dim=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward_features(x))


def build_vit(name: str, **overrides: Any) -> VisionTransformer:
    """A ViT from a timm preset name (``vit_small_patch16_224``) with any constructor argument overridden."""
    if name not in VIT_PRESETS:
        raise ModelLoadError(f"unknown ViT preset {name!r}; presets are {sorted(VIT_PRESETS)} (any of their keys can "
                             "be overridden in arch_kwargs)", architecture=name)
    kwargs = {"patch_size": 16, "img_size": 224, **VIT_PRESETS[name], **overrides}
    return VisionTransformer(**kwargs)


class EncoderClassifier(nn.Module):
    """An encoder and a head: (N, C, P, P) → (N, K) logits. State-dict keys ``encoder.*`` and ``head.*``."""

    def __init__(self, encoder: VisionTransformer, n_outputs: int, head: str = "linear", hidden: int = 256) -> None:
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        self.encoder = encoder
        d = encoder.out_dim
        self.head: nn.Module = nn.Linear(d, n_outputs) if head == "linear" else \
            nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, n_outputs))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


def build_encoder_classifier(name: str, *, n_outputs: int = 1, encoder: dict[str, Any] | None = None,
                             hidden: int = 256) -> EncoderClassifier:
    """``<preset>+linear`` or ``<preset>+mlp`` → an :class:`EncoderClassifier` (``encoder``: ViT overrides)."""
    preset, _, head = name.partition("+")
    if head not in HEADS:
        raise ModelLoadError(f"unknown architecture {name!r}; an encoder with a head is named <ViT preset>+linear or "
                             f"<ViT preset>+mlp", architecture=name)
    return EncoderClassifier(build_vit(preset, **(encoder or {})), n_outputs, head, hidden)


def load_state(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict`` that names what does not fit (missing, unexpected and mis-shaped keys)."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: file {tuple(state[k].shape)} ≠ model {tuple(own[k].shape)}" for k in sorted(set(own) & set(state))
              if tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{label} {vals[:5]}{' …' if len(vals) > 5 else ''}" for label, vals in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)) if vals]
        raise ModelLoadError(f"weights {source} do not fit the architecture: {'; '.join(parts)} — check the "
                             "architecture name and arch_kwargs (embed_dim, depth, reg_tokens, class_token, "
                             "no_embed_class, init_values, mlp)", path=source)
    module.load_state_dict(state)


# -- loading encoders ---------------------------------------------------------------------------
ENCODER_CONFIG_KEYS = ("name", "architecture", "arch_kwargs", "patch_px", "mpp", "mean", "std", "pad_value")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"encoder config {path}: cannot be read as JSON ({e})", path=str(path)) from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"encoder config {path}: expected a JSON object, got {type(data).__name__}", path=str(path))
    return data


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own SafetensorError for truncated or bad headers
        raise ModelLoadError(f"weights {path}: not a readable safetensors file ({type(e).__name__}: {e})",
                             path=str(path)) from None


def _digest(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()


def encoder_card(cfg: dict[str, Any], source: str) -> ModelCard:
    """The card the scorer's planning needs (patch size, µm/px, normalisation, padding) from an encoder config."""
    unknown = sorted(set(cfg) - set(ENCODER_CONFIG_KEYS))
    if unknown:
        raise ModelLoadError(f"encoder config {source}: unknown key {unknown[0]!r}; known keys are "
                             f"{list(ENCODER_CONFIG_KEYS)}", path=source, key=unknown[0])
    for key in ("architecture", "patch_px", "mpp"):
        if key not in cfg:
            raise ModelLoadError(f"encoder config {source}: required key {key!r} missing (required: architecture, "
                                 "patch_px, mpp)", path=source, key=key)
    doc: dict[str, Any] = {"name": cfg.get("name") or Path(source).stem, "classes": ["embedding"],
           **{k: cfg[k] for k in ("patch_px", "mpp", "pad_value", "mean", "std") if k in cfg}}
    return ModelCard.from_dict(doc, source=source)


def load_encoder(path: str, **runtime: Any) -> PatchEncoder:
    """An encoder from ``path``: a ``.safetensors`` file with ``<file>.json`` or ``encoder.json`` beside it, a
    folder holding ``encoder.json`` and ``weights.safetensors``, or an encoder + head package (``card.json``
    naming ``<preset>+linear|mlp``, ``weights.safetensors`` with ``encoder.*`` keys: its encoder is used)."""
    p = Path(path)
    if p.is_dir():
        weights = p / "weights.safetensors"
        if (p / "card.json").exists():
            return _encoder_of_package(p, weights, runtime)
        cfg_path = p / "encoder.json"
    else:
        weights = p
        cfg_path = next((c for c in (p.with_name(p.name + ".json"), p.with_suffix(".json"), p.with_name("encoder.json"))
                         if c.exists()), p.with_name("encoder.json"))
    if not weights.exists():
        raise ConfigError(f"--encoder {path}: no such file; expected a .safetensors file with its JSON config beside "
                          "it, a folder with encoder.json and weights.safetensors, or an encoder + head package")
    if not cfg_path.exists():
        raise ModelLoadError(f"encoder {weights}: no config found; put {weights.name}.json or encoder.json beside it "
                             f"with keys {list(ENCODER_CONFIG_KEYS)}", path=str(weights))
    cfg = _read_json(cfg_path)
    card = encoder_card(cfg, str(cfg_path))
    arch = str(cfg["architecture"])
    try:
        vit = build_vit(arch, **dict(cfg.get("arch_kwargs") or {}))
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"encoder config {cfg_path}: arch_kwargs {cfg.get('arch_kwargs')} refused by {arch!r} "
                             f"({e})", path=str(cfg_path), key="arch_kwargs") from None
    state = _read_safetensors(weights)
    dropped = [k for k in state if k.startswith("head.")]  # a published checkpoint's classification head
    load_state(vit, {k: v for k, v in state.items() if k not in dropped}, str(weights))
    checksum = _digest(weights.read_bytes(), json.dumps(cfg, sort_keys=True).encode())
    return PatchEncoder(vit, card, checksum=checksum, source=str(path), arch=(arch, dict(cfg.get("arch_kwargs") or {})),
                        **runtime)


def _encoder_of_package(folder: Path, weights: Path, runtime: dict[str, Any]) -> PatchEncoder:
    card = ModelCard.from_dict(_read_json(folder / "card.json"), source=str(folder / "card.json"))
    if not card.architecture or "+" not in card.architecture:
        raise ModelLoadError(f"model package {folder}: its card names architecture {card.architecture!r}; an encoder "
                             "package names <ViT preset>+linear or +mlp", path=str(folder))
    if not weights.exists():
        raise ModelLoadError(f"model package {folder}: no weights.safetensors inside", path=str(folder))
    try:
        model = build_encoder_classifier(card.architecture, **card.arch_kwargs)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"model package {folder}: arch_kwargs refused ({e})", path=str(folder)) from None
    load_state(model, _read_safetensors(weights), str(weights))
    checksum = _digest(json.dumps(card.arch_kwargs, sort_keys=True).encode(), *(
        t.contiguous().view(torch.uint8).numpy().tobytes() for _, t in sorted(model.encoder.state_dict().items())))
    preset = card.architecture.partition("+")[0]
    return PatchEncoder(model.encoder, card, checksum=checksum, source=str(folder),
                        arch=(preset, dict(card.arch_kwargs.get("encoder") or {})), **runtime)


# -- running encoders ---------------------------------------------------------------------------
AMP_DTYPES: dict[str, torch.dtype | None] = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class PatchEncoder:
    """An encoder (``(N, C, P, P)`` normalised pixels → ``(N, D)``) with the card that says how to feed it.

    ``amp`` (``bf16``/``fp16``) applies on CUDA only; embeddings are returned as float32 and checked finite.
    """

    def __init__(self, module: nn.Module, card: ModelCard, *, device: str = "auto", checksum: str = "",
                 source: str = "", amp: str = "off", channels_last: bool = True,
                 arch: tuple[str, dict[str, Any]] | None = None) -> None:
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp: expected one of {tuple(AMP_DTYPES)}, got {amp!r}")
        self.device = torch.device(device)
        self.module = module.eval().to(self.device)
        self.card, self.checksum, self.source = card, checksum, source
        self.arch = arch  # (ViT preset, its arch_kwargs): what a package built on this encoder names
        self.amp = amp if self.device.type == "cuda" else "off"
        self.channels_last = channels_last
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        mean = torch.tensor(card.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(card.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), -mean / std
        dim = getattr(module, "out_dim", None)
        self.dim = int(dim) if dim is not None else int(self._embed(torch.zeros(1, card.n_channels, card.patch_px,
                                                                                card.patch_px, device=self.device)).shape[1])

    def info(self) -> dict[str, Any]:
        return {"name": self.card.name, "source": self.source, "checksum": self.checksum, "dim": self.dim,
                "patch_px": self.card.patch_px, "mpp": self.card.mpp, "device": str(self.device), "amp": self.amp}

    @torch.inference_mode()
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, c, P, P) uint8 on the device → (B, D) float32, checked finite."""
        y = torch.empty(x.shape, dtype=torch.float32, device=self.device,
                        memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        y.copy_(x).mul_(self._scale).add_(self._shift)
        dtype = AMP_DTYPES[self.amp]
        ctx = torch.autocast(device_type=self.device.type, dtype=dtype) if dtype is not None else nullcontext()
        with ctx:
            out = self.module(y)
        out = out.float()
        if out.ndim != 2 or out.shape[0] != len(x):
            raise ModelOutputError(f"encoder {self.card.name!r} returned {tuple(out.shape)} for {len(x)} patches; "
                                   "expected (N, D)", model=self.card.name)
        if not bool(torch.isfinite(out).all()):
            bad = int((~torch.isfinite(out)).any(1).sum())
            raise ModelOutputError(f"encoder {self.card.name!r} returned NaN/inf embeddings for {bad} of {len(x)} "
                                   "patches; the weights or the card's mean/std are wrong"
                                   + (" (or float16 overflows: try amp bf16 or off)" if self.amp == "fp16" else ""),
                                   model=self.card.name)
        return out

    def embed_patches(self, patches: np.ndarray, batch_size: int = 256) -> np.ndarray:
        """(N, P, P, c) uint8 patches → (N, D) float32."""
        out = np.empty((len(patches), self.dim), np.float32)
        for i in range(0, len(patches), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(patches[i : i + batch_size])).to(self.device)
            out[i : i + len(batch)] = self._embed(batch.permute(0, 3, 1, 2)).cpu().numpy()
        return out

    @torch.inference_mode()
    def embed_block(self, pixels: np.ndarray, valid: np.ndarray, stride_px: int, batch_size: int = 256) -> np.ndarray:
        """A block's (h, w, c) pixels → (Py, Px, D) float32 embeddings of its ``valid`` patches (NaN elsewhere).

        The block crosses to the device once as uint8; each batch is one gather from a strided
        (unfold) view of it, so no patch is cut in Python and memory is the block plus one batch.
        """
        p = self.card.patch_px
        py, px = valid.shape
        out = np.full((py, px, self.dim), np.nan, np.float32)
        ys, xs = np.nonzero(valid)
        if not len(ys):
            return out
        block = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device)
        windows = block.unfold(0, p, stride_px).unfold(1, p, stride_px)  # (Py', Px', c, P, P), a view
        ys_t, xs_t = (torch.from_numpy(a.astype(np.int64)).to(self.device) for a in (ys, xs))
        for i in range(0, len(ys), batch_size):
            emb = self._embed(windows[ys_t[i : i + batch_size], xs_t[i : i + batch_size]])
            out[ys[i : i + batch_size], xs[i : i + batch_size]] = emb.cpu().numpy()
        return out
