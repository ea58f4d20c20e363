"""The driver of a Ray run: plans samples, feeds their blocks to the actor pool, retries, finishes.

See :mod:`slidescore.run.ray` for the design; this module holds the scheduling loop (:class:`Driver`).
Its fixed cost per job is kept small: the actors start as soon as there is work (before the driver
has read the model or planned anything), so their process start and imports overlap the driver's;
the model is read once and shipped to them through the object store, and the driver plans with its
card and checksum without importing torch (:mod:`slidescore.run.ray.shipping`); planning and
finishing run in two driver threads, so a sample's finishing never waits behind the next sample's
planning or the reverse. With ``cluster.keep_warm_s`` the actors are taken from, and left in, a
warm pool across jobs (:mod:`slidescore.run.ray.pool`).
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import json
import logging
import sys
import time
import uuid
from typing import Any

import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ModelLoadError
from slidescore.io.outputs import exists, join
from slidescore.run import lifecycle
from slidescore.run.ray import pool, state
from slidescore.run.ray.actor import LeaseLostError, ScoringActor, TaskResult, model_id
from slidescore.run.ray.cluster import ClusterError, actor_device
from slidescore.run.ray.record import write_run_record
from slidescore.run.ray.shipping import ShippedModel, ship_model
from slidescore.run.ray.state import FaultInjection, RunAborted, SampleState, Slot, Task
from slidescore.stages.layout import SUCCESS
from slidescore.stages.lease import release_lease
from slidescore.stages.plan import (
    SamplePlan,
    check_config_for_model,
    image_error,
    plan_images,
    resolve_samples,
)
from slidescore.stages.records import BlockRecord, SampleResult

__all__ = ["Driver", "FaultInjection", "RunAborted"]

log = logging.getLogger(__name__)


MAX_BLOCKS_PER_TASK = 64  # blocks without foreground ride along with the next block that has some
BACKOFF_BASE_S = 0.5
BACKOFF_MAX_S = 30.0
KILL_WAIT_S = 30.0
TOUCH_EVERY_S = 10.0  # how often a job keeps the leases of its warm-pool actors fresh


class Driver:
    """The scheduling loop of one :func:`score_samples_ray` call."""

    def __init__(self, uris: list[str | SampleSpec], cfg: JobConfig, out_root: str, n_actors: int, progress: bool,
                 fault: FaultInjection | None, wait_for_pool: bool = False) -> None:
        self.cfg, self.out_root, self.progress = cfg, out_root, progress
        self.fault = fault or FaultInjection()
        self.device = actor_device(cfg)
        self.shipped: ShippedModel | None = None  # card, checksum, bytes in the object store: _prepare_model
        self.model_ref: Any = None  # the model's bytes in the object store, shared by every actor
        self.model_bytes = 0
        self.scoring: dict[str, Any] | None = None  # the actors' classifier record, for run.json
        self.samples = [SampleState(str(spec.sample_id), spec) for spec in resolve_samples(uris)]
        self.by_id = {s.sid: s for s in self.samples}
        self.to_plan = collections.deque(self.samples)
        self.queue: collections.deque[Task] = collections.deque()
        self.delayed: list[Task] = []
        self.in_flight: dict[Any, tuple[Task, int, int]] = {}
        self.slots = [Slot(i) for i in range(n_actors)]
        # one thread plans (one sample ahead), one finishes: neither waits behind the other
        self.planner = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidescore-plan")
        self.finisher = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="slidescore-finish")
        self.jobs: dict[cf.Future, tuple[str, SampleState]] = {}
        self.blocks_done = self.actors_started = self.actors_replaced = 0
        self.actors_warm = 0  # pool actors that had served an earlier job
        self.devices: set[str] = set()
        self.actor_gpus: list[dict[str, Any]] = []  # what each started actor was pinned to
        self.t0 = time.perf_counter()
        self.t_pool: float | None = None
        self.t_pool_ready: float | None = None  # when the last actor of the first pool was ready
        self.wait_for_pool = wait_for_pool
        self.timings: dict[str, float] = {}  # seconds since the driver started, for the run record
        self.cpu: dict[str, float] = {"start": state.cpu_s()}  # the driver process's CPU seconds at these points
        self.startup: dict[str, Any] = {"process_s": state.process_age_s(), "cpu_s": self.cpu["start"]}  # before the Driver
        c = cfg.cluster
        self.token = uuid.uuid4().hex  # this job's lease on warm-pool actors
        self.pool_prefix = pool.pool_prefix(c.num_cpus_per_actor, c.num_gpus_per_actor, self.device) \
            if c.keep_warm_s > 0 else None
        self.pool_next, self.pool_names_max = 0, pool.NAMES_PER_ACTOR * n_actors  # the next pool name to try, and the last
        self.t_touched = 0.0

    def _mark(self, what: str) -> None:
        if what not in self.timings:
            self.timings[what] = round(time.perf_counter() - self.t0, 3)
            self.cpu[what] = state.cpu_s()

    # -- the model ------------------------------------------------------------------------
    def _prepare_model(self) -> None:
        """Start the actors if there is work, then read the model once and put it into the object store
        for them; plan with its card and checksum (no torch on the driver: :mod:`~slidescore.run.ray.shipping`).
        The actors' process start and imports overlap the driver's model reading and planning."""
        if self._work_likely():
            self._start_pool()
        self.shipped = ship_model(self.cfg)
        self.model_ref, self.model_bytes = self.shipped.ref, self.shipped.n_bytes
        if self.fault.on_model_shipped is not None:
            self.fault.on_model_shipped(self)
        for slot in self.slots:
            if slot.actor is not None and slot.ready_ref is None and not slot.ready:
                slot.ready_ref = self._load(slot)
        check_config_for_model(self.cfg, self.shipped.card)
        self._mark("model_ready")

    def _load(self, slot: Slot) -> Any:
        """Ask the slot's actor to build the model: a pool actor gets the reference unresolved (it
        fetches the bytes only when it holds another model) and this job's config and lease token."""
        assert self.shipped is not None
        if slot.pooled:
            return slot.actor.load.remote([self.model_ref, model_id(self.shipped.files)], self.cfg, self.token)
        return slot.actor.load.remote(self.model_ref)

    def _work_likely(self, probe: int = 8) -> bool:
        """Whether one of the first ``probe`` samples has no completion marker (so it will be scored).

        A rerun of finished samples (every marker there) starts no actor and loads no model on the
        cluster; it is decided by planning, which compares the markers' run keys.
        """
        return any(not exists(join(self.out_root, s.sid, SUCCESS)) for s in self.samples[:probe])

    # -- actors ---------------------------------------------------------------------------
    def _start(self, slot: Slot, *, pooled: bool = True) -> None:
        """Fill the slot with a new actor or, with a warm pool, the next pool actor of this job's kind
        (:mod:`~slidescore.run.ray.pool`; a lost actor's replacement is a plain actor)."""
        c = self.cfg.cluster
        slot.gen += 1
        crash = self.fault.crash_on_task if slot.gen == 0 else None
        transient = self.fault.transient_errors if slot.gen == 0 else 0
        # restarts are ours (replace + resubmit, counted per task), not Ray's
        options = {"num_cpus": c.num_cpus_per_actor, "num_gpus": c.num_gpus_per_actor, "max_restarts": 0, "max_task_retries": 0}
        args = (self.cfg, self.device, crash, transient)
        slot.pooled = slot.warm = False
        slot.actor = self._pool_actor(slot, options, args) if pooled and self.pool_prefix is not None else None
        if slot.actor is None:
            slot.actor = ScoringActor.options(**options).remote(*args)  # type: ignore[attr-defined]
            self.actors_started += 1
        # the model's bytes once they are in the object store (a pool started early gets them in _prepare_model)
        slot.ready_ref = self._load(slot) if self.model_ref is not None else None
        slot.ready = False
        slot.in_flight = 0
        slot.t_asked = time.perf_counter()

    def _pool_actor(self, slot: Slot, options: dict[str, Any], args: tuple[Any, ...]) -> Any:
        """The next pool name of this job's kind: its live actor (asked with a deadline), or a new
        detached actor under that name; None once ``pool.NAMES_PER_ACTOR`` names per actor were tried."""
        while self.pool_next < self.pool_names_max:
            name = f"{self.pool_prefix}{self.pool_next}"
            self.pool_next += 1
            actor = pool.lookup(name)
            slot.warm = actor is not None
            if actor is None:
                try:
                    actor = ScoringActor.options(**options, name=name, namespace=pool.NAMESPACE,  # type: ignore[attr-defined]
                                                 lifetime="detached").remote(*args, keep_warm_s=self.cfg.cluster.keep_warm_s)
                except ValueError:  # another job created it meanwhile: the next name
                    continue
                self.actors_started += 1
            deadline = time.time() + pool.ACQUIRE_WAIT_S if slot.warm else None
            slot.acquire_ref = actor.acquire.remote(self.token, deadline, pool.code_fingerprint())
            slot.pooled = True
            return actor
        return None

    def _start_pool(self) -> None:
        """Start the actors once there is work (a rerun of finished samples loads no model anywhere)."""
        if self.t_pool is not None:
            return
        self.t_pool = time.perf_counter()
        self._mark("pool_start")
        c = self.cfg.cluster  # idle pools of another code version, or in the way of this job's actors, make room
        pool.retire_stale(self.pool_prefix, len(self.slots) * c.num_cpus_per_actor, len(self.slots) * c.num_gpus_per_actor)
        for slot in self.slots:
            self._start(slot)

    def _replace(self, slot: Slot, why: str, *, kill: bool = True) -> None:
        log.warning("scoring actor %s lost (%s); starting a replacement", slot.label, why)
        if kill:
            ray.kill(slot.actor, no_restart=True)
        self.actors_replaced += 1
        self._start(slot, pooled=False)

    def _check_warm_wait(self) -> None:
        """A warm pool actor that has not answered ``acquire`` within ``pool.ACQUIRE_WAIT_S`` is busy with
        another job: leave it to that job (its late ``acquire`` refuses) and take the next one."""
        now = time.perf_counter()
        for slot in self.slots:
            waited = slot.warm and not slot.ready and not slot.retired and now - slot.t_asked > pool.ACQUIRE_WAIT_S
            if waited and not ray.wait([slot.acquire_ref], timeout=0)[0]:
                log.info("warm pool actor of slot %d busy; taking another", slot.index)
                self._start(slot)

    def _on_ready(self, slot: Slot) -> None:
        assert self.shipped is not None
        try:
            info = ray.get(slot.ready_ref)
        except RayError as e:
            if slot.pooled:  # a pool actor that exited (idle, retired) between lookup and use: the next one
                self._start(slot)
                return
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
        if "refused" in info:  # a pool actor another job holds, or of other code (then useless to all: ours goes)
            log.info("pool actor of slot %d not taken: %s", slot.index, info["refused"])
            if not slot.warm and info["refused"].startswith("another code version"):
                ray.kill(slot.actor, no_restart=True)
            self._start(slot)
            return
        if info["checksum"] != self.shipped.checksum:
            raise ModelLoadError(
                f"model {self.cfg.model.name}: the actor on node {info['node_id']} loaded a different file "
                f"(sha256 {info['checksum'][:12]}… ≠ {self.shipped.checksum[:12]}… on the driver); every node must see the same model"
            )
        if json.dumps(info["card"], sort_keys=True) != json.dumps(self.shipped.card.to_dict(), sort_keys=True):
            raise ModelLoadError(f"model {self.cfg.model.name}: the actor's classifier has another card than the one the driver "
                                 "planned with (slidescore.run.ray.shipping); this is a bug, please report it")
        slot.ready = True
        slot.start_failures = 0
        slot.ready_ref = None
        self.devices.add(info["device"])
        self.scoring = self.scoring or info.get("scoring")
        self.actor_gpus.append({"actor": slot.label, "node_id": info["node_id"], "gpu_ids": info["gpu_ids"],
                                "cuda_visible_devices": info["cuda_visible_devices"], "device": info["device"],
                                "pid": info["pid"], "cpu_s": info["cpu_s"], "process_s": info["process_s"], "jobs": info["jobs"],
                                "pooled": slot.pooled})
        self.actors_warm += info["jobs"] > 1
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
        assert self.shipped is not None
        fut = self.planner.submit(plan_images, s.spec, self.cfg, self.shipped.card, self.shipped.checksum, self.out_root)
        self.jobs[fut] = ("plan", s)

    def _on_planned(self, s: SampleState, plans: list[SamplePlan] | None) -> None:
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
                    self.queue.append(Task(s.sid, k, tuple(group)))
                    group = []
            if group:
                self.queue.append(Task(s.sid, k, tuple(group)))
        self._start_pool()
        if self.progress:
            from tqdm import tqdm

            s.bar = tqdm(total=sum(p.blocks_with_foreground for p in plans), unit="block", desc=s.sid, leave=False,
                         dynamic_ncols=True, mininterval=0.1 if sys.stderr.isatty() else 15.0)  # job logs: few lines

    def _fail(self, s: SampleState, err: BaseException, stage: str) -> None:
        if s.status in ("failed", "ok", "skipped"):
            return
        s.status, s.t_end = "failed", time.perf_counter()
        s.refs = None
        self.queue = collections.deque(t for t in self.queue if t.sid != s.sid)
        self.delayed = [t for t in self.delayed if t.sid != s.sid]
        s.result = lifecycle.failed(self.out_root, s.spec, err, stage)
        self._close_bar(s)

    def _close_bar(self, s: SampleState) -> None:
        if s.bar is not None:
            s.bar.close()
            s.bar = None

    def _finish(self, s: SampleState) -> None:
        assert s.plans is not None and self.shipped is not None
        s.status = "finishing"
        s.refs = None  # release the plans in the object store
        records = [[s.records[k, b.index] for b in plan.blocks] for k, plan in enumerate(s.plans)]
        info = self.shipped.info(self.devices, s.scoring or self.scoring)
        fut = self.finisher.submit(self._finish_sample, s.plans, records, info, s.t_start)
        self.jobs[fut] = ("finish", s)

    def _finish_sample(self, plans: list[SamplePlan], records: list[list[BlockRecord]], info: dict[str, Any],
                       t_start: float) -> SampleResult:
        """In the finishing thread: the driver's CPU copy of the model is built only if the report's
        explanation maps need it (same checksum and card as the actors')."""
        assert self.shipped is not None
        return lifecycle.finish_sample(plans, records, self.cfg, info, self.shipped.card, t_start,
                                       model=self.shipped.for_report(self.cfg))

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
            ref = slot.actor.score.remote(sample.refs[task.image], list(task.blocks), self.token)
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
            if isinstance(cause, LeaseLostError):  # its warm-pool lease expired: another job's actor now
                if slot.gen == gen and not slot.retired:
                    self._replace(slot, str(cause), kill=False)
                self._retry(task, s, cause, lost=True)
                return
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
        s.scoring = done.scoring or s.scoring
        s.actor_seconds += done.seconds
        s.t_last_record = time.perf_counter()
        self.blocks_done += len(records)
        if s.bar is not None:
            rate = s.patches_scored / max(1e-9, time.perf_counter() - (s.t_first_task or s.t_start))
            plan = (s.plans or [])[task.image]  # progress in blocks with foreground, as in one process
            s.bar.update(sum(plan.block_has_foreground(plan.blocks[i]) for i in task.blocks))
            s.bar.set_postfix_str(f"{rate:,.0f} patches/s", refresh=False)
        if len(s.records) == s.n_blocks:
            self._finish(s)
        if self.fault.on_blocks_done is not None:
            self.fault.on_blocks_done(self)
        if self.fault.abort_after_blocks is not None and self.blocks_done >= self.fault.abort_after_blocks:
            raise RunAborted(f"stopped after {self.blocks_done} blocks (FaultInjection.abort_after_blocks)")

    def _retry(self, task: Task, s: SampleState, err: BaseException, *, lost: bool) -> None:
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
        normal = False
        try:
            self._prepare_model()
            while True:
                self._maybe_plan()
                self._dispatch()
                waiting = self.to_plan or self.queue or self.delayed or self.in_flight or self.jobs
                if not waiting:
                    break
                self._check_start_timeout()
                self._keep_pool()
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
            normal = True
        finally:
            self.planner.shutdown(wait=True, cancel_futures=True)
            self.finisher.shutdown(wait=True, cancel_futures=True)
            self._stop_actors(normal)
            if self.in_flight:  # after an abort: return only once no killed actor can still write a block
                ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=KILL_WAIT_S)
            for s in self.samples:
                self._close_bar(s)
                if s.status != "ok" and s.plans:  # no actor writes any more: free the folder for the next run
                    release_lease(s.plans[0].sample_out, s.plans[0].run_key)
        results = [s.result for s in self.samples if s.result is not None]
        write_run_record(self)
        return results

    def _keep_pool(self) -> None:
        """Warm pool only: take another actor for a slot whose warm actor is busy, and keep the leases fresh."""
        if self.pool_prefix is None:
            return
        self._check_warm_wait()
        if time.perf_counter() - self.t_touched > TOUCH_EVERY_S:
            self.t_touched = time.perf_counter()
            for slot in self.slots:
                if slot.pooled and slot.ready:
                    slot.actor.touch.remote(self.token)

    def _stop_actors(self, normal: bool) -> None:
        """Kill the job's actors; after a normal end, release its warm-pool actors instead. Pool actors
        this job created that are still starting are waited for (``pool.HANDOVER_WAIT_S``) and left warm."""
        keep = [s for s in self.slots if normal and s.pooled and s.actor is not None]
        starting = [s.ready_ref for s in keep if not s.ready and not s.warm and s.ready_ref is not None]
        if starting:  # their start is paid for: the next job takes them warm
            ray.wait(starting, num_returns=len(starting), timeout=pool.HANDOVER_WAIT_S)
        releases = []
        for slot in self.slots:
            if slot.actor is None:
                continue
            if any(slot is k for k in keep) and (slot.ready or slot.warm or ray.wait([slot.ready_ref], timeout=0)[0]):
                releases.append(slot.actor.release.remote(self.token))
            else:
                ray.kill(slot.actor, no_restart=True)
        if releases:  # delivered before the driver exits (a ready actor answers at once)
            ray.wait(releases, num_returns=len(releases), timeout=pool.ACQUIRE_WAIT_S)
