"""``slidescore train``: fit a patch classifier and write a model package the scorer loads.

Data come from :mod:`slidescore.offline.datasets` (class folders, annotation tables read with
slidescore's readers, or synthetic smears). The data are split by source image (no image in two
splits), the training split is balanced as chosen (``downsample`` the majority classes,
``class_weights`` in the loss, or ``bias_init``: output bias at log(pos/neg) so the first steps
start from the prior), patches are augmented in ways that keep hue (flips, 90° turns, brightness,
contrast, saturation and sharpness jitter), and training stops early when the validation loss has
not improved for ``patience`` epochs (the best epoch's weights are kept). The network is the
built-in SmearNet (plain torch, dense for 64-px patches). Two classes train one sigmoid (the
positive class), more a softmax; a *multi-label* set (a table with a ``labels`` column: any subset
of the classes per patch) trains a sigmoid per class (head ``multilabel_sigmoid``), balanced per
class (``class_weights``: BCE ``pos_weight`` = negatives / positives of each class; ``bias_init``:
each output's bias at the logit of its class prior), with per-class metrics (AUC-ROC, AUC-PR,
precision / recall / specificity at the default threshold 0.5, a 2 × 2 confusion per class) and
per-class ROC / PR curves. Outputs: ``weights.pt`` (state dict),
``card.json`` (patch_px, µm/px, normalisation, classes, head, dense capability, training summary,
metrics, training prevalence) and ``plots/`` (ROC, precision–recall, confusion matrix). Runs on
CUDA when present, else CPU.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from slidescore.decide import calibration as cal
from slidescore.errors import ConfigError
from slidescore.model.architectures import SmearNet
from slidescore.model.card import ModelCard
from slidescore.offline import plots
from slidescore.offline.datasets import PatchSet, load_patches, positive_class

log = logging.getLogger(__name__)
BALANCES = ("downsample", "class_weights", "bias_init", "none")


@dataclass(frozen=True)
class Augmentation:
    """Hue-keeping augmentation; jitter amplitudes are relative (0.1 = ±10 %)."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.15
    sharpness: float = 0.3

    @classmethod
    def parse(cls, text: str | None) -> Augmentation:
        """``none``, ``default`` or ``key=value,...`` (e.g. ``flips=1,rot90=0,saturation=0.2``)."""
        if text is None or text == "default":
            return cls()
        if text == "none":
            return cls(False, False, 0.0, 0.0, 0.0, 0.0)
        kw: dict[str, Any] = {}
        names = {f.name: f.type for f in dataclasses.fields(cls)}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            if key not in names:
                raise ConfigError(f"--augment: unknown key {key!r}; known keys are {sorted(names)}")
            try:
                kw[key] = value.strip().lower() in ("1", "true", "yes") if names[key] in (bool, "bool") else float(value)
            except ValueError:
                raise ConfigError(f"--augment: {key}={value!r} is not a number") from None
        return cls(**kw)

    def apply(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """(N, 3, P, P) in [0, 1] → augmented copy; every change keeps each pixel's hue."""
        n = x.shape[0]

        def u(amp: float) -> torch.Tensor:
            return (torch.rand(n, 1, 1, 1, generator=gen, device=x.device) * 2 - 1) * amp

        if self.rot90 or self.flips:
            out = torch.empty_like(x)
            ks = torch.randint(0, 4 if self.rot90 else 1, (n,), generator=gen, device="cpu")
            fl = torch.randint(0, 2 if self.flips else 1, (n,), generator=gen, device="cpu")
            for k in range(4):  # one call per (turn, flip) group, not per patch
                for f in range(2):
                    idx = torch.nonzero((ks == k) & (fl == f)).flatten().to(x.device)
                    if len(idx):
                        xi = torch.rot90(x[idx], k, (2, 3))
                        out[idx] = torch.flip(xi, (3,)) if f else xi
            x = out
        if self.brightness:
            x = x * (1 + u(self.brightness))
        if self.contrast:
            m = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - m) * (1 + u(self.contrast)) + m
        if self.saturation:  # towards/away from the pixel's grey: hue unchanged
            g = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
            x = g + (x - g) * (1 + u(self.saturation))
        if self.sharpness:  # unsharp mask / blur, the same for every channel
            blur = nn.functional.avg_pool2d(nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
            x = x + u(self.sharpness) * (x - blur)
        return x.clamp(0, 1)


@dataclass(frozen=True)
class TrainOptions:
    epochs: int = 20
    patience: int = 3
    batch_size: int = 64
    lr: float = 2e-3
    width: int = 32
    balance: str = "bias_init"
    val_frac: float = 0.2
    seed: int = 0
    augmentation: Augmentation = dataclasses.field(default_factory=Augmentation)
    device: str = "auto"
    positive: str | None = None
    name: str | None = None
    pad_value: int = 255
    progress: bool = True


# -- splitting and balancing --------------------------------------------------------------------
def split_by_group(groups: np.ndarray, labels: np.ndarray, val_frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train / val masks; whole source images go to one split, every class in both if possible."""
    if not 0 < val_frac < 1:
        raise ConfigError(f"--val-frac: expected a fraction in (0, 1), got {val_frac}")
    uniq = np.unique(groups)
    labels = np.asarray(labels)

    def has(c: Any, sel: np.ndarray) -> bool:  # class c among the patches of sel (multi-label: any carries it)
        return bool(labels[sel, c].any()) if labels.ndim == 2 else bool((labels[sel] == c).any())

    if len(uniq) < 2:
        raise ConfigError(f"all {len(groups)} patches come from one source image ({uniq[0]!r}); a split by source image "
                          "needs at least two (check --group-regex)")
    rng = np.random.default_rng([seed, 5])
    order = list(rng.permutation(uniq))
    n_target = val_frac * len(groups)
    val_groups: set[Any] = set()
    n_val = 0
    classes = np.arange(labels.shape[1]) if labels.ndim == 2 else np.unique(labels)
    # first one group per class into val (so val has every class), then fill up to val_frac
    for c in classes:
        if any(has(c, groups == g) for g in val_groups):
            continue
        for g in order:
            if g not in val_groups and has(c, groups == g):
                val_groups.add(g)
                n_val += int((groups == g).sum())
                break
    for g in order:
        if n_val >= n_target:
            break
        n_g = int((groups == g).sum())
        # a group joins when it brings validation nearer its target (not past it by more than it lacks)
        if g not in val_groups and len(val_groups) < len(uniq) - 1 and n_val + n_g - n_target < n_target - n_val:
            val_groups.add(g)
            n_val += n_g
    val = np.isin(groups, list(val_groups))
    train = ~val
    missing = [int(c) for c in classes if not has(c, train)]
    if missing or not train.any():
        raise ConfigError("cannot split by source image so that training and validation both have every class; "
                          "add source images of the rarer classes or lower --val-frac")
    return train, val


def balance_indices(labels: np.ndarray, balance: str, rng: np.random.Generator) -> np.ndarray:
    if balance not in BALANCES:
        raise ConfigError(f"--balance: expected one of {list(BALANCES)}, got {balance!r}")
    idx = np.arange(len(labels))
    if balance != "downsample":
        return idx
    if labels.ndim == 2:
        raise ConfigError("--balance downsample: a multi-label set cannot be downsampled per class (a patch carries "
                          "several); use class_weights (pos_weight per class) or bias_init")
    counts = np.bincount(labels)
    m = counts[counts > 0].min()
    keep = [rng.choice(idx[labels == c], size=m, replace=False) for c in np.unique(labels)]
    return np.sort(np.concatenate(keep))


# -- model helpers ------------------------------------------------------------------------------
def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def forward_logits(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, K) logits; a larger-than-1×1 logit map is averaged, as the per-patch scorer does."""
    z = module(x)
    return z.flatten(2).mean(-1) if z.ndim == 4 else z


@torch.no_grad()
def predict_logits(module: nn.Module, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                   device: torch.device, batch_size: int = 256) -> np.ndarray:
    """(N, P, P, 3) uint8 → (N, K) float64 logits, normalised as the card says."""
    module.eval()
    m = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    out = []
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size].transpose(0, 3, 1, 2))).to(device)
        out.append(forward_logits(module, (x.float() / 255.0 - m) / s).double().cpu().numpy())
    return np.concatenate(out) if out else np.empty((0, 0))


def targets_for(ps: PatchSet, head: str, pos_index: int) -> np.ndarray:
    """Binary: (N, 1) 0/1 for the positive class; multi-label: (N, K) 0/1; softmax: (N,) class indices."""
    if head == "multilabel_sigmoid":
        return ps.onehot()
    if head == "binary_sigmoid":
        return (ps.labels == pos_index).astype(np.float64)[:, None]
    return ps.labels.astype(np.int64)


def probabilities(logits: np.ndarray, head: str) -> np.ndarray:
    if head == "softmax":
        z = logits - logits.max(1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(1, keepdims=True)
    return cal.sigmoid(logits)


def evaluate(probs: np.ndarray, targets: np.ndarray, head: str, classes: tuple[str, ...]) -> dict[str, Any]:
    """Per class AUC-ROC, AUC-PR and the confusion matrix (threshold 0.5, or argmax for softmax)."""
    out: dict[str, Any] = {"per_class": {}}
    for i, c in enumerate(classes):
        y = targets[:, i] > 0.5 if head != "softmax" else targets == i
        out["per_class"][c] = {"auc_roc": round(cal.auc_roc(probs[:, i], y), 6),
                               "auc_pr": round(cal.average_precision(probs[:, i], y), 6),
                               "n_pos": int(y.sum()), "n_neg": int((~y).sum())}
    if head == "softmax":
        pred = probs.argmax(1)
        k = len(classes)
        out["confusion"] = np.bincount(targets * k + pred, minlength=k * k).reshape(k, k).tolist()
        out["confusion_labels"] = list(classes)
        out["accuracy"] = float((pred == targets).mean())
    elif head == "multilabel_sigmoid":  # per class at the default threshold 0.5
        for i, c in enumerate(classes):
            y, p = targets[:, i] > 0.5, probs[:, i] >= 0.5
            tp, fp, fn = int((y & p).sum()), int((~y & p).sum()), int((y & ~p).sum())
            out["per_class"][c].update(precision=round(tp / max(1, tp + fp), 6), recall=round(tp / max(1, tp + fn), 6),
                                       specificity=round(int((~y & ~p).sum()) / max(1, int((~y).sum())), 6),
                                       confusion=[[int((~y & ~p).sum()), fp], [fn, tp]])
        out["confusion"] = [[m["confusion"][0][0], m["confusion"][0][1], m["confusion"][1][0], m["confusion"][1][1]]
                            for m in out["per_class"].values()]
        out["confusion_labels"] = list(classes)
        out["confusion_columns"] = ["TN", "FP", "FN", "TP"]
        out["accuracy"] = float(((targets > 0.5) == (probs >= 0.5)).mean())  # per class and patch
        out["exact_match"] = float(((targets > 0.5) == (probs >= 0.5)).all(axis=1).mean())
    else:
        y, p = targets[:, 0] > 0.5, probs[:, 0] >= 0.5
        out["confusion"] = [[int((~y & ~p).sum()), int((~y & p).sum())], [int((y & ~p).sum()), int((y & p).sum())]]
        out["confusion_labels"] = [f"not {classes[0]}", classes[0]]
        out["accuracy"] = float((y == p).mean())
    return out


def write_plots(folder: Path, probs: np.ndarray, targets: np.ndarray, head: str, classes: tuple[str, ...],
                metrics: dict[str, Any], tag: str = "validation") -> list[str]:
    roc_s, pr_s = [], []
    for i, c in enumerate(classes):
        y = targets[:, i] > 0.5 if head != "softmax" else targets == i
        r = cal.roc_points(probs[:, i], y)
        if r["n_pos"] == 0 or r["n_neg"] == 0:
            continue
        tpr, fpr = r["tp"] / r["n_pos"], r["fp"] / r["n_neg"]
        prec = r["tp"] / (r["tp"] + r["fp"])
        m = metrics["per_class"][c]
        roc_s.append((f"{c} (AUC {m['auc_roc']:.3f})", np.r_[0, fpr], np.r_[0, tpr]))
        pr_s.append((f"{c} (AP {m['auc_pr']:.3f})", np.r_[0, tpr], np.r_[1, prec]))
    files = [plots.line_plot(folder / "roc.png", roc_s, f"ROC ({tag})", "false positive rate", "true positive rate", diagonal=True),
             plots.line_plot(folder / "pr.png", pr_s, f"precision-recall ({tag})", "recall", "precision"),
             plots.confusion_plot(folder / "confusion.png", np.asarray(metrics["confusion"]), metrics["confusion_labels"],
                                  f"confusion ({tag})", columns=metrics.get("confusion_columns"))]
    return [str(f.relative_to(folder.parent)) for f in files]


def channel_stats(images: np.ndarray, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of (N, P, P, 3) uint8 patches, scaled to [0, 1], in chunks (bounded memory)."""
    s = np.zeros(3)
    s2 = np.zeros(3)
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].reshape(-1, 3).astype(np.float64) / 255.0
        s += x.sum(0)
        s2 += (x * x).sum(0)
    n = max(1, images.shape[0] * images.shape[1] * images.shape[2])
    m = s / n
    sd = np.sqrt(np.maximum(s2 / n - m * m, 0))
    return tuple(round(float(v), 6) for v in m), tuple(round(float(max(v, 1e-3)), 6) for v in sd)


# -- training -----------------------------------------------------------------------------------
# Long on purpose: the training loop, its evaluation and the card it writes read as one procedure (offline, not runtime).
def train_model(data: PatchSet, out: Path, opts: TrainOptions) -> ModelCard:
    """Train on ``data`` and write the model package to ``out``; returns its card."""
    t0 = time.time()
    size = int(data.images.shape[1])
    if size < SmearNet.patch_px:
        raise ConfigError(f"patches are {size} px; the built-in SmearNet needs at least {SmearNet.patch_px} px — pass "
                          f"--resize {SmearNet.patch_px}")
    if data.mpp is None:
        raise ConfigError(f"training data {data.source}: µm/px unknown; pass --mpp (the resolution the patches were "
                          "cut at), so the scorer reads slides at the same resolution")
    counts = np.asarray(list(data.counts().values()))
    if (counts == 0).any() or (len(counts) < 2 and not data.multilabel) or (data.multilabel and (counts == len(data)).any()):
        raise ConfigError(f"training data {data.source}: class counts {data.counts()} of {len(data)} patches; every class "
                          "needs patches" + (" with it and without it (multi-label)" if data.multilabel else ""))
    classes: tuple[str, ...]
    if data.multilabel:
        head, pos, classes = "multilabel_sigmoid", -1, data.class_names
    elif len(data.class_names) == 2:
        head, pos = "binary_sigmoid", positive_class(data.class_names, opts.positive)
        classes = (data.class_names[pos],)
    else:
        head, pos, classes = "softmax", -1, data.class_names
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng([opts.seed, 9])
    gen = torch.Generator().manual_seed(opts.seed)
    device = pick_device(opts.device)

    train_mask, val_mask = split_by_group(data.groups, data.labels, opts.val_frac, opts.seed)
    tr_all, va = data.subset(np.nonzero(train_mask)[0]), data.subset(np.nonzero(val_mask)[0])
    tr = tr_all.subset(balance_indices(tr_all.labels, opts.balance, rng))
    y_tr, y_va = targets_for(tr, head, pos), targets_for(va, head, pos)
    # what the trained model's outputs assume as prior: the class frequencies it effectively saw
    sigmoid = head != "softmax"  # one independent sigmoid per output (binary, multi-label)
    if sigmoid:
        natural = y_tr.mean(axis=0).astype(np.float64)
    else:
        natural = np.bincount(y_tr, minlength=len(classes)) / len(y_tr)
    if sigmoid and not ((natural > 0) & (natural < 1)).all():
        raise ConfigError(f"training data {data.source}: after the split, training positives per class are "
                          f"{dict(zip(classes, np.round(natural * len(y_tr)).astype(int).tolist(), strict=True))} of "
                          f"{len(y_tr)}; every class needs positive and negative training patches")
    effective = np.full_like(natural, 0.5 if sigmoid else 1 / len(classes)) \
        if opts.balance in ("downsample", "class_weights") else natural
    mean, std = channel_stats(tr.images)

    n_out = len(classes)
    model = SmearNet(n_outputs=n_out, width=opts.width).to(device)
    if opts.balance == "bias_init":
        bias = model.head.bias
        with torch.no_grad():
            if bias is None:
                raise ConfigError("--balance bias_init: the network's head has no bias")
            if sigmoid:  # each output starts at its class prior
                bias.copy_(torch.from_numpy(cal.logit(natural)).float())
            else:
                bias.copy_(torch.from_numpy(np.log(np.maximum(natural, 1e-6))).float())
    if sigmoid:  # pos_weight per class: negatives / positives (1: no reweighting)
        w_pos = torch.tensor((1 - natural) / natural if opts.balance == "class_weights" else np.ones_like(natural),
                             dtype=torch.float32, device=device)
        class_w = None
    else:
        w_pos = torch.ones(1, device=device)
        class_w = torch.tensor(1.0 / np.maximum(natural * len(classes), 1e-6), dtype=torch.float32, device=device) \
            if opts.balance == "class_weights" else None

    def loss_of(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if sigmoid:
            w = 1 + (w_pos - 1) * y
            return (nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none") * w).sum() / w.sum()
        return nn.functional.cross_entropy(logits, y, weight=class_w)

    m_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    s_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    opt = torch.optim.Adam(model.parameters(), lr=opts.lr)
    x_tr = torch.from_numpy(np.ascontiguousarray(tr.images.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y_tr).float() if sigmoid else torch.from_numpy(y_tr)
    yv = torch.from_numpy(y_va).float() if sigmoid else torch.from_numpy(y_va)
    best = (float("inf"), -1, {k: v.detach().clone() for k, v in model.state_dict().items()})
    history: list[dict[str, float]] = []
    bar = None
    if opts.progress:
        from tqdm import tqdm

        bar = tqdm(total=opts.epochs, unit="epoch", desc=f"training on {len(tr)} patches", leave=False, dynamic_ncols=True)
    stale = 0
    for epoch in range(opts.epochs):
        model.train()
        perm = torch.randperm(len(tr), generator=gen)
        total = 0.0
        for i in range(0, len(tr), opts.batch_size):
            b = perm[i : i + opts.batch_size]
            if len(b) < 2:  # batch norm needs two samples
                continue
            x = opts.augmentation.apply(x_tr[b].to(device).float() / 255.0, gen)
            loss = loss_of(forward_logits(model, (x - m_t) / s_t), yt[b].to(device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(b)
        lv = predict_logits(model, va.images, mean, std, device)
        val_loss = float(loss_of(torch.from_numpy(lv).float().to(device), yv.to(device)))
        history.append({"epoch": epoch + 1, "train_loss": round(total / len(tr), 6), "val_loss": round(val_loss, 6)})
        if bar is not None:
            bar.update(1)
            bar.set_postfix(train_loss=f"{total / len(tr):.4f}", val_loss=f"{val_loss:.4f}", refresh=False)
        if val_loss < best[0] - 1e-6:
            best, stale = (val_loss, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()}), 0
        else:
            stale += 1
            if stale >= opts.patience:
                break
    if bar is not None:
        bar.close()
    model.load_state_dict(best[2])

    logits = predict_logits(model, va.images, mean, std, device)
    probs = probabilities(logits, head)
    metrics = evaluate(probs, y_va, head, classes)
    metrics["val_loss"] = round(best[0], 6)
    out.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(out / "plots", probs, y_va, head, classes, metrics)
    with torch.no_grad():
        dense = size == SmearNet.patch_px and tuple(model(torch.zeros(1, 3, size, size, device=device)).shape[2:]) == (1, 1)
    card = ModelCard(
        name=opts.name or out.name, patch_px=size, mpp=float(data.mpp), classes=classes, head=head,
        thresholds=(0.5,) * len(classes), color_space="RGB", mean=mean, std=std, architecture="smearnet",
        arch_kwargs={"n_outputs": n_out, "width": opts.width}, dense=dense, network_stride_px=SmearNet.stride_px,
        pad_value=opts.pad_value, version="1",
        description=f"SmearNet trained by slidescore train on {data.source}",
        training={
            "command": "slidescore train", "source": data.source, "seed": opts.seed,
            "class_names": list(data.class_names), "positive_class": classes[0] if head == "binary_sigmoid" else None,
            "patches": {"train": tr_all.counts(), "train_used": tr.counts(), "val": va.counts()},
            "source_images": {"train": int(len(np.unique(tr.groups))), "val": int(len(np.unique(va.groups)))},
            "split": "by source image", "val_frac": opts.val_frac, "balance": opts.balance,
            "natural_prevalence": [round(float(v), 6) for v in natural],
            "augmentation": dataclasses.asdict(opts.augmentation),
            "epochs_run": len(history), "best_epoch": best[1], "patience": opts.patience, "batch_size": opts.batch_size,
            "lr": opts.lr, "history": history, "device": str(device), "torch": torch.__version__,
            "time_s": round(time.time() - t0, 1), "plots": plot_files,
        },
        metrics={"validation": metrics},
        training_prevalence=tuple(round(float(v), 6) for v in effective),
    )
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, out / "weights.pt")
    (out / "card.json").write_text(json.dumps(card.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return card


def run_train(source: str, out: str, opts: TrainOptions, *, mpp: float | None = None, resize: int | None = None,
              group_regex: str | None = None, synthetic_smears: int = 4, synthetic_size_px: int = 1536,
              patch_px: int = 64) -> ModelCard:
    """Load the data named by ``source`` and train (the CLI entry point)."""
    from slidescore.offline.datasets import DEFAULT_GROUP_REGEX

    data = load_patches(source, patch_px=patch_px, mpp=mpp, resize=resize, group_regex=group_regex or DEFAULT_GROUP_REGEX,
                        seed=opts.seed, synthetic_smears=synthetic_smears, synthetic_size_px=synthetic_size_px,
                        pad_value=opts.pad_value)
    if data.mpp is None and mpp is not None:
        data.mpp = mpp
    if data.source.startswith("synthetic") and opts.pad_value == 255:
        opts = dataclasses.replace(opts, pad_value=235)
    return train_model(data, Path(out), opts)
