"""The fixed cost of a Ray job: many small slides scored by ``slidescore score`` in one process vs ``ray job submit``.

Usage: ``.venv/bin/python benchmarks/ray_overhead.py [--n-slides 8] [--size 4096] [--rounds 3] [--layouts 2x1 1x2]
[--per-sample-jobs] [--workdir /tmp/slidescore-ray-overhead] [--out benchmarks/results/ray-overhead]``

Generates ``--n-slides`` synthetic smears of ``--size``² px (JPEG-tiled pyramids at 0.25 µm/px,
``generate_smear(…, seed=100 + i)``, once), starts its own local head (``ray start --head`` with
``nproc`` CPUs, auth off, free loopback ports; stopped at the end, only it), and then, round after
round, interleaved so that load from other processes hits both alike:

- **one process**: ``slidescore score <slides> -c job.yaml -o <out> -q`` in a fresh process;
- **Ray job**: ``ray job submit --working-dir <repo> --runtime-env-json '{"excludes": […]}' --
  python -m jobs.score --config job.yaml --output <out> -q --uri … --uri …`` (one job of all the
  slides) for each actor layout of ``--layouts`` (``AxC``: A actors of C CPUs each; ``2x1`` is the
  issue's case, ``1x2`` the layout that suits a 2-core machine); its wall time as the CLI sees it
  (which tails the job's log and polls with Ray's own 1-s sleeps) and the job's duration in Ray's
  job record (submitted → ended);
- **empty Ray job**: the same submission running ``python -c pass``: what Ray's job machinery costs
  whatever the job does (the supervisor actor, the runtime env, the CLI);
- **warm pool** (``--keep-warm-s`` > 0, the first layout): two jobs in a row with
  ``cluster.keep_warm_s``: the first starts the pool (cold: in every round the next round's
  default job has retired the idle pool to make room), the second takes its actors warm.

CPU seconds of a job are also split by process role (the job's driver, its scoring actors, Ray's
job supervisor, and the rest of the head: raylet, GCS, dashboard, agents, idle workers).

Same config for both (built-in model, report off; the default config otherwise). The first round
is a warm-up and not counted (it uploads the working directory package once). With
``--per-sample-jobs``, also the unbatched intake's way: one job per slide, all submitted at once.
Outputs: the Ray job's mosaics against the one-process run's, chunk by chunk and region by region
(``benchmarks/_bench.py`` ``compare_outputs``), and against a one-process run with one torch thread
per process as each actor has (byte-identical expected). Writes ``ray_overhead.json`` and
``ray_overhead.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RAY, REPO, Head, TreeCpu, compare_outputs, machine, run_child, start_head  # noqa: E402


def make_slides(work: Path, n: int, size: int) -> list[Path]:
    from slidescore.offline.demo import generate_smear

    slides = []
    for i in range(n):
        tif = work / f"smear{size}-{i}.tif"
        if not tif.exists():
            generate_smear(tif, size_px=size, seed=100 + i, progress=False)
        slides.append(tif)
    return slides


class RoleCpu(TreeCpu):
    """:class:`TreeCpu` split by what each process is (its command line when last seen)."""

    def __init__(self, root: int, period_s: float = 0.25) -> None:
        super().__init__(root, period_s)
        self.cmd: dict[tuple[int, int], str] = {}

    def _sample(self, initial: bool) -> None:
        super()._sample(initial)
        for key in self.last:
            try:
                cmd = Path(f"/proc/{key[0]}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue  # ended: keep the last command line seen
            if cmd.strip():  # a zombie's is empty: keep the last one seen
                self.cmd[key] = cmd

    def by_role(self) -> dict[str, float]:
        tck = os.sysconf("SC_CLK_TCK")
        roles: dict[str, float] = {}
        for key, used in self.last.items():
            cmd = self.cmd.get(key, "")
            role = ("driver" if "jobs.score" in cmd or " -c pass" in cmd else "actors" if "ScoringActor" in cmd
                    else "supervisor" if "JobSupervisor" in cmd else "rest")
            roles[role] = round(roles.get(role, 0.0) + (used - self.first[key]) / tck, 2)
        return roles


def submit(head: Head, entry: list[str], sid: str, *, wait: bool = True, working_dir: Path = REPO) -> dict[str, Any]:
    from slidescore.intake.backends import WORKING_DIR_EXCLUDES

    cmd = [str(RAY), "job", "submit", "--address", head.url, "--submission-id", sid, "--working-dir", str(working_dir),
           "--runtime-env-json", json.dumps({"excludes": list(WORKING_DIR_EXCLUDES)})]
    if not wait:
        cmd.append("--no-wait")
    with RoleCpu(head.proc.pid) as cpu:  # the head's processes: supervisor, driver, actors, background
        res = run_child([*cmd, "--", *entry], env=head.env)
    if wait:
        res.update(job_record(head, sid))
        res["head_cpu_s"], res["cli_cpu_s"], res["cpu_by_role"] = cpu.seconds, res["cpu_s"], cpu.by_role()
    return res


def job_record(head: Head, sid: str) -> dict[str, Any]:
    job = head.get(f"/api/jobs/{sid}")
    return {"status": job["status"], "job_s": (job["end_time"] - job["start_time"]) / 1000 if job.get("end_time") else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-slides", type=int, default=8)
    ap.add_argument("--size", type=int, default=4096, help="slide edge in level-0 pixels")
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up")
    ap.add_argument("--layouts", nargs="+", default=["2x1", "1x2"], help="actor layouts AxC: A actors of C CPUs")
    ap.add_argument("--per-sample-jobs", action="store_true", help="also time one job per slide (the unbatched intake)")
    ap.add_argument("--keep-warm-s", type=float, default=30.0, help="cluster.keep_warm_s of the warm-pool pair of jobs "
                                                                      "(0: no warm-pool jobs)")
    ap.add_argument("--baseline-dir", type=Path, help="also run the first layout's job from this copy of the repository "
                                                      "(e.g. with an older slidescore/run/ray), in the same rounds")
    ap.add_argument("--workdir", default="/tmp/slidescore-ray-overhead")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ray-overhead"))
    args = ap.parse_args()

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    slides = make_slides(work, args.n_slides, args.size)
    sids = [p.stem for p in slides]
    base = {"model": {"name": "builtin:smearnet", "device": "cpu"}, "report": {"enabled": False}}
    jobs: dict[str, Path] = {}
    for layout in args.layouts:
        n, c = (int(x) for x in layout.split("x"))
        jobs[layout] = work / f"job-{layout}.yaml"
        jobs[layout].write_text(json.dumps({**base, "cluster": {"n_actors": n, "num_cpus_per_actor": c, "num_gpus_per_actor": 0}}))
    n, c = (int(x) for x in args.layouts[0].split("x"))
    warm_job = work / "job-warm.yaml"
    warm_job.write_text(json.dumps({**base, "cluster": {"n_actors": n, "num_cpus_per_actor": c, "num_gpus_per_actor": 0,
                                                        "keep_warm_s": args.keep_warm_s}}))
    local_job = work / "job-local.yaml"
    local_job.write_text(json.dumps(base))
    info = machine()
    local_cmd = [str(RAY.with_name("slidescore")), "score", *map(str, slides), "-c", str(local_job), "-q"]
    uris = [a for p in slides for a in ("--uri", str(p))]

    def entry(layout: str) -> list[str]:
        return ["python", "-m", "jobs.score", "--config", str(jobs.get(layout, warm_job)), "-q", *uris]

    def job_row(res: dict[str, Any], out: Path) -> dict[str, Any]:
        run = json.loads((out / "run.json").read_text())
        cl = run["cluster"]
        return {"cli_s": res["wall_s"], "job_s": res["job_s"], "driver_s": run["seconds"], "head_cpu_s": res["head_cpu_s"],
                "cpu_by_role": res["cpu_by_role"], "timings": cl.get("timings"), "pool_start_s": cl["seconds_pool_start"],
                "driver_startup": cl.get("driver_startup"), "driver_cpu_s": cl.get("driver_cpu_s"),
                "actors": [{k: a.get(k) for k in ("cpu_s", "process_s", "jobs")} for a in cl.get("actor_pinning", [])],
                "actors_warm": cl.get("actors_warm")}

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the head on the way out (finally)
    head = start_head(os.cpu_count() or 2, work / "head.log")
    stamp = time.strftime("%H%M%S")
    rows: list[dict[str, Any]] = []
    first = args.layouts[0]
    try:
        for r in range(args.rounds + 1):
            for out in work.glob(f"out-*-{r}"):
                shutil.rmtree(out)
            loc = run_child([*local_cmd, "-o", str(work / f"out-local-{r}")])
            if loc["rc"] != 0:
                raise SystemExit(f"round {r}: slidescore score exited {loc['rc']}:\n{loc['output'][-3000:]}")
            row: dict[str, Any] = {"round": r, "local_s": loc["wall_s"], "local_rss_mib": loc["peak_rss_mib"], "local_cpu_s": loc["cpu_s"]}
            for layout in args.layouts:
                res = submit(head, [*entry(layout), "--output", str(work / f"out-ray{layout}-{r}")], f"bench-{stamp}-{layout}-{r}")
                if res["rc"] != 0:
                    raise SystemExit(f"round {r}: ray job ({layout}) exited {res['rc']}:\n{res['output'][-3000:]}")
                row[layout] = job_row(res, work / f"out-ray{layout}-{r}")
            if args.baseline_dir:
                res = submit(head, [*entry(first), "--output", str(work / f"out-base-{r}")], f"base-{stamp}-{r}",
                             working_dir=args.baseline_dir)
                row["baseline"] = {"job_s": res["job_s"], "cli_s": res["wall_s"], "head_cpu_s": res["head_cpu_s"], "rc": res["rc"],
                                   "cpu_by_role": res["cpu_by_role"]}
            if args.keep_warm_s > 0:  # the pool's first job (cold: the default jobs above retired any idle pool), then a warm one
                for kind in ("pool_first", "pool_next"):
                    out = work / f"out-{kind}-{r}"
                    res = submit(head, [*entry("warm"), "--output", str(out)], f"{kind}-{stamp}-{r}")
                    if res["rc"] != 0:
                        raise SystemExit(f"round {r}: ray job ({kind}) exited {res['rc']}:\n{res['output'][-3000:]}")
                    row[kind] = job_row(res, out)
            noop = submit(head, ["python", "-c", "pass"], f"noop-{stamp}-{r}")
            row.update(noop_cli_s=noop["wall_s"], noop_job_s=noop["job_s"], noop_head_cpu_s=noop["head_cpu_s"],
                       load=round(os.getloadavg()[0], 2))
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        last = args.rounds
        same = compare_outputs(work / f"out-local-{last}", work / f"out-ray{first}-{last}", sids)
        warm_out = work / f"out-pool_next-{last}"
        shutil.rmtree(work / "out-local-1thread", ignore_errors=True)
        one = run_child([*local_cmd, "-o", str(work / "out-local-1thread")], env={**os.environ, "OMP_NUM_THREADS": "1"})
        same_1t = compare_outputs(work / "out-local-1thread", work / f"out-ray{first}-{last}", sids) if one["rc"] == 0 \
            else {"error": one["output"][-2000:]}
        same_warm = compare_outputs(work / "out-local-1thread", warm_out, sids) if one["rc"] == 0 and warm_out.exists() else None
        per_sample = None
        if args.per_sample_jobs:
            t0 = time.perf_counter()
            names = [f"one-{stamp}-{i}" for i in range(len(slides))]
            for name, p in zip(names, slides, strict=True):
                submit(head, ["python", "-m", "jobs.score", "--config", str(jobs[first]), "-q", "--uri", str(p),
                              "--output", str(work / "out-per-sample")], name, wait=False)
            while not all(job_record(head, n)["status"] in ("SUCCEEDED", "FAILED", "STOPPED") for n in names):
                time.sleep(0.2)
            per_sample = {"wall_s": time.perf_counter() - t0, "status": [job_record(head, n)["status"] for n in names],
                          "job_s": [job_record(head, n)["job_s"] for n in names]}
    finally:
        head.stop()

    timed = rows[1:] or rows

    def stat(f: Any) -> dict[str, float]:
        vals = [f(r) for r in timed]
        return {"median": statistics.median(vals), "best": min(vals)}

    summary: dict[str, Any] = {k: stat(lambda r, k=k: r[k]) for k in ("local_s", "local_cpu_s", "noop_cli_s", "noop_job_s",
                                                                      "noop_head_cpu_s")}
    for layout in [*args.layouts, *(("pool_first", "pool_next") if args.keep_warm_s > 0 else ())]:
        for k in ("cli_s", "job_s", "driver_s", "head_cpu_s"):
            summary[f"{layout}_{k}"] = stat(lambda r, layout=layout, k=k: r[layout][k])
        summary[f"{layout}_ratio"] = stat(lambda r, layout=layout: r[layout]["job_s"] / r["local_s"])
        for role in ("driver", "actors", "supervisor", "rest"):
            summary[f"{layout}_cpu_{role}"] = stat(lambda r, layout=layout, role=role: r[layout]["cpu_by_role"].get(role, 0.0))
    if args.baseline_dir:
        for k in ("job_s", "cli_s", "head_cpu_s"):
            summary[f"baseline_{k}"] = stat(lambda r, k=k: r["baseline"][k])
        summary["baseline_ratio"] = stat(lambda r: r["baseline"]["job_s"] / r["local_s"])
        for role in ("driver", "actors", "supervisor", "rest"):
            summary[f"baseline_cpu_{role}"] = stat(lambda r, role=role: r["baseline"]["cpu_by_role"].get(role, 0.0))
    result = {"machine": info, "load_average_end": [round(x, 2) for x in os.getloadavg()], "args": vars(args), "rounds": rows,
              "summary": summary, "outputs_vs_local": same, "outputs_vs_local_1thread": same_1t,
              "outputs_warm_vs_local_1thread": same_warm, "per_sample_jobs": per_sample,
              "commands": {"local": " ".join(local_cmd) + " -o OUT",
                           "ray": f"ray job submit --address URL --working-dir {REPO} --runtime-env-json '{{\"excludes\": […]}}' -- "
                                  + " ".join(entry(first)) + " --output OUT"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_overhead.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = table(result)
    (out / "ray_overhead.md").write_text(md)
    print(md)


def table(res: dict[str, Any]) -> str:
    s, a = res["summary"], res["args"]

    def cell(k: str) -> str:
        return f"{s[k]['median']:.2f} | {s[k]['best']:.2f}"

    def roles(k: str) -> str:
        return ", ".join(f"{role} {s[f'{k}_cpu_{role}']['median']:.2f}" for role in ("driver", "actors", "supervisor", "rest"))

    lines = [f"{a['n_slides']} slides of {a['size']}² px; {res['machine']['nproc']} CPUs; load average "
             f"{res['machine']['load_average']} at start, {res['load_average_end']} at end; {max(1, len(res['rounds']) - 1)} timed "
             "rounds after a warm-up", "",
             "| | seconds, median | best | × one process (median of per-round ratios) |", "| --- | --- | --- | --- |",
             f"| `slidescore score`, one process | {cell('local_s')} | 1.00 |"]
    for layout in a["layouts"]:
        n, c = layout.split("x")
        lines += [f"| Ray job, {n} actor(s) × {c} CPU: Ray's job record (submitted → ended) | {cell(layout + '_job_s')} | "
                  f"**{s[layout + '_ratio']['median']:.2f}** |",
                  f"| … `ray job submit` CLI wall | {cell(layout + '_cli_s')} | |",
                  f"| … the job's driver (`run.json` seconds) | {cell(layout + '_driver_s')} | |",
                  f"| … CPU seconds of the head's processes | {cell(layout + '_head_cpu_s')} | "
                  f"{s[layout + '_head_cpu_s']['median'] / s['local_cpu_s']['median']:.2f} (CPU) |",
                  f"| … CPU seconds by role (median): {roles(layout)} | | | |"]
    for kind, what in (("pool_first", "the pool's first job (starts it)"), ("pool_next", "the next job (warm actors)")):
        if f"{kind}_job_s" not in s:
            continue
        lines += [f"| warm pool (`keep_warm_s: {a['keep_warm_s']:g}`), {what}: job record | {cell(kind + '_job_s')} | "
                  f"**{s[kind + '_ratio']['median']:.2f}** |",
                  f"| … CPU seconds of the head's processes | {cell(kind + '_head_cpu_s')} | "
                  f"{s[kind + '_head_cpu_s']['median'] / s['local_cpu_s']['median']:.2f} (CPU) |",
                  f"| … CPU seconds by role (median): {roles(kind)} | | | |"]
    if "baseline_job_s" in s:
        lines += [f"| Ray job, {a['layouts'][0]}, from `--baseline-dir` (before): job record | {cell('baseline_job_s')} | "
                  f"{s['baseline_ratio']['median']:.2f} |",
                  f"| … CPU seconds of the head's processes | {cell('baseline_head_cpu_s')} | "
                  f"{s['baseline_head_cpu_s']['median'] / s['local_cpu_s']['median']:.2f} (CPU) |",
                  f"| … CPU seconds by role (median): {roles('baseline')} | | | |"]
    lines += [f"| empty Ray job (`python -c pass`): job record | {cell('noop_job_s')} | |",
              f"| empty Ray job: CLI wall | {cell('noop_cli_s')} | |",
              f"| empty Ray job: CPU seconds of the head's processes | {cell('noop_head_cpu_s')} | |",
              f"| one process: CPU seconds | {cell('local_cpu_s')} | 1.00 (CPU) |", ""]
    o, o1 = res["outputs_vs_local"], res["outputs_vs_local_1thread"]
    lines.append(f"Outputs ({a['layouts'][0]}) vs the one-process run: {o['chunks'] - o['chunks_differing']}/{o['chunks']} chunk files "
                 f"byte-identical, max abs diff {o['max_abs_diff']:.1e}, NaN pattern equal: {o['nan_pattern_equal']}, regions "
                 f"identical: {o['regions_identical']} (same cells, boxes, ranks: {o['regions_same_cells']}; probabilities within "
                 f"{o['max_region_probability_diff']:.1e}).")
    if "chunks" in o1:
        lines.append(f"Outputs vs one process with one torch thread (as each 1-CPU actor): {o1['chunks'] - o1['chunks_differing']}/"
                     f"{o1['chunks']} chunk files byte-identical, regions identical: {o1['regions_identical']}.")
    ow = res.get("outputs_warm_vs_local_1thread")
    if ow and "chunks" in ow:
        lines.append(f"Outputs of the warm-pool job vs one process with one torch thread: {ow['chunks'] - ow['chunks_differing']}/"
                     f"{ow['chunks']} chunk files byte-identical, regions identical: {ow['regions_identical']}.")
    if res["per_sample_jobs"]:
        p = res["per_sample_jobs"]
        lines.append(f"One job per slide ({len(p['status'])} jobs submitted at once): {p['wall_s']:.1f} s until all ended "
                     f"({', '.join(sorted(set(p['status'])))}).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
