"""The ViT encoder in timm's layout: parameter names and shapes, outputs against timm, loading, heads.

The reference outputs below were computed once with timm 1.0.31 (``timm.create_model(
"vit_tiny_patch16_224", num_classes=0, img_size=32, depth=2, …)``) on weights drawn from
``numpy.random.default_rng(0)`` per state-dict key in sorted order and inputs from
``default_rng(1)``; timm is not installed here, so the test rebuilds the same weights and compares.
A second reference is an unfused re-implementation in this file (softmax attention written out).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from slidescore.errors import ModelLoadError
from slidescore.model.architectures import build_architecture
from slidescore.model.vit import EncoderClassifier, build_vit, load_encoder

# name → (arch overrides, input px, first 6 outputs of sample 0, sum, abs sum) from timm 1.0.31
TIMM_REFERENCE = {
    "plain": ({"img_size": 32, "depth": 2}, 32,
              [0.041358, 0.124394, -0.110577, 0.114202, 0.241586, 0.130268], 3.07517, 41.24101),
    # register tokens, position embedding without prefix tokens, layer scale, SwiGLU-packed MLP (H-optimus,
    # UNI2), and a 48-px input on a 32-px position embedding (resampled as timm's dynamic_img_size does)
    "reg_swiglu_ls_resampled": ({"img_size": 32, "depth": 2, "reg_tokens": 4, "no_embed_class": True,
                                 "init_values": 1e-5, "mlp": "swiglu_packed", "mlp_ratio": 2.66667 * 2}, 48,
                                [-0.086185, 0.062992, 0.081451, 0.099603, -0.046392, -0.023018], 4.21527, 42.27588),
    "avg_noclass": ({"img_size": 32, "depth": 2, "class_token": False, "global_pool": "avg", "no_embed_class": True},
                    32, [-0.101234, -0.055794, -0.010975, 0.058996, -0.020067, 0.028168], 11.44875, 43.46613),
}


def _rng_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {k: torch.from_numpy((rng.standard_normal(tuple(v.shape)) * 0.1).astype(np.float32))
            for k, v in sorted(model.state_dict().items())}


@pytest.mark.parametrize("case", sorted(TIMM_REFERENCE))
def test_outputs_match_timm(case: str) -> None:
    kw, size, first, total, abs_total = TIMM_REFERENCE[case]
    vit = build_vit("vit_tiny_patch16_224", **kw).eval()
    vit.load_state_dict(_rng_state(vit, 0))
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, size, size)).astype(np.float32))
    with torch.no_grad():
        y = vit(x).double().numpy()
    np.testing.assert_allclose(y[0, :6], first, atol=2e-6)
    assert y.sum() == pytest.approx(total, abs=1e-3)
    assert np.abs(y).sum() == pytest.approx(abs_total, abs=1e-3)


def _unfused_reference(vit: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The ViT forward written out from the state dict alone (class token, standard MLP, final norm)."""
    sd = {k: v.double() for k, v in vit.state_dict().items()}
    ln = lambda t, p: torch.nn.functional.layer_norm(t, t.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    lin = lambda t, p: t @ sd[p + ".weight"].T + sd[p + ".bias"]  # noqa: E731
    w = sd["patch_embed.proj.weight"]
    p = w.shape[-1]
    n, _, h, wd = x.shape
    cols = x.double().unfold(2, p, p).unfold(3, p, p)  # (n, c, gh, gw, p, p)
    tokens = torch.einsum("ncyxij,dcij->nyxd", cols, w).reshape(n, -1, w.shape[0]) + sd["patch_embed.proj.bias"]
    t = torch.cat([sd["cls_token"].expand(n, -1, -1), tokens], 1) + sd["pos_embed"]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    heads = vit.blocks[0].attn.num_heads
    for i in range(depth):
        b = f"blocks.{i}"
        q, k, v = lin(ln(t, b + ".norm1"), b + ".attn.qkv").chunk(3, -1)
        split = lambda z: z.reshape(n, z.shape[1], heads, -1).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        t = t + lin(att.transpose(1, 2).reshape(n, t.shape[1], -1), b + ".attn.proj")
        hid = torch.nn.functional.gelu(lin(ln(t, b + ".norm2"), b + ".mlp.fc1"))
        t = t + lin(hid, b + ".mlp.fc2")
    return ln(t, "norm")[:, 0]


def test_outputs_match_an_unfused_reimplementation() -> None:
    torch.manual_seed(3)
    vit = build_vit("vit_tiny_patch16_224", img_size=48, depth=3).eval()
    x = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        got = vit(x).double()
    assert torch.allclose(got, _unfused_reference(vit, x), atol=1e-5)


def test_state_dict_layout_is_timms() -> None:
    """ViT-B/16 (Phikon's and many encoders' shape): every key and shape as timm's vit_base_patch16_224."""
    with torch.device("meta"):
        sd = build_vit("vit_base_patch16_224").state_dict()
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embed.proj.weight"] == (768, 3, 16, 16)
    assert shapes["cls_token"] == (1, 1, 768) and shapes["pos_embed"] == (1, 197, 768)
    assert shapes["blocks.11.attn.qkv.weight"] == (2304, 768) and shapes["blocks.11.mlp.fc1.weight"] == (3072, 768)
    assert shapes["norm.weight"] == (768,)
    per_block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                 "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expected = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias", "norm.weight", "norm.bias",
                *(f"blocks.{i}.{k}" for i in range(12) for k in per_block)}
    assert set(sd) == expected
    with torch.device("meta"):  # UNI-style layer scale, register tokens without position embedding
        sd = build_vit("vit_large_patch16_224", init_values=1e-5, reg_tokens=8, no_embed_class=True).state_dict()
    assert tuple(sd["blocks.0.ls1.gamma"].shape) == (1024,) and tuple(sd["reg_token"].shape) == (1, 8, 1024)
    assert tuple(sd["pos_embed"].shape) == (1, 196, 1024)


def _write_encoder(tmp_path, **cfg_extra):
    torch.manual_seed(0)
    vit = build_vit("vit_tiny_patch16_224", img_size=32, depth=2).eval()
    state = dict(vit.state_dict())
    state["head.weight"] = torch.zeros(1000, 192)  # a published checkpoint's classifier: dropped on load
    path = tmp_path / "enc.safetensors"
    save_file(state, str(path))
    cfg = {"architecture": "vit_tiny_patch16_224", "arch_kwargs": {"img_size": 32, "depth": 2}, "patch_px": 32,
           "mpp": 0.5, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], **cfg_extra}
    (tmp_path / "enc.safetensors.json").write_text(json.dumps(cfg))
    return vit, path


def test_load_encoder_from_safetensors(tmp_path) -> None:
    vit, path = _write_encoder(tmp_path)
    enc = load_encoder(str(path), device="cpu")
    assert enc.dim == 192 and enc.card.patch_px == 32 and len(enc.checksum) == 64
    patches = np.random.default_rng(2).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    x = torch.from_numpy(((patches / 255.0 - mean) / std).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        expected = vit(x).numpy()
    np.testing.assert_allclose(enc.embed_patches(patches, batch_size=2), expected, atol=1e-5)


def test_weights_that_do_not_fit_name_the_keys(tmp_path) -> None:
    _, path = _write_encoder(tmp_path, arch_kwargs={"img_size": 32, "depth": 3})
    with pytest.raises(ModelLoadError, match=r"missing keys \['blocks\.2\."):
        load_encoder(str(path), device="cpu")
    (tmp_path / "bad.safetensors").write_bytes(b"not safetensors")
    (tmp_path / "bad.safetensors.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "patch_px": 32,
                                                               "mpp": 0.5}))
    with pytest.raises(ModelLoadError, match="not a readable safetensors file"):
        load_encoder(str(tmp_path / "bad.safetensors"), device="cpu")


def test_encoder_with_head_is_a_built_in_architecture() -> None:
    m = build_architecture("vit_tiny_patch16_224+mlp", n_outputs=2, encoder={"img_size": 32, "depth": 1}, hidden=16)
    assert isinstance(m, EncoderClassifier)
    keys = set(m.state_dict())
    assert {"head.0.weight", "head.2.weight"} <= keys and all(k.startswith(("encoder.", "head.")) for k in keys)
    assert m(torch.zeros(3, 3, 32, 32)).shape == (3, 2)
    with pytest.raises(ModelLoadError, match="unknown"):
        build_architecture("vit_tiny_patch16_224+transformer")
