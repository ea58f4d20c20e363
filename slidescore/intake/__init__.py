"""Intake poller: find new samples, submit each exactly once, retry, then quarantine.

One poll (``python -m jobs.intake``, run by the Kubernetes CronJob) does, in this order:

1. **Jobs.** Lists the jobs earlier polls submitted (the Ray job server's submissions, or the
   KubeRay ``RayJob`` objects): they are the record of what was submitted, each named
   ``slidescore-<run key>-a<attempt>``. Listed *before* the outputs are read, so a job that
   finished in between is never mistaken for one that succeeded without writing its marker.
2. **Samples** (:func:`find_samples`). An image directly under ``intake_prefix`` is one sample,
   whose id is the file name without its image extensions (``s3://in/2026/a.ome.tiff`` → ``a``),
   as ``jobs.score`` names it. A sub-folder ``<intake_prefix>/<sample_id>/`` is one sample of all
   the images directly in it (``sample_folders``), submitted once it is *complete*: it holds the
   marker object ``_READY`` (written by the uploader after its last image), or, with ``settle_s``
   set, no object in it changed for ``settle_s`` seconds; until then it is ``waiting``. A
   ``manifest`` lists one image URI per line, or ``ID: URI URI …`` for a sample of several images
   (complete as listed). Two samples with one id (``a.tif`` and ``a.svs``, or ``a.tif`` and
   ``a/``) are a *conflict*: neither is submitted until one is renamed.
3. **Run key** of each sample (:func:`sample_run_key`, the key :func:`slidescore.stages.plan.plan_images`
   computes): the fingerprints of all its images (URI, size, ETag or mtime), the model checksum and
   card, the scoring config and the version. The job computes the same key and writes it into
   ``<output>/<sample_id>/_SUCCESS``; images added to a folder after it was scored give a new key.
4. **Decide** (:func:`decide`, pure): done (marker with this key) → skip; quarantined with this
   key → skip; a job of this sample pending/running (any key) → wait; fewer than ``max_attempts`` finished
   attempts → submit attempt n+1 while fewer than ``max_in_flight`` jobs run; otherwise write
   ``<output>/_quarantine/<sample_id>.json`` with the last job's error and never submit this key
   again. A changed input (or model, or config) has a new key and starts over at attempt 1.
5. **Submit** with the attempt in the name: the Ray job server refuses a second submission id, the
   Kubernetes API a second object name, so two polls that overlap submit each attempt once (the
   loser counts it as ``running``). ``max_in_flight`` is a soft bound when polls overlap (each may
   fill the free slots it saw); the CronJob's ``concurrencyPolicy: Forbid`` prevents overlap.

Ray and the Kubernetes API are reached only through their HTTP job APIs (Ray's job SDK is an HTTP
client; the RayJob backend speaks plain HTTPS with the pod's service-account token), so the poller
starts no Ray runtime and needs no Kubernetes client library.

The package, one module per step: :mod:`~slidescore.intake.config` (the poller's YAML),
:mod:`~slidescore.intake.sources` (step 2), :mod:`~slidescore.intake.decide` (steps 3 and 4, job
names), :mod:`~slidescore.intake.backends` (steps 1 and 5: Ray job server, KubeRay) and
:mod:`~slidescore.intake.poll` (one poll, in this order). Every name is importable from here.
"""

from slidescore.intake.backends import (
    ANNOTATION_SAMPLE,
    ANNOTATION_URIS,
    LABEL_ATTEMPT,
    LABEL_COMPONENT,
    LABEL_RUN_KEY,
    REASON_CHARS,
    JobBackend,
    RayJobBackend,
    RayJobsBackend,
    build_rayjob,
    make_backend,
    rayjob_state,
)
from slidescore.intake.config import SUBMIT_MODES, IntakeConfig, load_intake_config, load_job_config
from slidescore.intake.decide import (
    ACTIVE,
    FAILED,
    MAX_RAYJOB_NAME,
    NAME_PREFIX,
    SUCCEEDED,
    Attempt,
    Decision,
    SampleState,
    decide,
    job_name,
    parse_job_name,
    sample_run_key,
    score_command,
)
from slidescore.intake.poll import INTAKE_DIR, QUARANTINE_DIR, PollSummary, poll
from slidescore.intake.sources import (
    READY,
    Found,
    find_samples,
    folder_id,
    folder_sample,
    group_samples,
    read_manifest,
)

__all__ = [
    "ACTIVE",
    "ANNOTATION_SAMPLE",
    "ANNOTATION_URIS",
    "FAILED",
    "INTAKE_DIR",
    "LABEL_ATTEMPT",
    "LABEL_COMPONENT",
    "LABEL_RUN_KEY",
    "MAX_RAYJOB_NAME",
    "NAME_PREFIX",
    "QUARANTINE_DIR",
    "READY",
    "REASON_CHARS",
    "SUBMIT_MODES",
    "SUCCEEDED",
    "Attempt",
    "Decision",
    "Found",
    "IntakeConfig",
    "JobBackend",
    "PollSummary",
    "RayJobBackend",
    "RayJobsBackend",
    "SampleState",
    "build_rayjob",
    "decide",
    "find_samples",
    "folder_id",
    "folder_sample",
    "group_samples",
    "job_name",
    "load_intake_config",
    "load_job_config",
    "make_backend",
    "parse_job_name",
    "poll",
    "rayjob_state",
    "read_manifest",
    "sample_run_key",
    "score_command",
]
