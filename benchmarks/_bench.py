"""What the benchmarks of issue #16 share: the machine, fresh child processes with their peak RSS,
a local Ray head, and the comparison of two output folders chunk by chunk.

Not a benchmark itself (``benchmarks/sparse.py`` and ``benchmarks/ray_overhead.py`` import it).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
RAY = Path(sys.executable).with_name("ray")


def machine() -> dict[str, Any]:
    """CPU model, ``nproc``, memory (``free -g``'s total), load averages, versions."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gib = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 2**20, 1)
    import ray
    import torch

    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_total_gib": mem_gib, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "load_average": [round(x, 2) for x in os.getloadavg()],
            "time_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_child(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | Path | None = None,
              timeout: float = 3600) -> dict[str, Any]:
    """Run ``cmd`` as a fresh process: wall seconds, exit code, output, and the child's peak RSS.

    Peak RSS is ``ru_maxrss`` of the waited-for child (``os.wait4``): the largest resident set of that
    process (the children it spawns are not included; ``slidescore score`` spawns none).
    """
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError(f"{cmd[:4]}… ran past {timeout} s")
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read().decode(errors="replace")
    return {"wall_s": wall, "rc": proc.returncode, "output": text, "peak_rss_mib": usage.ru_maxrss / 1024,
            "cpu_s": usage.ru_utime + usage.ru_stime}


class TreeCpu:
    """CPU seconds (user + system) used by the processes under ``root`` while it runs (a context manager).

    Under a ``ray start --head`` process: raylet, GCS, dashboard, the job supervisors, the drivers they
    start and the actors. Exited workers are not reliably reaped by a process of the tree, so the
    tree is sampled every ``period_s`` and each process (pid and start time) counts with the most CPU
    it was seen with, less what it had used before; a process's last < ``period_s`` can be missed.
    """

    def __init__(self, root: int, period_s: float = 0.25) -> None:
        import threading

        self.root, self.period_s = root, period_s
        self.first: dict[tuple[int, int], int] = {}
        self.last: dict[tuple[int, int], int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, initial: bool) -> None:
        parent, cpu = {}, {}
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                f = stat.read_text().rsplit(")", 1)[1].split()  # state ppid … utime(11) stime(12) … starttime(19)
            except (OSError, IndexError):
                continue  # the process ended while we looked
            pid = int(stat.parent.name)
            parent[pid], cpu[(pid, int(f[19]))] = int(f[1]), int(f[11]) + int(f[12])
        children: dict[int, list[int]] = {}
        for pid, ppid in parent.items():
            children.setdefault(ppid, []).append(pid)
        tree, todo = set(), [self.root]
        while todo:
            pid = todo.pop()
            tree.add(pid)
            todo += children.get(pid, [])
        for key, used in cpu.items():
            if key[0] in tree:
                self.first.setdefault(key, used if initial else 0)
                self.last[key] = max(used, self.last.get(key, 0))

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self._sample(False)

    def __enter__(self) -> TreeCpu:
        self._sample(True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample(False)

    @property
    def seconds(self) -> float:
        return sum(self.last[k] - self.first[k] for k in self.last) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Head:
    """A ``ray start --head`` this benchmark started (and only it stops)."""

    url: str
    env: dict[str, str]
    proc: subprocess.Popen
    temp_dir: str

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        """SIGTERM the head, then SIGKILL what is left of its process group; never ``ray stop``
        (it would stop every Ray instance on the machine)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_head(num_cpus: int, log: Path) -> Head:
    """A local head on free loopback ports, auth off (a local benchmark), with the dashboard's job server."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="disabled", PATH=f"{RAY.parent}{os.pathsep}{env.get('PATH', '')}")
    dash, agent = free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="raybench", dir="/tmp")  # short: Ray's unix sockets live under it
    cmd = [str(RAY), "start", "--head", "--block", f"--port={free_port()}", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--ray-client-server-port={free_port()}", f"--dashboard-agent-listen-port={agent}", "--disable-usage-stats",
           f"--temp-dir={temp_dir}"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    head = Head(f"http://127.0.0.1:{dash}", env, proc, temp_dir)
    deadline = time.monotonic() + 180
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            head.get("/api/version")
            socket.create_connection(("127.0.0.1", agent), timeout=5).close()
            return head
        except OSError:
            if time.monotonic() > deadline:
                head.stop()
                raise SystemExit(f"the Ray dashboard did not answer within 180 s:\n{log.read_text()[-3000:]}") from None
            time.sleep(1)


def compare_outputs(a: Path, b: Path, sample_ids: list[str]) -> dict[str, Any]:
    """Both runs' outputs of each sample: every chunk file of both mosaics (probabilities and mask, every
    level) byte for byte, the decoded level 0, and the regions.

    ``chunks_identical``: chunk files equal byte for byte (metadata files are left out: they name the
    output folder); ``max_abs_diff``: over the decoded level-0 probabilities (NaN = not scored must
    match); ``regions_identical``: regions.json's regions equal, every field; ``regions_same_cells``:
    equal but for float noise in their mean and peak probabilities (same count, ranks, boxes, cells, peak positions).
    """
    import numpy as np

    from slidescore.io import mosaic as mz

    out: dict[str, Any] = {"chunks": 0, "chunks_differing": 0, "max_abs_diff": 0.0, "nan_pattern_equal": True,
                           "regions_identical": True, "regions_same_cells": True, "max_region_probability_diff": 0.0, "notes": []}
    for sid in sample_ids:
        for name in ("probabilities.ome.zarr", "mask.ome.zarr"):
            ra, rb = a / sid / name, b / sid / name
            fa = {p.relative_to(ra) for p in ra.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json"))
                  and "OME" not in p.parts}
            fb = {p.relative_to(rb) for p in rb.rglob("*") if p.is_file() and not p.name.startswith((".z", "zarr.json"))
                  and "OME" not in p.parts}
            if fa != fb:
                out["notes"].append(f"{sid}/{name}: chunk files differ: {sorted(map(str, fa ^ fb))[:5]}")
            for rel in sorted(fa & fb):
                out["chunks"] += 1
                out["chunks_differing"] += (ra / rel).read_bytes() != (rb / rel).read_bytes()
        pa = mz.read_level(a / sid / "probabilities.ome.zarr", 0)
        pb = mz.read_level(b / sid / "probabilities.ome.zarr", 0)
        out["nan_pattern_equal"] &= bool(np.array_equal(np.isnan(pa), np.isnan(pb)))
        if np.isfinite(pa).any():
            out["max_abs_diff"] = max(out["max_abs_diff"], float(np.nanmax(np.abs(pa - pb))))
        regions_a = json.loads((a / sid / "regions.json").read_text())["regions"]
        regions_b = json.loads((b / sid / "regions.json").read_text())["regions"]
        if regions_a != regions_b:
            out["regions_identical"] = False
            floats = ("mean_probability", "peak_probability")
            if [{k: v for k, v in r.items() if k not in floats} for r in regions_a] != \
                    [{k: v for k, v in r.items() if k not in floats} for r in regions_b]:
                out["regions_same_cells"] = False
                out["notes"].append(f"{sid}: regions differ beyond their probabilities")
            else:
                out["max_region_probability_diff"] = max(out["max_region_probability_diff"], max(
                    abs(x[k] - y[k]) for x, y in zip(regions_a, regions_b, strict=True) for k in floats))
    out["identical"] = out["chunks_differing"] == 0 and out["regions_identical"] and not out["notes"]
    return out
