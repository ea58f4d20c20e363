"""Intake decisions: run keys, job names and the pure rule of what one poll does with each sample.

:func:`sample_run_key` is the key the job will write into ``_SUCCESS``; :func:`job_name` /
:func:`parse_job_name` encode a run key and an attempt number in a job's name, the record of what
was submitted; :func:`score_command` is the job's entrypoint. :func:`decide` (pure, step 4 of
:mod:`slidescore.intake`) maps each sample's state (:class:`SampleState`: its key, finished and
quarantined keys, :class:`Attempt` s) to a :class:`Decision`: done, wait, submit, quarantine.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from slidescore.config import JobConfig, SampleSpec
from slidescore.intake.sources import _sid
from slidescore.io.open import input_fingerprint as fingerprint
from slidescore.stages.layout import image_ids, sample_id_for
from slidescore.stages.plan import sample_run_key_for

NAME_PREFIX = "slidescore-"
ACTIVE, SUCCEEDED, FAILED = "ACTIVE", "SUCCEEDED", "FAILED"
MAX_RAYJOB_NAME = 47  # KubeRay: RayJob names become cluster/service/job names with suffixes


def sample_run_key(sample: SampleSpec, model_checksum: str, card: Any, job_cfg: JobConfig) -> str:
    """The key ``jobs.score`` will write into the sample's ``_SUCCESS``.

    The job's own :func:`slidescore.stages.plan.sample_run_key_for` of the images' fingerprints, in the
    sample's order (the order :func:`score_command` passes them in), of the sample's ``roi`` (a manifest's
    ``roi=``; else the job config's ``mask.roi``) and of its reader (a manifest's ``backend=``), which the
    job is given with it.
    """
    return sample_run_key_for([fingerprint(u) for u in sample.uris], model_checksum, card, job_cfg,
                              image_ids=image_ids(sample.uris), roi=sample.roi, backend=sample.backend)


def job_name(run_key: str, attempt: int) -> str:
    """Submission id / RayJob name of one attempt: ``slidescore-<run key>-a<n>`` (DNS-1035, ≤ 47)."""
    if not re.fullmatch(r"[0-9a-f]{8,32}", run_key) or attempt < 1:
        raise ValueError(f"job_name: expected a hex run key and attempt >= 1, got {run_key!r}, {attempt!r}")
    name = f"{NAME_PREFIX}{run_key}-a{attempt}"
    if len(name) > MAX_RAYJOB_NAME:
        raise ValueError(f"job_name: {name!r} is longer than KubeRay's {MAX_RAYJOB_NAME} characters for a RayJob")
    return name


def parse_job_name(name: str) -> tuple[str, int] | None:
    m = re.fullmatch(rf"{NAME_PREFIX}([0-9a-f]{{8,32}})-a([0-9]+)", name)
    return (m.group(1), int(m.group(2))) if m else None


def score_command(sample: SampleSpec, job_config: str, output: str, *, overwrite: bool = False) -> list[str]:
    """The job's entrypoint: score only this sample, into ``output``.

    ``--uri URI`` for one image named after its file; ``--sample ID=URI,URI`` for a sample of
    several images, one whose id is not its file's (a folder of one image), or one with its own
    settings from a manifest line (``roi=PATH``, ``backend=NAME``), which follow as the same words:
    ``--sample "ID=URI roi=PATH backend=NAME"`` (:func:`slidescore.cli.parse_sample_arg`).
    """
    cmd = ["python", "-m", "jobs.score", "--config", job_config, "--output", output, "-q"]
    settings = ([f"roi={sample.roi}"] if sample.roi else []) + ([f"backend={sample.backend}"] if sample.backend != "auto" else [])
    if len(sample.uris) == 1 and sample_id_for(sample.uris[0]) == _sid(sample) and not settings:
        cmd += ["--uri", sample.uris[0]]
    else:
        cmd += ["--sample", " ".join([f"{_sid(sample)}={','.join(sample.uris)}", *settings])]
    return cmd + (["--overwrite"] if overwrite else [])

# -- decisions ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Attempt:
    """One submitted job of a run key, as the job backend reports it."""

    name: str
    attempt: int
    state: str  # ACTIVE, SUCCEEDED or FAILED
    message: str = ""
    sample_id: str = ""


@dataclass(frozen=True)
class SampleState:
    sample: SampleSpec
    run_key: str
    done_key: str | None  # run key in the sample's _SUCCESS, None without one
    quarantined_key: str | None  # run key of its quarantine record, None without one
    attempts: tuple[Attempt, ...] = ()


@dataclass(frozen=True)
class Decision:
    sample_id: str
    run_key: str
    action: str  # done, quarantined, running, submit, quarantine, deferred, changed
    attempt: int = 0
    reason: str = ""


def decide(states: Sequence[SampleState], *, in_flight: int, max_in_flight: int, max_attempts: int,
           rescore_changed: bool = False, busy: frozenset[str] = frozenset()) -> list[Decision]:
    """What one poll does with each sample (pure; see :mod:`slidescore.intake` for the rules).

    ``busy``: sample ids with a running job under *any* run key (the image was replaced while it
    was being scored): wait for it, so two jobs never write one sample folder at once.
    """
    out = []
    free = max(0, max_in_flight - in_flight)
    for s in states:
        sid, key = _sid(s.sample), s.run_key
        if s.done_key == key:
            out.append(Decision(sid, key, "done"))
            continue
        if s.quarantined_key == key:
            out.append(Decision(sid, key, "quarantined"))
            continue
        mine = sorted((a for a in s.attempts), key=lambda a: a.attempt)
        if any(a.state == ACTIVE for a in mine) or sid in busy:
            out.append(Decision(sid, key, "running", max((a.attempt for a in mine), default=0)))
            continue
        if s.done_key is not None and not rescore_changed:
            out.append(Decision(sid, key, "changed", reason=f"outputs of run key {s.done_key} exist; the input, model or "
                                                            f"config changed (now {key}); set rescore_changed: true to rescore"))
            continue
        if len(mine) >= max_attempts:
            last = mine[-1]
            out.append(Decision(sid, key, "quarantine", last.attempt,
                                reason=f"{len(mine)} attempts failed; last ({last.name}, {last.state}): {last.message}"))
            continue
        if free <= 0:
            out.append(Decision(sid, key, "deferred", (mine[-1].attempt if mine else 0) + 1))
            continue
        free -= 1
        out.append(Decision(sid, key, "submit", (mine[-1].attempt if mine else 0) + 1,
                            reason=f"retry after: {mine[-1].message}" if mine else ""))
    return out
