"""``python -m jobs.embed`` (the Ray path of ``slidescore embed``) writes exactly the one-process run's outputs.

Same stage functions (plan_embed, embed_blocks, finish_embed), same blocks and batch size, so the
embeddings and features.h5 are compared for exact equality, not within a tolerance.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr

from jobs.embed import main as job_main
from slidescore.cli import main
from slidescore.model.vit import load_encoder
from tests.test_distributed import ray_cluster  # noqa: F401  (the module's local Ray cluster)
from tests.test_embed import STRIDE, encoder_path, image  # noqa: F401  (the small smear and tiny encoder)

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_ray_embed_equals_one_process(tmp_path: Path, image, encoder_path: Path, ray_cluster) -> None:  # noqa: F811
    path, _ = image
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"tiling:\n  stride_px: {STRIDE}\n  chunk_cells: 4\nmodel:\n  batch_size: 7\n"
                   "cluster:\n  n_actors: 2\n  num_cpus_per_actor: 0.5\n")
    local, dist = tmp_path / "local", tmp_path / "ray"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the actors (Ray sets OMP_NUM_THREADS from num_cpus): same float sums
    try:
        assert main(["embed", str(path), "--encoder", str(encoder_path), "-o", str(local), "-c", str(cfg),
                     "--device", "cpu", "-q"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert job_main(["-c", str(cfg), "--encoder", str(encoder_path), "--uri", str(path), "-o", str(dist)]) == 0

    a = np.asarray(zarr.open_array(str(local / "smear" / "embeddings.zarr"), mode="r")[:])
    b = np.asarray(zarr.open_array(str(dist / "smear" / "embeddings.zarr"), mode="r")[:])
    assert np.isfinite(a).all(2).sum() > 0
    np.testing.assert_array_equal(a, b)  # exact (NaN where NaN)
    with h5py.File(local / "smear" / "features.h5") as f, h5py.File(dist / "smear" / "features.h5") as g:
        for k in ("coords", "features", "grid_index"):
            np.testing.assert_array_equal(f[k][:], g[k][:])
        assert g.attrs["encoder_checksum"] == f.attrs["encoder_checksum"]
    checksum = load_encoder(str(encoder_path), device="cpu").checksum
    run = json.loads((dist / "run.json").read_text())
    assert run["runner"] == "ray" and run["encoder"]["checksum"] == checksum
    sample = json.loads((dist / "smear" / "run.json").read_text())
    assert sample["encoder"]["checksum"] == checksum and sample["blocks"]["embedded"] > 1
    assert sample["patches"]["embedded"] == json.loads((local / "smear" / "run.json").read_text())["patches"]["embedded"]
    assert (dist / "smear" / "_SUCCESS").exists()

    # a bad sample fails alone with its record; the good one is complete from the run before (skipped)
    bad = tmp_path / "broken.tif"
    bad.write_bytes(b"II*\x00not a tiff")
    assert job_main(["-c", str(cfg), "--encoder", str(encoder_path), "--uri", str(path), "--uri", str(bad),
                     "-o", str(dist)]) == 1
    failures = [json.loads(line) for line in (dist / "failures.jsonl").read_text().splitlines()]
    assert [f["sample_id"] for f in failures] == ["broken"]
    rows = {r["sample_id"]: r["status"] for r in json.loads((dist / "run.json").read_text())["samples"]}
    assert rows == {"smear": "skipped", "broken": "failed"} and not (dist / "broken" / "_SUCCESS").exists()
