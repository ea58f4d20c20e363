"""Cost follows the tissue: a giant sparse slide vs a dense slide with the same tissue (issue #16).

Usage: ``.venv/bin/python benchmarks/sparse.py [--sparse-size 100000] [--dense-size 8192] [--giant-size 200000]
[--report-off] [--aligned] [--workdir /tmp/slidescore-sparse] [--out benchmarks/results/sparse]``

Writes two (or three) JPEG-tiled pyramidal TIFFs at 0.25 µm/px (512-px tiles, JPEG q90 YCbCr
4:2:0 as ``slidescore.io.tiff.write_tiff_pyramid`` writes them, levels down to ~1024 px) holding
the same tissue: 16 identical islands of 1024² px of synthetic smear
(``slidescore.offline.synthetic``, seed 3) on glass (RGB 236), on a 4 × 4 grid:

- **dense**: ``--dense-size``² px (8192²: islands 2048 px apart, a quarter of the slide is tissue);
- **sparse**: ``--sparse-size``² px (100,000²: islands ~25,000 px apart, 0.03 % tissue);
- **giant** (``--giant-size``, 0 = skip): the ≤ 1 GiB peak-memory target of a 200,000² slide.

A slide's background tiles are encoded once and written again and again (the bytes a direct write
would give), so a 100k² pyramid takes seconds to write. Each slide is then scored by
``slidescore score <tif> -o <out> -q --overwrite`` (default config: built-in model, report on unless
``--report-off``) in a fresh process, the dense and sparse ones interleaved for ``--rounds`` rounds;
per run: wall time, the child's peak RSS (``ru_maxrss`` from ``wait4``), and from the sample's
``run.json`` ``total_s``, ``score_s``, ``mask_s``, patches scored, regions, blocks (total, without
foreground). Writes ``sparse.json`` and ``sparse.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RAY, REPO, machine, run_child  # noqa: E402

MPP = 0.25
TILE = 512
ISLAND = 1024
GLASS = 236
OPTS: dict[str, Any] = {"tile": (TILE, TILE), "compression": "jpeg", "photometric": "rgb", "dtype": "uint8",
                        "compressionargs": {"level": 90}}


def tissue(seed: int = 3) -> np.ndarray:
    """One island of tissue: a 1024² px patch of synthetic smear at 0.25 µm/px."""
    from slidescore.offline.synthetic import SmearSpec, plan_smear, render_region

    layout = plan_smear(SmearSpec(height_px=ISLAND, width_px=ISLAND, mpp=MPP, seed=seed))
    return render_region(layout, 0, 0, ISLAND, ISLAND)


BLOCK_PX = 4096  # a block at the default config: chunk_cells 128 × the built-in model's 32-px stride, level 0


def island_origins(size: int, n_side: int = 4, like: int | None = None) -> list[tuple[int, int]]:
    """Islands on an n × n grid, centred in their cells, on multiples of 128 px (whole pixels at every level).

    ``like``: move each island to the nearest origin that has, within its :data:`BLOCK_PX` block, the offset
    the same island has on a ``like``² slide — the same islands in the same places within their blocks, so
    the two slides differ in canvas only, not in how their islands fall across blocks.
    """
    step = size / n_side
    grid = [(int((step * i + (step - ISLAND) / 2) // 128 * 128), int((step * j + (step - ISLAND) / 2) // 128 * 128))
            for i in range(n_side) for j in range(n_side)]
    if like is None:
        return grid

    def snap(c: int, ref: int) -> int:
        off = ref % BLOCK_PX
        return min((q * BLOCK_PX + off for q in range(size // BLOCK_PX + 1) if q * BLOCK_PX + off + ISLAND <= size),
                   key=lambda v: abs(v - c))

    return [(snap(y, ry), snap(x, rx)) for (y, x), (ry, rx) in zip(grid, island_origins(like, n_side), strict=True)]


def encode(tile: np.ndarray) -> bytes:
    """A tile's bytes exactly as tifffile writes them with :data:`OPTS` (one-tile TIFF, its segment cut out)."""
    import tifffile

    buf = io.BytesIO()
    with tifffile.TiffWriter(buf) as tw:
        tw.write(tile, **OPTS)
    buf.seek(0)
    with tifffile.TiffFile(buf) as t:
        off, n = t.pages[0].dataoffsets[0], t.pages[0].databytecounts[0]
    return buf.getvalue()[off : off + n]


def write_slide(path: Path, size: int, patch: np.ndarray, origins: list[tuple[int, int]]) -> None:
    import tifffile

    n_levels = 1 + max(0, math.ceil(math.log2(size / 1024)))
    background = encode(np.full((TILE, TILE, 3), GLASS, np.uint8))

    def tiles(ds: int) -> Iterator[bytes]:
        h = w = -(-size // ds)
        small = patch.reshape(ISLAND // ds, ds, ISLAND // ds, ds, 3).mean(axis=(1, 3)).round().astype(np.uint8) \
            if ds > 1 else patch
        isl = [(y // ds, x // ds) for y, x in origins]
        e = ISLAND // ds
        for ty in range(0, h, TILE):
            for tx in range(0, w, TILE):
                th, tw = min(TILE, h - ty), min(TILE, w - tx)
                hits = [(y, x) for y, x in isl if y < ty + TILE and y + e > ty and x < tx + TILE and x + e > tx]
                if not hits and th == TILE and tw == TILE:
                    yield background
                    continue
                tile = np.zeros((TILE, TILE, 3), np.uint8)  # past the image edge: zeros, as write_tiff_pyramid
                tile[:th, :tw] = GLASS
                for y, x in hits:
                    y0, y1, x0, x1 = max(y, ty), min(y + e, ty + th), max(x, tx), min(x + e, tx + tw)
                    if y1 > y0 and x1 > x0:
                        tile[y0 - ty : y1 - ty, x0 - tx : x1 - tx] = small[y0 - y : y1 - y, x0 - x : x1 - x]
                yield encode(tile)

    tmp = path.with_suffix(".partial")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for lvl in range(n_levels):
            ds = 2**lvl
            h = w = -(-size // ds)
            res = {"resolution": (1e4 / (MPP * ds), 1e4 / (MPP * ds)), "resolutionunit": "CENTIMETER"}
            extra: dict[str, Any] = {"subifds": n_levels - 1, "metadata": None} if lvl == 0 else {"subfiletype": 1}
            tw.write(tiles(ds), shape=(h, w, 3), **OPTS, **res, **extra)
    tmp.rename(path)


def score(tif: Path, out: Path, config: Path | None) -> dict[str, Any]:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [str(RAY.with_name("slidescore")), "score", str(tif), "-o", str(out), "-q", "--overwrite"]
    if config is not None:
        cmd += ["-c", str(config)]
    res = run_child(cmd)
    if res["rc"] != 0:
        raise SystemExit(f"{tif.name}: slidescore score exited {res['rc']}:\n{res['output'][-3000:]}")
    run = json.loads((out / tif.stem / "run.json").read_text())
    t = run["timings_s"]
    return {"wall_s": res["wall_s"], "peak_rss_mib": res["peak_rss_mib"], "total_s": t["total_s"], "score_s": t["score_s"],
            "mask_s": t["mask_s"], "patches_scored": run["patches"]["scored"], "regions": run["regions"]["total"],
            "blocks": run["blocks"]["total"], "blocks_without_foreground": run["blocks"].get("without_foreground")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense-size", type=int, default=8192)
    ap.add_argument("--sparse-size", type=int, default=100_000)
    ap.add_argument("--giant-size", type=int, default=0, help="also a sparse slide of this size (200000: the ≤ 1 GiB target); 0 = skip")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of dense and sparse (best and median kept)")
    ap.add_argument("--report-off", action="store_true", help="report.enabled: false (default: the default config, report on)")
    ap.add_argument("--aligned", action="store_true",
                    help="place the sparse (and giant) slide's islands at the dense slide's offsets within their "
                         f"{BLOCK_PX}-px blocks (default: centred in a 4 × 4 grid, where some fall across blocks)")
    ap.add_argument("--workdir", default="/tmp/slidescore-sparse")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "sparse"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    patch = tissue()
    slides: dict[str, Path] = {}
    for name, size in (("dense", args.dense_size), ("sparse", args.sparse_size), ("giant", args.giant_size)):
        if not size:
            continue
        like = args.dense_size if args.aligned and name != "dense" else None
        tif = work / f"{name}-{size}{'-aligned' if like else ''}.tif"
        if not tif.exists():
            t = time.perf_counter()
            write_slide(tif, size, patch, island_origins(size, like=like))
            print(f"wrote {tif} ({tif.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        slides[name] = tif
    config = None
    if args.report_off:
        config = work / "report-off.yaml"
        config.write_text("report: {enabled: false}\n")
    info = machine()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in slides}
    for r in range(args.rounds):
        for name in ("dense", "sparse"):
            runs[name].append(score(slides[name], work / f"out-{name}", config))
            print(json.dumps({"round": r, "slide": name, **runs[name][-1]}), file=sys.stderr)
    if "giant" in slides:
        runs["giant"].append(score(slides["giant"], work / "out-giant", config))
        print(json.dumps({"slide": "giant", **runs["giant"][-1]}), file=sys.stderr)
    summary = {n: {k: {"best": min(x[k] for x in rs), "median": statistics.median(x[k] for x in rs)}
                   for k in ("wall_s", "peak_rss_mib", "total_s", "score_s", "mask_s")} | {"last": rs[-1]}
               for n, rs in runs.items()}
    result = {"machine": info, "args": vars(args), "slides": {n: {"path": str(p), "mib": p.stat().st_size / 2**20}
                                                              for n, p in slides.items()},
              "runs": runs, "summary": summary, "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sparse.json").write_text(json.dumps(result, indent=2) + "\n")
    md = table(result)
    (out / "sparse.md").write_text(md)
    print(md)


def table(res: dict[str, Any]) -> str:
    s, a = res["summary"], res["args"]
    d, p = s["dense"], s["sparse"]
    lines = [f"dense {a['dense_size']}² px vs sparse {a['sparse_size']}² px, 16 islands of {ISLAND}² px each, {MPP} µm/px; "
             f"report {'off' if a['report_off'] else 'on'}; islands {'block-aligned' if a.get('aligned') else 'on a grid'}; {res['machine']['nproc']} CPUs, load average "
             f"{res['machine']['load_average']} at start, {res['load_average_end']} at end; best of {a['rounds']} interleaved rounds "
             "(median in brackets)", ""]
    hdr = f"| | {a['dense_size']}² slide | {a['sparse_size']}² slide | ratio (best) | ratio (median) |"
    if "giant" in s:
        hdr += f" {a['giant_size']}² slide |"
    lines += [hdr, "| --- | --- | --- | --- | --- |" + (" --- |" if "giant" in s else "")]
    for key, label, unit in (("wall_s", "wall time, fresh process", "s"), ("total_s", "run.json `total_s`", "s"),
                             ("score_s", "`score_s`", "s"), ("mask_s", "`mask_s`", "s"), ("peak_rss_mib", "peak RSS", "MiB")):
        def fmt(v: float, unit: str = unit) -> str:
            return f"{v:.0f} {unit}" if unit == "MiB" else f"{v:.2f} {unit}"

        row = (f"| {label} | {fmt(d[key]['best'])} ({fmt(d[key]['median'])}) | {fmt(p[key]['best'])} ({fmt(p[key]['median'])}) | "
               f"{p[key]['best'] / d[key]['best']:.2f}× | {p[key]['median'] / d[key]['median']:.2f}× |")
        if "giant" in s:
            row += f" {fmt(s['giant'][key]['best'])} |"
        lines.append(row)
    for key, label in (("patches_scored", "patches scored"), ("regions", "regions"), ("blocks", "blocks"),
                       ("blocks_without_foreground", "blocks without foreground")):
        row = f"| {label} | {d['last'][key]} | {p['last'][key]} | | |"
        if "giant" in s:
            row += f" {s['giant']['last'][key]} |"
        lines.append(row)
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
