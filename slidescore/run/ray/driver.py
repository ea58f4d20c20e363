"""The driver of a Ray run: plans samples, feeds their blocks to the actor pool, retries, finishes.

See :mod:`slidescore.run.ray` for the design; this module holds the scheduling loop (:class:`Driver`).
Its fixed cost per job is kept small: the model is read once and shipped to the actors through the
object store; the actors start as soon as there is work (before the driver has read the model,
loaded its own copy or planned anything), so their process start and imports overlap the driver's; planning and finishing run in two driver threads, so a sample's finishing never waits
behind the next sample's planning or the reverse.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ModelLoadError, SlideScoreError
from slidescore.io.outputs import exists, join
from slidescore.run import lifecycle
from slidescore.run.ray.actor import ScoringActor, TaskResult
from slidescore.run.ray.cluster import ClusterError, actor_device
from slidescore.stages.layout import SUCCESS, sample_label
from slidescore.stages.lease import release_lease
from slidescore.stages.plan import (
    SamplePlan,
    check_config_for_model,
    image_error,
    plan_images,
    resolve_samples,
)
from slidescore.stages.records import BlockRecord, RunRecord, SampleResult, model_info

log = logging.getLogger(__name__)


MAX_BLOCKS_PER_TASK = 64  # blocks without foreground ride along with the next block that has some


BACKOFF_BASE_S = 0.5


BACKOFF_MAX_S = 30.0


KILL_WAIT_S = 30.0


class RunAborted(SlideScoreError):
    """The run was stopped on purpose before it finished (``FaultInjection.abort_after_blocks``)."""


@dataclass(frozen=True)
class FaultInjection:
    """Deterministic faults for tests; never set in production.

    ``crash_on_task``: every first-generation actor exits (``os._exit``, like a killed process)
    when its N-th task starts; replacements do not. ``transient_errors``: first-generation actors
    raise ``TransientStorageError`` on their first N tasks.
    ``abort_after_blocks``: the driver raises :class:`RunAborted` after that many block records.
    ``on_blocks_done``: called on the driver with the driver (its ``blocks_done`` and actor
    ``slots``) after each task's records are in; a test removes a node from there, at a known point.
    ``on_model_shipped``: called with the driver once the model's bytes are in the object store,
    before any actor is asked to load them (a test removes the model's files there: actors must not
    need them).
    """

    crash_on_task: int | None = None
    transient_errors: int = 0
    abort_after_blocks: int | None = None
    on_blocks_done: Callable[[Any], None] | None = None
    on_model_shipped: Callable[[Any], None] | None = None


# -- driver state -----------------------------------------------------------------------------
@dataclass
class _Sample:
    sid: str
    spec: SampleSpec
    t_start: float = 0.0
    status: str = "waiting"  # waiting, planning, running, finishing, ok, skipped, failed
    plans: list[SamplePlan] | None = None  # one per image
    refs: list[Any] | None = None  # the plans in the object store
    records: dict[tuple[int, int], BlockRecord] = field(default_factory=dict)  # (image, block) → record
    actors: set[str] = field(default_factory=set)
    retries: int = 0
    result: SampleResult | None = None
    t_first_task: float | None = None
    t_last_record: float | None = None
    t_end: float | None = None
    patches_scored: int = 0
    bytes_read: int = 0
    actor_seconds: float = 0.0
    bar: Any = None

    @property
    def uri(self) -> str:
        return sample_label(self.spec)

    @property
    def n_blocks(self) -> int:
        return sum(len(p.blocks) for p in self.plans or ())


@dataclass
class _Task:
    sid: str
    image: int  # index of the image in its sample (block tasks are per image)
    blocks: tuple[int, ...]
    transient: int = 0
    lost: int = 0
    not_before: float = 0.0


@dataclass
class _Slot:
    index: int
    gen: int = -1
    actor: Any = None
    ready_ref: Any = None
    ready: bool = False
    in_flight: int = 0
    start_failures: int = 0
    retired: bool = False

    @property
    def label(self) -> str:
        return f"a{self.index}" if self.gen == 0 else f"a{self.index}.{self.gen}"


class Driver:
    """The scheduling loop of one :func:`score_samples_ray` call."""

    def __init__(self, uris: list[str | SampleSpec], cfg: JobConfig, out_root: str, n_actors: int, progress: bool,
                 fault: FaultInjection | None, wait_for_pool: bool = False) -> None:
        self.cfg, self.out_root, self.progress = cfg, out_root, progress
        self.fault = fault or FaultInjection()
        self.device = actor_device(cfg)
        self.model: Any = None  # the driver's CPU copy (card, checksum, explanation maps): _prepare_model
        self.model_ref: Any = None  # the model's bytes in the object store, shared by every actor
        self.model_bytes = 0
        self.samples = [_Sample(str(spec.sample_id), spec) for spec in resolve_samples(uris)]
        self.by_id = {s.sid: s for s in self.samples}
        self.to_plan = collections.deque(self.samples)
        self.queue: collections.deque[_Task] = collections.deque()
        self.delayed: list[_Task] = []
        self.in_flight: dict[Any, tuple[_Task, int, int]] = {}
        self.slots = [_Slot(i) for i in range(n_actors)]
        # one thread plans (one sample ahead), one finishes: neither waits behind the other
        self.planner = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidescore-plan")
        self.finisher = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidescore-finish")
        self.jobs: dict[cf.Future, tuple[str, _Sample]] = {}
        self.blocks_done = 0
        self.actors_started = 0
        self.actors_replaced = 0
        self.devices: set[str] = set()
        self.actor_gpus: list[dict[str, Any]] = []  # what each started actor was pinned to
        self.t0 = time.perf_counter()
        self.t_pool: float | None = None
        self.t_pool_ready: float | None = None  # when the last actor of the first pool was ready
        self.wait_for_pool = wait_for_pool
        self.timings: dict[str, float] = {}  # seconds since the driver started, for the run record

    def _mark(self, what: str) -> None:
        self.timings.setdefault(what, round(time.perf_counter() - self.t0, 3))

    # -- the model ------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        """Start the actors if there is work, read the model once and put it into the object store for
        them, then load the driver's CPU copy (its card and checksum key the runs; it serves the
        explanation maps). The actors' process start and imports overlap the driver's model reading,
        loading and planning."""
        if self._work_likely():
            self._start_pool()
        from slidescore.model.loading import load_files, resolve_model

        files = resolve_model(self.cfg.model.name, card=self.cfg.model.card).with_data()
        assert files.data is not None
        self.model_ref, self.model_bytes = ray.put(files), len(files.data)
        if self.fault.on_model_shipped is not None:
            self.fault.on_model_shipped(self)
        for slot in self.slots:
            if slot.actor is not None and slot.ready_ref is None and not slot.ready:
                slot.ready_ref = slot.actor.load.remote(self.model_ref)
        self.model = load_files(files, device="cpu")  # the GPUs are left to the actors
        check_config_for_model(self.cfg, self.model.card)
        self._mark("model_ready")

    def _work_likely(self, probe: int = 8) -> bool:
        """Whether one of the first ``probe`` samples has no completion marker (so it will be scored).

        A rerun of finished samples (every marker there) starts no actor and loads no model on the
        cluster; it is decided by planning, which compares the markers' run keys.
        """
        return any(not exists(join(self.out_root, s.sid, SUCCESS)) for s in self.samples[:probe])

    # -- actors ---------------------------------------------------------------------------
    def _start(self, slot: _Slot) -> None:
        c = self.cfg.cluster
        slot.gen += 1
        crash = self.fault.crash_on_task if slot.gen == 0 else None
        transient = self.fault.transient_errors if slot.gen == 0 else 0
        # restarts are ours (replace + resubmit, counted per task), not Ray's
        options = {"num_cpus": c.num_cpus_per_actor, "num_gpus": c.num_gpus_per_actor, "max_restarts": 0, "max_task_retries": 0}
        slot.actor = ScoringActor.options(**options).remote(self.cfg, self.device, crash, transient)  # type: ignore[attr-defined]
        # the model's bytes once they are in the object store (a pool started early gets them in _prepare_model)
        slot.ready_ref = slot.actor.load.remote(self.model_ref) if self.model_ref is not None else None
        slot.ready = False
        slot.in_flight = 0
        self.actors_started += 1

    def _start_pool(self) -> None:
        """Start the actors once there is work (a rerun of finished samples loads no model anywhere)."""
        if self.t_pool is not None:
            return
        self.t_pool = time.perf_counter()
        self._mark("pool_start")
        for slot in self.slots:
            self._start(slot)

    def _replace(self, slot: _Slot, why: str) -> None:
        log.warning("scoring actor %s lost (%s); starting a replacement", slot.label, why)
        ray.kill(slot.actor, no_restart=True)
        self.actors_replaced += 1
        self._start(slot)

    def _on_ready(self, slot: _Slot) -> None:
        try:
            info = ray.get(slot.ready_ref)
        except RayError as e:
            slot.start_failures += 1
            ray.kill(slot.actor, no_restart=True)
            if slot.start_failures > self.cfg.cluster.max_retries:
                slot.retired = True
                log.error("scoring actor slot %d failed to start %d times; giving it up: %s", slot.index, slot.start_failures, e)
                if all(s.retired for s in self.slots):
                    raise ModelLoadError(f"no scoring actor could start (last error: {e}); check model.name is readable "
                                         "on the worker nodes and the actors' resources") from None
                self._note_pool_ready()
                return
            log.warning("scoring actor %s failed to start (%s); retrying", slot.label, e)
            self._start(slot)
            return
        if info["checksum"] != self.model.checksum:
            raise ModelLoadError(
                f"model {self.cfg.model.name}: the actor on node {info['node_id']} loaded a different file "
                f"(sha256 {info['checksum'][:12]}… ≠ {self.model.checksum[:12]}… on the driver); every node must see the same model"
            )
        slot.ready = True
        slot.start_failures = 0
        slot.ready_ref = None
        self.devices.add(info["device"])
        self.actor_gpus.append({"actor": slot.label, "node_id": info["node_id"], "gpu_ids": info["gpu_ids"],
                                "cuda_visible_devices": info["cuda_visible_devices"], "device": info["device"]})
        self._mark("first_actor_ready")
        self._note_pool_ready()

    def _note_pool_ready(self) -> None:
        if self.t_pool_ready is None and all(s.ready or s.retired for s in self.slots):
            self.t_pool_ready = time.perf_counter()
            self._mark("pool_ready")

    def _check_start_timeout(self) -> None:
        if self.t_pool is None or any(s.ready for s in self.slots):
            return
        if time.perf_counter() - self.t_pool < self.cfg.cluster.actor_start_timeout_s:
            return
        c = self.cfg.cluster
        raise ClusterError(
            f"no scoring actor started within cluster.actor_start_timeout_s={c.actor_start_timeout_s:g} s; each asks for "
            f"{c.num_cpus_per_actor:g} CPU and {c.num_gpus_per_actor:g} GPU, the cluster has {ray.cluster_resources()}; "
            "lower num_cpus_per_actor / num_gpus_per_actor or add nodes"
        )

    # -- samples --------------------------------------------------------------------------
    def _capacity(self) -> int:
        return len(self.slots) * self.cfg.cluster.max_in_flight_per_actor

    def _maybe_plan(self) -> None:
        if not self.to_plan or any(kind == "plan" for kind, _ in self.jobs.values()):
            return
        if len(self.queue) + len(self.delayed) >= 2 * self._capacity():
            return
        s = self.to_plan.popleft()
        s.status, s.t_start = "planning", time.perf_counter()
        fut = self.planner.submit(plan_images, s.spec, self.cfg, self.model.card, self.model.checksum, self.out_root)
        self.jobs[fut] = ("plan", s)

    def _on_planned(self, s: _Sample, plans: list[SamplePlan] | None) -> None:
        self._mark("first_plan")
        if plans is None:
            s.status, s.t_end = "skipped", s.t_start
            s.result = lifecycle.skipped(self.out_root, s.spec)
            return
        s.plans, s.status = plans, "running"
        # the valid-patch grid travels to the object store once per image, not with every task
        s.refs = [ray.put(plan) for plan in plans]
        for k, plan in enumerate(plans):
            group: list[int] = []
            for b in plan.blocks:
                group.append(b.index)
                if plan.block_has_foreground(b) or len(group) >= MAX_BLOCKS_PER_TASK:
                    self.queue.append(_Task(s.sid, k, tuple(group)))
                    group = []
            if group:
                self.queue.append(_Task(s.sid, k, tuple(group)))
        self._start_pool()
        if self.progress:
            from tqdm import tqdm

            s.bar = tqdm(total=s.n_blocks, unit="block", desc=s.sid, leave=False, dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 15.0)  # job logs are files: few lines

    def _fail(self, s: _Sample, err: BaseException, stage: str) -> None:
        if s.status in ("failed", "ok", "skipped"):
            return
        s.status, s.t_end = "failed", time.perf_counter()
        s.refs = None
        self.queue = collections.deque(t for t in self.queue if t.sid != s.sid)
        self.delayed = [t for t in self.delayed if t.sid != s.sid]
        s.result = lifecycle.failed(self.out_root, s.spec, err, stage)
        self._close_bar(s)

    def _close_bar(self, s: _Sample) -> None:
        if s.bar is not None:
            s.bar.close()
            s.bar = None

    def _finish(self, s: _Sample) -> None:
        assert s.plans is not None
        s.status = "finishing"
        s.refs = None  # release the plans in the object store
        records = [[s.records[k, b.index] for b in plan.blocks] for k, plan in enumerate(s.plans)]
        info = model_info(self.model)
        info["device"] = ",".join(sorted(self.devices)) or info["device"]
        # the driver's CPU copy of the scoring model (same checksum as the actors') serves the explanation maps: no reload
        fut = self.finisher.submit(lifecycle.finish_sample, s.plans, records, self.cfg, info, self.model.card, s.t_start,
                                   model=self.model)
        self.jobs[fut] = ("finish", s)

    def _on_job_done(self, fut: cf.Future) -> None:
        kind, s = self.jobs.pop(fut)
        try:
            value = fut.result()
        except Exception as e:  # one sample's error never stops the others; the record says what happened
            if lifecycle.classify(e) == "stop":
                raise
            self._fail(s, e, "planning" if kind == "plan" else "finishing")
            return
        if kind == "plan":
            self._on_planned(s, value)
        else:
            s.status, s.result, s.t_end = "ok", value, time.perf_counter()
            self._close_bar(s)
            if self.progress:
                from tqdm import tqdm

                tqdm.write(f"{s.sid}: {len(s.records)} blocks ({sum(r.resumed for r in s.records.values())} resumed), "
                           f"{s.patches_scored:,} patches scored, {time.perf_counter() - s.t_start:.1f} s")

    # -- tasks ----------------------------------------------------------------------------
    def _dispatch(self) -> None:
        now = time.perf_counter()
        due = [t for t in self.delayed if t.not_before <= now]
        if due:
            self.delayed = [t for t in self.delayed if t.not_before > now]
            self.queue.extendleft(reversed(due))
        limit = self.cfg.cluster.max_in_flight_per_actor
        if self.wait_for_pool and self.t_pool_ready is None:
            return
        while self.queue:
            free = [s for s in self.slots if s.ready and s.in_flight < limit]
            if not free:
                return
            task = self.queue.popleft()
            sample = self.by_id[task.sid]
            if sample.status != "running":
                continue  # its sample failed: drop the rest of its blocks
            slot = min(free, key=lambda s: s.in_flight)
            assert sample.refs is not None
            ref = slot.actor.score.remote(sample.refs[task.image], list(task.blocks))
            self.in_flight[ref] = (task, slot.index, slot.gen)
            slot.in_flight += 1
            sample.actors.add(slot.label)
            if sample.t_first_task is None:
                sample.t_first_task = time.perf_counter()
                self._mark("first_task")

    def _on_task_done(self, ref: Any) -> None:
        task, index, gen = self.in_flight.pop(ref)
        slot = self.slots[index]
        if slot.gen == gen:
            slot.in_flight -= 1
        s = self.by_id[task.sid]
        try:
            done: TaskResult = ray.get(ref)
        except RayActorError as e:
            if slot.gen == gen and not slot.retired:
                self._replace(slot, f"{type(e).__name__} while scoring {s.sid}")
            self._retry(task, s, e, lost=True)
            return
        except RayTaskError as e:
            cause = e.cause if isinstance(e.cause, BaseException) else e
            outcome = lifecycle.classify(cause)
            if outcome == "stop":
                raise cause from None
            if outcome == "retry":
                self._retry(task, s, cause, lost=False)
            else:
                plan = s.plans[task.image] if s.plans else None
                if plan is not None and plan.image_id:  # a sample of several images: name the bad one
                    cause = image_error(s.sid, plan.image_id, plan.uri, cause)
                log.debug("blocks %s of %s failed", list(task.blocks), s.sid)
                self._fail(s, cause, "scoring")
            return
        except RayError as e:  # worker crash, lost object, node died: like a lost actor, without replacing it
            self._retry(task, s, e, lost=True)
            return
        if s.status != "running":
            return
        records = done.records
        for rec, i in zip(records, task.blocks, strict=True):
            s.records[task.image, i] = rec
            s.patches_scored += 0 if rec.resumed else rec.patches_scored
        s.bytes_read += done.bytes_read
        s.actor_seconds += done.seconds
        s.t_last_record = time.perf_counter()
        self.blocks_done += len(records)
        if s.bar is not None:
            rate = s.patches_scored / max(1e-9, time.perf_counter() - (s.t_first_task or s.t_start))
            s.bar.update(len(records))
            s.bar.set_postfix_str(f"{rate:,.0f} patches/s", refresh=False)
        if len(s.records) == s.n_blocks:
            self._finish(s)
        if self.fault.on_blocks_done is not None:
            self.fault.on_blocks_done(self)
        if self.fault.abort_after_blocks is not None and self.blocks_done >= self.fault.abort_after_blocks:
            raise RunAborted(f"stopped after {self.blocks_done} blocks (FaultInjection.abort_after_blocks)")

    def _retry(self, task: _Task, s: _Sample, err: BaseException, *, lost: bool) -> None:
        if s.status != "running":
            return
        s.retries += 1
        if lost:
            task.lost += 1
        else:
            task.transient += 1
        n = task.lost if lost else task.transient
        if n > self.cfg.cluster.max_retries:
            log.error("sample %s: blocks %s failed after %d retries", s.sid, list(task.blocks), n - 1)
            self._fail(s, err, "scoring")
            return
        if lost:
            log.warning("resubmitting blocks %s of %s (attempt %d): %s", list(task.blocks), s.sid, n + 1, type(err).__name__)
            self.queue.appendleft(task)
        else:
            wait = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2 ** (n - 1))
            log.warning("transient error in blocks %s of %s; retry %d in %.1f s: %s", list(task.blocks), s.sid, n, wait, err)
            task.not_before = time.perf_counter() + wait
            self.delayed.append(task)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> list[SampleResult]:
        try:
            self._prepare_model()
            while True:
                self._maybe_plan()
                self._dispatch()
                waiting = self.to_plan or self.queue or self.delayed or self.in_flight or self.jobs
                if not waiting:
                    break
                self._check_start_timeout()
                starting = {s.ready_ref: s for s in self.slots if s.ready_ref is not None and not s.retired}
                refs = list(self.in_flight) + list(starting)
                timeout = 0.05 if self.jobs or self.delayed else 1.0
                ready: list[Any] = []
                if refs:
                    ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
                elif self.jobs:
                    cf.wait(list(self.jobs), timeout=timeout, return_when=cf.FIRST_COMPLETED)
                else:
                    time.sleep(timeout)  # only retries waiting for their backoff
                for ref in ready:
                    if ref in starting:
                        self._on_ready(starting[ref])
                    else:
                        self._on_task_done(ref)
                for fut in [f for f in self.jobs if f.done()]:
                    self._on_job_done(fut)
            self._mark("done")
        finally:
            self.planner.shutdown(wait=True, cancel_futures=True)
            self.finisher.shutdown(wait=True, cancel_futures=True)
            for slot in self.slots:
                if slot.actor is not None:
                    ray.kill(slot.actor, no_restart=True)
            if self.in_flight:  # after an abort: return only once no killed actor can still write a block
                ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=KILL_WAIT_S)
            for s in self.samples:
                self._close_bar(s)
                if s.status != "ok" and s.plans:  # no actor writes any more: free the folder for the next run
                    release_lease(s.plans[0].sample_out, s.plans[0].run_key)
        results = [s.result for s in self.samples if s.result is not None]
        self._write_run_record()
        return results

    def _write_run_record(self) -> None:
        if self.model is None:  # the run stopped before the model loaded: nothing was planned or scored
            return
        info = model_info(self.model)
        info["device"] = ",".join(sorted(self.devices)) or info["device"]
        c = self.cfg.cluster
        rows = []
        for s in self.samples:
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
        cluster = {"ray_version": ray.__version__, "n_actors": len(self.slots), "actors_started": self.actors_started,
                   "actors_replaced": self.actors_replaced, "num_cpus_per_actor": c.num_cpus_per_actor,
                   "num_gpus_per_actor": c.num_gpus_per_actor, "resources": ray.cluster_resources(),
                   "actor_pinning": self.actor_gpus, "blocks_done": self.blocks_done,
                   "seconds": time.perf_counter() - self.t0,
                   "seconds_pool_start": None if self.t_pool is None or self.t_pool_ready is None
                   else round(self.t_pool_ready - self.t_pool, 3),
                   "model_shipped_bytes": self.model_bytes, "timings": dict(self.timings)}
        record = RunRecord(self.cfg.to_dict(), info, "ray", rows, cluster=cluster, seconds=round(time.perf_counter() - self.t0, 3))
        lifecycle.write_run_record(self.out_root, record, self.cfg)
