"""``slidescore train --encoder PATH``: fit a linear or small-MLP head on a frozen encoder's embeddings.

The labelled patches come from the same sources as ``slidescore train`` (class folders, annotation
tables, ``synthetic[:SEED]``) and go through the same split by source image, balancing
(``downsample`` / ``class_weights`` / ``bias_init``), early stopping on the validation loss, metrics
(AUC-ROC, AUC-PR, confusion) and plots (:mod:`slidescore.offline.train`). The encoder runs once over
every patch (:class:`~slidescore.model.vit.PatchEncoder`, large batches, the encoder's device); the
head is then fitted on those cached embeddings in seconds on CPU. Augmentation does not apply (it would
need the encoder again for every epoch); the card says so. Embeddings are standardised with the training
split's mean and std while fitting, and that affine map is folded into the head's first linear layer
afterwards, so the package computes ``head(encoder(x))`` with nothing extra.

The result is one model package: ``card.json`` (architecture ``<ViT preset>+linear|mlp``, the
encoder's patch size, µm/px, normalisation and padding, the training summary and validation metrics)
and ``weights.safetensors`` (``encoder.*`` and ``head.*``). ``slidescore calibrate`` fits its
calibration and operating points like any other package.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slidescore.decide import calibration as cal
from slidescore.errors import ConfigError
from slidescore.model.card import ModelCard
from slidescore.model.vit import EncoderClassifier, PatchEncoder, load_encoder
from slidescore.offline.datasets import PatchSet, load_patches, positive_class
from slidescore.offline.train import (
    TrainOptions,
    balance_indices,
    evaluate,
    probabilities,
    split_by_group,
    targets_for,
    write_plots,
)

MPP_TOLERANCE = 0.1


def embed_patchset(encoder: PatchEncoder, data: PatchSet, batch_size: int = 256) -> np.ndarray:
    """(N, D) float32 embeddings of every patch of ``data`` (the encoder runs once per patch)."""
    p = encoder.card.patch_px
    if data.images.shape[1:3] != (p, p):
        raise ConfigError(f"training data {data.source}: patches are {data.images.shape[1]}×{data.images.shape[2]} px; "
                          f"encoder {encoder.card.name!r} takes {p}×{p} px — pass --resize {p} (and --mpp for the "
                          "resolution the resized patches have)")
    return encoder.embed_patches(data.images, batch_size=batch_size)


def _first_linear(head: nn.Module) -> nn.Linear:
    first = head if isinstance(head, nn.Linear) else head[0]  # type: ignore[index]
    assert isinstance(first, nn.Linear)
    return first


# Long on purpose: split, balance, fit, evaluate and write the package read as one procedure, as in train_model (offline).
def train_head(data: PatchSet, encoder: PatchEncoder, out: Path, opts: TrainOptions, *, head: str = "linear",
               hidden: int = 256) -> ModelCard:
    """Fit a head on ``encoder``'s embeddings of ``data``; write the encoder + head package to ``out``."""
    t0 = time.time()
    if encoder.arch is None:
        raise ConfigError(f"encoder {encoder.source}: not a ViT preset with known arch_kwargs; cannot write a package")
    preset, enc_kwargs = encoder.arch
    card0 = encoder.card
    if data.mpp is not None and abs(data.mpp / card0.mpp - 1) > MPP_TOLERANCE:
        raise ConfigError(f"training data {data.source}: patches at {data.mpp} µm/px, encoder {card0.name!r} expects "
                          f"{card0.mpp} µm/px; cut the patches at the encoder's resolution (or fix --mpp)")
    counts = np.asarray(list(data.counts().values()))
    multilabel = bool(getattr(data, "multilabel", False))
    if (counts == 0).any() or (len(counts) < 2 and not multilabel) or (multilabel and (counts == len(data)).any()):
        raise ConfigError(f"training data {data.source}: class counts {data.counts()} of {len(data)} patches; every "
                          "class needs patches" + (" with it and without it (multi-label)" if multilabel else ""))
    classes: tuple[str, ...]
    if multilabel:
        kind, pos, classes = "multilabel_sigmoid", -1, data.class_names
    elif len(data.class_names) == 2:
        kind, pos = "binary_sigmoid", positive_class(data.class_names, opts.positive)
        classes = (data.class_names[pos],)
    else:
        kind, pos, classes = "softmax", -1, data.class_names
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng([opts.seed, 9])
    gen = torch.Generator().manual_seed(opts.seed)

    t_emb = time.time()
    emb = embed_patchset(encoder, data, batch_size=max(opts.batch_size, 64))
    t_emb = time.time() - t_emb
    train_mask, val_mask = split_by_group(data.groups, data.labels, opts.val_frac, opts.seed)
    tr_idx, va_idx = np.nonzero(train_mask)[0], np.nonzero(val_mask)[0]
    tr_all, va = data.subset(tr_idx), data.subset(va_idx)
    keep = balance_indices(tr_all.labels, opts.balance, rng)
    tr, x_tr, x_va = tr_all.subset(keep), emb[tr_idx][keep], emb[va_idx]
    y_tr, y_va = targets_for(tr, kind, pos), targets_for(va, kind, pos)
    sigmoid = kind != "softmax"  # one independent sigmoid per output (binary, multi-label)
    natural = y_tr.mean(0) if sigmoid else np.bincount(y_tr, minlength=len(classes)) / len(y_tr)
    effective = np.full_like(natural, 0.5 if sigmoid else 1 / len(classes)) \
        if opts.balance in ("downsample", "class_weights") else natural

    mu, sd = x_tr.mean(0), np.maximum(x_tr.std(0), 1e-6)
    n_out = len(classes)
    model = EncoderClassifier(encoder.module.cpu(), n_out, head, hidden)  # type: ignore[arg-type]
    net = model.head
    first = _first_linear(net)
    last = net if isinstance(net, nn.Linear) else net[-1]  # type: ignore[index]
    if opts.balance == "bias_init":
        with torch.no_grad():
            if sigmoid:
                last.bias.copy_(torch.from_numpy(np.asarray(cal.logit(np.clip(natural, 1e-6, 1 - 1e-6)))).float())
            else:
                last.bias.copy_(torch.from_numpy(np.log(np.maximum(natural, 1e-6))).float())
    w_pos = torch.from_numpy((1 - natural) / np.maximum(natural, 1e-6)).float() \
        if sigmoid and opts.balance == "class_weights" else torch.ones(n_out)
    class_w = torch.tensor(1.0 / np.maximum(natural * len(classes), 1e-6), dtype=torch.float32) \
        if kind == "softmax" and opts.balance == "class_weights" else None

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if sigmoid:
            w = 1 + (w_pos - 1) * y
            return (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()
        return nn.functional.cross_entropy(logits, y, weight=class_w)

    xt = torch.from_numpy(((x_tr - mu) / sd).astype(np.float32))
    xv = torch.from_numpy(((x_va - mu) / sd).astype(np.float32))
    yt = torch.from_numpy(y_tr).float() if sigmoid else torch.from_numpy(y_tr)
    yv = torch.from_numpy(y_va).float() if sigmoid else torch.from_numpy(y_va)
    opt = torch.optim.AdamW(net.parameters(), lr=opts.lr, weight_decay=1e-4)
    best = (float("inf"), -1, {k: v.clone() for k, v in net.state_dict().items()})
    history: list[dict[str, float]] = []
    stale = 0
    for epoch in range(opts.epochs):
        net.train()
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), opts.batch_size):
            b = perm[i : i + opts.batch_size]
            loss = loss_of(net(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        net.eval()
        with torch.no_grad():
            val_loss = float(loss_of(net(xv), yv))
        history.append({"epoch": epoch + 1, "train_loss": round(total / len(xt), 6), "val_loss": round(val_loss, 6)})
        if val_loss < best[0] - 1e-6:
            best, stale = (val_loss, epoch + 1, {k: v.clone() for k, v in net.state_dict().items()}), 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    net.load_state_dict(best[2])
    with torch.no_grad():  # fold the standardisation into the first layer: W' = W / sd, b' = b − W'·mu
        w = first.weight / torch.from_numpy(sd.astype(np.float32))
        first.bias.sub_(w @ torch.from_numpy(mu.astype(np.float32)))
        first.weight.copy_(w)
        logits = net(torch.from_numpy(x_va)).double().numpy()
    probs = probabilities(logits, kind)
    metrics = evaluate(probs, y_va, kind, classes)
    metrics["val_loss"] = round(best[0], 6)
    out.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(out / "plots", probs, y_va, kind, classes, metrics)
    card = ModelCard(
        name=opts.name or out.name, patch_px=card0.patch_px, mpp=card0.mpp, classes=classes, head=kind,
        thresholds=(0.5,) * len(classes), color_space="RGB", mean=card0.mean, std=card0.std,
        architecture=f"{preset}+{head}", arch_kwargs={"n_outputs": n_out, "encoder": enc_kwargs,
                                                      **({"hidden": hidden} if head == "mlp" else {})},
        dense=False, network_stride_px=1, pad_value=card0.pad_value, version="1",
        description=f"{head} head on the frozen encoder {card0.name} ({preset}), trained by slidescore train --encoder "
                    f"on {data.source}",
        training={
            "command": "slidescore train --encoder", "source": data.source, "seed": opts.seed,
            "encoder": {"source": encoder.source, "checksum": encoder.checksum, "dim": encoder.dim, "preset": preset},
            "embeddings": {"patches": len(emb), "seconds": round(t_emb, 1), "device": str(encoder.device)},
            "class_names": list(data.class_names), "positive_class": classes[0] if kind == "binary_sigmoid" else None,
            "patches": {"train": tr_all.counts(), "train_used": tr.counts(), "val": va.counts()},
            "source_images": {"train": int(len(np.unique(tr.groups))), "val": int(len(np.unique(va.groups)))},
            "split": "by source image", "val_frac": opts.val_frac, "balance": opts.balance,
            "natural_prevalence": [round(float(v), 6) for v in natural], "augmentation": "none (frozen encoder)",
            "head": head, "device": "cpu", "epochs_run": len(history), "best_epoch": best[1], "patience": opts.patience,
            "batch_size": opts.batch_size, "lr": opts.lr, "history": history, "torch": torch.__version__,
            "time_s": round(time.time() - t0, 1), "plots": plot_files,
        },
        metrics={"validation": metrics},
        training_prevalence=tuple(round(float(v), 6) for v in effective),
    )
    save_package(out, model, card)
    return card


def save_package(out: Path, model: nn.Module, card: ModelCard) -> None:
    """``weights.safetensors`` (``encoder.*``, ``head.*``) and ``card.json``."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")


def run_train_head(source: str, out: str, opts: TrainOptions, *, encoder: str, head: str = "linear", hidden: int = 256,
                   mpp: float | None = None, resize: int | None = None, group_regex: str | None = None,
                   synthetic_smears: int = 4, synthetic_size_px: int = 1536,
                   encoder_device: str = "auto") -> ModelCard:
    """Load the encoder and the data named by ``source``, then :func:`train_head` (the CLI entry point)."""
    from slidescore.offline.datasets import DEFAULT_GROUP_REGEX

    enc = load_encoder(encoder, device=encoder_device)
    data = load_patches(source, patch_px=enc.card.patch_px, mpp=mpp, resize=resize,
                        group_regex=group_regex or DEFAULT_GROUP_REGEX, seed=opts.seed,
                        synthetic_smears=synthetic_smears, synthetic_size_px=synthetic_size_px,
                        pad_value=enc.card.pad_value)
    if data.mpp is None:
        data.mpp = mpp
    return train_head(data, enc, Path(out), opts, head=head, hidden=hidden)

