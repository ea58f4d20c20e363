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
"""

from __future__ import annotations

import json
import logging
import os
import re
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from slidescore.config import (
    SAMPLE_ID_PATTERN,
    JobConfig,
    SampleSpec,
    load_config,
    load_yaml_file,
    parse_manifest,
)
from slidescore.errors import ConfigError, InputError, SlideScoreError
from slidescore.io.storage import (
    IMAGE_SUFFIXES,
    filesystem,
    fingerprint,
    is_local,
    protocol_of,
    with_retries,
)
from slidescore.stages.layout import SUCCESS, image_ids, sample_id_for
from slidescore.stages.plan import sample_run_key_for

log = logging.getLogger(__name__)

NAME_PREFIX = "slidescore-"
QUARANTINE_DIR = "_quarantine"
INTAKE_DIR = "_intake"
READY = "_READY"  # the uploader's "this sample folder is complete" marker
ACTIVE, SUCCEEDED, FAILED = "ACTIVE", "SUCCEEDED", "FAILED"
SUBMIT_MODES = ("rayjob", "ray_jobs")
MAX_RAYJOB_NAME = 47  # KubeRay: RayJob names become cluster/service/job names with suffixes
LABEL_RUN_KEY, LABEL_ATTEMPT, LABEL_COMPONENT = "slidescore.io/run-key", "slidescore.io/attempt", "app.kubernetes.io/component"
ANNOTATION_SAMPLE, ANNOTATION_URIS = "slidescore.io/sample-id", "slidescore.io/uris"
REASON_CHARS = 4000


# -- configuration ------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntakeConfig:
    """The poller's YAML (``intake.yaml``; every key but ``output`` and one source is optional).

    ``intake_prefix`` (folder or ``s3://`` prefix) and/or ``manifest`` (text file, local or
    ``s3://``, one image URI or ``ID: URI URI …`` per line, the job's format: :func:`slidescore.config.parse_manifest`) say where samples come from. ``output`` is
    where the jobs write (passed to them as ``--output``). ``job_config`` is the scoring config, a
    path valid both here and where the job driver runs (relative: beside this file).
    ``submit: rayjob`` creates a KubeRay RayJob per attempt from the suspended template
    ``rayjob_template`` in ``namespace`` (default: ``$POD_NAMESPACE``); ``submit: ray_jobs`` submits
    to the Ray job server at ``ray_address`` (default: ``$RAY_ADDRESS``, else
    ``http://127.0.0.1:8265``), uploading ``working_dir`` when set. ``rescore_changed`` rescores a
    sample whose finished outputs belong to another run key (otherwise it is reported ``changed``).
    ``sample_folders`` (default true): each sub-folder of ``intake_prefix`` is one sample of the
    images in it, complete once it holds ``_READY`` or, with ``settle_s``, once no object in it
    changed for ``settle_s`` seconds (false: sub-folders are ignored).
    """

    output: str
    intake_prefix: str | None = None
    manifest: str | None = None
    job_config: str = "job.yaml"
    max_in_flight: int = 4
    max_attempts: int = 3
    submit: str = "rayjob"
    ray_address: str | None = None
    working_dir: str | None = None
    namespace: str | None = None
    rayjob_template: str = "slidescore-score"
    rescore_changed: bool = False
    sample_folders: bool = True
    settle_s: int | None = None

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path | None = None) -> IntakeConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"intake config: expected a mapping of keys, got {type(data).__name__} {data!r}")
        types_ = {"output": str, "intake_prefix": str, "manifest": str, "job_config": str, "max_in_flight": int,
                  "max_attempts": int, "submit": str, "ray_address": str, "working_dir": str, "namespace": str,
                  "rayjob_template": str, "rescore_changed": bool, "sample_folders": bool, "settle_s": int}
        unknown = sorted(set(data) - set(types_), key=repr)  # keys need not be strings (YAML `1: x`)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key; the intake config accepts {sorted(types_)}")
        for key, value in data.items():
            tp = types_[key]
            optional = key not in ("output", "job_config", "max_in_flight", "max_attempts", "submit", "rayjob_template", "rescore_changed",
                                   "sample_folders")
            if value is None and optional:
                continue
            if tp is int and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ConfigError(f"{key}: expected a positive integer, got {value!r}")
            if tp is bool and not isinstance(value, bool):
                raise ConfigError(f"{key}: expected true or false, got {value!r}")
            if tp is str and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
        if "output" not in data:
            raise ConfigError("output: required; the folder or s3:// prefix the jobs write <sample_id>/ into")
        if not data.get("intake_prefix") and not data.get("manifest"):
            raise ConfigError("intake_prefix: expected a folder or s3:// prefix holding new images (or manifest: a file "
                              "listing image URIs); neither is set")
        if data.get("submit", "rayjob") not in SUBMIT_MODES:
            raise ConfigError(f"submit: expected one of {list(SUBMIT_MODES)}, got {data['submit']!r}")
        cfg = cls(**data)
        if base_dir is not None and not Path(cfg.job_config).is_absolute() and "://" not in cfg.job_config:
            cfg = _replace(cfg, job_config=str(Path(base_dir) / cfg.job_config))
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _replace(cfg: IntakeConfig, **changes: Any) -> IntakeConfig:
    return IntakeConfig(**{**cfg.to_dict(), **changes})


def load_intake_config(path: str | Path) -> IntakeConfig:
    """Read the poller's YAML with the job's strict reader (:func:`slidescore.config.load_yaml_file`)."""
    p = Path(path)
    return IntakeConfig.from_dict(load_yaml_file(p, what="intake config"), base_dir=p.resolve().parent)


# -- samples ------------------------------------------------------------------------------------
# A sample is the job's :class:`~slidescore.config.SampleSpec`: an id and its image URIs (one, or
# several: a folder or a manifest group), with ``origin`` (a folder, a manifest line) for messages.
# The poller always fills in the id; :func:`_sid` reads it.
def _sid(sample: SampleSpec) -> str:
    """A sample's id: its own, or (never the case for the poller's samples) its image's file name."""
    return sample.sample_id if sample.sample_id is not None else sample_id_for(sample.uris[0])


@dataclass
class Found:
    """What one listing of the intake source holds (:func:`find_samples`)."""

    samples: list[SampleSpec] = field(default_factory=list)
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # id → the places claiming it
    waiting: dict[str, str] = field(default_factory=dict)  # folder samples not complete yet → what they wait for
    problems: dict[str, str] = field(default_factory=dict)  # entries never submittable as they are → why, and the fix


def read_manifest(uri: str) -> list[str | SampleSpec]:
    """A manifest's entries (local or object storage), parsed by the job's own parser.

    An image URI per line, or ``ID: URI URI …`` (a sample of several images); comments and blank
    lines as :func:`slidescore.config.parse_manifest` documents them, so the poller and the job
    (``samples.manifest``) read one manifest as the same samples.
    """
    fs, path = filesystem(uri)
    raw = with_retries(lambda: fs.cat_file(path), uri, "reading the manifest")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"manifest: {uri} is not UTF-8 text ({e}); expected one image URI (or 'ID: URI URI …') "
                          "per line") from None
    return parse_manifest(text, f"manifest: {uri}")


def _entry_uri(prefix: str, name: str) -> str:
    return name if is_local(prefix) else f"{protocol_of(prefix)}://{name}"


def _list(uri: str) -> list[dict[str, Any]]:
    """A folder's entries, freshly listed (fsspec caches listings per process; a poll must see new files)."""
    fs, path = filesystem(uri)
    fs.invalidate_cache(path.rstrip("/"))
    return list(with_retries(lambda: fs.ls(path.rstrip("/"), detail=True), uri, "listing the prefix"))


def _is_image(entry: dict[str, Any]) -> bool:
    name = str(entry["name"]).rstrip("/").lower()  # as io.storage.list_images: image files and *.zarr folders
    return name.endswith(IMAGE_SUFFIXES) and (entry.get("type") != "directory" or name.endswith(".zarr"))


def _modified_s(entry: dict[str, Any]) -> float | None:
    """When an entry last changed (seconds since the epoch): S3 ``LastModified``, local ``mtime``."""
    for k in ("LastModified", "mtime", "last_modified", "updated"):
        v = entry.get(k)
        if v is not None:
            return float(v.timestamp() if hasattr(v, "timestamp") else v)
    return None


def folder_id(folder: str) -> str:
    """A sample folder's id: its name, made filesystem-safe as :func:`sample_id_for` does for files."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", folder.rstrip("/").rsplit("/", 1)[-1])


def folder_sample(folder: str, cfg: IntakeConfig, now: float) -> tuple[SampleSpec | None, str, str]:
    """(sample, waiting reason, problem) of one sample folder: a sample only once it is complete."""
    sid = folder_id(folder)
    if not SAMPLE_ID_PATTERN.match(sid):
        return None, "", (f"folder {folder}/ cannot name a sample: a sample id starts with a letter or digit; "
                          "rename the folder")
    entries = _list(folder)
    uris = sorted(_entry_uri(folder, str(e["name"]).rstrip("/")) for e in entries if _is_image(e))
    names = {str(e["name"]).rstrip("/").rsplit("/", 1)[-1] for e in entries}
    if READY in names:
        if not uris:
            return None, "", f"folder {folder}/ holds {READY} but no image; put the sample's images beside it"
        return SampleSpec(sid, tuple(uris), origin=f"{folder}/"), "", ""
    if not uris:
        return None, f"folder {folder}/ holds no image yet", ""
    if cfg.settle_s is None:
        return None, f"folder {folder}/ ({len(uris)} images) has no {READY} marker yet", ""
    times = [_modified_s(e) for e in entries if e.get("type") != "directory"]
    if any(t is None for t in times):
        return None, f"folder {folder}/: the storage gives no modification times; write {READY} when it is complete", ""
    quiet_s = now - max(t for t in times if t is not None)
    if quiet_s < cfg.settle_s:
        return None, (f"folder {folder}/ ({len(uris)} images) changed {max(quiet_s, 0):.0f} s ago; complete after "
                      f"settle_s={cfg.settle_s} s without changes (or when {READY} is written)"), ""
    return SampleSpec(sid, tuple(uris), origin=f"{folder}/"), "", ""


def find_samples(cfg: IntakeConfig, *, now: float | None = None) -> Found:
    """The samples of the intake source (module docstring, step 2), grouped and checked."""
    now = time.time() if now is None else now
    found = Found()
    singles: list[str] = []
    listed: list[SampleSpec] = []
    if cfg.intake_prefix:
        prefix = cfg.intake_prefix.rstrip("/")
        for e in _list(cfg.intake_prefix):
            name = str(e["name"]).rstrip("/")
            base = name.rsplit("/", 1)[-1]
            if _is_image(e):
                singles.append(_entry_uri(cfg.intake_prefix, name))
            elif e.get("type") == "directory" and cfg.sample_folders and not base.startswith((".", "_")):
                folder = f"{prefix}/{base}"
                sample, waiting, problem = folder_sample(folder, cfg, now)
                if sample is not None:
                    listed.append(sample)
                elif problem:
                    found.problems[base] = problem
                else:
                    found.waiting[folder_id(folder)] = waiting
        singles.sort()
    if cfg.manifest:
        for entry in read_manifest(cfg.manifest):
            if isinstance(entry, SampleSpec):
                listed.append(entry)
            elif entry not in singles:
                singles.append(entry)
    in_groups = {u for s in listed for u in s.uris}
    # an image listed in a manifest group belongs to that sample, not to a sample of its own
    found.samples, found.conflicts = group_samples([u for u in singles if u not in in_groups], listed)
    for s in list(found.samples):
        if (len(s.uris) > 1 or sample_id_for(s.uris[0]) != _sid(s)) and any("," in u for u in s.uris):
            found.samples.remove(s)
            found.problems[_sid(s)] = (f"sample {_sid(s)!r}: an image URI contains ',', which the job's "
                                           "--sample ID=URI,URI cannot carry; rename the image")
    return found


def group_samples(uris: Sequence[str], samples: Sequence[SampleSpec] = ()) -> tuple[list[SampleSpec], dict[str, list[str]]]:
    """One image = one sample (id = file name without image extensions), plus ``samples`` (folders,
    manifest groups); (samples by id, conflicts).

    Ids that several entries map to (``a.tif`` and ``a.svs``, or ``a.tif`` and a folder ``a/``) are
    conflicts: returned by id with what claims them and never submitted, since their outputs would
    share ``<output>/<id>/``.
    """
    by_id: dict[str, list[SampleSpec]] = {}
    for u in uris:
        by_id.setdefault(sample_id_for(u), []).append(SampleSpec(sample_id_for(u), (u,)))
    for s in samples:
        by_id.setdefault(_sid(s), []).append(s)
    ok = [ss[0] for _, ss in sorted(by_id.items()) if len(ss) == 1]
    conflicts = {sid: [s.origin or " ".join(s.uris) for s in ss] for sid, ss in sorted(by_id.items()) if len(ss) > 1}
    return ok, conflicts


def sample_run_key(sample: SampleSpec, model_checksum: str, card: Any, job_cfg: JobConfig) -> str:
    """The key ``jobs.score`` will write into the sample's ``_SUCCESS``.

    The job's own :func:`slidescore.stages.plan.sample_run_key_for` of the images' fingerprints, in the
    sample's order (the order :func:`score_command` passes them in).
    """
    return sample_run_key_for([fingerprint(u) for u in sample.uris], model_checksum, card, job_cfg,
                              image_ids=image_ids(sample.uris))


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
    several images or one whose id is not its file's (a folder of one image).
    """
    cmd = ["python", "-m", "jobs.score", "--config", job_config, "--output", output, "-q"]
    if len(sample.uris) == 1 and sample_id_for(sample.uris[0]) == _sid(sample):
        cmd += ["--uri", sample.uris[0]]
    else:
        cmd += ["--sample", f"{_sid(sample)}={','.join(sample.uris)}"]
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
    """What one poll does with each sample (pure; see the module docstring for the rules).

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


# -- job backends -------------------------------------------------------------------------------
class JobBackend(Protocol):
    """Where attempts are submitted and looked up (the record of what was submitted)."""

    def attempts(self) -> dict[str, list[Attempt]]:
        """Every slidescore attempt the backend knows, by run key."""

    def submit(self, name: str, sample: SampleSpec, run_key: str, attempt: int, command: list[str]) -> bool:
        """Submit one attempt; ``False`` when a job of that name exists already (another poll's)."""

    def failure_detail(self, name: str) -> str:
        """Why a finished attempt failed, beyond its one-line message (a log tail), or ``""``."""


def _state_of_ray(status: str) -> str:
    return {"SUCCEEDED": SUCCEEDED, "FAILED": FAILED, "STOPPED": FAILED}.get(status, ACTIVE)


def _reason_from_logs(logs: str) -> str:
    failed = [ln for ln in logs.splitlines() if ln.startswith(("FAILED", "error:"))]
    tail = logs[-REASON_CHARS // 2 :]
    return ("\n".join(failed) + "\n--- log tail ---\n" + tail) if failed else tail


class RayJobsBackend:
    """Ray job server (``JobSubmissionClient``): submission id = job name, metadata = run key."""

    def __init__(self, address: str, working_dir: str | None = None, *, headers: dict[str, str] | None = None) -> None:
        """``headers``: e.g. an explicit ``Authorization: Bearer <token>``; by default Ray's client
        adds the token itself when ``RAY_AUTH_MODE=token`` (``RAY_AUTH_TOKEN`` or ``~/.ray/auth_token``)."""
        from ray.job_submission import JobSubmissionClient  # the HTTP client only, no Ray runtime

        self.address = address
        self.client = JobSubmissionClient(address, headers=headers)
        self.working_dir = working_dir

    def attempts(self) -> dict[str, list[Attempt]]:
        out: dict[str, list[Attempt]] = {}
        for job in self.client.list_jobs():
            name = job.submission_id or ""
            parsed = parse_job_name(name)
            if parsed is None:
                continue
            key, n = parsed
            state = _state_of_ray(str(getattr(job.status, "value", job.status)))
            message = (job.message or "").split("\n", 1)[0]  # Ray appends a log tail; failure_detail has it
            sid = str((job.metadata or {}).get("slidescore_sample_id", ""))
            out.setdefault(key, []).append(Attempt(name, n, state, message, sid))
        return out

    def failure_detail(self, name: str) -> str:
        try:
            return _reason_from_logs(self.client.get_job_logs(name))
        except RuntimeError as e:  # logs gone (driver node lost): the job's message must do
            return f"(no logs: {e})"

    def submit(self, name: str, sample: SampleSpec, run_key: str, attempt: int, command: list[str]) -> bool:
        import shlex

        runtime_env: dict[str, Any] = {}
        if self.working_dir:
            runtime_env = {"working_dir": self.working_dir,
                           "excludes": [".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info", ".ruff_cache", ".mypy_cache"]}
        try:
            self.client.submit_job(
                entrypoint=shlex.join(command), submission_id=name, runtime_env=runtime_env or None,
                metadata={"slidescore_sample_id": _sid(sample), "slidescore_run_key": run_key,
                          "slidescore_attempt": str(attempt), "slidescore_uris": " ".join(sample.uris)},
            )
        except RuntimeError as e:
            if "already exists" in str(e):
                return False
            raise
        return True


class RayJobBackend:
    """KubeRay: one ``RayJob`` per attempt, copied from the suspended template, over HTTPS."""

    SA_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")

    def __init__(self, namespace: str | None, template_name: str, *, api_url: str | None = None, token: str | None = None,
                 ca_file: str | None = None) -> None:
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        self.api_url = api_url or (f"https://{host}:{port}" if host else "")
        if not self.api_url:
            raise ConfigError("submit: rayjob needs the Kubernetes API: run the poller in a pod (in-cluster service "
                              "account) or use submit: ray_jobs with ray_address")
        ns_file = self.SA_DIR / "namespace"
        self.namespace = namespace or os.environ.get("POD_NAMESPACE") or (ns_file.read_text().strip() if ns_file.exists() else "")
        if not self.namespace:
            raise ConfigError("namespace: not set and neither POD_NAMESPACE nor the service account's namespace file exists")
        self.token = token if token is not None else (self.SA_DIR / "token").read_text().strip()
        ca = ca_file or str(self.SA_DIR / "ca.crt")
        self.ssl = ssl.create_default_context(cafile=ca) if self.api_url.startswith("https") else None
        self.template_name = template_name
        self._template: dict[str, Any] | None = None

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        req = urllib.request.Request(self.api_url + path, method=method, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json",
                                              "Accept": "application/json"})
        with urllib.request.urlopen(req, timeout=30, context=self.ssl) as r:
            return json.loads(r.read())

    def _base(self) -> str:
        return f"/apis/ray.io/v1/namespaces/{self.namespace}/rayjobs"

    def attempts(self) -> dict[str, list[Attempt]]:
        items = self._request("GET", self._base() + "?labelSelector=" + urllib.parse.quote(LABEL_RUN_KEY))["items"]
        out: dict[str, list[Attempt]] = {}
        for obj in items:
            parsed = parse_job_name(obj["metadata"]["name"])
            if parsed is None:
                continue
            key, n = parsed
            state, message = rayjob_state(obj)
            sid = (obj["metadata"].get("annotations") or {}).get(ANNOTATION_SAMPLE, "")
            out.setdefault(key, []).append(Attempt(obj["metadata"]["name"], n, state, message[-REASON_CHARS:], sid))
        return out

    def failure_detail(self, name: str) -> str:
        return ""  # the poller's Role cannot read pod logs: `kubectl logs job/<name>` (docs/kubernetes.md)

    def submit(self, name: str, sample: SampleSpec, run_key: str, attempt: int, command: list[str]) -> bool:
        if self._template is None:
            self._template = self._request("GET", f"{self._base()}/{self.template_name}")
        obj = build_rayjob(self._template, name, sample, run_key, attempt, command)
        try:
            self._request("POST", self._base(), obj)
        except urllib.error.HTTPError as e:
            if e.code == 409:  # AlreadyExists: another poll created this attempt
                return False
            raise
        return True


def rayjob_state(obj: dict[str, Any]) -> tuple[str, str]:
    """(state, message) of a RayJob: final only once KubeRay's deployment status is final."""
    st = obj.get("status") or {}
    deployment, job = st.get("jobDeploymentStatus", ""), st.get("jobStatus", "")
    message = st.get("message") or st.get("reason") or ""
    if deployment == "Complete" and job == "SUCCEEDED":
        return SUCCEEDED, message
    if deployment in ("Complete", "Failed", "ValidationFailed"):
        return FAILED, f"{deployment}/{job or 'no job status'}: {message}"
    return ACTIVE, message


def build_rayjob(template: dict[str, Any], name: str, sample: SampleSpec, run_key: str, attempt: int,
                 command: list[str]) -> dict[str, Any]:
    """A runnable RayJob for one attempt from the (suspended) template RayJob."""
    import copy
    import shlex

    if len(name) > MAX_RAYJOB_NAME:
        raise ValueError(f"RayJob name {name!r} is longer than KubeRay's {MAX_RAYJOB_NAME} characters")
    spec = copy.deepcopy(template["spec"])
    spec["suspend"] = False
    spec["entrypoint"] = shlex.join(command)
    spec.pop("jobId", None)  # KubeRay derives the submission id from the name
    labels = {k: v for k, v in (template.get("metadata", {}).get("labels") or {}).items()}
    labels.update({LABEL_COMPONENT: "intake-run", LABEL_RUN_KEY: run_key, LABEL_ATTEMPT: str(attempt)})
    meta: dict[str, Any] = {"name": name, "labels": labels,
                            "annotations": {ANNOTATION_SAMPLE: _sid(sample), ANNOTATION_URIS: " ".join(sample.uris)}}
    if template.get("metadata", {}).get("namespace"):
        meta["namespace"] = template["metadata"]["namespace"]
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": meta, "spec": spec}


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
    """One intake poll (module docstring); returns what it saw and did."""
    summary = PollSummary()
    known = backend.attempts()  # first: see the module docstring, step 1
    summary.in_flight = sum(a.state == ACTIVE for atts in known.values() for a in atts)
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
    for d in decide(states, in_flight=summary.in_flight, max_in_flight=cfg.max_in_flight, max_attempts=cfg.max_attempts,
                    rescore_changed=cfg.rescore_changed, busy=busy):
        st = by_id[d.sample_id]
        if d.action == "submit":
            name = job_name(d.run_key, d.attempt)
            cmd = score_command(st.sample, cfg.job_config, out, overwrite=st.done_key is not None)
            if backend.submit(name, st.sample, d.run_key, d.attempt, cmd):
                (summary.retried if d.attempt > 1 else summary.submitted).append(d.sample_id)
                summary.jobs[d.sample_id] = name
                summary.in_flight += 1
            else:
                summary.refused.append(d.sample_id)
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
    _write_json(f"{out}/{INTAKE_DIR}/last_poll.json", {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                                       **summary.to_dict()})
    return summary


def make_backend(cfg: IntakeConfig) -> JobBackend:
    if cfg.submit == "ray_jobs":
        return RayJobsBackend(cfg.ray_address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265", cfg.working_dir)
    return RayJobBackend(cfg.namespace, cfg.rayjob_template)


def load_job_config(cfg: IntakeConfig) -> JobConfig:
    try:
        return load_config(cfg.job_config).replace(output={"uri": cfg.output})
    except ConfigError as e:
        raise ConfigError(f"job_config ({cfg.job_config}): {e}") from None
