"""Typed records of a run: what a block, a sample and the whole run report (run.json, failures.jsonl).

Records are small dataclasses that cross process boundaries (Ray ships :class:`BlockRecord` from
the actors) and serialise to the JSON files users and tools read. Both runners build the run-level
``run.json`` from :class:`RunRecord` / :class:`SampleRow`, so it has one layout whichever runner
wrote it (fields a runner does not measure are ``null``).

A sample's own ``run.json`` is :class:`~slidescore.stages.sample_record.SampleRecord` (defined in
:mod:`slidescore.stages.sample_record`, re-exported here with its parts).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from slidescore.core.regions import Region
from slidescore.stages.sample_record import (
    AreaRecord,
    BlockCounts,
    CalibrationRecord,
    DecisionRecord,
    GridRecord,
    ImageRecord,
    ImageReport,
    InputRecord,
    ModelRecord,
    OutputsRecord,
    PatchCounts,
    PerImageOutputs,
    QualityFlag,
    RegionCounts,
    RegionCrop,
    SampleCall,
    SampleInput,
    SampleRecord,
    SampleReport,
    Throughput,
    Timings,
)
from slidescore.version import __version__

__all__ = [  # the per-sample record's types, with the run's
    "AreaRecord", "BlockCounts", "BlockRecord", "CalibrationRecord", "DecisionRecord", "FailureRecord", "GridRecord",
    "ImageRecord", "ImageReport", "InputRecord", "ModelRecord", "OutputsRecord", "PatchCounts", "PerImageOutputs",
    "QualityFlag", "RegionCounts", "RegionCrop", "RunRecord", "SampleCall", "SampleInput", "SampleRecord", "SampleReport",
    "SampleResult", "SampleRow", "Throughput", "Timings", "block_record_dict", "code_version", "model_info", "utc_now",
]


@dataclass(frozen=True)
class BlockRecord:
    """What a worker reports for one block (small; never pixels)."""

    key: str
    patches_scored: int  # foreground patches whose origin cell this block owns (each patch counted once)
    patches_skipped: int  # background patches whose origin cell this block owns
    seconds_read: float
    seconds_score: float
    seconds_write: float
    resumed: bool = False
    patch_evaluations: int = 0  # patches sent through the model, halo included (per-patch equivalent)


@dataclass
class SampleResult:
    sample_id: str
    uri: str
    status: str
    out_dir: str
    regions: list[Region] = field(default_factory=list)
    run: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    error_type: str = ""
    images: list[str] = field(default_factory=list)  # the sample's image URIs (one for a one-image sample)


@dataclass(frozen=True)
class FailureRecord:
    """One line of ``failures.jsonl``: which sample failed, with what error (a multi-image sample lists its images)."""

    sample_id: str
    uri: str
    error_type: str
    error: str
    time: str
    images: tuple[str, ...] = ()
    stage: str = ""  # planning, scoring, finishing (empty when unknown)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sample_id": self.sample_id, "uri": self.uri, "error_type": self.error_type,
                             "error": self.error, "time": self.time}
        if self.stage:
            d["stage"] = self.stage
        if len(self.images) > 1:
            d["images"] = list(self.images)
        return d


@dataclass
class SampleRow:
    """A sample's line in the run-level ``run.json`` (one layout for the local and the Ray runner)."""

    sample_id: str
    uri: str
    status: str  # ok, skipped, failed
    error: str = ""
    error_type: str = ""
    n_regions: int | None = None
    images: list[str] = field(default_factory=list)
    blocks_total: int | None = None
    blocks_done: int = 0
    blocks_resumed: int = 0
    patches_scored: int = 0
    seconds: float | None = None
    # measured by the Ray runner only (null for the local runner)
    retries: int | None = None
    seconds_scoring: float | None = None
    bytes_read: int | None = None
    actor_seconds: float | None = None
    actors: list[str] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"sample_id": self.sample_id, "uri": self.uri, "status": self.status, "error": self.error,
                             "error_type": self.error_type, "n_regions": self.n_regions,
                             "blocks": {"total": self.blocks_total, "done": self.blocks_done, "resumed": self.blocks_resumed},
                             "patches_scored": self.patches_scored, "seconds": self.seconds,
                             "retries": self.retries, "seconds_scoring": self.seconds_scoring, "bytes_read": self.bytes_read,
                             "actor_seconds": self.actor_seconds,
                             "n_actors": None if self.actors is None else len(self.actors), "actors": self.actors}
        if len(self.images) > 1:
            d["images"] = self.images
        return d


@dataclass
class RunRecord:
    """The run-level ``run.json``: versions, resolved config, model, runner, and one row per sample."""

    config: dict[str, Any]
    model: dict[str, Any]
    runner: str  # local or ray
    samples: list[SampleRow]
    cluster: dict[str, Any] | None = None
    slidescore_version: str = __version__
    code_version: str = ""
    seconds: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"slidescore_version": self.slidescore_version, "code_version": self.code_version or code_version(),
                "config": self.config, "model": self.model, "runner": self.runner, "cluster": self.cluster,
                "seconds": self.seconds, "samples": [s.to_dict() for s in self.samples]}


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def block_record_dict(rec: BlockRecord) -> dict[str, Any]:
    """What a block's completion record holds (its marker file)."""
    return asdict(rec)


def code_version() -> str:
    """The git commit of the running code when available, else the package version."""
    head = Path(__file__).resolve().parents[2] / ".git" / "HEAD"
    try:
        ref = head.read_text().strip()
        if ref.startswith("ref: "):
            ref_file = head.parent / ref[5:]
            return ref_file.read_text().strip() if ref_file.exists() else __version__
        return ref
    except OSError:
        return __version__


def model_info(model: Any) -> dict[str, Any]:
    info = {"source": model.source, "sha256": model.checksum, "card": model.card.to_dict(), "device": str(model.device)}
    if hasattr(model, "scoring_info"):  # dense self-check result and device options
        info["scoring"] = model.scoring_info()
    return info
