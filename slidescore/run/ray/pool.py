"""A warm pool of scoring actors across jobs (``cluster.keep_warm_s`` > 0; off by default).

A job's actors cost a process start and the imports of ray, slidescore and torch each (about 2 CPU-s
apiece, docs/benchmarks.md "Ray job overhead"). A scanner room's intake poller submits one small
job every few minutes and would pay that every time; with ``keep_warm_s`` the actors outlive their
job as *detached named actors* and the next job of the same kind takes them over. The rules that
keep this safe:

- **Kind.** A pool actor's name carries the code fingerprint (:func:`code_fingerprint`, the sha256
  of slidescore's source files) and a key over everything else that fixes what the process is: Ray
  and Python versions, the job's runtime environment (working dir package, env vars, pip), the
  actor's CPUs, GPUs and device (:func:`pool_key`). A job only ever looks up names of its own kind,
  and the actor checks the fingerprint again when it is taken (:meth:`WarmPool.acquire` on the
  actor): a pool of another code version is never reused.
- **One job at a time.** A job takes an actor with a lease (a random token): ``acquire`` refuses
  while another job's lease is fresh (used within :data:`LEASE_TTL_S`, or a task running), and
  refuses if it runs after the caller's deadline (a request queued behind another job's tasks never
  takes the actor late). The job releases its actors when it ends normally; an aborted job kills
  them, as without a pool. A refused, late or dead pool actor is replaced by the next name, or by a
  plain actor of this job.
- **Idle pools make room.** Every job (pool or not) retires idle pool actors of another code
  version, and, when the free resources would not hold its actors, every idle pool actor but those
  of its own pool (they exit at once when not leased): an idle pool never holds what a job needs.
- **Idle exit.** Each pool actor watches itself and exits (``ray.kill`` of itself; its name is
  freed) once it has been unleased for ``keep_warm_s`` seconds; a lease whose job vanished expires
  after :data:`LEASE_TTL_S` without calls.
- **Fresh state per job.** A taken actor gets the job's config and model reference again
  (:meth:`~slidescore.run.ray.actor.ScoringActor.load`): it keeps its built classifier only when
  the checksum, card and runtime options are equal, and closes every reader of the last job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import threading
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import ray

log = logging.getLogger(__name__)

NAMESPACE = "slidescore-warm-pool"

LEASE_TTL_S = 60.0  # a lease without any call for this long belongs to a job that is gone

ACQUIRE_WAIT_S = 2.0  # a warm actor that has not answered by then is busy: start another

HANDOVER_WAIT_S = 30.0  # a job that ends before its new pool actors are up waits this long to leave them warm

NAMES_PER_ACTOR = 4  # pool names a job tries per actor it needs before it starts plain actors


@lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """sha256 over slidescore's Python source (relative paths and bytes): the code a pool actor runs."""
    root = Path(__file__).resolve().parents[2]  # the slidescore package
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def pool_key(num_cpus: float, num_gpus: float, device: str) -> str:
    """What else fixes an actor process besides the code: runtime environment, versions, resources."""
    env = ray.get_runtime_context().runtime_env
    doc = {"ray": ray.__version__, "python": sys.version, "executable": sys.executable,
           "runtime_env": json.loads(json.dumps(dict(env or {}), sort_keys=True, default=str)),
           "num_cpus": float(num_cpus), "num_gpus": float(num_gpus), "device": device}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def pool_prefix(num_cpus: float, num_gpus: float, device: str) -> str:
    return f"sc-{code_fingerprint()[:12]}-{pool_key(num_cpus, num_gpus, device)[:12]}-"


def retire_stale(own: str | None, need_cpus: float, need_gpus: float) -> int:
    """Ask idle pool actors to exit (fire and forget) that are of another code version, or not of this
    job's pool ``own`` (its name prefix; None: a job without a pool) when the cluster's free resources
    would not hold this job's actors; returns how many were asked."""
    code = code_fingerprint()[:12]
    free = ray.available_resources()
    short = free.get("CPU", 0.0) < need_cpus or free.get("GPU", 0.0) < need_gpus
    asked = 0
    for entry in ray.util.list_named_actors(all_namespaces=True):
        name = entry.get("name", "") if isinstance(entry, dict) else ""
        if not name.startswith("sc-") or entry.get("namespace") != NAMESPACE or (own and name.startswith(own)):
            continue
        if name.split("-")[1] == code and not short:
            continue
        actor = lookup(name)
        if actor is not None:
            actor.retire.remote()
            asked += 1
    return asked


def lookup(name: str) -> Any:
    """The live pool actor of this name, or None."""
    try:
        return ray.get_actor(name, namespace=NAMESPACE)
    except ValueError:
        return None


class WarmPool:
    """The lease and idle-exit bookkeeping inside one pool actor (a mix-in state, not an actor)."""

    def __init__(self, keep_warm_s: float) -> None:
        self.keep_warm_s = keep_warm_s
        self.holder: str | None = None
        self.last_call = time.monotonic()  # the holder's last call (or the release)
        self.running = 0  # methods of the holder running now
        self.closing = False
        self.refused: dict[str, str] = {}  # the last few refusals, by token: why (for the load that follows)
        self.lock = threading.Lock()
        self.fingerprint = code_fingerprint()
        threading.Thread(target=self._watch, daemon=True, name="slidescore-pool-idle").start()

    def acquire(self, token: str, deadline: float | None, fingerprint: str) -> str:
        """Take the lease for ``token``; '' when taken, else why not."""
        with self.lock:
            why = self._refusal(token, deadline, fingerprint)
            if why:
                self.refused = {**dict(list(self.refused.items())[-7:]), token: why}
            else:
                self.holder, self.last_call = token, time.monotonic()
            return why

    def _refusal(self, token: str, deadline: float | None, fingerprint: str) -> str:
        if self.closing:
            return "exiting"
        if fingerprint != self.fingerprint:
            return f"another code version ({self.fingerprint[:12]}…)"
        if deadline is not None and time.time() > deadline:
            return "asked too late (the actor was busy)"
        if self.holder not in (None, token) and (self.running or time.monotonic() - self.last_call < LEASE_TTL_S):
            return "leased by another job"
        return ""

    def why_not(self, token: str | None) -> str:
        with self.lock:
            return self.refused.get(token or "", "leased by another job")

    def holds(self, token: str | None) -> bool:
        with self.lock:
            return token is None or self.holder == token

    def enter(self) -> None:
        with self.lock:
            self.running += 1
            self.last_call = time.monotonic()

    def leave(self) -> None:
        with self.lock:
            self.running -= 1
            self.last_call = time.monotonic()

    def release(self, token: str) -> bool:
        with self.lock:
            if self.holder != token:
                return False
            self.holder, self.last_call = None, time.monotonic()
            return True

    def retire(self) -> bool:
        """Exit now unless a job holds a fresh lease (a stale pool making room)."""
        with self.lock:
            if self.holder is not None and (self.running or time.monotonic() - self.last_call < LEASE_TTL_S):
                return False
            self.closing = True
        self._exit()
        return True

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.05, min(1.0, self.keep_warm_s / 4)))
            with self.lock:
                idle = time.monotonic() - self.last_call
                if self.holder is not None and not self.running and idle >= LEASE_TTL_S:
                    log.warning("pool actor: the lease of a job that stopped calling expired after %.0f s", idle)
                    self.holder = None
                if self.holder is None and not self.running and idle >= self.keep_warm_s:
                    self.closing = True
            if self.closing:
                self._exit()
                return

    @staticmethod
    def _exit() -> None:
        ray.kill(ray.get_runtime_context().current_actor, no_restart=True)  # frees the name and the resources
