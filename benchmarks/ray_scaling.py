"""Ray scaling: the same generated smear scored by 1 and by 2 CPU actors (one in-process Ray).

Usage: ``.venv/bin/python benchmarks/ray_scaling.py [--size 4096] [--chunk-cells 32] [--workdir /tmp/slidescore-ray-bench]``

The smear is ``slidescore.offline.demo.generate_smear(path, size_px=4096, seed=5)`` (generated once), scored
with the built-in model and the default config except ``tiling.chunk_cells`` (32 cells = 512 px
blocks at the scored level, so the pool has several blocks to share; the default 128 would make a
2048² level a single block). Ray runs in this process (``ray.init(num_cpus=2)``, no dashboard,
``RAY_AUTH_MODE=disabled``); each actor reserves 1 CPU, so Ray gives it one torch thread
(``OMP_NUM_THREADS=1``). Each run starts a fresh pool (``wait_for_pool=True``: no block is
dispatched before every actor has loaded the model) and writes a fresh output folder.

Columns: *wall seconds* = scoring wall time from the run record (first block dispatched → last
block record in: read, score, blend, write on the actors); *patches/s* = patches scored / that;
*speed-up* over 1 actor; *call seconds* = the whole ``score_samples_ray`` call (actor start and
model load, planning, scoring, pyramid, regions); *pool start* = seconds until every actor was
ready; *actor-seconds* and *MiB read* (decoded pixels) from the run record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4096, help="smear size in level-0 pixels (square)")
    ap.add_argument("--chunk-cells", type=int, default=32, help="tiling.chunk_cells (block = chunk with block_chunks 1)")
    ap.add_argument("--actors", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", default="/tmp/slidescore-ray-bench")
    args = ap.parse_args()

    os.environ["RAY_AUTH_MODE"] = "disabled"  # an in-process cluster needs no auth; writes no ~/.ray/auth_token
    import ray

    from slidescore.config import JobConfig
    from slidescore.offline.demo import generate_smear
    from slidescore.run.ray import score_samples_ray

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tif = work / f"smear{args.size}.tif"
    if not tif.exists():
        generate_smear(tif, size_px=args.size, seed=5, progress=False)

    ray.init(num_cpus=max(2, max(args.actors)), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for n in args.actors:
            out = work / f"out-{n}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = JobConfig().replace(output={"uri": str(out)}, tiling={"chunk_cells": args.chunk_cells},
                                      cluster={"n_actors": n, "num_cpus_per_actor": 1, "num_gpus_per_actor": 0})
            t0 = time.perf_counter()
            (res,) = score_samples_ray([str(tif)], cfg, str(out), progress=False, wait_for_pool=True)
            wall = time.perf_counter() - t0
            if res.status != "ok":
                raise SystemExit(f"{n} actor(s): sample {res.status}: {res.error}")
            run = json.loads((out / "run.json").read_text())
            rec = run["samples"][0]
            rows.append({"actors": n, "call_s": wall, "wall_s": rec["seconds_scoring"], "pool_s": run["cluster"]["seconds_pool_start"],
                         "patches": rec["patches_scored"], "blocks": rec["blocks"]["total"],
                         "actor_s": rec["actor_seconds"], "mib_read": rec["bytes_read"] / 2**20, "used": rec["n_actors"]})
    finally:
        ray.shutdown()

    base = rows[0]["wall_s"]
    print(f"{tif.name}: {args.size}×{args.size} px, {rows[0]['blocks']} blocks of {args.chunk_cells} cells, "
          f"{rows[0]['patches']:,} patches scored; {platform.machine()}, {os.cpu_count()} cores, ray {ray.__version__}\n")
    print("| actors | wall seconds | patches/s | speed-up | actors used | actor-seconds | MiB read | pool start s | call seconds |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['actors']} | {r['wall_s']:.2f} | {r['patches'] / r['wall_s']:,.0f} | {base / r['wall_s']:.2f}× | "
              f"{r['used']} | {r['actor_s']:.2f} | {r['mib_read']:.1f} | {r['pool_s']:.1f} | {r['call_s']:.1f} |")


if __name__ == "__main__":
    main()
