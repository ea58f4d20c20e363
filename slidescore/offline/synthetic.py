"""Synthetic Giemsa-stained thin blood smears, for tests, demos and training the built-in model.

:func:`plan_smear` places every object of a smear once, deterministically from a
:class:`SmearSpec`: pink red cells (some overlapping, a few parasitized by a ring form with a dark
chromatin dot and a faint blue cytoplasm ring), purple white cells with lobed nuclei, small purple
platelets lying between the cells (hard negatives), and a few large empty gaps. :func:`render_region`
then draws any rectangle of any pyramid level straight from that layout, with a transmitted-light
model (optical densities of overlapping objects add, ``rgb = white · light · exp(-OD)``), a slow
lighting gradient, smooth stain variation and coordinate-hash noise. A pixel's value depends only
on the layout and its own coordinates, so a tile-by-tile rendering equals the whole-image
rendering bit for bit. Coordinates are level-0 pixels with axis order (y, x); the continuous
position ``c`` lies in pixel ``floor(c)`` (pixel ``q`` spans ``[q, q + 1)``). Pure numpy + scipy.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from slidescore.errors import ConfigError

_BIN_PX = 256  # level-0 size of a bin of the spatial index of primitives
_OVERLAP_GAIN = 1.06  # summed red-cell area / covered area, measured at the default overlap


@dataclass(frozen=True)
class SmearSpec:
    """What to generate. Sizes are level-0 pixels, lengths in µm, fractions in [0, 1]."""

    height_px: int
    width_px: int
    mpp: float = 0.25
    seed: int = 0
    parasitemia: float = 0.01
    coverage: float = 0.45
    cell_diameter_um: float = 7.5
    cell_diameter_cv: float = 0.08
    max_overlap: float = 0.3  # RBC centres stay >= (1 - max_overlap) · mean diameter apart
    gaps_per_mm2: float = 0.75  # large empty areas; at least one per smear
    gap_radius_um: tuple[float, float] = (40.0, 110.0)
    # 50 µm keeps the blended detections of two parasites (each ~±16 µm at 0.5 µm/px) apart
    min_parasite_distance_um: float = 50.0
    # parasites keep off the image border, where fewer overlapping patches see them
    parasite_border_um: float = 20.0
    wbc_per_rbc: float = 0.004
    platelets_per_rbc: float = 0.06
    stain_variation: float = 0.12  # relative size of per-slide, per-cell and smooth stain changes
    lighting_gradient: float = 0.05  # relative size of the slow illumination change
    noise_level: float = 1.5  # std of the per-pixel noise at level 0, in grey levels
    background_rgb: tuple[int, int, int] = (236, 236, 233)

    def __post_init__(self) -> None:
        for name in ("height_px", "width_px"):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or v <= 0:
                raise ConfigError(f"SmearSpec.{name}: expected a positive int, got {v!r}")
        for name in ("mpp", "cell_diameter_um", "min_parasite_distance_um"):
            if not getattr(self, name) > 0:
                raise ConfigError(
                    f"SmearSpec.{name}: expected a positive number, got {getattr(self, name)!r}"
                )
        for name in ("parasitemia", "coverage", "max_overlap", "cell_diameter_cv"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(
                    f"SmearSpec.{name}: expected a fraction in [0, 1), got {getattr(self, name)!r}"
                )


@dataclass(frozen=True, eq=False)
class _Primitives:
    """One kind of drawable: elliptic discs (``profile='disc'``) or thin rings (``'ring'``)."""

    profile: str
    cy: np.ndarray
    cx: np.ndarray
    a: np.ndarray  # semi-axis along theta (level-0 px); ring radius for rings
    b: np.ndarray  # other semi-axis; ring half-width for rings
    theta: np.ndarray
    od: np.ndarray  # (n, 3) optical density at full coverage
    pallor: np.ndarray  # relative paleness of the centre (discs)
    soft_px: np.ndarray  # edge blur in level-0 px
    extent_px: float  # no primitive reaches farther than this from its centre
    bin_order: np.ndarray  # primitive indices sorted by bin
    bin_starts: np.ndarray  # CSR offsets into bin_order, one per bin + 1
    n_bins_x: int
    n_bins_y: int


@dataclass(frozen=True, eq=False)
class SmearLayout:
    """Everything placed on one smear, in level-0 pixels (y, x); deterministic from ``spec``."""

    spec: SmearSpec
    rbc_centers: np.ndarray  # (n, 2)
    rbc_radii: np.ndarray  # (n,) equivalent-circle radius
    rbc_od: np.ndarray  # (n, 3) per-cell colour as optical density
    parasitized: np.ndarray  # (n,) bool
    parasite_cells: np.ndarray  # (m,) index of the parasitized red cell
    parasite_dots: np.ndarray  # (m, 2) centre of each parasite's (first) chromatin dot
    wbc_centers: np.ndarray
    wbc_radii: np.ndarray
    platelet_centers: np.ndarray
    gap_centers: np.ndarray
    gap_radii: np.ndarray
    _groups: tuple[_Primitives, ...] = field(repr=False)
    _light: tuple[np.ndarray, ...] = field(repr=False)  # smooth illumination field parameters


# ---------------------------------------------------------------------------------------------
# smooth fields: sums of a few plane waves, evaluated separably on rows and columns


def _wave_params(
    rng: np.random.Generator, n: int, wavelength_px: tuple[float, float]
) -> tuple[np.ndarray, ...]:
    lam = rng.uniform(*wavelength_px, size=n)
    ang = rng.uniform(0, np.pi, size=n)
    fy, fx = np.cos(ang) / lam, np.sin(ang) / lam
    phase = rng.uniform(0, 2 * np.pi, size=n)
    amp = np.full(n, math.sqrt(2.0 / n))  # unit variance
    return fy, fx, phase, amp


def _wave_at(params: tuple[np.ndarray, ...], y: np.ndarray, x: np.ndarray) -> np.ndarray:
    fy, fx, phase, amp = params
    arg = 2 * np.pi * (np.multiply.outer(y, fy) + np.multiply.outer(x, fx)) + phase
    return np.cos(arg) @ amp


def _wave_grid(params: tuple[np.ndarray, ...], y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The field on the grid ``y × x`` via cos(A + B) = cos A cos B − sin A sin B.

    Summed term by term with elementwise ops (not a matrix product, whose rounding may depend on
    the array shape), so a pixel's value does not depend on the region it is rendered in.
    """
    fy, fx, phase, amp = params
    out = np.zeros((len(y), len(x)))
    for k in range(len(amp)):
        ay = 2 * np.pi * fy[k] * y + phase[k]
        bx = 2 * np.pi * fx[k] * x
        out += amp[k] * (
            np.cos(ay)[:, None] * np.cos(bx)[None, :] - np.sin(ay)[:, None] * np.sin(bx)[None, :]
        )
    return out


# ---------------------------------------------------------------------------------------------
# planning


def _hardcore(
    rng: np.random.Generator,
    n_target: int,
    d_min: float,
    shape: tuple[int, int],
    accept: Callable[[np.ndarray], np.ndarray],
    max_rounds: int = 60,
) -> np.ndarray:
    """Random sequential placement, batched: points at least ``d_min`` apart, where ``accept`` says."""
    pts = np.empty((0, 2))
    for _ in range(max_rounds):
        need = n_target - len(pts)
        if need <= 0:
            break
        cand = rng.uniform((0.0, 0.0), shape, size=(2 * need + 64, 2))
        cand = cand[accept(cand)]
        if len(pts) and len(cand):
            dist, _ = cKDTree(pts).query(cand, distance_upper_bound=d_min)
            cand = cand[~np.isfinite(dist)]
        if len(cand) > 1:  # within the batch, an earlier point wins (Matérn type II)
            pairs = cKDTree(cand).query_pairs(d_min, output_type="ndarray")
            keep = np.ones(len(cand), bool)
            keep[pairs.max(axis=1)] = False
            cand = cand[keep]
        pts = np.vstack([pts, cand[:need]])
    return pts


def _index(
    profile: str,
    cy: np.ndarray,
    cx: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    theta: np.ndarray,
    od: np.ndarray,
    pallor: np.ndarray,
    soft: np.ndarray,
    spec: SmearSpec,
) -> _Primitives:
    n_by = -(-spec.height_px // _BIN_PX)
    n_bx = -(-spec.width_px // _BIN_PX)
    by = np.clip(np.floor(cy / _BIN_PX).astype(np.int64), 0, n_by - 1)
    bx = np.clip(np.floor(cx / _BIN_PX).astype(np.int64), 0, n_bx - 1)
    bins = by * n_bx + bx
    order = np.argsort(bins, kind="stable")
    starts = np.searchsorted(bins[order], np.arange(n_by * n_bx + 1))
    reach = (a + b if profile == "ring" else np.maximum(a, b)) + 2 * soft
    extent = float(reach.max()) if len(reach) else 0.0
    f8 = lambda v: np.ascontiguousarray(v, dtype=np.float64)  # noqa: E731
    return _Primitives(
        profile,
        f8(cy),
        f8(cx),
        f8(a),
        f8(b),
        f8(theta),
        f8(od).reshape(-1, 3),
        f8(pallor),
        f8(soft),
        extent,
        order,
        starts,
        n_bx,
        n_by,
    )


# Long on purpose: one seeded generator read top to bottom (cells, then parasites, then stain); split, the
# order of the random draws — which fixes every generated smear and the built-in model's training data — would be
# spread over several functions.
def plan_smear(spec: SmearSpec) -> SmearLayout:
    """Place every object of the smear described by ``spec`` (deterministic from ``spec.seed``)."""
    H, W, mpp = spec.height_px, spec.width_px, spec.mpp
    um = 1.0 / mpp  # level-0 px per µm
    rngs = [np.random.default_rng([spec.seed, k]) for k in range(8)]
    sv = spec.stain_variation

    # slide-level stain and smooth fields
    r0 = rngs[0]
    slide_gain = 1 + sv * np.clip(r0.normal(0, 0.6, 3), -2, 2)
    density = _wave_params(r0, 5, (300 * um, 900 * um))
    stain = _wave_params(r0, 5, (200 * um, 800 * um))
    light = _wave_params(r0, 4, (600 * um, 2000 * um))
    light_tilt = r0.normal(0, 1, 2)

    # empty gaps
    r1 = rngs[1]
    area_mm2 = H * W * (mpp * 1e-3) ** 2
    n_gaps = max(1, int(round(area_mm2 * spec.gaps_per_mm2)))
    gap_r = np.minimum(r1.uniform(*spec.gap_radius_um, size=n_gaps) * um, 0.22 * min(H, W))
    gap_c = r1.uniform((0.1 * H, 0.1 * W), (0.9 * H, 0.9 * W), size=(n_gaps, 2))
    gy, gx = np.meshgrid(
        (np.arange(64) + 0.5) * H / 64, (np.arange(64) + 0.5) * W / 64, indexing="ij"
    )
    grid = np.stack([gy.ravel(), gx.ravel()], 1)

    def outside_gaps(p: np.ndarray, margin: float) -> np.ndarray:
        d2 = ((p[:, None, :] - gap_c[None]) ** 2).sum(-1)
        return (d2 > (gap_r + margin) ** 2).all(1)

    r_mean = spec.cell_diameter_um * um / 2
    # summed disc area a bit above the wanted union (overlaps); capped where gaps leave little room
    free_frac = outside_gaps(grid, 1.35 * r_mean).mean()
    sum_frac = min(_OVERLAP_GAIN * spec.coverage, 0.75 * free_frac)
    n_rbc_est = sum_frac * H * W / (math.pi * r_mean**2)

    def density_ok(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        dens = np.clip(1 + 0.45 * _wave_at(density, p[:, 0], p[:, 1]), 0.25, 1.7) / 1.7
        return rng.uniform(size=len(p)) < dens

    # white cells: neutrophils (lobed nucleus) and lymphocytes (one round nucleus)
    r2 = rngs[2]
    n_wbc = int(r2.poisson(n_rbc_est * spec.wbc_per_rbc))
    wbc_c = _hardcore(
        r2, n_wbc, 16 * um, (H, W), lambda p: outside_gaps(p, 8 * um) & density_ok(p, r2)
    )
    lympho = r2.uniform(size=len(wbc_c)) < 0.4
    wbc_r = (
        np.where(lympho, r2.uniform(4.2, 5.2, len(wbc_c)), r2.uniform(5.2, 6.8, len(wbc_c))) * um
    )
    wbc_tree = cKDTree(wbc_c) if len(wbc_c) else None

    # red cells
    r3 = rngs[3]
    d_min = (1 - spec.max_overlap) * 2 * r_mean

    def rbc_ok(p: np.ndarray) -> np.ndarray:
        ok = outside_gaps(p, 1.35 * r_mean) & density_ok(p, r3)
        if wbc_tree is not None:
            dist, j = wbc_tree.query(p)
            ok &= dist > (1 - spec.max_overlap) * (wbc_r[np.minimum(j, len(wbc_r) - 1)] + r_mean)
        return ok

    rbc_c = _hardcore(r3, int(round(n_rbc_est)), d_min, (H, W), rbc_ok)
    n_rbc = len(rbc_c)
    rbc_r = r_mean * np.clip(1 + spec.cell_diameter_cv * r3.normal(size=n_rbc), 0.75, 1.3)
    aspect = 1 + np.minimum(np.abs(r3.normal(0, 0.06, n_rbc)), 0.2)
    rbc_theta = r3.uniform(0, np.pi, n_rbc)
    stain_at = lambda p: 1 + 0.6 * sv * _wave_at(stain, p[:, 0], p[:, 1])  # noqa: E731
    rbc_od = (
        (np.array([0.08, 0.45, 0.39]) * slide_gain)
        * (stain_at(rbc_c) * np.clip(1 + 0.4 * sv * r3.normal(size=n_rbc), 0.7, 1.3))[:, None]
        * np.clip(1 + 0.15 * r3.normal(size=(n_rbc, 3)) * sv, 0.8, 1.2)
    )
    pallor = r3.uniform(0.2, 0.45, n_rbc)

    # parasites: ring forms, far apart from each other
    r4 = rngs[4]
    n_par_target = int(round(spec.parasitemia * n_rbc))
    min_d = spec.min_parasite_distance_um * um
    border = max(spec.parasite_border_um * um, 2.0)
    dots: list[np.ndarray] = []
    cells: list[int] = []
    ring_c: list[np.ndarray] = []
    ring_r: list[float] = []
    extra_dots: list[tuple[float, float, float]] = []
    taken: dict[tuple[int, int], list[np.ndarray]] = {}
    for i in r4.permutation(n_rbc):
        if len(dots) >= n_par_target:
            break
        rr = r4.uniform(1.0, 1.6) * um
        room = 0.85 * rbc_r[i] / math.sqrt(aspect[i]) - rr - 0.7 * um
        off_r, off_a, dot_a = (
            r4.uniform(0, max(room, 0.0)),
            r4.uniform(0, 2 * np.pi),
            r4.uniform(0, 2 * np.pi),
        )
        rc = rbc_c[i] + off_r * np.array([np.sin(off_a), np.cos(off_a)])
        dot = rc + rr * np.array([np.sin(dot_a), np.cos(dot_a)])
        if not (border <= dot[0] < H - border and border <= dot[1] < W - border):
            continue
        key = (int(dot[0] // min_d), int(dot[1] // min_d))
        near = [
            q
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
            for q in taken.get((key[0] + dy, key[1] + dx), [])
        ]
        if any(np.hypot(*(q - dot)) < min_d for q in near):
            continue
        taken.setdefault(key, []).append(dot)
        dots.append(dot)
        cells.append(i)
        ring_c.append(rc)
        ring_r.append(rr)
        if r4.uniform() < 0.25:  # "headphone" ring with a second, smaller dot
            a2 = dot_a + np.pi + r4.uniform(-0.6, 0.6)
            extra_dots.append(
                (rc[0] + rr * np.sin(a2), rc[1] + rr * np.cos(a2), r4.uniform(0.35, 0.55) * um)
            )
    parasitized = np.zeros(n_rbc, bool)
    parasitized[cells] = True
    dots_a = np.array(dots).reshape(-1, 2)
    ring_c_a = np.array(ring_c).reshape(-1, 2)
    n_par = len(dots_a)

    # platelets: small purple dots between the cells, single or in small clumps
    r5 = rngs[5]
    rbc_tree = cKDTree(rbc_c) if n_rbc else None
    n_plt = int(r5.poisson(spec.platelets_per_rbc * n_rbc))

    def plt_ok(p: np.ndarray) -> np.ndarray:
        ok = outside_gaps(p, 4 * um)
        for tree, rad in ((rbc_tree, rbc_r * 1.2), (wbc_tree, wbc_r)):
            if tree is not None:
                dist, j = tree.query(p)
                ok &= dist > rad[np.minimum(j, len(rad) - 1)] + 2.2 * um
        return ok

    plt_c = _hardcore(r5, n_plt, 6 * um, (H, W), plt_ok, max_rounds=8)
    n_sub = np.where(
        r5.uniform(size=len(plt_c)) < 0.12,
        r5.integers(3, 6, len(plt_c)),
        r5.integers(1, 4, len(plt_c)),
    )
    owner = np.repeat(np.arange(len(plt_c)), n_sub)
    spread = np.where(n_sub[owner] >= 3, 1.6, 0.8) * um
    sub_c = plt_c[owner] + r5.normal(size=(len(owner), 2)) * spread[:, None]
    sub_r = r5.uniform(0.55, 1.25, len(owner)) * um
    dark = np.repeat(r5.uniform(size=len(plt_c)) < 0.2, n_sub)
    plt_od = (
        np.array([0.42, 0.72, 0.30])
        * slide_gain
        * (r5.uniform(0.6, 1.2, len(owner)) * np.where(dark, 1.6, 1.0))[:, None]
    )

    # nuclei of white cells
    r6 = rngs[6]
    nuc_c, nuc_r = [], []
    for c, R, ly in zip(wbc_c, wbc_r, lympho, strict=True):
        if ly:
            nuc_c.append(c + r6.normal(0, 0.08 * R, 2))
            nuc_r.append(0.72 * R)
            continue
        start, n_lobes = r6.uniform(0, 2 * np.pi), int(r6.integers(2, 5))
        for k in range(n_lobes):
            ang = start + k * r6.uniform(0.9, 1.5)
            nuc_c.append(c + 0.42 * R * np.array([np.sin(ang), np.cos(ang)]))
            nuc_r.append(r6.uniform(0.26, 0.34) * R)
    nuc_c_a, nuc_r_a = np.array(nuc_c).reshape(-1, 2), np.array(nuc_r)
    nuc_od = np.array([1.0, 1.45, 0.55]) * slide_gain * r6.uniform(0.85, 1.15, (len(nuc_r_a), 1))
    wbc_od = np.array([0.17, 0.22, 0.08]) * slide_gain * r6.uniform(0.8, 1.2, (len(wbc_c), 1))

    # chromatin dots (parasites' first dots, then the second dots of double-dot rings)
    extra = np.array(extra_dots).reshape(-1, 3)
    chrom_c = np.vstack([dots_a, extra[:, :2]])
    chrom_r = np.concatenate([r4.uniform(0.5, 0.75, n_par) * um, extra[:, 2]])
    chrom_od = np.array([0.95, 1.7, 0.8]) * slide_gain * r4.uniform(0.8, 1.2, (len(chrom_r), 1))
    ring_od = np.array([0.42, 0.24, 0.06]) * r4.uniform(0.7, 1.2, (n_par, 1))
    ring_w = r4.uniform(0.15, 0.22, n_par) * um

    z = np.zeros
    soft = 0.9  # level-0 px of optical blur on every edge
    small_c = np.vstack([sub_c, chrom_c])
    small_r = np.concatenate([sub_r, chrom_r])
    groups = (
        _index(
            "disc",
            wbc_c[:, 0],
            wbc_c[:, 1],
            wbc_r,
            wbc_r,
            z(len(wbc_r)),
            wbc_od,
            z(len(wbc_r)),
            np.full(len(wbc_r), 1.5 * soft),
            spec,
        ),
        _index(
            "disc",
            rbc_c[:, 0],
            rbc_c[:, 1],
            rbc_r * np.sqrt(aspect),
            rbc_r / np.sqrt(aspect),
            rbc_theta,
            rbc_od,
            pallor,
            np.full(n_rbc, soft),
            spec,
        ),
        _index(
            "disc",
            nuc_c_a[:, 0],
            nuc_c_a[:, 1],
            nuc_r_a,
            nuc_r_a,
            z(len(nuc_r_a)),
            nuc_od,
            z(len(nuc_r_a)),
            np.full(len(nuc_r_a), 1.5 * soft),
            spec,
        ),
        _index(
            "ring",
            ring_c_a[:, 0],
            ring_c_a[:, 1],
            np.array(ring_r),
            ring_w,
            z(n_par),
            ring_od,
            z(n_par),
            np.full(n_par, soft),
            spec,
        ),
        _index(
            "disc",
            small_c[:, 0],
            small_c[:, 1],
            small_r,
            small_r,
            z(len(small_r)),
            np.vstack([plt_od, chrom_od]),
            z(len(small_r)),
            np.full(len(small_r), soft),
            spec,
        ),
    )
    return SmearLayout(
        spec=spec,
        rbc_centers=rbc_c,
        rbc_radii=rbc_r,
        rbc_od=rbc_od,
        parasitized=parasitized,
        parasite_cells=np.array(cells, dtype=np.int64),
        parasite_dots=dots_a,
        wbc_centers=wbc_c,
        wbc_radii=wbc_r,
        platelet_centers=plt_c,
        gap_centers=gap_c,
        gap_radii=gap_r,
        _groups=groups,
        _light=(*light, light_tilt),
    )


def parasite_positions(layout: SmearLayout) -> np.ndarray:
    """(n, 2) level-0 (y, x) centres of the parasites' chromatin dots, one per parasitized cell."""
    return layout.parasite_dots.copy()


# ---------------------------------------------------------------------------------------------
# rendering


def _hash_noise(iy: np.ndarray, ix: np.ndarray, salt: int) -> np.ndarray:
    """Zero-mean, unit-std noise from integer coordinates (murmur-style finaliser, wrapping uint32).

    The two 16-bit halves of one hash are summed, giving a triangular distribution.
    """
    h = (iy.astype(np.uint32) * np.uint32(0x9E3779B1)) ^ (
        ix.astype(np.uint32) * np.uint32(0x85EBCA77)
    )
    h ^= np.uint32(salt & 0xFFFFFFFF)
    h ^= h >> np.uint32(16)
    h *= np.uint32(0x7FEB352D)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x846CA68B)
    h ^= h >> np.uint32(16)
    tri = (h & np.uint32(0xFFFF)).astype(np.float64) + (h >> np.uint32(16)).astype(np.float64)
    return (tri - 65535.0) * (math.sqrt(6.0) / 65536.0)


def _query(g: _Primitives, y0: float, y1: float, x0: float, x1: float) -> np.ndarray:
    """Indices (ascending) of the primitives of ``g`` that may touch level-0 box [y0, y1) × [x0, x1)."""
    e = g.extent_px + 1
    by0, by1 = max(int((y0 - e) // _BIN_PX), 0), min(int((y1 + e) // _BIN_PX), g.n_bins_y - 1)
    bx0, bx1 = max(int((x0 - e) // _BIN_PX), 0), min(int((x1 + e) // _BIN_PX), g.n_bins_x - 1)
    if by1 < by0 or bx1 < bx0 or len(g.cy) == 0:
        return np.empty(0, np.int64)
    parts = [
        g.bin_order[g.bin_starts[r * g.n_bins_x + bx0] : g.bin_starts[r * g.n_bins_x + bx1 + 1]]
        for r in range(by0, by1 + 1)
    ]
    idx = np.sort(np.concatenate(parts))
    keep = (g.cy[idx] + e > y0) & (g.cy[idx] - e < y1) & (g.cx[idx] + e > x0) & (g.cx[idx] - e < x1)
    return idx[keep]


def _accumulate(od: np.ndarray, g: _Primitives, y: int, x: int, h: int, w: int, d: int) -> None:
    """Add the optical density of the primitives of ``g`` to ``od`` (3, h·w), in index order."""
    idx = _query(g, y * d, (y + h) * d, x * d, (x + w) * d)
    if len(idx) == 0:
        return
    cy, cx, a, b, th = g.cy[idx], g.cx[idx], g.a[idx], g.b[idx], g.theta[idx]
    size = int(math.ceil(2 * (g.extent_px + 1) / d)) + 2
    ar = np.arange(size)
    py = np.floor(cy / d).astype(np.int64)[:, None] - size // 2 + ar  # (n, S) level rows
    px = np.floor(cx / d).astype(np.int64)[:, None] - size // 2 + ar
    dy = ((py + 0.5) * d - cy[:, None])[:, :, None]  # (n, S, 1) level-0 offsets of pixel centres
    dx = ((px + 0.5) * d - cx[:, None])[:, None, :]
    ramp = np.sqrt(d * d + g.soft_px[idx] ** 2)[
        :, None, None
    ]  # box filter of the level pixel + blur
    if g.profile == "ring":
        dist = np.sqrt(dy * dy + dx * dx)
        sig = np.sqrt(b * b + (0.4 * d) ** 2)[:, None, None]
        val = (b[:, None, None] / sig) * np.exp(-(((dist - a[:, None, None]) / sig) ** 2))
    else:
        c, s = np.cos(th)[:, None, None], np.sin(th)[:, None, None]
        u, v = (dy * c + dx * s) / a[:, None, None], (dx * c - dy * s) / b[:, None, None]
        rho = np.sqrt(u * u + v * v)
        r_eq = np.sqrt(a * b)[:, None, None]
        val = np.clip((1 - rho) * r_eq / ramp + 0.5, 0.0, 1.0)
        pal = g.pallor[idx]
        if pal.any():
            val *= 1 - pal[:, None, None] * np.exp(-4.0 * (u * u + v * v))
    ry, rx = py - y, px - x
    inside = ((ry >= 0) & (ry < h))[:, :, None] & ((rx >= 0) & (rx < w))[:, None, :] & (val > 0)
    lin = (ry[:, :, None] * w + rx[:, None, :])[inside]
    v = val[inside]
    counts = inside.sum((1, 2))
    for ch in range(
        3
    ):  # bincount adds in input order, so every pixel sums its primitives in index order
        od[ch] += np.bincount(lin, weights=v * np.repeat(g.od[idx, ch], counts), minlength=h * w)


def render_region(
    layout: SmearLayout, y: int, x: int, h: int, w: int, downsample: int = 1
) -> np.ndarray:
    """Render ``[y, y + h) × [x, x + w)`` of the level with this ``downsample`` as uint8 (h, w, 3) RGB.

    Level pixel ``p`` covers level-0 pixels ``[p·downsample, (p + 1)·downsample)`` and is drawn
    directly at that resolution (edges box-filtered analytically, noise scaled by 1/downsample).
    Pixels outside the image are drawn like the rest (mostly background).
    """
    d = int(downsample)
    if d < 1 or h < 0 or w < 0:
        raise ValueError(
            f"render_region: need downsample >= 1 and h, w >= 0; got {downsample}, {h}, {w}"
        )
    spec = layout.spec
    od = np.zeros((3, h * w))
    for g in layout._groups:
        _accumulate(od, g, y, x, h, w, d)
    yc = (np.arange(y, y + h) + 0.5) * d  # level-0 centres of the level pixels
    xc = (np.arange(x, x + w) + 0.5) * d
    *waves, tilt = layout._light
    gl = spec.lighting_gradient
    light = 1 + gl * (
        0.5 * _wave_grid(tuple(waves), yc, xc)
        + tilt[0] * (yc / spec.height_px - 0.5)[:, None]
        + tilt[1] * (xc / spec.width_px - 0.5)[None, :]
    )
    iy, ix = np.meshgrid(
        np.arange(y, y + h, dtype=np.int64), np.arange(x, x + w, dtype=np.int64), indexing="ij"
    )
    out = np.empty((h, w, 3), np.uint8)
    sigma = spec.noise_level / d  # a level pixel averages d² level-0 pixels
    for ch in range(3):
        noise = _hash_noise(iy, ix, spec.seed * 7919 + d * 104729 + ch * 15485863) * sigma
        val = spec.background_rgb[ch] * light * np.exp(-od[ch].reshape(h, w)) + noise
        out[..., ch] = np.clip(np.rint(val), 0, 255)
    return out


def level_shape(spec: SmearSpec, downsample: int = 1) -> tuple[int, int]:
    """(height, width) of the level with this downsample: ``ceil(size / downsample)``."""
    return -(-spec.height_px // downsample), -(-spec.width_px // downsample)


def render_image(layout: SmearLayout, downsample: int = 1, tile_px: int = 512) -> np.ndarray:
    """The whole level with this downsample (for small images), drawn in tiles to stay in cache."""
    h, w = level_shape(layout.spec, downsample)
    out = np.empty((h, w, 3), np.uint8)
    for y in range(0, h, tile_px):
        for x in range(0, w, tile_px):
            th, tw = min(tile_px, h - y), min(tile_px, w - x)
            out[y : y + th, x : x + tw] = render_region(layout, y, x, th, tw, downsample)
    return out
