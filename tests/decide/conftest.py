"""Fixtures for the decision tests: a small labelled patch folder cut from generated smears."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="session")
def patch_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``root/{parasitized,uninfected}/smear<S>_cell_<i>.png``: 64-px patches at 0.5 µm/px, 4 smears."""
    from slidescore.offline.datasets import load_synthetic

    ps = load_synthetic(1, n_smears=4, size_px=768)
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("patches") / "train"
    for ci, name in enumerate(ps.class_names):
        (root / name).mkdir(parents=True)
        for g in np.unique(ps.groups):
            idx = np.nonzero((ps.labels == ci) & (ps.groups == g))[0]
            for i in rng.permutation(idx)[:70]:
                Image.fromarray(ps.images[i]).save(root / name / f"{g}_cell_{i}.png")
    return root
