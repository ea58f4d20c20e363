"""PNG figures of training and calibration: ROC, precision–recall, confusion matrix, reliability.

Drawn with matplotlib (Agg backend) when it is installed, otherwise with Pillow line drawing (a
hard dependency), so ``slidescore train`` and ``calibrate`` always leave their figures behind.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

Series = tuple[str, np.ndarray, np.ndarray]  # label, x, y


def _have_matplotlib() -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        return True
    except ImportError:
        return False


def line_plot(path: Path, series: list[Series], title: str, xlabel: str, ylabel: str, *, diagonal: bool = False) -> Path:
    """Curves on the unit square, e.g. ROC (``diagonal``: the chance line) or PR."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if _have_matplotlib():
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4.5, 4.5), dpi=100)
        for label, x, y in series:
            ax.plot(x, y, label=label, lw=1.5)
        if diagonal:
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
        ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel=xlabel, ylabel=ylabel, title=title)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    size, m = 420, 40
    img = Image.new("RGB", (size, size), "white")
    d = ImageDraw.Draw(img)
    span = size - 2 * m

    def xy(x: np.ndarray, y: np.ndarray) -> list[tuple[float, float]]:
        return [(m + float(a) * span, size - m - float(b) * span) for a, b in zip(x, y, strict=True)]

    d.rectangle([m, m, size - m, size - m], outline="black")
    if diagonal:
        d.line(xy(np.array([0, 1]), np.array([0, 1])), fill="grey")
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]
    for i, (label, x, y) in enumerate(series):
        pts = xy(np.asarray(x), np.asarray(y))
        if len(pts) > 1:
            d.line(pts, fill=colors[i % len(colors)], width=2)
        d.text((m + 4, m + 4 + 12 * i), label, fill=colors[i % len(colors)])
    d.text((m, 8), title, fill="black")
    d.text((size // 2 - 30, size - m + 12), xlabel, fill="black")
    d.text((4, m - 16), ylabel, fill="black")
    img.save(path)
    return path


def confusion_plot(path: Path, matrix: np.ndarray, labels: list[str], title: str, *,
                   columns: list[str] | None = None) -> Path:
    """Counts of (true row, predicted column); with ``columns`` a table of counts per row (e.g. a
    multi-label model's TN, FP, FN, TP per class), each column shaded on its own scale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    matrix = np.asarray(matrix)
    cols = columns or labels
    if columns is not None:  # columns of different kinds: shade each against its own maximum
        shade = matrix / np.maximum(matrix.max(axis=0, keepdims=True), 1)
    else:
        shade = matrix / max(1, int(matrix.max()))
    if _have_matplotlib():
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(labels), 1.4 + 1.1 * len(labels)), dpi=100)
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=1)
        for (i, j), v in np.ndenumerate(matrix):
            ax.text(j, i, str(int(v)), ha="center", va="center", color="white" if shade[i, j] > 0.5 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        ax.set(xlabel="predicted" if columns is None else "at threshold 0.5", ylabel="true" if columns is None else "class",
               title=title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return path
    cell, m = 90, 110
    n = len(labels)
    img = Image.new("RGB", (m + cell * len(cols) + 10, m + cell * n + 10), "white")
    d = ImageDraw.Draw(img)
    for (i, j), v in np.ndenumerate(matrix):
        g = int(255 - 200 * shade[i, j])
        d.rectangle([m + j * cell, m + i * cell, m + (j + 1) * cell, m + (i + 1) * cell], fill=(g, g, 255), outline="black")
        d.text((m + j * cell + cell // 3, m + i * cell + cell // 2 - 6), str(int(v)), fill="black")
    for k, lab in enumerate(cols):
        d.text((m + k * cell + 4, m - 16), lab[:12], fill="black")
    for k, lab in enumerate(labels):
        d.text((4, m + k * cell + cell // 2 - 6), lab[:14], fill="black")
    d.text((4, 8), title if columns is not None else f"{title} (rows: true, columns: predicted)", fill="black")
    img.save(path)
    return path


def reliability_plot(path: Path, before: dict[str, list[float]], after: dict[str, list[float]], ece_before: float,
                     ece_after: float, title: str = "reliability") -> Path:
    """Observed frequency against mean confidence per bin, before and after calibration."""
    def series(r: dict[str, list[float]], label: str) -> Series:
        keep = np.asarray(r["count"]) > 0
        return label, np.asarray(r["confidence"])[keep], np.asarray(r["frequency"])[keep]

    return line_plot(path, [series(before, f"before (ECE {ece_before:.4f})"), series(after, f"after (ECE {ece_after:.4f})")],
                     title, "mean predicted probability", "observed frequency", diagonal=True)
