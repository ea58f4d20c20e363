"""``slidescore embed``: per-patch embeddings on the global grid equal the encoder run patch by patch.

The reference cuts every patch with numpy from the image at its grid origin ((a − k + 1)·s, padded past
the edge with the encoder's pad value) and runs the encoder on it alone; the Zarr array, the HDF5 export,
resume after a lost block, block-size independence and S3 output are checked against it.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import save_file

from slidescore.cli import main
from slidescore.config import load_config
from slidescore.model.vit import build_vit, load_encoder
from slidescore.run.embed import embed_samples
from tests.conftest import textured_image, write_tiff

PATCH, STRIDE, PAD = 32, 16, 235
FG = (40, 24, 150, 120)  # y, x, h, w of the textured foreground


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    img = textured_image(200, 170, seed=5, background=PAD, fg_box=FG)
    return write_tiff(tmp_path_factory.mktemp("img") / "smear.tif", img, mpp=0.5, tile_px=64), img


@pytest.fixture(scope="module")
def encoder_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    vit = build_vit("vit_tiny_patch16_224", img_size=PATCH, depth=1, embed_dim=24, num_heads=2)
    folder = tmp_path_factory.mktemp("enc")
    save_file(vit.state_dict(), str(folder / "weights.safetensors"))
    (folder / "encoder.json").write_text(json.dumps({
        "name": "tiny", "architecture": "vit_tiny_patch16_224",
        "arch_kwargs": {"img_size": PATCH, "depth": 1, "embed_dim": 24, "num_heads": 2},
        "patch_px": PATCH, "mpp": 0.5, "pad_value": PAD, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}))
    return folder


def _reference(img: np.ndarray, encoder, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    m = PATCH // STRIDE - 1
    padded = np.pad(img, ((PATCH, PATCH), (PATCH, PATCH), (0, 0)), constant_values=PAD)
    out = []
    for ai, bi in zip(a, b, strict=True):
        y, x = (ai - m) * STRIDE + PATCH, (bi - m) * STRIDE + PATCH
        out.append(encoder.embed_patches(padded[None, y : y + PATCH, x : x + PATCH], batch_size=1)[0])
    return np.stack(out)


def _config(tmp_path: Path, chunk_cells: int) -> Path:
    p = tmp_path / f"embed-{chunk_cells}.yaml"
    p.write_text(f"tiling:\n  stride_px: {STRIDE}\n  chunk_cells: {chunk_cells}\n")
    return p


@pytest.mark.slow
def test_embeddings_equal_the_encoder_patch_by_patch(tmp_path: Path, image, encoder_path: Path) -> None:
    path, img = image
    out = tmp_path / "out"
    rc = main(["embed", str(path), "--encoder", str(encoder_path), "-o", str(out), "-c", str(_config(tmp_path, 4)),
               "--device", "cpu", "--batch-size", "7", "-q"])
    assert rc == 0
    arr = zarr.open_array(str(out / "smear" / "embeddings.zarr"), mode="r")
    emb = np.asarray(arr[:])
    ch, cw = -(-200 // STRIDE), -(-170 // STRIDE)
    assert emb.shape == (ch + 1, cw + 1, 24) and arr.chunks[2] == 24
    done = np.isfinite(emb).all(2)
    assert (np.isnan(emb).all(2) | done).all()  # a patch is whole or absent
    # every patch wholly inside the foreground is embedded; every patch whose in-image part is background is not
    oy, ox = (np.arange(ch + 1) - 1) * STRIDE, (np.arange(cw + 1) - 1) * STRIDE
    inside = ((oy >= FG[0]) & (oy + PATCH <= FG[0] + FG[2]))[:, None] & ((ox >= FG[1]) & (ox + PATCH <= FG[1] + FG[3]))[None]
    outside = ((oy + PATCH <= FG[0]) | (oy >= FG[0] + FG[2]))[:, None] | ((ox + PATCH <= FG[1]) | (ox >= FG[1] + FG[3]))[None]
    assert done[inside].all() and not done[outside].any() and 0 < done.sum() < done.size
    encoder = load_encoder(str(encoder_path), device="cpu")
    a, b = np.nonzero(done)
    pick = np.linspace(0, len(a) - 1, 32).round().astype(int)  # one by one is slow: an even sample of them
    a, b = a[pick], b[pick]
    np.testing.assert_allclose(emb[a, b], _reference(img, encoder, a, b), atol=2e-5)
    attrs = arr.attrs["slidescore"]
    assert attrs["encoder"]["checksum"] == encoder.checksum and attrs["origin_level0_yx"] == [-STRIDE, -STRIDE]
    assert attrs["step_level0"] == STRIDE and attrs["mpp"] == 0.5
    # the MIL export: coords are level-0 x, y of each patch's top-left
    with h5py.File(out / "smear" / "features.h5") as f:
        coords, feats, index = f["coords"][:], f["features"][:], f["grid_index"][:]
        assert f["coords"].attrs["patch_size_level0"] == PATCH and f["coords"].attrs["mpp"] == 0.5
        assert f.attrs["encoder_checksum"] == encoder.checksum
    assert len(feats) == done.sum()
    np.testing.assert_array_equal(coords, np.stack([(index[:, 1] - 1) * STRIDE, (index[:, 0] - 1) * STRIDE], 1))
    np.testing.assert_array_equal(feats, emb[index[:, 0], index[:, 1]])
    run = json.loads((out / "smear" / "run.json").read_text())
    assert run["encoder"]["checksum"] == encoder.checksum and run["patches"]["embedded"] == done.sum()
    assert json.loads((out / "run.json").read_text())["encoder"]["checksum"] == encoder.checksum
    assert (out / "smear" / "_SUCCESS").exists()

    # block size never changes the array (one block vs many; batches differ, so up to float rounding)
    one = tmp_path / "one"
    assert main(["embed", str(path), "--encoder", str(encoder_path), "-o", str(one), "-c", str(_config(tmp_path, 64)),
                 "--device", "cpu", "-q"]) == 0
    np.testing.assert_allclose(np.asarray(zarr.open_array(str(one / "smear" / "embeddings.zarr"), mode="r")[:]), emb,
                               atol=1e-5)  # NaN where NaN


def test_rerun_skips_and_a_lost_chunk_is_redone(tmp_path: Path, image, encoder_path: Path) -> None:
    path, _ = image
    cfg = load_config(_config(tmp_path, 4))
    encoder = load_encoder(str(encoder_path), device="cpu")
    out = str(tmp_path / "out")
    (r,) = embed_samples([str(path)], cfg, out, encoder)
    assert r.status == "ok"
    before = np.asarray(zarr.open_array(f"{out}/smear/embeddings.zarr", mode="r")[:])
    (r,) = embed_samples([str(path)], cfg, out, encoder)
    assert r.status == "skipped"
    # a crash after a block's marker but with its chunk lost: finishing finds the hole, removes that
    # block's marker and fails the sample; the next run embeds exactly that block
    (Path(out) / "smear" / "_SUCCESS").unlink()
    chunk = next(p for p in sorted((Path(out) / "smear" / "embeddings.zarr").rglob("*")) if p.is_file()
                 and not p.name.startswith("."))
    chunk.unlink()
    (r,) = embed_samples([str(path)], cfg, out, encoder)
    assert r.status == "failed" and "no finite embedding" in r.error
    (r,) = embed_samples([str(path)], cfg, out, encoder)
    assert r.status == "ok" and r.run["blocks"]["embedded"] == 1
    np.testing.assert_array_equal(np.asarray(zarr.open_array(f"{out}/smear/embeddings.zarr", mode="r")[:]), before)


def test_bad_inputs_fail_clearly(tmp_path: Path, image, encoder_path: Path, capsys) -> None:
    path, _ = image
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00garbage")
    rc = main(["embed", str(bad), str(path), "--encoder", str(encoder_path), "-o", str(tmp_path / "o"), "-q"])
    err = capsys.readouterr().err
    assert rc == 1 and "FAILED  broken" in err and "Traceback" not in err
    assert (tmp_path / "o" / "smear" / "_SUCCESS").exists() and not (tmp_path / "o" / "broken" / "_SUCCESS").exists()
    rc = main(["embed", str(path), "--encoder", str(tmp_path / "missing.safetensors"), "-o", str(tmp_path / "p")])
    assert rc == 2 and "no such file" in capsys.readouterr().err
    rc = main(["embed", str(path), "--encoder", str(encoder_path), "-o", str(tmp_path / "p"), "--stride", "24"])
    assert rc == 2 and "divisor" in capsys.readouterr().err


@pytest.mark.s3
@pytest.mark.slow
def test_embeddings_on_s3_equal_local(tmp_path: Path, image, encoder_path: Path, s3fs_client) -> None:
    path, _ = image
    s3fs_client.mkdir("embed-out")
    cfg = load_config(_config(tmp_path, 8))
    encoder = load_encoder(str(encoder_path), device="cpu")
    (local,) = embed_samples([str(path)], cfg, str(tmp_path / "local"), encoder)
    (remote,) = embed_samples([str(path)], cfg, "s3://embed-out/run", encoder)
    assert local.status == remote.status == "ok", remote.error
    remote_arr = zarr.open_array(zarr.storage.FsspecStore.from_url("s3://embed-out/run/smear/embeddings.zarr",
                                                                   read_only=True), mode="r", zarr_format=2)
    np.testing.assert_array_equal(np.asarray(remote_arr[:]),
                                  np.asarray(zarr.open_array(str(tmp_path / "local" / "smear" / "embeddings.zarr"))[:]))
    assert s3fs_client.exists("embed-out/run/smear/_SUCCESS") and s3fs_client.exists("embed-out/run/smear/features.h5")


@pytest.mark.slow
def test_demo_smear_embeddings_equal_the_encoder_on_its_level(tmp_path: Path) -> None:
    """The demo's smear (JPEG-tiled pyramid at 0.25 µm/px): a 64-px encoder at 0.5 µm/px embeds level 1, stride 64."""
    from slidescore.core.types import Box
    from slidescore.io import open_image
    from slidescore.offline.demo import generate_smear

    tif = tmp_path / "smear.tif"
    generate_smear(tif, 1536, seed=7, progress=False)
    torch.manual_seed(4)
    folder = tmp_path / "enc"
    folder.mkdir()
    kw = {"img_size": 64, "depth": 1, "embed_dim": 24, "num_heads": 2}
    save_file(build_vit("vit_tiny_patch16_224", **kw).state_dict(), str(folder / "weights.safetensors"))
    (folder / "encoder.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "arch_kwargs": kw,
                                                     "patch_px": 64, "mpp": 0.5, "pad_value": PAD}))
    assert main(["embed", str(tif), "--encoder", str(folder), "-o", str(tmp_path / "out"), "--device", "cpu", "-q"]) == 0
    emb = np.asarray(zarr.open_array(str(tmp_path / "out" / "smear" / "embeddings.zarr"), mode="r")[:])
    assert emb.shape == (12, 12, 24)  # level 1 is 768 px: 12 cells of 64 px, k = 1 (no margin)
    reader = open_image(str(tif))
    level1 = reader.read(1, Box(0, 0, 768, 768))
    reader.close()
    a, b = np.nonzero(np.isfinite(emb).all(2))
    assert len(a) > 50
    pick = np.linspace(0, len(a) - 1, 24).round().astype(int)  # one by one is slow: an even sample of them
    a, b = a[pick], b[pick]
    encoder = load_encoder(str(folder), device="cpu")
    one_by_one = np.stack([encoder.embed_patches(level1[None, y * 64 : y * 64 + 64, x * 64 : x * 64 + 64], 1)[0]
                           for y, x in zip(a, b, strict=True)])
    np.testing.assert_allclose(emb[a, b], one_by_one, atol=2e-5)
    with h5py.File(tmp_path / "out" / "smear" / "features.h5") as f:  # level-0 coordinates: twice the level-1 ones
        np.testing.assert_array_equal(f["coords"][:], np.stack([f["grid_index"][:, 1], f["grid_index"][:, 0]], 1) * 128)
        assert f["coords"].attrs["patch_size_level0"] == 128 and f["coords"].attrs["mpp"] == 0.5
