"""One intake poll: list the jobs, find the samples, decide, submit or quarantine, and record it.

:func:`poll` runs the steps of :mod:`slidescore.intake` in their order against a
:class:`~slidescore.intake.backends.JobBackend` and returns a :class:`PollSummary`; it reads each
sample's ``_SUCCESS`` and quarantine record and writes quarantine records and
``<output>/_intake/last_poll.json`` with the small JSON helpers here. With ``batch_size`` > 1 the
samples a poll submits go in jobs of up to that many samples (:func:`batches`, :func:`batch_command`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import InputError, SlideScoreError
from slidescore.intake.backends import JobBackend, Member, batch_key
from slidescore.intake.config import IntakeConfig
from slidescore.intake.decide import (
    ACTIVE,
    SampleState,
    decide,
    job_name,
    sample_run_key,
    score_command,
)
from slidescore.intake.sources import _sid, find_samples
from slidescore.io.storage import filesystem, is_local, with_retries
from slidescore.stages.layout import SUCCESS

QUARANTINE_DIR = "_quarantine"
INTAKE_DIR = "_intake"


# -- outputs ------------------------------------------------------------------------------------
def _read_json(uri: str) -> Any | None:
    fs, path = filesystem(uri)
    try:
        data = with_retries(lambda: fs.cat_file(path), uri, "reading it")
    except InputError as e:
        if isinstance(e, FileNotFoundError):
            return None
        raise
    try:
        return json.loads(data)
    except json.JSONDecodeError:
        return {}


def _write_json(uri: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, default=str) + "\n"
    if is_local(uri):
        from slidescore.io.outputs import write_text  # atomic rename

        write_text(filesystem(uri)[1], text)
        return
    fs, path = filesystem(uri)
    with_retries(lambda: fs.pipe_file(path, text.encode()), uri, "writing it")


def _key_of(record: Any) -> str | None:
    return str(record.get("run_key")) if isinstance(record, dict) and record.get("run_key") else None


# -- batches ------------------------------------------------------------------------------------
def batch_command(samples: Sequence[SampleSpec], job_config: str, output: str, *, overwrite: bool = False) -> list[str]:
    """The entrypoint of one job scoring ``samples``: :func:`score_command`'s, with every sample's
    ``--uri`` / ``--sample`` arguments in turn."""
    cmds = [score_command(s, job_config, output) for s in samples]
    start = next(i for i, a in enumerate(cmds[0]) if a in ("--uri", "--sample"))
    return cmds[0][:start] + [a for c in cmds for a in c[start:]] + (["--overwrite"] if overwrite else [])


def batches(members: Sequence[tuple[Member, bool]], size: int) -> list[tuple[list[Member], bool]]:
    """Members to submit (each with whether it needs ``--overwrite``) in jobs of at most ``size``, in order;
    samples that need ``--overwrite`` never share a job with samples that do not."""
    out: list[tuple[list[Member], bool]] = []
    for flag in (False, True):
        group = [m for m, o in members if o is flag]
        out += [(group[i : i + size], flag) for i in range(0, len(group), size)]
    return out


def _job_name(batch: Sequence[Member]) -> str:
    if len(batch) == 1:
        return job_name(batch[0].run_key, batch[0].attempt)
    return job_name(batch_key(batch), max(m.attempt for m in batch))


# -- one poll -----------------------------------------------------------------------------------
@dataclass
class PollSummary:
    submitted: list[str] = field(default_factory=list)
    retried: list[str] = field(default_factory=list)
    done: list[str] = field(default_factory=list)
    running: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)  # newly quarantined by this poll
    still_quarantined: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # another poll submitted the same attempt first
    conflicts: dict[str, list[str]] = field(default_factory=dict)
    waiting: dict[str, str] = field(default_factory=dict)  # sample folders not complete yet
    problems: dict[str, str] = field(default_factory=dict)  # entries that cannot be submitted as they are
    failed_to_key: dict[str, str] = field(default_factory=dict)  # samples whose fingerprint failed
    jobs: dict[str, str] = field(default_factory=dict)  # sample id → job name submitted now
    in_flight: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def lines(self) -> list[str]:
        out = [f"submit    {sid}: {self.jobs[sid]}" for sid in self.submitted]
        out += [f"retry     {sid}: {self.jobs[sid]}" for sid in self.retried]
        out += [f"QUARANTINED {sid}: see {QUARANTINE_DIR}/{sid}.json" for sid in self.quarantined]
        out += [f"CONFLICT  {sid}: {', '.join(us)} share one sample id; rename all but one" for sid, us in self.conflicts.items()]
        out += [f"CHANGED   {sid}: finished outputs of another run key exist; not rescored (rescore_changed: true)"
                for sid in self.changed]
        out += [f"ERROR     {sid}: {why}" for sid, why in {**self.problems, **self.failed_to_key}.items()]
        out += [f"waiting   {sid}: {why}" for sid, why in self.waiting.items()]
        out.append(f"intake: {len(self.submitted)} submitted, {len(self.retried)} retried, {len(self.running) + len(self.refused)} running, "
                   f"{len(self.deferred)} waiting for a slot, {len(self.done)} done, {len(self.quarantined)} quarantined now, "
                   f"{len(self.still_quarantined)} in quarantine, {len(self.changed)} changed, {len(self.conflicts)} conflicts, "
                   f"{len(self.waiting)} incomplete; "
                   f"{self.in_flight} jobs in flight")
        return out


def poll(cfg: IntakeConfig, job_cfg: JobConfig, backend: JobBackend, *, model_checksum: str, card: Any) -> PollSummary:
    """One intake poll (:mod:`slidescore.intake`); returns what it saw and did."""
    summary = PollSummary()
    known = backend.attempts()  # first: see slidescore.intake, step 1
    summary.in_flight = len({a.name for atts in known.values() for a in atts if a.state == ACTIVE})  # jobs, not samples
    found = find_samples(cfg)
    samples, summary.conflicts, summary.waiting, summary.problems = found.samples, found.conflicts, found.waiting, found.problems
    out = cfg.output.rstrip("/")
    states = []
    for s in samples:
        try:
            key = sample_run_key(s, model_checksum, card, job_cfg)
        except SlideScoreError as e:  # vanished since listing, or unreadable: next poll tries again
            summary.failed_to_key[_sid(s)] = str(e)
            continue
        done = _key_of(_read_json(f"{out}/{_sid(s)}/{SUCCESS}"))
        quarantined = _key_of(_read_json(f"{out}/{QUARANTINE_DIR}/{_sid(s)}.json"))
        states.append(SampleState(s, key, done, quarantined, tuple(known.get(key, ()))))
    by_id = {_sid(st.sample): st for st in states}
    busy = frozenset(a.sample_id for atts in known.values() for a in atts if a.state == ACTIVE and a.sample_id)
    # decide counts samples against free slots; a slot (a job) holds up to batch_size samples
    b = cfg.batch_size
    to_submit: list[tuple[Member, bool]] = []
    for d in decide(states, in_flight=summary.in_flight * b, max_in_flight=cfg.max_in_flight * b, max_attempts=cfg.max_attempts,
                    rescore_changed=cfg.rescore_changed, busy=busy):
        st = by_id[d.sample_id]
        if d.action == "submit":
            to_submit.append((Member(st.sample, d.run_key, d.attempt), st.done_key is not None))
        elif d.action == "quarantine":
            last = max(st.attempts, key=lambda a: a.attempt)
            detail = backend.failure_detail(last.name)
            _write_json(f"{out}/{QUARANTINE_DIR}/{d.sample_id}.json", {
                "sample_id": d.sample_id, "uris": list(st.sample.uris), "run_key": d.run_key,
                "reason": d.reason + (f"\n{detail}" if detail else ""),
                "attempts": [{"name": a.name, "state": a.state, "message": a.message} for a in sorted(st.attempts, key=lambda a: a.attempt)],
                "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "release": "the sample is submitted again when its input changes (new run key); to retry it unchanged, "
                           "delete this file and its failed jobs (ray job delete / kubectl delete rayjob)",
            })
            summary.quarantined.append(d.sample_id)
        else:
            {"done": summary.done, "quarantined": summary.still_quarantined, "running": summary.running,
             "deferred": summary.deferred, "changed": summary.changed}[d.action].append(d.sample_id)
    free_jobs = max(0, cfg.max_in_flight - summary.in_flight)
    for i, (batch, overwrite) in enumerate(batches(to_submit, b)):
        if i >= free_jobs:  # batches split by --overwrite can outnumber the free slots: the rest waits
            summary.deferred += [_sid(m.sample) for m in batch]
            continue
        name = _job_name(batch)
        cmd = batch_command([m.sample for m in batch], cfg.job_config, out, overwrite=overwrite)
        ids = [_sid(m.sample) for m in batch]
        if backend.submit_batch(name, batch, cmd):
            for m, sid in zip(batch, ids, strict=True):
                (summary.retried if m.attempt > 1 else summary.submitted).append(sid)
                summary.jobs[sid] = name
            summary.in_flight += 1
        else:
            summary.refused += ids
    _write_json(f"{out}/{INTAKE_DIR}/last_poll.json", {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                       **summary.to_dict()})
    return summary
