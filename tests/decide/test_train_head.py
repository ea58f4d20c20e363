"""``slidescore train --encoder``: a head on cached embeddings of a frozen ViT, written as one package.

Checks that the package's ``head(encoder(x))`` equals the fitted head on the cached embeddings (the
standardisation is folded in correctly), that the validation figures in the card are recomputed from
the package's own outputs, that only the head changed (the encoder's weights are the file's), that the
split, balancing and class checks are those of ``slidescore train``, and that the package loads through
``build_architecture`` (safetensors with ``encoder.*`` and ``head.*``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from slidescore.cli import main
from slidescore.decide import calibration as cal
from slidescore.errors import ConfigError
from slidescore.model import load_model
from slidescore.model.architectures import build_architecture
from slidescore.model.card import ModelCard
from slidescore.model.vit import build_vit, load_encoder
from slidescore.offline.datasets import PatchSet
from slidescore.offline.train import TrainOptions
from slidescore.offline.train_head import train_head

P = 32


def _patchset(seed: int = 0, n_groups: int = 6, per_group: int = 40) -> PatchSet:
    """Two classes that differ in colour (the positive class has a dark purple dot), one group per image."""
    rng = np.random.default_rng(seed)
    n = n_groups * per_group
    images = rng.integers(200, 240, (n, P, P, 3), dtype=np.uint8)
    labels = (rng.uniform(size=n) < 0.3).astype(int)
    for i in np.nonzero(labels)[0]:
        y, x = rng.integers(4, P - 10, 2)
        images[i, y : y + 6, x : x + 6] = (90, 30, 120)
    groups = np.repeat([f"img{g}" for g in range(n_groups)], per_group)
    return PatchSet(images, labels, groups, ("uninfected", "parasitized"), 0.5, "test:dots")


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(1)
    kw = {"img_size": P, "depth": 2, "embed_dim": 48, "num_heads": 3, "global_pool": "token"}
    folder = tmp_path_factory.mktemp("encoder")
    save_file(build_vit("vit_tiny_patch16_224", **kw).state_dict(), str(folder / "weights.safetensors"))
    (folder / "encoder.json").write_text(json.dumps({"name": "tiny", "architecture": "vit_tiny_patch16_224",
                                                     "arch_kwargs": kw, "patch_px": P, "mpp": 0.5, "pad_value": 235}))
    return folder


@pytest.mark.slow
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_package_equals_the_fitted_head(tmp_path: Path, encoder_dir: Path, head: str) -> None:
    data = _patchset()
    enc = load_encoder(str(encoder_dir), device="cpu")
    card = train_head(data, enc, tmp_path / "pkg", TrainOptions(epochs=40, patience=8, lr=3e-3, batch_size=256, progress=False),
                      head=head, hidden=16)
    assert card.architecture == f"vit_tiny_patch16_224+{head}" and card.patch_px == P and card.dense is False
    state = load_file(str(tmp_path / "pkg" / "weights.safetensors"))
    assert {k.split(".")[0] for k in state} == {"encoder", "head"}
    # the encoder is the file's, untouched
    original = load_file(str(encoder_dir / "weights.safetensors"))
    assert all(torch.equal(state[f"encoder.{k}"], v) for k, v in original.items())
    # the package, rebuilt from its card alone, scores the validation patches; the card's figures are these
    saved = ModelCard.from_dict(json.loads((tmp_path / "pkg" / "card.json").read_text()))
    model = build_architecture(saved.architecture, **saved.arch_kwargs).eval()
    model.load_state_dict(state)
    assert card.training["source_images"]["val"] >= 1
    x = torch.from_numpy(((data.images / 255.0 - 0.5) / 0.25).transpose(0, 3, 1, 2).astype(np.float32))
    with torch.no_grad():
        logits = model(x)[:, 0].double().numpy()
    # which patches were validation: the groups not used for training (the card counts them)
    n_val = sum(card.training["patches"]["val"].values())
    from slidescore.offline.train import split_by_group

    _, val = split_by_group(data.groups, data.labels, 0.2, 0)
    assert val.sum() == n_val
    auc = cal.auc_roc(cal.sigmoid(logits[val]), data.labels[val] == 1)
    assert card.metrics["validation"]["per_class"]["parasitized"]["auc_roc"] == pytest.approx(auc, abs=1e-5)
    assert auc > 0.9  # a purple dot is easy even for random features
    # the scorer loads the package as it is (card.json + weights.safetensors) and scores the same
    clf = load_model(str(tmp_path / "pkg"), device="cpu")
    probs = clf.score_patches(np.ascontiguousarray(data.images[:16].transpose(0, 3, 1, 2)), 8)[:, 0]
    np.testing.assert_allclose(probs, cal.sigmoid(logits[:16]), atol=1e-5)
    # and `slidescore embed --encoder PACKAGE` uses the package's encoder: the same embeddings as the original
    np.testing.assert_array_equal(load_encoder(str(tmp_path / "pkg"), device="cpu").embed_patches(data.images[:4]),
                                  enc.embed_patches(data.images[:4]))
    assert card.training["embeddings"]["patches"] == len(data) and card.training["augmentation"].startswith("none")


def test_balancing_and_class_checks_are_trains(tmp_path: Path, encoder_dir: Path) -> None:
    data = _patchset(seed=2)
    enc = load_encoder(str(encoder_dir), device="cpu")
    card = train_head(data, enc, tmp_path / "down", TrainOptions(epochs=3, balance="downsample", progress=False))
    used = card.training["patches"]["train_used"]
    assert used["parasitized"] == used["uninfected"] and card.training_prevalence == (0.5,)
    one_class = PatchSet(data.images, np.zeros(len(data), int), data.groups, data.class_names, 0.5, "test:one")
    with pytest.raises(ConfigError, match="every class needs patches"):
        train_head(one_class, enc, tmp_path / "bad", TrainOptions(epochs=1, progress=False))
    wrong_mpp = PatchSet(data.images, data.labels, data.groups, data.class_names, 0.25, "test:mpp")
    with pytest.raises(ConfigError, match="µm/px"):
        train_head(wrong_mpp, enc, tmp_path / "bad", TrainOptions(epochs=1, progress=False))


def test_cli_train_encoder_on_a_class_folder(tmp_path: Path, encoder_dir: Path, capsys) -> None:
    from PIL import Image

    data = _patchset(seed=3, n_groups=4, per_group=15)
    for i, (img, lab, g) in enumerate(zip(data.images, data.labels, data.groups, strict=True)):
        d = tmp_path / "cells" / data.class_names[lab]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(d / f"{g}_cell_{i}.png")
    rc = main(["train", str(tmp_path / "cells"), "--encoder", str(encoder_dir), "-o", str(tmp_path / "pkg"),
               "--mpp", "0.5", "--epochs", "5", "-q"])
    out = capsys.readouterr().out
    assert rc == 0 and "weights.safetensors" in out and "AUC-ROC" in out
    assert (tmp_path / "pkg" / "plots" / "roc.png").exists()
    rc = main(["train", str(tmp_path / "cells"), "--encoder", str(encoder_dir), "-o", str(tmp_path / "p2"),
               "--mpp", "0.5", "--resize", "48", "-q"])
    assert rc == 2 and "--resize 32" in capsys.readouterr().err
