"""Intake sources: list the intake prefix and the manifest, and turn what they hold into samples.

:func:`find_samples` (step 2 of :mod:`slidescore.intake`) lists images directly under
``intake_prefix`` (one sample each), sample folders (complete once they hold ``_READY`` or have
settled), DICOM WSI series (a folder of ``.dcm`` instances: one image, a sample complete as a sample
folder is, since its instances arrive one by one; a series inside a sample folder is one of its
images), and manifest entries (never a MIRAX slide's data folder or a VMS's ``.jpg`` parts:
:func:`slidescore.io.storage.classify_entries`), then :func:`group_samples` groups them by sample id and sets aside
ids claimed twice (conflicts). Read-only: nothing is written and nothing is submitted here.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from slidescore.config import SAMPLE_ID_PATTERN, SampleSpec, parse_manifest
from slidescore.errors import ConfigError
from slidescore.intake.config import IntakeConfig
from slidescore.io.storage import (
    FOLDER,
    IMAGE,
    SERIES,
    classify_entries,
    filesystem,
    holds_dicom,
    list_entries,
    with_retries,
)
from slidescore.stages.layout import sample_id_for

READY = "_READY"  # the uploader's "this sample folder is complete" marker


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


def _list(uri: str) -> list[dict[str, Any]]:
    """A folder's entries, freshly listed (fsspec caches listings per process; a poll must see new files)."""
    return list_entries(uri)


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
    # its images (image files, *.zarr, DICOM series in sub-folders); a folder of .dcm instances is itself one
    uris = sorted(u for u, kind in classify_entries(folder, entries).items() if kind in (IMAGE, SERIES))
    uris = sorted([folder, *uris]) if holds_dicom(entries) else uris
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
    """The samples of the intake source (:mod:`slidescore.intake`, step 2), grouped and checked."""
    now = time.time() if now is None else now
    found = Found()
    singles: list[str] = []
    listed: list[SampleSpec] = []
    if cfg.intake_prefix:
        prefix = cfg.intake_prefix.rstrip("/")
        # sub-folders: sample folders, DICOM series (both complete on _READY or settle_s; a series is listed
        # whatever sample_folders says), a MIRAX slide's data folder (read with the .mrxs, never a sample)
        kinds = classify_entries(cfg.intake_prefix, _list(cfg.intake_prefix), look_inside=not cfg.sample_folders)
        for uri, kind in kinds.items():
            base = uri.rstrip("/").rsplit("/", 1)[-1]
            if kind == IMAGE:
                singles.append(uri)
            elif kind == SERIES or (kind == FOLDER and cfg.sample_folders and not base.startswith((".", "_"))):
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
        via_sample_arg = len(s.uris) > 1 or sample_id_for(s.uris[0]) != _sid(s) or s.roi or s.backend != "auto"
        if via_sample_arg and any("," in u for u in s.uris):  # what decide.score_command passes as --sample
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
    for s in samples:  # with its id filled in (a manifest's 'URI roi=PATH' line has none of its own)
        by_id.setdefault(_sid(s), []).append(replace(s, sample_id=_sid(s)))
    ok = [ss[0] for _, ss in sorted(by_id.items()) if len(ss) == 1]
    conflicts = {sid: [s.origin or " ".join(s.uris) for s in ss] for sid, ss in sorted(by_id.items()) if len(ss) > 1}
    return ok, conflicts
