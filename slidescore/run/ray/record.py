"""The run record of a Ray run: per sample what the driver measured, per run the pool and where the job's fixed cost went."""

from __future__ import annotations

import time
from typing import Any

import ray

from slidescore.run import lifecycle
from slidescore.stages.records import RunRecord, SampleResult


def write_run_record(driver: Any) -> None:
    """The run-level ``run.json`` of a :class:`~slidescore.run.ray.driver.Driver` (typed ``Any``: no import
    circle): one row per sample with what the Ray runner measured, and the pool's record."""
    if driver.shipped is None:  # the run stopped before the model was read: nothing was planned or scored
        return
    info = driver.shipped.info(driver.devices, driver.scoring)
    c = driver.cfg.cluster
    rows = []
    for s in driver.samples:
        r = s.result
        if r is None:  # cannot happen once the loop ended normally; recorded rather than crashing the record
            r = SampleResult(s.sid, s.uri, "failed", "", error="not finished", error_type="RunAborted", images=list(s.spec.uris))
        measured: dict[str, Any] = {
            "blocks_done": len(s.records), "blocks_resumed": sum(rec.resumed for rec in s.records.values()),
            "patches_scored": s.patches_scored, "retries": s.retries,
            "seconds": round((s.t_end or s.t_start) - s.t_start, 3),
            "seconds_scoring": round(s.t_last_record - s.t_first_task, 3)
            if s.t_first_task is not None and s.t_last_record is not None else None,
            "bytes_read": s.bytes_read, "actor_seconds": round(s.actor_seconds, 3), "actors": sorted(s.actors)}
        if s.plans:
            measured["blocks_total"] = s.n_blocks
        rows.append(lifecycle.sample_row(r, **measured))
    cluster = {"ray_version": ray.__version__, "n_actors": len(driver.slots), "actors_started": driver.actors_started,
               "actors_replaced": driver.actors_replaced, "num_cpus_per_actor": c.num_cpus_per_actor,
               "num_gpus_per_actor": c.num_gpus_per_actor, "resources": ray.cluster_resources(),
               "actor_pinning": driver.actor_gpus, "blocks_done": driver.blocks_done,
               "seconds": time.perf_counter() - driver.t0,
               "seconds_pool_start": None if driver.t_pool is None or driver.t_pool_ready is None
               else round(driver.t_pool_ready - driver.t_pool, 3),
               "model_shipped_bytes": driver.model_bytes, "timings": dict(driver.timings),
               "driver_cpu_s": dict(driver.cpu), "driver_startup": dict(driver.startup),
               "keep_warm_s": c.keep_warm_s, "actors_warm": driver.actors_warm}
    record = RunRecord(driver.cfg.to_dict(), info, "ray", rows, cluster=cluster, seconds=round(time.perf_counter() - driver.t0, 3))
    lifecycle.write_run_record(driver.out_root, record, driver.cfg)
