"""Intake job backends: where attempts are submitted and looked up (the record of what was submitted).

:class:`JobBackend` is the protocol the poll uses; :class:`RayJobsBackend` talks to the Ray job
server through Ray's HTTP job SDK, :class:`RayJobBackend` creates one KubeRay ``RayJob`` per
attempt from a suspended template over plain HTTPS with the pod's service-account token
(:func:`build_rayjob`, :func:`rayjob_state`). :func:`make_backend` picks one from the intake
config. No Ray runtime and no Kubernetes client library is needed.

A job scores one sample or a *batch* of several (``batch_size``): :meth:`JobBackend.submit_batch`
records every member's run key, attempt and sample id with the job (Ray job metadata, RayJob
annotations), and :meth:`JobBackend.attempts` reports the job as one attempt of each member, so
the rules of :func:`~slidescore.intake.decide.decide` stay per sample. A batch's name carries a
hash of its members' keys and attempts (:func:`batch_key`) in place of a run key.
"""

from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

from slidescore.config import SampleSpec
from slidescore.errors import ConfigError
from slidescore.intake.config import IntakeConfig
from slidescore.intake.decide import (
    ACTIVE,
    FAILED,
    MAX_RAYJOB_NAME,
    SUCCEEDED,
    Attempt,
    parse_job_name,
)
from slidescore.intake.sources import _sid

LABEL_RUN_KEY, LABEL_ATTEMPT, LABEL_COMPONENT = "slidescore.io/run-key", "slidescore.io/attempt", "app.kubernetes.io/component"
ANNOTATION_SAMPLE, ANNOTATION_URIS = "slidescore.io/sample-id", "slidescore.io/uris"
ANNOTATION_MEMBERS = "slidescore.io/members"
REASON_CHARS = 4000
#: left out of the working directory a job uploads (``runtime_env.excludes``, gitignore syntax): the
#: job needs the package, jobs/ and its configs only; a small package uploads and unpacks fast
WORKING_DIR_EXCLUDES = (".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info", ".ruff_cache", ".mypy_cache",
                        ".hypothesis", ".grimp_cache", ".import_linter_cache", "tests", "docs", "benchmarks", "k8s",
                        "demo-output", "out", "*.tif", "*.tiff", "*.svs", "*.zarr")


class Member(NamedTuple):
    """One sample of a job: its spec, run key and attempt number."""

    sample: SampleSpec
    run_key: str
    attempt: int


def batch_key(members: Sequence[Member]) -> str:
    """The name key of a job of several samples: a hash of its members' run keys and attempts (a
    batch resubmitted unchanged gets the same name, which the job server refuses a second time)."""
    import hashlib

    text = " ".join(sorted(f"{m.run_key}:{m.attempt}" for m in members))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def encode_members(members: Sequence[Member]) -> str:
    """``<run key>:<attempt>:<sample id>`` per member, space-separated (job metadata, annotations)."""
    return " ".join(f"{m.run_key}:{m.attempt}:{_sid(m.sample)}" for m in members)


def decode_members(text: str) -> list[tuple[str, int, str]]:
    """(run key, attempt, sample id) per member of :func:`encode_members`; malformed entries are left out."""
    out = []
    for item in text.split():
        key, _, rest = item.partition(":")
        attempt, _, sid = rest.partition(":")
        if key and attempt.isdigit() and sid:
            out.append((key, int(attempt), sid))
    return out


def _add_attempts(out: dict[str, list[Attempt]], name: str, state: str, message: str, members: str,
                  key: str, n: int, sid: str) -> None:
    """The job as one attempt of each member (a batch), or of its own run key (one sample)."""
    decoded = decode_members(members) if members else []
    for m_key, m_n, m_sid in decoded or [(key, n, sid)]:
        out.setdefault(m_key, []).append(Attempt(name, m_n, state, message, m_sid))


# -- job backends -------------------------------------------------------------------------------
class JobBackend(Protocol):
    """Where attempts are submitted and looked up (the record of what was submitted)."""

    def attempts(self) -> dict[str, list[Attempt]]:
        """Every slidescore attempt the backend knows, by run key."""

    def submit(self, name: str, sample: SampleSpec, run_key: str, attempt: int, command: list[str]) -> bool:
        """Submit one attempt; ``False`` when a job of that name exists already (another poll's)."""

    def submit_batch(self, name: str, members: Sequence[Member], command: list[str]) -> bool:
        """Submit one job of several samples (an attempt of each); ``False`` when that name exists already."""

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
            meta = job.metadata or {}
            _add_attempts(out, name, state, message, str(meta.get("slidescore_members", "")), key, n,
                          str(meta.get("slidescore_sample_id", "")))
        return out

    def failure_detail(self, name: str) -> str:
        try:
            return _reason_from_logs(self.client.get_job_logs(name))
        except RuntimeError as e:  # logs gone (driver node lost): the job's message must do
            return f"(no logs: {e})"

    def submit(self, name: str, sample: SampleSpec, run_key: str, attempt: int, command: list[str]) -> bool:
        return self.submit_batch(name, [Member(sample, run_key, attempt)], command)

    def submit_batch(self, name: str, members: Sequence[Member], command: list[str]) -> bool:
        import shlex

        runtime_env: dict[str, Any] = {}
        if self.working_dir:
            runtime_env = {"working_dir": self.working_dir, "excludes": list(WORKING_DIR_EXCLUDES)}
        first = members[0]
        metadata = {"slidescore_sample_id": _sid(first.sample), "slidescore_run_key": first.run_key,
                    "slidescore_attempt": str(first.attempt), "slidescore_uris": " ".join(first.sample.uris)}
        if len(members) > 1:
            metadata["slidescore_members"] = encode_members(members)
            metadata["slidescore_uris"] = " ".join(u for m in members for u in m.sample.uris)
        try:
            self.client.submit_job(entrypoint=shlex.join(command), submission_id=name, runtime_env=runtime_env or None,
                                   metadata=metadata)
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
            notes = obj["metadata"].get("annotations") or {}
            _add_attempts(out, obj["metadata"]["name"], state, message[-REASON_CHARS:], notes.get(ANNOTATION_MEMBERS, ""),
                          key, n, notes.get(ANNOTATION_SAMPLE, ""))
        return out

    def failure_detail(self, name: str) -> str:
        return ""  # the poller's Role cannot read pod logs: `kubectl logs job/<name>` (docs/kubernetes.md)

    def submit(self, name: str, sample: SampleSpec, run_key: str, attempt: int, command: list[str]) -> bool:
        return self.submit_batch(name, [Member(sample, run_key, attempt)], command)

    def submit_batch(self, name: str, members: Sequence[Member], command: list[str]) -> bool:
        if self._template is None:
            self._template = self._request("GET", f"{self._base()}/{self.template_name}")
        first = members[0]
        obj = build_rayjob(self._template, name, first.sample, first.run_key, first.attempt, command)
        parsed = parse_job_name(name)
        if len(members) > 1 and parsed:  # the labels carry the batch's key and attempt (its name's); the members are annotated
            obj["metadata"]["labels"].update({LABEL_RUN_KEY: parsed[0], LABEL_ATTEMPT: str(parsed[1])})
            obj["metadata"]["annotations"].update({ANNOTATION_MEMBERS: encode_members(members),
                                                   ANNOTATION_URIS: " ".join(u for m in members for u in m.sample.uris)})
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



def make_backend(cfg: IntakeConfig) -> JobBackend:
    if cfg.submit == "ray_jobs":
        return RayJobsBackend(cfg.ray_address or os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265", cfg.working_dir)
    return RayJobBackend(cfg.namespace, cfg.rayjob_template)

