"""Intake configuration: the poller's own YAML (:class:`IntakeConfig`) and the scoring config it submits.

:func:`load_intake_config` reads ``intake.yaml`` with the job's strict YAML reader and checks every
key; :func:`load_job_config` loads the scoring config the jobs will run (with the intake's
``output``), so the poller computes the same run keys as the jobs. Nothing here touches storage or
a job backend.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slidescore.config import JobConfig, load_config, load_yaml_file
from slidescore.errors import ConfigError

SUBMIT_MODES = ("rayjob", "ray_jobs")


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
    ``batch_size`` (default 1): the most samples one job scores. Samples submitted by one poll are
    grouped into jobs of up to ``batch_size`` samples, so a job's fixed cost (the driver, the actors'
    start, the model's load) is paid once per batch rather than per sample; ``max_in_flight`` still
    counts jobs. Each sample keeps its own attempts, retries and quarantine: a failed sample of a
    batch is retried (possibly in another batch) while its batch mates are done.
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
    batch_size: int = 1

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path | None = None) -> IntakeConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"intake config: expected a mapping of keys, got {type(data).__name__} {data!r}")
        types_ = {"output": str, "intake_prefix": str, "manifest": str, "job_config": str, "max_in_flight": int,
                  "max_attempts": int, "submit": str, "ray_address": str, "working_dir": str, "namespace": str,
                  "rayjob_template": str, "rescore_changed": bool, "sample_folders": bool, "settle_s": int, "batch_size": int}
        unknown = sorted(set(data) - set(types_), key=repr)  # keys need not be strings (YAML `1: x`)
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown key; the intake config accepts {sorted(types_)}")
        for key, value in data.items():
            tp = types_[key]
            optional = key not in ("output", "job_config", "max_in_flight", "max_attempts", "submit", "rayjob_template", "rescore_changed",
                                   "sample_folders", "batch_size")
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


def load_job_config(cfg: IntakeConfig) -> JobConfig:
    try:
        return load_config(cfg.job_config).replace(output={"uri": cfg.output})
    except ConfigError as e:
        raise ConfigError(f"job_config ({cfg.job_config}): {e}") from None
