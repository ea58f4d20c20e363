"""Ray job entrypoint: score the samples of a job config on the cluster this job runs on.

``python -m jobs.score --config job.yaml [--output DIR] [--uri URI ...] [--sample ID=URI,URI ...] [--overwrite] [--dry-run] [--quiet]``,
usually through ``ray job submit --working-dir . -- python -m jobs.score --config job.yaml``. The
samples come from the config (``samples.uris``, ``samples.manifest``, ``samples.prefix``) or, when
given, only from ``--uri`` / ``--sample`` (the intake poller submits one sample, or a batch of up to
``batch_size`` samples, per job so); the pool from ``cluster``. ``--dry-run``
validates the config, loads the model and plans every sample without writing anything.

Exit codes: 0 all samples ok (or, with ``--dry-run``, all plannable), 1 some samples failed (see
``failures.jsonl``), 2 usage, config, model or cluster error (nothing was scored).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from typing import Any

from slidescore.errors import ConfigError, InputError, ModelLoadError, OutputLocationError

EXIT_OK, EXIT_SAMPLES_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.score", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="job YAML with samples.uris / samples.manifest and a cluster section")
    p.add_argument("--output", "-o", help="output folder (overrides output.uri)")
    p.add_argument("--uri", action="append", default=[], metavar="URI",
                   help="score this image (repeatable); replaces the config's samples section (the intake poller uses it)")
    p.add_argument("--sample", action="append", default=[], metavar="ID=URI1,URI2",
                   help="score this sample of one or more images under this id (repeatable); like --uri, replaces the "
                        "config's samples section")
    p.add_argument("--overwrite", action="store_true", help="rescore samples whose finished outputs belong to another run")
    p.add_argument("--dry-run", action="store_true", help="validate, load the model, plan every sample; write nothing")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def print_dry_run(rows: list[dict[str, Any]]) -> int:
    for r in rows:
        if r["status"] == "failed":
            print(f"FAILED    {r['sample_id']}: {r['error']}", file=sys.stderr)
        elif r["status"] == "complete":
            print(f"complete  {r['sample_id']}: finished outputs of this run exist; would skip")
        else:
            print(f"to score  {r['sample_id']}: level {r['level']} ({r['level_mpp']:.3g} µm/px, {r['level_shape'][0]}×{r['level_shape'][1]} px), "
                  f"{r['blocks']} blocks ({r['blocks_done']} already done), {r['patches_to_score']:,} of {r['patches_total']:,} patches to score")
    n_bad = sum(r["status"] == "failed" for r in rows)
    print(f"dry run: {len(rows)} samples, {sum(r.get('blocks', 0) for r in rows)} blocks, "
          f"{sum(r.get('patches_to_score', 0) for r in rows):,} patches to score; {n_bad} would fail; nothing written")
    return EXIT_SAMPLES_FAILED if n_bad else EXIT_OK


def print_summary(results: list[Any], run: dict[str, Any], out_root: str, seconds: float) -> int:
    rows = {s["sample_id"]: s for s in run.get("samples", [])}
    for r in results:
        if r.status == "failed":
            print(f"FAILED   {r.sample_id}: {r.error}", file=sys.stderr)
            continue
        row = rows.get(r.sample_id, {})
        b = row.get("blocks", {})
        if r.status == "skipped":
            print(f"skipped  {r.sample_id}: already complete → {r.out_dir}")
        else:
            print(f"ok       {r.sample_id}: {b.get('done')} blocks ({b.get('resumed')} resumed), {row.get('patches_scored', 0):,} patches "
                  f"scored on {row.get('n_actors', 0)} actor(s) ({row.get('actor_seconds', 0):.1f} actor-s, "
                  f"{row.get('bytes_read', 0) / 2**20:,.1f} MiB read), {r.run['regions']['total']} regions, "
                  f"{row.get('seconds', 0):.1f} s → {r.out_dir}")
    failed = sum(r.status == "failed" for r in results)
    print(f"{len(results) - failed}/{len(results)} samples ok in {seconds:.1f} s; outputs under {out_root}")
    if failed:
        print(f"{failed} sample(s) failed; details in {out_root}/failures.jsonl", file=sys.stderr)
        return EXIT_SAMPLES_FAILED
    return EXIT_OK


RAY_WORKING_DIR_COPY = "/runtime_resources/working_dir_files/"  # where `ray job submit --working-dir` unpacks the job


def refuse_relative_paths_in_ray_copy(entries: list[Any], out_root: str) -> None:
    """Under ``ray job submit --working-dir``, the job runs in Ray's copy of that folder: a relative
    local path would read inputs from the copy and write outputs into Ray's session folder, where
    nobody finds them (and on several nodes each would write its own). Refuse them, with the fix."""
    if RAY_WORKING_DIR_COPY not in os.getcwd().replace(os.sep, "/"):
        return
    from slidescore.io.storage import is_local

    paths = [u for e in entries for u in (e.uris if hasattr(e, "uris") else (e,))] + [out_root]
    relative = [p for p in paths if is_local(p) and not p.startswith("file://") and not os.path.isabs(p)]
    if relative:
        raise ConfigError(
            f"relative local paths {relative[:3]} in a job run from Ray's copy of --working-dir ({os.getcwd()}): they would "
            "resolve inside that copy; give absolute paths (e.g. --uri \"$PWD/image.tif\" --output \"$PWD/out\"), or s3:// URIs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from slidescore.config import load_config
    from slidescore.io.outputs import read_json
    from slidescore.run.ray import ClusterError, dry_run_samples, score_samples_ray

    try:
        cfg = load_config(args.config)
        if args.output:
            cfg = cfg.replace(output={"uri": args.output})
        if args.overwrite:
            cfg = cfg.replace(output={"overwrite": True})
        # samples of several images (manifest `ID: URI URI`, samples.groups) come as SampleSpecs
        from slidescore.cli import parse_sample_arg

        given: list[Any] = [*args.uri, *(parse_sample_arg(s) for s in args.sample)]
        uris: list[Any] = given if given else cfg.samples.list_samples()
        if cfg.samples.prefix and not given:
            from slidescore.io.storage import list_images

            try:
                uris += list_images(cfg.samples.prefix)
            except InputError as e:
                raise ConfigError(f"samples.prefix: {e}") from None
        if not uris:
            raise ConfigError("samples: no samples to score; list image URIs in samples.uris, a file in samples.manifest, "
                              "or a folder / s3:// prefix holding images in samples.prefix")
        out_root = cfg.output.uri
        refuse_relative_paths_in_ray_copy(uris, out_root)
        if args.dry_run:
            return print_dry_run(dry_run_samples(uris, cfg, out_root))
        t0 = time.perf_counter()
        results = score_samples_ray(uris, cfg, out_root, progress=not args.quiet)
    except (ConfigError, ModelLoadError, OutputLocationError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return print_summary(results, read_json(f"{out_root}/run.json"), out_root, time.perf_counter() - t0)


if __name__ == "__main__":
    sys.exit(main())
