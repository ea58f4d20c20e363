"""The single-process runner: plan, score and finish samples one after another in this process.

It drives the shared sample lifecycle (:mod:`slidescore.run.lifecycle`): each sample is planned
(:func:`~slidescore.stages.plan.plan_images`), its blocks are scored by the block stage
(:func:`~slidescore.stages.block.score_blocks`, reading ahead) with the job's
:class:`~slidescore.stages.recipe.BlockRecipe`, and it is finished
(:func:`~slidescore.run.lifecycle.finish_sample`). Anything a sample raises fails that sample only
(:func:`~slidescore.run.lifecycle.classify`); a ``ConfigError`` stops the run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

from slidescore.config import JobConfig, SampleSpec
from slidescore.errors import ConfigError
from slidescore.io.storage import is_local
from slidescore.run import lifecycle
from slidescore.stages.block import score_blocks
from slidescore.stages.layout import sample_id_for
from slidescore.stages.lease import release_lease
from slidescore.stages.plan import (
    SamplePlan,
    check_config_for_model,
    image_error,
    open_for_plan,
    plan_images,
    resolve_samples,
)
from slidescore.stages.recipe import BlockRecipe
from slidescore.stages.records import BlockRecord, RunRecord, SampleResult, model_info

Progress = Callable[[int, int], Any]


def score_sample(uri: str | SampleSpec, model: Any, cfg: JobConfig, out_root: str, *, sample_id: str | None = None,
                 progress: Progress | None = None, stage: list[str] | None = None) -> SampleResult:
    """Plan, score every block of every image, finish. Raises on a bad sample (callers record it).

    ``uri`` is one image URI or a :class:`~slidescore.config.SampleSpec` (one or several images).
    ``stage``, when given, holds the name of the step under way (for the failure record).
    """
    where = stage if stage is not None else [""]
    t_start = time.perf_counter()
    spec = uri if isinstance(uri, SampleSpec) else SampleSpec(sample_id, (uri,))
    sid = spec.sample_id or sample_id or sample_id_for(spec.uris[0])
    spec = dataclasses.replace(spec, sample_id=sid)  # keeps the spec's roi
    where[0] = "planning"
    plans = plan_images(spec, cfg, model.card, model.checksum, out_root)
    if plans is None:
        return lifecycle.skipped(out_root, spec)
    try:
        where[0] = "scoring"
        recipe = BlockRecipe.for_job(model, cfg)
        records = []
        for plan in plans:
            try:
                records.append(score_image(plan, model, recipe, cfg, progress))
            except ConfigError:
                raise
            except Exception as e:
                if not plan.image_id:
                    raise
                raise image_error(sid, plan.image_id, plan.uri, e) from e
        where[0] = "finishing"
        return lifecycle.finish_sample(plans, records, cfg, model_info(model), model.card, t_start, model=model)
    except BaseException:
        release_lease(plans[0].sample_out, plans[0].run_key)  # this run writes nothing more there
        raise


def score_image(plan: SamplePlan, model: Any, recipe: BlockRecipe, cfg: JobConfig,
                progress: Progress | None = None) -> list[BlockRecord]:
    """Score every block of one planned image in this process; the block records in block order."""
    reader = open_for_plan(plan)
    # progress in blocks with foreground: a sparse slide's empty blocks cost nothing and are not counted
    bar = progress(plan.blocks_with_foreground, plan.grid.n_patches) if progress else None
    try:
        records = []
        depth = cfg.model.prefetch_depth(model.device.type, not is_local(plan.uri))
        for block, rec in zip(plan.blocks, score_blocks(plan, plan.blocks, reader, recipe, depth), strict=True):
            records.append(rec)
            if bar is not None and plan.block_has_foreground(block):
                bar.update(1)
                bar.set_postfix(patches=rec.patches_scored, refresh=False)
    finally:
        if bar is not None:
            bar.close()
        reader.close()
    return records


def score_samples(uris: Sequence[str | SampleSpec], cfg: JobConfig, out_root: str, *, model: Any = None,
                  progress: Progress | None = None) -> list[SampleResult]:
    """Score many samples in this process; a failing sample is recorded and the others go on.

    Each entry is an image URI (one sample, its id from the file name) or a
    :class:`~slidescore.config.SampleSpec` (an id and one or several images). ``out_root`` is a
    local folder or a URL such as ``s3://bucket/prefix``. Raises only what stops the whole run
    (``ConfigError``, a model that cannot load, an unusable output location).
    """
    t0 = time.perf_counter()
    if model is None:
        from slidescore.model import load_model

        model = load_model(cfg.model.name, **cfg.model.runtime_options())
    check_config_for_model(cfg, model.card)
    specs = resolve_samples(uris)
    lifecycle.prepare_output_root(out_root)
    results, rows = [], []
    for result, seconds in lifecycle.each_sample(
            specs, out_root, lambda spec, stage: score_sample(spec, model, cfg, out_root, progress=progress, stage=stage)):
        results.append(result)
        rows.append(lifecycle.sample_row(result, seconds=seconds))
    record = RunRecord(cfg.to_dict(), model_info(model), "local", rows, seconds=round(time.perf_counter() - t0, 3))
    lifecycle.write_run_record(out_root, record, cfg)
    return results
