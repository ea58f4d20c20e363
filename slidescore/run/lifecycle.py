"""The sample lifecycle, shared by both runners: states, the error boundary, records, finishing.

A sample goes ``planned → scoring → finishing → ok``, or ends ``skipped`` (its finished outputs of
this run exist) or ``failed``. What the runners share lives here once:

- **the error boundary** (:func:`classify`, :func:`failed`): anything raised while planning, reading,
  scoring or finishing a sample — our errors, the model's, the codecs', the storage layer's — fails
  that sample alone: a one-line message, a ``failures.jsonl`` row (a failure to write it is logged and
  does not stop the run) and exit code 1 for the run. Only a :class:`~slidescore.errors.ConfigError`
  (and the errors a runner raises before any sample, such as a model that cannot load) stops the
  run. :class:`~slidescore.errors.TransientStorageError` is the one error a runner may retry;
- **skipped** samples (:func:`skipped`) and the **run-level records** (:func:`write_run_record`: one
  ``run.json`` layout whichever runner wrote it, and ``index.html``);
- **finishing** (:func:`finish_sample`): the stage's pyramid, regions and files, then the report,
  a last check that nothing non-finite is about to be marked complete, ``run.json``, and the
  completion marker last.

The local runner (:mod:`slidescore.run.local`) drives it in one process; the Ray runner
(:mod:`slidescore.run.ray`) keeps only what is Ray's: the actor pool, the task queue and the retries.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import numpy as np

from slidescore.config import JobConfig, SampleSpec
from slidescore.core.regions import Region
from slidescore.errors import (
    ConfigError,
    InputError,
    OutputLocationError,
    SlideScoreError,
    TransientStorageError,
)
from slidescore.io.outputs import (
    append_jsonl,
    join,
    make_dirs,
    read_json,
    remove,
    write_bytes,
    write_json,
)
from slidescore.model.card import ModelCard
from slidescore.stages.finish import OVERVIEW_THREADS, write_outputs
from slidescore.stages.layout import FAILURES, IMAGES, RUN_JSON, SUCCESS, sample_label
from slidescore.stages.lease import release_lease, renew_lease
from slidescore.stages.plan import SamplePlan, open_for_plan
from slidescore.stages.records import (
    BlockRecord,
    FailureRecord,
    ImageRecord,
    ImageReport,
    QualityFlag,
    RunRecord,
    SampleRecord,
    SampleResult,
    SampleRow,
    utc_now,
)

log = logging.getLogger(__name__)

Outcome = Literal["stop", "retry", "fail"]


def classify(err: BaseException) -> Outcome:
    """What an error raised inside a sample's work means for the run.

    ``stop``: it dooms every sample (a usage or config error); ``retry``: transient storage trouble
    (throttling, timeouts) that a runner may retry; ``fail``: anything else fails this sample only.
    """
    if isinstance(err, ConfigError | OutputLocationError):
        return "stop"
    if isinstance(err, TransientStorageError):
        return "retry"
    return "fail"


def prepare_output_root(out_root: str) -> None:
    """Create the output root and prove it writable (one small file written and removed), before any work.

    The probe's name is unique to the call, so runs sharing a root never remove each other's probe.
    A file in the way, a read-only folder, a missing bucket or wrong credentials doom every sample:
    they raise :class:`~slidescore.errors.OutputLocationError` (the run stops, exit code 2).
    """
    # a name of its own: jobs that share an output root (an intake poll submits several at once) probe it
    # at the same moment, and one's remove must not take away the other's probe (it failed that job)
    probe = join(out_root, f".slidescore-write-probe-{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        make_dirs(out_root)
        write_bytes(probe, b"ok\n")
        remove(probe)
    except Exception as e:  # noqa: BLE001 — whatever the storage says, the answer is "not writable"
        raise OutputLocationError(
            f"output {out_root}: cannot be written ({type(e).__name__}: {describe(e)}); choose a folder you can write "
            "(not an existing file), or for s3:// check that the bucket exists and the credentials may PutObject there",
            uri=out_root) from None


def describe(err: BaseException) -> str:
    """The one-line message of a sample's error: ours as written; anything else with its type named."""
    if isinstance(err, SlideScoreError | OSError):
        text = str(err)
    else:  # an error nobody anticipated (a model, codec or library bug): say what it was
        text = f"unexpected {type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def each_sample(specs: Sequence[SampleSpec], out_root: str,
                work: Callable[[SampleSpec, list[str]], SampleResult]) -> Iterator[tuple[SampleResult, float]]:
    """``(result, seconds)`` of ``work(spec, stage)`` for every sample, in order, behind the error boundary.

    ``work`` keeps ``stage[0]`` up to date (planning, scoring, finishing …) for the failure record. An
    error that dooms every sample (:func:`classify` says ``stop``) ends the run; any other fails that
    sample alone (:func:`failed`) and the next one starts. The one loop of the local scoring and
    embedding runners.
    """
    for spec in specs:
        stage = ["planning"]
        t0 = time.perf_counter()
        try:
            result = work(spec, stage)
        except Exception as e:  # the sample's error boundary: classified, recorded, the run goes on
            if classify(e) == "stop":
                raise
            result = failed(out_root, spec, e, stage[0])
        yield result, round(time.perf_counter() - t0, 3)


def failed(out_root: str, spec: SampleSpec, err: BaseException, stage: str) -> SampleResult:
    """Record a failed sample (log line, ``failures.jsonl`` row) and return its result.

    Unanticipated errors are logged with their traceback at debug level; the user sees one line.
    Writing the failure row may fail too (a full disk, a vanished bucket): that is logged and the run goes on.
    """
    sid = str(spec.sample_id)
    msg = describe(err)
    if not isinstance(err, SlideScoreError | OSError):
        log.debug("sample %s: unexpected error while %s", sid, stage, exc_info=err)
    log.info("sample %s failed while %s: %s", sid, stage, msg)  # the CLI prints one FAILED line per sample
    row = FailureRecord(sid, sample_label(spec), type(err).__name__, msg, utc_now(), tuple(spec.uris), stage)
    try:
        append_jsonl(join(out_root, FAILURES), row.to_dict())
    except Exception as e:  # noqa: BLE001 — a failure to record a failure must not stop the other samples
        log.error("sample %s: could not record its failure in %s (%s: %s)", sid, join(out_root, FAILURES), type(e).__name__, e)
    return SampleResult(sid, sample_label(spec), "failed", join(out_root, sid), error=msg, error_type=type(err).__name__,
                        images=list(spec.uris))


def skipped(out_root: str, spec: SampleSpec) -> SampleResult:
    """The result of a sample whose finished outputs of this run exist (its run.json, when readable)."""
    sid = str(spec.sample_id)
    out = join(out_root, sid)
    try:
        run = read_json(join(out, RUN_JSON))
    except (ValueError, OSError) as e:
        log.warning("sample %s is complete but its run.json is unreadable (%s); reporting it without details", sid, e)
        run = {}
    return SampleResult(sid, sample_label(spec), "skipped", out, [], run if isinstance(run, dict) else {},
                        images=list(spec.uris))


def finish_sample(plans: SamplePlan | Sequence[SamplePlan], records: Sequence[BlockRecord] | Sequence[Sequence[BlockRecord]],
                  cfg: JobConfig, model_info: dict[str, Any], card: ModelCard, t_start: float, *, model: Any = None) -> SampleResult:
    """Pyramids, regions, files, report, run.json; the completion marker last.

    Takes one plan and its block records, or, for a sample of several images, the plans of all its
    images and one list of block records per image: their regions are ranked together and written
    once, at the sample level. ``model`` is the classifier that scored the sample (the explanation maps reuse it).
    """
    per_image: list[list[BlockRecord]]
    if isinstance(plans, SamplePlan):
        plans, per_image = [plans], [list(records)]  # type: ignore[arg-type]
    else:
        plans, per_image = list(plans), [list(r) for r in records]  # type: ignore[arg-type]
    # one overview per image, drawn in parallel (PNG encoding and numpy release the GIL): for a
    # sample of many small fields the overviews would otherwise take longer than scoring them
    workers = max(1, min(len(plans), os.cpu_count() or 1, OVERVIEW_THREADS))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="slidescore-overview") as pool:
        done = write_outputs(plans, per_image, cfg, model_info, card, t_start, pool)
        run = done.run
        if cfg.report.enabled:
            _write_reports(run, plans, done.probs, done.regions, done.images, card, cfg, model=model)
        for f in done.overviews:
            f.result()  # drawn and written (or its error raised) before run.json and the completion marker
    _check_finite(plans, done.probs)
    first = plans[0]
    out = first.sample_out
    renew_lease(out, first.run_key, sample_id=first.sample_id)  # refuses if another run took the folder over
    write_json(join(out, RUN_JSON), run.to_dict())
    write_json(join(out, SUCCESS), {"run_key": first.run_key, "finished": utc_now()})
    release_lease(out, first.run_key)
    return SampleResult(first.sample_id, " ".join(p.uri for p in plans), "ok", out, done.regions, run.to_dict(),
                        images=[p.uri for p in plans])


def _check_finite(plans: list[SamplePlan], probs: list[np.ndarray]) -> None:
    """Refuse to mark complete a mosaic holding ±inf or values outside [0, 1] (NaN = not scored is allowed)."""
    for plan, prob in zip(plans, probs, strict=True):
        bad = np.isinf(prob) | (prob < 0) | (prob > 1)  # NaN compares False: it is "not scored"
        if bad.any():
            raise InputError(f"sample {plan.sample_id!r} ({plan.uri}): the probability map holds {int(bad.sum())} "
                             "values that are infinite or outside [0, 1]; the model's outputs are not probabilities — "
                             "check the model card's head and calibration", uri=plan.uri)
        if plan.valid.any() and not np.isfinite(prob).any():
            raise InputError(f"sample {plan.sample_id!r} ({plan.uri}): {int(plan.valid.sum())} patches were scored but the "
                             "map has no finite value; the model returned NaN — check it and its card's mean/std", uri=plan.uri)


def sample_row(result: SampleResult, **measured: Any) -> SampleRow:
    """The run-level row of a sample; ``measured`` adds what the runner measured (blocks, seconds, …)."""
    run = result.run or {}
    blocks = run.get("blocks", {}) if isinstance(run.get("blocks"), dict) else {}
    n_regions = run.get("regions", {}).get("total") if isinstance(run.get("regions"), dict) else None
    row = SampleRow(result.sample_id, result.uri, result.status, result.error, result.error_type, n_regions,
                    list(result.images), blocks_total=blocks.get("total"),
                    blocks_done=int(blocks.get("total") or 0) if result.status == "ok" else 0,
                    blocks_resumed=int(blocks.get("resumed") or 0) if result.status == "ok" else 0,
                    patches_scored=int(run.get("patches", {}).get("scored") or 0) if result.status == "ok" else 0)
    for k, v in measured.items():
        setattr(row, k, v)
    return row


def write_run_record(out_root: str, record: RunRecord, cfg: JobConfig) -> None:
    """The run-level ``run.json`` and ``index.html``; a failure here is logged, the samples' outputs stand."""
    try:
        write_json(join(out_root, RUN_JSON), record.to_dict())
        write_run_index(out_root, cfg)
    except Exception as e:  # noqa: BLE001 — every sample already has its own outputs and records
        log.error("could not write the run record in %s (%s: %s)", out_root, type(e).__name__, e)


def write_run_index(out_root: str, cfg: JobConfig) -> None:
    """``index.html`` at the run's output root (a local folder or ``s3://…``): every sample with its call and top score."""
    if not cfg.report.enabled:
        return
    from slidescore.report import write_index

    write_index(out_root)


def _write_reports(run: SampleRecord, plans: list[SamplePlan], probs: list[np.ndarray], regions: list[Region],
                   images: list[ImageRecord] | None, card: ModelCard, cfg: JobConfig, *, model: Any = None) -> None:
    """``report.html`` + ``tiles.geojson`` per image folder (the sample folder for one image); fills ``run``'s
    ``quality``, ``report`` and the report's ``outputs``.

    A sample of several images also gets ``<sample>/report.html``: the call, its images and the
    regions ranked across them (crops and explanation maps rendered once, for the image pages). ``model``
    is the classifier that scored the sample, reused for the explanation maps (``None``: the report loads it
    again). The report is rendered into a local temporary folder and its files copied to the output
    (a local folder or an object store), each in one write.
    """
    # lazy: the report imports torch only for the explanation maps
    from slidescore.report import SampleParts, render_report, write_sample_report

    def publish(tmp: str, dest: str) -> None:
        for f in sorted(Path(tmp).iterdir()):
            if f.is_file():
                write_bytes(join(dest, f.name), f.read_bytes())

    multi = images is not None
    quality: list[QualityFlag] = []
    reports: list[ImageReport] = []
    parts = SampleParts()  # filled only for a sample of several images
    for i, (plan, prob) in enumerate(zip(plans, probs, strict=True)):
        mine = [r for r in regions if r.image == plan.uri] if multi else regions
        reader = open_for_plan(plan)
        try:
            with tempfile.TemporaryDirectory(prefix="slidescore-report-") as tmp:
                added = render_report(tmp, run.for_image(i), mine, reader, prob, card, cfg=cfg.report, model=model,
                                      image_id=plan.image_id if multi else "", sample_href="../../",
                                      parts=parts if multi else None)
                publish(tmp, plan.out_dir)
        finally:
            reader.close()
        if multi:  # say which image each check and page is of
            for q in added.quality:
                q.image = plan.image_id
            added.report.image_id = plan.image_id
        quality += added.quality
        reports.append(added.report)
    run.quality = quality
    run.outputs.add_report("report.html", "tiles.geojson")
    if not multi:
        run.report = reports[0]
        return
    with tempfile.TemporaryDirectory(prefix="slidescore-report-") as tmp:
        page = write_sample_report(tmp, run, regions, parts, card, cfg=cfg.report, image_folder=IMAGES)
        publish(tmp, plans[0].sample_out)
    page.images = reports
    run.report = page
