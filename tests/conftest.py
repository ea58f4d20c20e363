"""Shared fixtures: tiny generated images and model packages (seeded, never downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest


def write_tiff(path: Path, img: np.ndarray, *, mpp: float | None = 0.5, n_levels: int = 1, compression: str = "zlib", tile_px: int = 64) -> Path:
    """A tiled pyramidal TIFF of ``img`` (levels are plain 2× decimations)."""
    from slidescore.io.tiff import write_tiff_pyramid

    def render(y: int, x: int, h: int, w: int, ds: int) -> np.ndarray:
        return img[::ds, ::ds][y : y + h, x : x + w]

    write_tiff_pyramid(str(path), img.shape[:2], render, mpp=mpp, n_levels=n_levels, tile_px=tile_px, compression=compression)
    return path


def textured_image(h: int, w: int, seed: int = 0, background: int = 235, fg_box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """Bright background with a saturated random-texture foreground rectangle (y, x, h, w)."""
    rng = np.random.default_rng(seed)
    img = np.full((h, w, 3), background, np.uint8)
    y, x, bh, bw = fg_box or (0, 0, h, w)
    tex = rng.integers(0, 256, (bh, bw, 3), dtype=np.uint8)
    tex[..., 0] = np.maximum(tex[..., 0], 150)  # reddish: saturated, never mistaken for background
    tex[..., 1] //= 3
    img[y : y + bh, x : x + bw] = tex
    return img


def make_model_package(folder: Path, *, seed: int = 0, width: int = 8, constant: float | None = None, n_outputs: int = 1,
                       head: str = "binary_sigmoid", mpp: float = 0.5, pad_value: int = 235) -> Path:
    """A SmearNet state-dict package with a card. ``constant`` makes every probability equal it."""
    import torch

    from slidescore.model.architectures import SmearNet
    from slidescore.model.card import ModelCard

    torch.manual_seed(seed)
    net = SmearNet(n_outputs=n_outputs, width=width)
    if constant is not None:
        with torch.no_grad():
            net.head.weight.zero_()
            net.head.bias.fill_(float(np.log(constant / (1 - constant))))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "weights.pt")
    classes = ("parasitized",) if n_outputs == 1 else tuple(f"class{i}" for i in range(n_outputs))
    card = ModelCard(
        name=folder.name, patch_px=64, mpp=mpp, classes=classes, head=head, thresholds=(0.5,) * len(classes),
        architecture="smearnet", arch_kwargs={"n_outputs": n_outputs, "width": width}, dense=True,
        network_stride_px=16, pad_value=pad_value, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
    )
    (folder / "card.json").write_text(json.dumps(card.to_dict()))
    return folder


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("models") / "random8", seed=3)


@pytest.fixture(scope="session")
def constant_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("models") / "const", constant=0.7)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on loopback; yields its endpoint URL.

    The AWS_* variables point every s3fs client of this process (and its children) at it.
    """
    import os

    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=endpoint)
    yield endpoint
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture()
def s3fs_client(s3_server: str):
    import s3fs

    return s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
