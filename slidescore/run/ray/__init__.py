"""Scoring on a Ray cluster: a fixed pool of model-holding actors fed with blocks through ``ray.wait``.

The driver starts the actors first (when some sample lacks its completion marker), reads the model
once and puts its bytes into the object store once, for every actor to build its classifier from
(:mod:`~slidescore.run.ray.shipping`: the driver plans with the card and checksum and builds its
own copy only for the report's explanation maps; every actor's card and checksum are checked
against them); it plans every sample (:func:`~slidescore.stages.plan.plan_images`, one sample ahead of the
actors, in a driver thread), puts each plan into the object store once, and feeds the blocks of all
samples to a fixed pool of :class:`ScoringActor` s in sample order with no barrier between samples:
when one sample's last blocks are in flight, idle actors already take the next sample's blocks.
Each actor keeps at most ``cluster.max_in_flight_per_actor`` tasks. A sample is finished
(:func:`~slidescore.run.lifecycle.finish_sample`: pyramid, regions, files, ``_SUCCESS``) on the driver,
in a second driver thread, as soon as its last block record arrives, while the actors go on.
Sample order (rather than round-robin over samples) finishes the first samples early, keeps few
readers open per actor, and leaves as many samples finished as possible when a job is stopped.
Blocks without foreground ride along with the next block that has some, so a task is never empty.
A sample of several images (:class:`~slidescore.config.SampleSpec`) is planned image by image
(:func:`~slidescore.stages.plan.plan_images`); its block tasks are per image, and it is finished once
the blocks of all its images are in (regions ranked across the images). Outputs may be local or
on an object store (``output.uri: s3://…``): actors and driver write through ``io.outputs``.

Why plain actors and ``ray.wait`` rather than Ray Data: our unit of work is a block of one sample
that writes its own mosaic chunks (docs/architecture.md, invariant 2) and returns a small
:class:`~slidescore.stages.records.BlockRecord`; we need those records per block (resume, progress,
run records, finishing a sample the moment its last block is done), a fixed pool sized by the
config (one actor per GPU, fractions of a GPU, or CPU actors; no autoscaling actor pools that
load the model again and again), and fault handling that knows blocks and samples. A Ray Data
pipeline would turn blocks into rows in batches it chooses, with retries and backpressure we
cannot tie to a sample, for nothing we need.

Faults: an actor that dies (``RayActorError``) is replaced and its in-flight blocks are
resubmitted (a block rewrites the same bytes, so this is idempotent); a task that raises
:class:`~slidescore.errors.TransientStorageError` is retried with exponential backoff; both at most
``cluster.max_retries`` times per task. Any other error in a block (an ``InputError`` such as a
corrupt tile) fails only that sample: it is recorded in ``failures.jsonl`` and its remaining
blocks are dropped; other samples go on. A :class:`~slidescore.errors.ConfigError` stops the run.

Observability: the driver shows a progress bar per sample (blocks, patches/s); ``run.json`` of the
run folder has per sample the blocks (total, done, resumed), patches scored, retries, the actors
used (``actors``, ``n_actors``), ``actor_seconds`` (sum of the wall time of its accepted actor
tasks), ``bytes_read`` (sum of the decoded pixel bytes those tasks read: the block + halo boxes
clipped to the image, for blocks with foreground) and ``seconds_scoring`` (first block dispatched →
last block record in); per run the pool (actors started / replaced, ``seconds_pool_start``), the
model's shipped bytes, the driver's ``timings`` (seconds from its start to pool start, model
ready, first plan, first actor ready, first task, done) with its CPU seconds at each
(``driver_cpu_s``), its process age and CPU when the driver started (``driver_startup``: Python,
imports, ``ray.init``), and per actor its CPU seconds and process age when it was ready and how many
jobs it has served (``actor_pinning``; ``actors_warm``): where a job's fixed cost goes.

Warm pool (``cluster.keep_warm_s`` > 0, off by default): the actors are detached named actors that
outlive the job, and the next job of the same code, runtime environment and resources takes them
over instead of starting processes (:mod:`~slidescore.run.ray.pool`: leases, idle exit, stale pools
retired, replaced when dead).

This is the only package that imports ray (``cluster``: connecting and devices; ``actor``: the
scoring actor; ``driver``: the scheduling loop; ``state``: its bookkeeping; ``shipping``: the model
on the driver; ``pool``: the warm pool; ``record``: the run record). The sample lifecycle (states, the error boundary,
failure records, finishing, the run record) is :mod:`slidescore.run.lifecycle`, shared with the
local runner; this module keeps what is Ray's: the actor pool, the task queue and the retries.
"""

from __future__ import annotations

from typing import Any

import ray

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ConfigError
from slidescore.run import lifecycle
from slidescore.run.ray.actor import EmbeddingActor, ScoringActor
from slidescore.run.ray.cluster import ClusterError, actor_device, connect
from slidescore.run.ray.driver import Driver, FaultInjection, RunAborted
from slidescore.stages.plan import check_config_for_model, dry_run_rows, resolve_samples
from slidescore.stages.records import SampleResult

__all__ = ["ClusterError", "EmbeddingActor", "FaultInjection", "RunAborted", "ScoringActor", "actor_device", "connect",
           "dry_run_samples", "embed_samples_ray", "score_samples_ray"]


def score_samples_ray(uris: list[str | SampleSpec], cfg: JobConfig, out_root: str, *, n_actors: int | None = None,
                      progress: bool = True, fault: FaultInjection | None = None, wait_for_pool: bool = False) -> list[SampleResult]:
    """Score many samples on a Ray cluster; the distributed counterpart of ``slidescore.run.local.score_samples``.

    Connects with ``ray.init(address=cfg.cluster.address)`` unless Ray is already initialised
    (and then leaves the connection open). ``n_actors`` defaults to ``cfg.cluster.n_actors``.
    Returns one result per URI, in order (``ok``, ``skipped`` or ``failed``); failures are also
    appended to ``<out_root>/failures.jsonl`` and the run record is ``<out_root>/run.json``.
    Raises ``ConfigError`` / ``ModelLoadError`` / :class:`ClusterError` when nothing can run.
    ``wait_for_pool``: dispatch no block until every actor of the pool has started (benchmarks: so
    that the scoring time measures the pool, not the actors' staggered start); off in production,
    where the first ready actor starts at once.
    """
    n = cfg.cluster.n_actors if n_actors is None else n_actors
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"cluster.n_actors: expected a positive integer, got {n!r}")
    lifecycle.prepare_output_root(out_root)  # before connecting: an unusable output dooms every sample
    connected = connect(cfg.cluster)
    try:
        return Driver(list(uris), cfg, out_root, n, progress, fault, wait_for_pool).run()
    finally:
        if connected:
            ray.shutdown()


def dry_run_samples(uris: list[str | SampleSpec], cfg: JobConfig, out_root: str) -> list[dict[str, Any]]:
    """Plan every sample without writing anything and say what a run would do (no Ray needed).

    Raises ``ConfigError`` / ``ModelLoadError`` like a real run; per-sample problems are reported
    in the returned rows (``status: failed``; :func:`~slidescore.stages.plan.dry_run_rows`).
    """
    from slidescore.model import load_model

    actor_device(cfg)
    model = load_model(cfg.model.name, card=cfg.model.card, device="cpu")
    check_config_for_model(cfg, model.card)
    return dry_run_rows(resolve_samples(uris), cfg, model.card, model.checksum, out_root)


def embed_samples_ray(uris: list[str | SampleSpec], cfg: JobConfig, out_root: str, encoder: Any, *,
                      n_actors: int | None = None, write_h5: bool = True) -> list[SampleResult]:
    """``slidescore embed`` on a Ray cluster: :func:`slidescore.run.embed.embed_samples` (planning, finishing,
    failures, run records: one code path) with each sample's blocks embedded by a pool of
    :class:`EmbeddingActor` s. The encoder goes into the object store once; each sample's plan once.
    Samples run one after another (no overlap between samples, no actor replacement: a lost actor
    fails the sample, whose finished blocks a rerun resumes)."""
    from slidescore.run.embed import embed_samples

    n = cfg.cluster.n_actors if n_actors is None else n_actors
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ConfigError(f"cluster.n_actors: expected a positive integer, got {n!r}")
    lifecycle.prepare_output_root(out_root)
    connected = connect(cfg.cluster)
    actors: list[Any] = []
    try:
        c, ref = cfg.cluster, ray.put(encoder)
        actors += [EmbeddingActor.options(num_cpus=c.num_cpus_per_actor, num_gpus=c.num_gpus_per_actor,  # type: ignore[attr-defined]
                                         max_restarts=0).remote(ref, cfg, actor_device(cfg)) for _ in range(n)]
        for got in ray.get([a.checksum.remote() for a in actors]):
            if got != encoder.checksum:
                raise ConfigError(f"encoder {encoder.source}: an actor holds checksum {got[:12]}…, not {encoder.checksum[:12]}…")

        def blocks_fn(ep: Any, _encoder: Any, *, progress: Any = None, **_: Any) -> list[dict[str, Any]]:
            plan_ref = ray.put(ep)
            todo = [b.index for b in ep.plan.blocks if ep.plan.block_has_foreground(b)]
            refs = [actors[k % n].embed.remote(plan_ref, todo[k::n]) for k in range(min(n, len(todo)))]
            try:
                done = ray.get(refs)
            except ray.exceptions.RayTaskError as e:  # the block's own error (InputError …), for the failure record
                raise (e.cause if isinstance(e.cause, BaseException) else e) from None
            if progress is not None:
                for _b in ep.plan.blocks:
                    progress()
            return [r for part in done for r in part]

        return embed_samples(uris, cfg, out_root, encoder, write_h5=write_h5, blocks_fn=blocks_fn, runner="ray")
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if connected:
            ray.shutdown()
