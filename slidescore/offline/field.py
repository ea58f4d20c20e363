"""Synthetic field scenes: a GeoTIFF of cloud patterns of four kinds over the ocean, with the truth.

A scene is a square image at ``pixel_m`` metres per pixel (default 4096² px at 10 m/px, 41 km a
side) in a projected CRS (UTM 33N, EPSG:32633). Real GeoKeys, ModelPixelScale and ModelTiepoint
tags make it a GeoTIFF that :mod:`slidescore.io.tiff` reads (µm/px from the pixel size, the affine
to map coordinates). The scene's footprint is a rotated rectangle; outside it the pixels are
no-data (0 in every channel), as in an orthorectified satellite or drone scene.

Inside, a dark ocean carries cloud patterns of four kinds (the classes of the cloud-pattern
practice), each planted as irregular blobs a few kilometres across, which may overlap each other:

* ``Fish`` — long wavy bands (wavelength 400 m), skeletal streaks, each pattern at its own angle;
* ``Flower`` — bright round clumps (radius ~140 m) on a jittered 560-m lattice, clear sky between;
* ``Sugar`` — a thin, fine-grained veil (speckle of ~20 m);
* ``Gravel`` — granular cells of ~100–150 m, brighter than Sugar, dark gaps between.

Where patterns overlap their cloud opacities combine as independent layers (1 − Π(1 − a)), so both
textures stay visible. The truth is one instance label image per class (every planted blob is an
instance); :func:`write_field_geotiff` writes the pyramid (level 0 plus 2× area-averaged levels,
deflate, lossless) and the truth beside it (``.truth.json`` with the instances, ``.truth.npz``
with the label images). Everything is seeded: a spec always gives the same pixels.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

FIELD_CLASSES = ("Fish", "Flower", "Sugar", "Gravel")
FIELD_COLORS = ((230, 120, 30), (220, 40, 160), (40, 170, 230), (120, 200, 40))
NODATA = 0
EPSG_UTM33N = 32633


@dataclass(frozen=True)
class FieldSpec:
    """What a scene looks like; every random choice follows from ``seed``."""

    size_px: int = 4096
    pixel_m: float = 10.0
    seed: int = 0
    patterns_per_class: int = 5
    radius_px: tuple[float, float] = (170.0, 330.0)  # level-0 px (1.7–3.3 km at 10 m/px)
    overlap_frac: float = 0.4  # share of the patterns planted overlapping one of another class
    footprint_inset: float = 0.06  # the footprint's margin, as a fraction of the edge
    epsg: int = EPSG_UTM33N
    origin_m: tuple[float, float] = (400_000.0, 5_100_000.0)  # easting, northing of the top-left corner


@dataclass(frozen=True)
class Pattern:
    """One planted pattern: its class, instance id (within the class, from 1), centre and radii (level-0 px)."""

    class_name: str
    instance: int
    center_yx: tuple[float, float]
    radii_px: tuple[float, float]
    angle_deg: float
    area_px: int = 0


@dataclass
class FieldScene:
    spec: FieldSpec
    image: np.ndarray  # (H, W, 3) uint8, level 0
    footprint: np.ndarray  # (H, W) bool: inside the scene (not no-data)
    labels: np.ndarray  # (K, H, W) uint8: instance id of class k's pattern at each pixel, 0 none
    patterns: list[Pattern] = field(default_factory=list)

    @property
    def masks(self) -> np.ndarray:
        """(K, H, W) bool: where each class's patterns lie."""
        return self.labels > 0


# -- geometry ------------------------------------------------------------------------------------
def footprint_mask(size_px: int, angle_deg: float, inset: float) -> np.ndarray:
    """A rectangle rotated by ``angle_deg`` about the centre, as large as fits with ``inset`` margin."""
    n = size_px
    c = (n - 1) / 2
    t = math.radians(angle_deg)
    # half-edges (1.2·b, b), rotated by t, inside [inset·n, (1 − inset)·n]²
    co, si = abs(math.cos(t)), abs(math.sin(t))
    b = (0.5 - inset) * n / max(1.2 * co + si, 1.2 * si + co)
    yy, xx = np.ogrid[:n, :n]
    dy, dx = yy - c, xx - c
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    return (np.abs(u) <= 1.2 * b) & (np.abs(v) <= b)


def _blob(rng: np.random.Generator, p: Pattern, n: int) -> tuple[tuple[slice, slice], np.ndarray]:
    """The pixels of a pattern: an ellipse with a wobbly edge (low-order harmonics of the angle)."""
    cy, cx = p.center_yx
    ry, rx = p.radii_px
    r = max(ry, rx) * 1.35
    y0, y1 = max(0, int(cy - r)), min(n, int(cy + r) + 1)
    x0, x1 = max(0, int(cx - r)), min(n, int(cx + r) + 1)
    yy, xx = np.ogrid[y0:y1, x0:x1]
    t = math.radians(p.angle_deg)
    dy, dx = yy - cy, xx - cx
    u = dx * math.cos(t) + dy * math.sin(t)
    v = -dx * math.sin(t) + dy * math.cos(t)
    phi = np.arctan2(v / ry, u / rx)
    wobble = np.zeros_like(phi)
    for k in (2, 3, 5):
        wobble += rng.uniform(0.03, 0.09) * np.cos(k * phi + rng.uniform(0, 2 * np.pi))
    inside = (u / rx) ** 2 + (v / ry) ** 2 <= (1 + wobble) ** 2
    return (slice(y0, y1), slice(x0, x1)), inside


def plant_patterns(spec: FieldSpec, footprint: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[Pattern]]:
    """Place ``patterns_per_class`` blobs per class inside the footprint; same-class blobs never touch.

    A share ``overlap_frac`` of the patterns is centred on the rim of a pattern of another class, so
    every scene has overlaps. Returns the (K, H, W) instance label images and the patterns.
    """
    n = spec.size_px
    k = len(FIELD_CLASSES)
    labels = np.zeros((k, n, n), np.uint8)
    patterns: list[Pattern] = []
    inside = ndimage.binary_erosion(footprint[::8, ::8], iterations=max(1, int(spec.radius_px[0] / 16)))
    cand = np.argwhere(inside) * 8
    if len(cand) == 0:
        raise ValueError(f"field scene of {n} px: no room for patterns of radius {spec.radius_px[0]} px")
    for ci, name in enumerate(FIELD_CLASSES):
        placed = 0
        for _ in range(200):
            if placed == spec.patterns_per_class:
                break
            ry, rx = (float(rng.uniform(*spec.radius_px)) for _ in range(2))
            others = [p for p in patterns if p.class_name != name]
            if others and rng.random() < spec.overlap_frac:
                o = others[int(rng.integers(len(others)))]
                a = rng.uniform(0, 2 * np.pi)
                d = 0.8 * min(o.radii_px)
                cy, cx = o.center_yx[0] + d * math.sin(a), o.center_yx[1] + d * math.cos(a)
                if not (0 <= cy < n and 0 <= cx < n and inside[int(cy) // 8 % inside.shape[0], int(cx) // 8 % inside.shape[1]]):
                    continue
            else:
                cy, cx = (float(v) for v in cand[int(rng.integers(len(cand)))])
            same = [p for p in patterns if p.class_name == name]
            if any(math.hypot(cy - p.center_yx[0], cx - p.center_yx[1]) < 1.45 * (max(ry, rx) + max(p.radii_px)) for p in same):
                continue
            p = Pattern(name, placed + 1, (cy, cx), (ry, rx), float(rng.uniform(0, 180)))
            box, blob = _blob(rng, p, n)
            blob &= footprint[box]
            if blob.sum() < 0.5 * math.pi * ry * rx:
                continue
            labels[ci][box][blob] = p.instance
            patterns.append(dataclasses.replace(p, area_px=int(blob.sum())))
            placed += 1
    return labels, patterns


# -- textures ------------------------------------------------------------------------------------
def _noise(rng: np.random.Generator, n: int, sigma_px: float) -> np.ndarray:
    """Gaussian noise smoothed at ``sigma_px`` (level-0 px), normalised to unit variance (float32).

    Large scales are made on a coarser grid and zoomed, so a 4096² field costs little."""
    f = max(1, int(sigma_px // 3))
    m = -(-n // f)
    a = ndimage.gaussian_filter(rng.standard_normal((m, m), dtype=np.float32), sigma_px / f, mode="wrap")
    a = (a - a.mean()) / max(float(a.std()), 1e-6)
    return _zoom(a, n) if f > 1 else a


def _zoom(a: np.ndarray, n: int) -> np.ndarray:
    """A float32 map bilinearly resized to n × n (Pillow: fast on large frames)."""
    from PIL import Image

    return np.asarray(Image.fromarray(a.astype(np.float32), mode="F").resize((n, n), Image.Resampling.BILINEAR))


def texture(name: str, rng: np.random.Generator, n: int, patterns: Sequence[Pattern] = ()) -> np.ndarray:
    """Cloud opacity in [0, 1] of a class's pattern over the whole frame (level-0 px at 10 m/px).

    Fish bands are drawn around each of its ``patterns`` (an orientation each); the other textures
    fill the frame (the patterns' masks cut them out)."""
    if name == "Sugar":  # fine, thin speckled veil
        return np.clip(0.3 + 0.16 * _noise(rng, n, 1.2), 0.0, 0.62)
    if name == "Gravel":  # granular cells with dark gaps
        g = _noise(rng, n, 4.5)
        return np.clip((g - 0.35) * 0.9, 0.0, 0.8)
    if name == "Flower":  # round clumps on a jittered lattice
        s, r = 56, 15.0
        m = -(-n // s)
        jy, jx = (rng.uniform(-0.18 * s, 0.18 * s, (m, m)).astype(np.float32) for _ in range(2))
        rad = rng.uniform(0.75 * r, 1.2 * r, (m, m)).astype(np.float32)
        yy, xx = np.ogrid[:n, :n]
        iy, ix = yy // s, xx // s
        dy = (yy % s - s / 2) - jy[iy, ix]
        dx = (xx % s - s / 2) - jx[iy, ix]
        d2 = (dy * dy + dx * dx) / rad[iy, ix] ** 2
        return (0.92 * np.sqrt(np.clip(1 - d2, 0, 1))).astype(np.float32)
    if name == "Fish":  # long wavy bands, each pattern at its own orientation
        out = np.zeros((n, n), np.float32)
        warp = 9.0 * _noise(rng, n, 60.0)
        grain = np.clip(0.75 + 0.25 * _noise(rng, n, 3.0), 0, 1)
        for p in patterns:
            if p.class_name != "Fish":
                continue
            t = rng.uniform(0, np.pi)
            r = max(p.radii_px) * 1.35  # the pattern's box (those of one class do not meet where they are cloudy)
            cy, cx = p.center_yx
            y0, y1, x0, x1 = max(0, int(cy - r)), min(n, int(cy + r) + 1), max(0, int(cx - r)), min(n, int(cx + r) + 1)
            yy, xx = np.ogrid[y0:y1, x0:x1]
            phase = ((xx - cx) * math.cos(t) + (yy - cy) * math.sin(t) + warp[y0:y1, x0:x1]) * (2 * np.pi / 40.0)
            band = np.clip(np.sin(phase) * 1.6 - 0.2, 0, 1)
            out[y0:y1, x0:x1] = np.maximum(out[y0:y1, x0:x1], 0.85 * band * grain[y0:y1, x0:x1])
        return out
    raise ValueError(f"unknown field class {name!r}; classes are {list(FIELD_CLASSES)}")


def make_scene(spec: FieldSpec) -> FieldScene:
    """Render a scene (level 0) and its truth."""
    n = spec.size_px
    rng = np.random.default_rng([spec.seed, 20])
    footprint = footprint_mask(n, float(rng.uniform(-20, 20)), spec.footprint_inset)
    labels, patterns = plant_patterns(spec, footprint, rng)
    # ocean: dark blue with slow swells of brightness, and sensor noise
    swell = _noise(rng, n, 200.0)
    base = np.array([14.0, 38.0, 66.0], np.float32)
    clear = np.ones((n, n), np.float32)  # Π(1 − a_k): the sky left clear
    for ci, name in enumerate(FIELD_CLASSES):
        # a soft edge (~60 m), made on a 4× coarser grid
        cover = _zoom(ndimage.gaussian_filter((labels[ci][::4, ::4] > 0).astype(np.float32), 1.5), n)
        clear *= 1 - texture(name, rng, n, patterns) * cover
    white = np.array([232.0, 236.0, 240.0], np.float32)
    grain = rng.normal(0, 2.5, (n, n)).astype(np.float32)
    sea = (1 + 0.12 * swell) * clear
    out = np.empty((n, n, 3), np.uint8)
    for c in range(3):
        v = base[c] * sea + white[c] * (1 - clear) + grain
        out[..., c] = np.clip(np.rint(v), 1, 255)  # 1: never the no-data value inside the scene
    out[~footprint] = NODATA
    return FieldScene(spec, out, footprint, labels, patterns)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Area average by an integer factor (a partial last row / column averages what it holds), rounded.

    This is how the pyramid's levels are made, so a model trained on ``downsample(level0, 2)`` sees
    exactly the pixels the scorer reads from level 1."""
    if factor == 1:
        return img
    h, w = img.shape[:2]
    hh, ww = -(-h // factor), -(-w // factor)
    pad = np.zeros((hh * factor, ww * factor) + img.shape[2:], np.float32)
    cnt = np.zeros((hh * factor, ww * factor), np.float32)
    pad[:h, :w] = img
    cnt[:h, :w] = 1
    s = pad.reshape(hh, factor, ww, factor, *img.shape[2:]).sum(axis=(1, 3))
    c = cnt.reshape(hh, factor, ww, factor).sum(axis=(1, 3))
    c = c.reshape(c.shape + (1,) * (img.ndim - 2))
    return np.rint(s / c).astype(img.dtype)


# -- files ---------------------------------------------------------------------------------------
def geotiff_tags(spec: FieldSpec) -> list[tuple[Any, ...]]:
    """GeoKeyDirectory (projected, PixelIsArea, EPSG, metres), ModelPixelScale and ModelTiepoint."""
    keys = [(1024, 1), (1025, 1), (3072, spec.epsg), (3076, 9001)]
    directory = [1, 1, 0, len(keys)] + [v for k, val in keys for v in (k, 0, 1, val)]
    e, n = spec.origin_m
    return [(34735, "H", len(directory), directory, False),
            (33550, "d", 3, (spec.pixel_m, spec.pixel_m, 0.0), False),
            (33922, "d", 6, (0.0, 0.0, 0.0, e, n, 0.0), False)]


def write_field_geotiff(path: Path, scene: FieldScene, *, n_levels: int = 4, tile_px: int = 256) -> Path:
    """The scene as a tiled pyramidal GeoTIFF (deflate) plus ``.truth.json`` and ``.truth.npz`` beside it."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    levels = [scene.image]
    for _ in range(1, n_levels):
        levels.append(downsample(levels[-1], 2))
    opts: dict[str, Any] = dict(tile=(tile_px, tile_px), compression="zlib", compressionargs={"level": 1},
                                photometric="rgb")
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(levels[0], subifds=n_levels - 1, metadata=None, extratags=geotiff_tags(scene.spec), **opts)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **opts)
    truth = {
        "coordinates": "level-0 pixels (y, x)", "classes": list(FIELD_CLASSES), "spec": dataclasses.asdict(scene.spec),
        "labels": f"{path.with_suffix('.truth.npz').name}: labels[k] = instance id of class k's pattern (0 none), "
                  "at level-0 pixels",
        "patterns": [dataclasses.asdict(p) for p in scene.patterns],
    }
    path.with_suffix(".truth.json").write_text(json.dumps(truth, indent=1) + "\n")
    np.savez_compressed(path.with_suffix(".truth.npz"), labels=scene.labels, footprint=scene.footprint)
    return path


def pattern_recall(labels: np.ndarray, detected: np.ndarray, min_covered: float = 0.25) -> list[dict[str, Any]]:
    """Per class: how many planted patterns have at least ``min_covered`` of their area detected.

    ``labels`` (K, H, W) instance ids and ``detected`` (K, H, W) bool on the same grid; also the
    share of the detected area that lies on planted patterns of the class (area precision)."""
    out = []
    for ci, name in enumerate(FIELD_CLASSES):
        lab, det = labels[ci], detected[ci]
        ids = np.arange(1, int(lab.max()) + 1)
        area = ndimage.sum_labels(np.ones_like(det), lab, ids) if len(ids) else np.zeros(0)
        hit = ndimage.sum_labels(det, lab, ids) if len(ids) else np.zeros(0)
        keep = area > 0
        found = int((hit[keep] >= min_covered * area[keep]).sum())
        n_det = int(det.sum())
        out.append({"class": name, "planted": int(keep.sum()), "found": found,
                    "recall": found / int(keep.sum()) if keep.any() else float("nan"),
                    "area_precision": float((det & (lab > 0)).sum() / n_det) if n_det else float("nan")})
    return out
