"""A mostly-background mosaic's pyramid is built chunk by chunk above its scored chunks (#16): every
level, every chunk file, bit for bit what the whole-level reduction writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from slidescore.core.types import Box
from slidescore.io import mosaic as mz
from slidescore.io import pyramid


def _spec(dtype: str, shape: tuple[int, int], k: int = 2, not_scored: float | None = None) -> mz.MosaicSpec:
    return mz.MosaicSpec(shape=(k, *shape), chunk=16, n_levels=5, dtype=dtype, cell_um=8.0, source_mpp=0.25,
                         channel_names=tuple("ab"[:k]), colors=((230, 25, 75), (0, 0, 255))[:k], thresholds=(0.5, 0.7)[:k],
                         not_scored=not_scored)


def _files(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def _written(tmp: Path, spec: mz.MosaicSpec, blocks: list[tuple[int, int]], seed: int) -> Path:
    """A mosaic whose listed 16-cell chunks are scored (random values, some cells not scored); the rest absent."""
    rng = np.random.default_rng(seed)
    path = tmp / "m.ome.zarr"
    mz.create_mosaic(path, spec, {"run_key": "k"})
    _, h, w = spec.shape
    for cy, cx in blocks:
        box = Box(cy * 16, cx * 16, min(16, h - cy * 16), min(16, w - cx * 16))
        prob = rng.random((spec.shape[0], box.h, box.w)).astype(np.float32)
        prob[:, rng.random((box.h, box.w)) < 0.3] = np.nan
        mz.write_block(path, spec, box, prob)
    return path


@pytest.mark.parametrize(("dtype", "not_scored"), [("float32", None), ("uint8", None), ("float32", -1.0)])
@pytest.mark.parametrize("shape", [(157, 203), (128, 128), (33, 250)])
def test_sparse_pyramid_writes_the_whole_level_pyramid(tmp_path: Path, dtype: str, not_scored: float | None,
                                                       shape: tuple[int, int]) -> None:
    spec = _spec(dtype, shape, not_scored=not_scored)
    cy_max, cx_max = -(-shape[0] // 16) - 1, -(-shape[1] // 16) - 1
    blocks = sorted({(0, 0), (cy_max, cx_max), (cy_max, 0), (1, min(3, cx_max))})  # corners: partial edge chunks
    sparse_path = _written(tmp_path / "sparse", spec, blocks, seed=shape[0])
    whole_path = _written(tmp_path / "whole", spec, blocks, seed=shape[0])
    prob0 = mz.read_level(sparse_path, 0)
    hot = pyramid._scored_chunks(prob0, spec.chunk)
    assert 2 * hot.sum() < hot.size  # the sparse branch is the one taken
    pyramid.build_pyramid(sparse_path, spec, prob0=prob0)
    # the whole-level branch, forced: every chunk counts as scored
    real = pyramid._scored_chunks
    pyramid._scored_chunks = lambda p, c: np.ones_like(real(p, c))  # type: ignore[assignment]
    try:
        pyramid.build_pyramid(whole_path, spec)
    finally:
        pyramid._scored_chunks = real
    a, b = _files(sparse_path), _files(whole_path)
    assert a.keys() == b.keys() and a == b
    assert any(k.startswith(f"{spec.n_levels - 1}/") for k in a)  # the top level was written
    for lvl in range(1, spec.n_levels):
        assert np.isfinite(mz.read_level(sparse_path, lvl)).any()


def test_mask_image_writes_only_foreground_chunks_as_the_whole_write_did(tmp_path: Path) -> None:
    """write_fraction_image writes runs of chunks holding foreground: the same files as one write per band."""
    import zarr

    rng = np.random.default_rng(5)
    frac = np.zeros((157, 203), np.float32)
    frac[3:20, 30:70] = rng.random((17, 40))
    frac[150:, 190:] = 1.0  # the partial corner chunk
    frac[60:64, :] = 0.002  # rounds to 0 stored: an all-zero chunk row that is not written
    frac[90:95, 100:101] = 1e-9
    spec = _spec("uint8", frac.shape, k=1)
    new = tmp_path / "new.ome.zarr"
    mz.write_fraction_image(new, frac, spec)
    old = tmp_path / "old.ome.zarr"
    mz.write_fraction_image(old, np.zeros_like(frac), spec)  # the same metadata, no chunks
    zarr.open_group(str(old), mode="r+")["0"][0] = np.rint(np.clip(frac, 0, 1) * 255).astype(np.uint8)  # one whole write
    assert _files(new) == _files(old)
    q = np.rint(np.clip(frac, 0, 1) * 255).astype(np.uint8)
    hot = {(y // 16, x // 16) for y, x in zip(*np.nonzero(q), strict=True)}
    assert {k for k in _files(new) if k.startswith("0/0/")} == {f"0/0/{y}/{x}" for y, x in hot}
