"""Shared fixtures: tiny generated images and model packages (seeded, never downloaded), a loopback
S3 server, and a real Ray head for job submission."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
def calibrated_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A card with temperature calibration and a training prevalence (so a prior shift can apply)."""
    folder = make_model_package(tmp_path_factory.mktemp("models") / "calibrated", seed=5)
    card = json.loads((folder / "card.json").read_text())
    card.update(calibration={"method": "temperature", "temperature": 1.7}, training_prevalence=[0.5])
    (folder / "card.json").write_text(json.dumps(card))
    return folder


@pytest.fixture(scope="session")
def constant_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model_package(tmp_path_factory.mktemp("models") / "const", constant=0.7)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API server (moto's server mode) on loopback; yields its endpoint URL.

    The AWS_* variables point every s3fs client of this process (and its children) at it.
    """
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


# -- a real Ray head for job submission (`ray start --head`, token auth) --------------------------
REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


@dataclass
class Head:
    """A running ``ray start --head``: its dashboard URL, the environment a client needs, its token."""

    url: str
    env: dict[str, str]
    token: str
    proc: subprocess.Popen
    log: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def head_get(head: Head, path: str) -> Any:
    """GET a dashboard API path with the head's token (JSON)."""
    req = urllib.request.Request(head.url + path, headers={"Authorization": f"Bearer {head.token}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def stop_head(proc: subprocess.Popen) -> None:
    """SIGTERM the head (it drains and stops its processes), then SIGKILL whatever is left of its group.

    Only the head this fixture started, by its own process group; never ``ray stop``, which would
    stop every Ray instance on the machine (other test sessions' too).
    """
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):  # dashboard modules and workers may outlive `ray start`
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def ray_head_options() -> dict[str, Any]:
    """How ``ray_head`` starts this module's head; a test module overrides this fixture.

    ``num_cpus`` / ``num_gpus``: the logical resources the head advertises. ``pass_aws``: give the
    head (and so every job driver and actor) this process's ``AWS_*`` variables, as a deployed head
    has them from its Secret; without it a job must get them in its runtime env.
    """
    return {"num_cpus": 2, "num_gpus": 0, "pass_aws": False}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory, ray_head_options: dict[str, Any]) -> Iterator[Head]:
    """``ray start --head`` with token auth on free loopback ports, stopped (only it) after the module.

    Module scope, not session: modules need differently configured heads (``ray_head_options``),
    and a head's jobs and their outputs stay out of the next module's way.

    Token auth, as on a real Ray 2.60 cluster, set explicitly and identically for the head, the
    ``ray job`` client and (inherited from the head) the job driver. The token is a fresh random one
    passed in RAY_AUTH_TOKEN, so nothing is read from or written to ~/.ray: with RAY_AUTH_MODE unset,
    ``ray start --head`` would turn auth on or off depending on whether ~/.ray/auth_token happens to
    exist, and a local ``ray.init()`` would create that file.
    """
    opts = {"num_cpus": 2, "num_gpus": 0, "pass_aws": False, **ray_head_options}
    token = secrets.token_hex(32)
    drop = ("RAY_",) if opts["pass_aws"] else ("RAY_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}")
    dash, agent = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: Ray's unix sockets live under it
    log = tmp_path_factory.mktemp("head") / "head.log"
    cmd = [str(RAY), "start", "--head", "--block", f"--port={free_port()}", f"--num-cpus={opts['num_cpus']}",
           f"--num-gpus={opts['num_gpus']}", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", env, token, proc, log)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                head_get(head, "/api/version")
                # jobs go through the node's dashboard agent, which comes up after the dashboard
                socket.create_connection(("127.0.0.1", agent), timeout=5).close()
                break
            except OSError:  # URLError included
                if time.monotonic() > deadline:
                    pytest.fail(f"the dashboard did not answer within 180 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield head
    finally:
        stop_head(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)
