"""The driver's bookkeeping: its samples, tasks and actor slots, and the test hooks (:class:`FaultInjection`)."""

from __future__ import annotations

import os
import resource
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slidescore.config import SampleSpec
from slidescore.errors import SlideScoreError
from slidescore.stages.layout import sample_label
from slidescore.stages.plan import SamplePlan
from slidescore.stages.records import BlockRecord, SampleResult


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


@dataclass
class SampleState:
    """One sample in the driver: where it is in its lifecycle, its plans and block records."""

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
    scoring: dict[str, Any] | None = None  # the scoring actors' classifier record (dense check, options)

    @property
    def uri(self) -> str:
        return sample_label(self.spec)

    @property
    def n_blocks(self) -> int:
        return sum(len(p.blocks) for p in self.plans or ())


@dataclass
class Task:
    """Some blocks of one image, sent to one actor as one task."""

    sid: str
    image: int  # index of the image in its sample (block tasks are per image)
    blocks: tuple[int, ...]
    transient: int = 0
    lost: int = 0
    not_before: float = 0.0


@dataclass
class Slot:
    """One place in the actor pool and the actor now filling it (replaced when it dies)."""

    index: int
    gen: int = -1
    actor: Any = None
    ready_ref: Any = None
    ready: bool = False
    in_flight: int = 0
    start_failures: int = 0
    retired: bool = False
    pooled: bool = False  # a warm-pool actor (cluster.keep_warm_s): released, not killed, when the job ends
    warm: bool = False  # a pool actor that existed before this job (asked with a deadline; may be busy)
    t_asked: float = 0.0  # when the actor was asked to start or to be taken
    acquire_ref: Any = None  # the reply of a pool actor's acquire

    @property
    def label(self) -> str:
        return f"a{self.index}" if self.gen == 0 else f"a{self.index}.{self.gen}"


def process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``; None elsewhere)."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return round(uptime - start_ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, IndexError):
        return None


def cpu_s() -> float:
    """CPU seconds (user + system) this process has used."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return round(ru.ru_utime + ru.ru_stime, 3)
