"""Labelled patch sets for training and calibration, from three sources.

* a folder of patches, one subfolder per class (``train/parasitized``, ``train/uninfected``);
  PNG/JPEG/BMP/TIFF read with Pillow; the source image of a patch comes from its file name
  (``--group-regex``, default: the part before ``_cell_``, as in public cell-image sets) so that
  no image is split between training and validation;
* an annotation table (CSV, or Parquet when pyarrow is installed) with columns ``image`` (URI),
  ``y``, ``x``, ``h``, ``w`` (level-0 box) and ``label``; a ``patch_px`` patch at the model's
  µm/px is read around each box centre with slidescore's own readers (``open_image``). With a
  ``labels`` column instead (``Fish;Sugar``: any subset of the classes, ``;``-separated, empty for
  none) the set is *multi-label*: each patch carries a 0/1 target per class. A table without box
  columns lists patch files (``image``, ``label``/``labels``, optional ``group``: the source image,
  so that no image is split between training and validation), read whole with Pillow — the way to
  give multi-label patches that a folder per class cannot;
* the synthetic smear generator (``synthetic[:SEED]``), labelled by the built-in model's rule.

Bad data (missing folder, one class, an empty class, mixed patch sizes, unreadable files, a
table without the needed columns) raises :class:`~slidescore.errors.ConfigError` naming the
problem and the fix.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from slidescore.errors import ConfigError, SlideScoreError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IGNORED_FILES = ("thumbs.db", ".ds_store", "desktop.ini")
NEGATIVE_NAMES = ("uninfected", "negative", "normal", "background", "benign", "healthy", "other", "none")
DEFAULT_GROUP_REGEX = r"^(.*?)_cell_\d+$"


@dataclass
class PatchSet:
    """Patches (N, P, P, 3) uint8 RGB, their labels, source image per patch.

    ``labels`` is (N,) class indices (single-label: one class per patch) or (N, K) 0/1 (multi-label:
    any subset of the K classes per patch, none included).
    """

    images: np.ndarray
    labels: np.ndarray
    groups: np.ndarray
    class_names: tuple[str, ...]
    mpp: float | None
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def subset(self, idx: np.ndarray) -> PatchSet:
        return PatchSet(self.images[idx], self.labels[idx], self.groups[idx], self.class_names, self.mpp, self.source)

    def counts(self) -> dict[str, int]:
        """Patches per class (multi-label: patches carrying the class; a patch may count for several)."""
        if self.multilabel:
            return {c: int(self.labels[:, i].sum()) for i, c in enumerate(self.class_names)}
        return {c: int((self.labels == i).sum()) for i, c in enumerate(self.class_names)}

    def onehot(self) -> np.ndarray:
        """(N, K) 0/1 targets per class, for either kind of labels."""
        if self.multilabel:
            return self.labels.astype(np.float64)
        return (self.labels[:, None] == np.arange(len(self.class_names))[None]).astype(np.float64)


def load_patches(source: str, *, patch_px: int | None = None, mpp: float | None = None, resize: int | None = None,
                 group_regex: str = DEFAULT_GROUP_REGEX, seed: int = 0, synthetic_smears: int = 4,
                 synthetic_size_px: int = 1536, pad_value: int = 255) -> PatchSet:
    """Dispatch on the source: ``synthetic[:SEED]``, a .csv/.parquet table, or a class folder."""
    if source == "synthetic" or source.startswith("synthetic:"):
        s = source.partition(":")[2]
        try:
            sseed = int(s) if s else seed
        except ValueError:
            raise ConfigError(f"training data {source!r}: expected synthetic or synthetic:SEED (an integer)") from None
        return load_synthetic(sseed, n_smears=synthetic_smears, size_px=synthetic_size_px)
    p = Path(source)
    if p.suffix.lower() in (".csv", ".parquet", ".pq"):
        return load_table(p, patch_px=patch_px or 64, mpp=mpp, pad_value=pad_value)
    return load_folder(p, resize=resize, group_regex=group_regex, mpp=mpp)


# -- folders ------------------------------------------------------------------------------------
def load_folder(root: Path, *, resize: int | None = None, group_regex: str = DEFAULT_GROUP_REGEX,
                mpp: float | None = None) -> PatchSet:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise ConfigError(f"training data {str(root)!r}: no such folder; expected a folder with one subfolder of "
                          "patches per class (e.g. train/parasitized, train/uninfected), a .csv/.parquet table, or synthetic")
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(class_dirs) < 2:
        found = [d.name for d in class_dirs]
        raise ConfigError(f"training data {str(root)!r}: found {len(class_dirs)} class subfolder(s) {found}; expected at "
                          "least two (one per class, e.g. parasitized/ and uninfected/)")
    pattern = re.compile(group_regex)
    images: list[np.ndarray] = []
    labels: list[int] = []
    groups: list[str] = []
    sizes: dict[tuple[int, int], str] = {}
    for ci, d in enumerate(class_dirs):
        files = sorted(f for f in d.iterdir() if f.is_file() and f.name.lower() not in IGNORED_FILES
                       and not f.name.startswith("."))
        files = [f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
        if not files:
            raise ConfigError(f"training data {str(root)!r}: class folder {d.name!r} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)}); add patches or remove the folder")
        for f in files:
            try:
                with Image.open(f) as im:
                    arr = np.asarray(im.convert("RGB").resize((resize, resize), Image.Resampling.BILINEAR)
                                     if resize else im.convert("RGB"))
            except (UnidentifiedImageError, OSError, ValueError) as e:
                raise ConfigError(f"training data: {str(f)!r} cannot be read as an image ({type(e).__name__}: {e}); "
                                  "replace or delete the file") from None
            sizes.setdefault(arr.shape[:2], str(f))
            if len(sizes) > 1:
                listed = "; ".join(f"{h}×{w} px e.g. {ex}" for (h, w), ex in sizes.items())
                raise ConfigError(f"training data {str(root)!r}: patches have mixed sizes ({listed}); expected one square "
                                  "size — pass --resize PX to resize every patch")
            images.append(arr)
            labels.append(ci)
            m = pattern.match(f.stem)
            groups.append(f"{d.name}/{f.stem}" if m is None else (m.group(1) if m.groups() else m.group(0)))
    h, w = images[0].shape[:2]
    if h != w:
        raise ConfigError(f"training data {str(root)!r}: patches are {h}×{w} px; expected square patches — pass --resize PX")
    return PatchSet(np.stack(images), np.asarray(labels), np.asarray(groups), tuple(d.name for d in class_dirs), mpp,
                    f"folder:{root}")


# -- annotation tables -----------------------------------------------------------------------
def read_table(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise ConfigError(f"annotation table {str(path)!r}: no such file")
    if path.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError(f"annotation table {str(path)!r}: reading Parquet needs pyarrow (pip install pyarrow); "
                              "or save the table as CSV") from None
        return list(pq.read_table(str(path)).to_pylist())
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load_table(path: Path, *, patch_px: int = 64, mpp: float | None = None, pad_value: int = 255,
               mpp_tolerance: float = 0.1) -> PatchSet:
    """Patches of ``patch_px`` at ``mpp`` (default: level 0) centred on each row's box."""
    from slidescore.core.tiling import choose_level
    from slidescore.core.types import Box
    from slidescore.io import open_image, read_padded

    rows = read_table(path)
    if not rows:
        raise ConfigError(f"annotation table {str(path)!r}: no rows")
    cols = set(rows[0])
    img_col = next((c for c in ("image", "uri", "file") if c in cols), None)
    label_col = "labels" if "labels" in cols else "label"
    boxes = any(c in cols for c in ("y", "x", "h", "w"))
    need = ("y", "x", "h", "w", label_col) if boxes else (label_col,)
    missing = [c for c in need if c not in cols] + ([] if img_col else ["image"])
    if missing:
        raise ConfigError(f"annotation table {str(path)!r}: missing columns {missing}; expected image (URI), y, x, h, w "
                          "(level-0 box) and label (one class) or labels (classes separated by ';'), or image and "
                          f"label/labels alone for a table of patch files; found {sorted(cols)}")
    img_col = img_col or "image"
    class_names, labels = table_labels(rows, label_col, str(path))
    if not boxes:
        return _load_patch_files(path, rows, img_col, labels, class_names, mpp)
    by_image: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_image.setdefault(str(r[img_col]), []).append(i)
    out = np.empty((len(rows), patch_px, patch_px, 3), np.uint8)
    model_mpp = mpp
    for uri, idx in by_image.items():
        uri_path = uri if "://" in uri or Path(uri).is_absolute() else str(path.parent / uri)
        try:
            reader = open_image(uri_path)
        except SlideScoreError as e:
            raise ConfigError(f"annotation table {str(path)!r}: image {uri!r}: {e}") from None
        try:
            level, ds = 0, 1.0
            if mpp is not None:
                if reader.mpp is None:
                    raise ConfigError(f"annotation table {str(path)!r}: image {uri!r} has no µm/px metadata, so a level "
                                      f"at --mpp {mpp} cannot be chosen; drop --mpp to read level 0")
                mpps = [reader.mpp * lv.downsample for lv in reader.levels]
                level, scale = choose_level(mpps, mpp, mpp_tolerance)
                if scale != 1.0:
                    raise ConfigError(f"annotation table {str(path)!r}: image {uri!r} has no level within "
                                      f"{mpp_tolerance:.0%} of {mpp} µm/px (levels {[round(m, 3) for m in mpps]})")
                ds = reader.levels[level].downsample
            elif model_mpp is None and reader.mpp is not None:
                model_mpp = reader.mpp
            for i in idx:
                r = rows[i]
                try:
                    y, x, h, w = (float(r[k]) for k in ("y", "x", "h", "w"))
                except (TypeError, ValueError):
                    raise ConfigError(f"annotation table {str(path)!r}, row {i + 1}: box y, x, h, w must be numbers, "
                                      f"got {[r[k] for k in ('y', 'x', 'h', 'w')]}") from None
                cy, cx = (y + h / 2) / ds, (x + w / 2) / ds
                box = Box(int(round(cy - patch_px / 2)), int(round(cx - patch_px / 2)), patch_px, patch_px)
                pix = read_padded(reader, level, box, pad_value)
                if pix.dtype != np.uint8:
                    raise ConfigError(f"annotation table {str(path)!r}: image {uri!r} is {pix.dtype}; expected 8-bit RGB")
                out[i] = np.repeat(pix, 3, axis=2) if pix.shape[2] == 1 else pix[..., :3]
        finally:
            reader.close()
    groups = np.asarray([str(r[img_col]) for r in rows])
    return PatchSet(out, labels, groups, class_names, model_mpp, f"table:{path}")


def split_labels(value: Any) -> list[str]:
    """``"Fish;Sugar"`` → ``["Fish", "Sugar"]``; empty (or missing) → no class."""
    return [t.strip() for t in str(value or "").split(";") if t.strip()]


def table_labels(rows: list[dict[str, Any]], label_col: str, where: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Class names (sorted) and labels: (N,) indices for ``label``, (N, K) 0/1 for ``labels`` (multi-label)."""
    if label_col == "label":
        class_names = tuple(sorted({str(r["label"]) for r in rows}))
        if len(class_names) < 2:
            raise ConfigError(f"annotation table {where!r}: one label {list(class_names)}; expected at least two classes")
        return class_names, np.asarray([class_names.index(str(r["label"])) for r in rows])
    sets = [split_labels(r["labels"]) for r in rows]
    class_names = tuple(sorted({c for s in sets for c in s}))
    if not class_names:
        raise ConfigError(f"annotation table {where!r}: the labels column names no class; expected class names "
                          "separated by ';' (e.g. Fish;Sugar), empty for a patch of none")
    multi = np.zeros((len(rows), len(class_names)), np.uint8)
    for i, s in enumerate(sets):
        multi[i, [class_names.index(c) for c in s]] = 1
    return class_names, multi


def _load_patch_files(path: Path, rows: list[dict[str, Any]], img_col: str, labels: np.ndarray,
                      class_names: tuple[str, ...], mpp: float | None) -> PatchSet:
    """Rows naming whole patch files (relative to the table's folder), read with Pillow."""
    from PIL import Image, UnidentifiedImageError

    images = []
    for i, r in enumerate(rows):
        f = Path(str(r[img_col]))
        f = f if f.is_absolute() else path.parent / f
        try:
            with Image.open(f) as im:
                images.append(np.asarray(im.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ConfigError(f"annotation table {str(path)!r}, row {i + 1}: patch file {str(f)!r} cannot be read as an "
                              f"image ({type(e).__name__}: {e}); fix the path or the file") from None
        if images[-1].shape != images[0].shape or images[-1].shape[0] != images[-1].shape[1]:
            raise ConfigError(f"annotation table {str(path)!r}, row {i + 1}: patch {str(f)!r} is "
                              f"{images[-1].shape[0]}×{images[-1].shape[1]} px, the first is {images[0].shape[0]}×"
                              f"{images[0].shape[1]} px; expected square patches of one size")
    # the source image of each patch (no image in two splits): a group column, else each file alone
    groups = np.asarray([str(r["group"]) if "group" in r else Path(str(r[img_col])).stem for r in rows])
    return PatchSet(np.stack(images), labels, groups, class_names, mpp, f"table:{path}")


# -- synthetic smears -------------------------------------------------------------------------
def load_synthetic(seed: int, *, n_smears: int = 4, size_px: int = 1536, neg_per_pos: float = 3.0) -> PatchSet:
    """64-px patches at 0.5 µm/px from generated smears, labelled like the built-in model.

    Positive: a chromatin-dot centre >= 4 px inside the patch; negative: none within the patch grown
    by 4 px (ambiguous patches are left out). All positives of the 16-px grid are kept and
    ``neg_per_pos`` times as many negatives drawn at random; each smear is one source image.
    """
    from slidescore.offline import synthetic as syn
    from slidescore.offline.train_builtin import cut_patches, grid_labels, inner_origins, make_smear

    rng = np.random.default_rng([seed, 3])
    images: list[np.ndarray] = []
    labels: list[int] = []
    groups: list[str] = []
    for i in range(n_smears):
        spec = syn.SmearSpec(size_px, size_px, seed=seed * 1000 + 500 + i, parasitemia=float(rng.uniform(0.02, 0.04)),
                             min_parasite_distance_um=30.0)
        sm = make_smear(spec)
        img = sm.images[int(rng.integers(2))]
        gy, gx = inner_origins(sm)
        positive, usable = grid_labels(sm, gy, gx)
        py, px = np.nonzero(positive)
        ny, nx = np.nonzero(usable & ~positive)
        take = rng.choice(len(ny), size=min(len(ny), max(1, int(neg_per_pos * max(len(py), 1)))), replace=False)
        for yy, xx, lab in [(py, px, 1), (ny[take], nx[take], 0)]:
            if len(yy):
                images.extend(cut_patches(img, gy[yy], gx[xx]))
                labels.extend([lab] * len(yy))
                groups.extend([f"smear{spec.seed}"] * len(yy))
    return PatchSet(np.stack(images), np.asarray(labels), np.asarray(groups), ("uninfected", "parasitized"), 0.5,
                    f"synthetic:{seed}")


def positive_class(class_names: tuple[str, ...], positive: str | None) -> int:
    """Index of the positive class of a two-class set (given, or the one not named like a negative)."""
    if positive is not None:
        if positive not in class_names:
            raise ConfigError(f"--positive {positive!r}: not a class of the data; classes are {list(class_names)}")
        return class_names.index(positive)
    neg = [i for i, c in enumerate(class_names) if c.lower() in NEGATIVE_NAMES]
    if len(neg) == 1:
        return 1 - neg[0]
    raise ConfigError(f"two classes {list(class_names)}: cannot tell which is the positive one; pass --positive NAME")
