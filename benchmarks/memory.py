"""Peak memory of scoring a 4k×4k vs a 16k×16k JPEG-tiled smear TIFF (one process each).

Usage: ``.venv/bin/python benchmarks/memory.py [--sizes 4096 16384] [--workdir /tmp/slidescore-bench] [--json]``

Each size is generated once (synthetic smear, 0.25 µm/px pyramid), then scored by
``slidescore score`` in a fresh child process whose peak RSS (``ru_maxrss``) is reported. The
claim under test: peak memory depends on the block size, not on the image size.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

CHILD = """
import json, resource, sys, time
from slidescore.cli import main
t = time.perf_counter()
rc = main(["score", sys.argv[1], "-o", sys.argv[2], "-q", "--overwrite"])
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t,
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--workdir", default="/tmp/slidescore-bench")
    ap.add_argument("--json", action="store_true", help="print the rows as one JSON line (for benchmarks/speed.py)")
    args = ap.parse_args()
    from slidescore.offline.demo import generate_smear

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        tif = work / f"smear-{size}.tif"
        if not tif.exists():
            t = time.perf_counter()
            generate_smear(tif, size, seed=11, progress=False)
            print(f"generated {tif} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        proc = subprocess.run([sys.executable, "-c", CHILD, str(tif), str(work / f"out-{size}")], capture_output=True, text=True, check=True)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        rec.update(size=size, file_mib=tif.stat().st_size / 2**20)
        rows.append(rec)
        print(json.dumps(rec), file=sys.stderr)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"machine: {platform.machine()} {platform.processor() or ''}, python {platform.python_version()}, "
          f"{resource.getrlimit(resource.RLIMIT_AS)}")
    print("| image (level 0) | TIFF size | wall time | peak RSS |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['size']}×{r['size']} | {r['file_mib']:.0f} MiB | {r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB |")
    if len(rows) >= 2:
        print(f"\nratio largest/smallest peak RSS: {rows[-1]['peak_rss_mib'] / rows[0]['peak_rss_mib']:.2f}")


if __name__ == "__main__":
    main()
