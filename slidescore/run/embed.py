"""The single-process embedding runner: plan, embed and finish samples one after another.

Each image URI is one sample (``<output>/<sample id>/embeddings.zarr``, ``features.h5``,
``run.json``, ``_SUCCESS``); planning, blocks, resume markers, leases and S3 output are those of
scoring (:mod:`slidescore.stages.embed`). A failing sample is recorded in ``failures.jsonl`` and the
others go on; what dooms every sample (a config error, an unusable output location) stops the run.
The run record ``<output>/run.json`` names the encoder and its checksum.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

from slidescore.config import JobConfig, SampleSpec
from slidescore.io.outputs import join, write_json
from slidescore.io.storage import is_local
from slidescore.run import lifecycle
from slidescore.stages.embed import embed_blocks, finish_embed, plan_embed
from slidescore.stages.layout import RUN_JSON
from slidescore.stages.lease import release_lease
from slidescore.stages.plan import resolve_samples
from slidescore.stages.records import SampleResult
from slidescore.version import __version__

Progress = Callable[[int, int], Any]
# embeds the blocks of a plan, with ``embed_blocks``' signature: in this process, or on a Ray actor pool
# (slidescore.run.ray.embed_samples_ray); planning, finishing, failures and run records stay here
EmbedBlocks = Callable[..., list[dict[str, Any]]]


def embed_sample(spec: SampleSpec, encoder: Any, cfg: JobConfig, out_root: str, *, write_h5: bool = True,
                 progress: Progress | None = None, stage: list[str] | None = None,
                 blocks_fn: EmbedBlocks = embed_blocks) -> SampleResult:
    """Plan, embed every block, finish one one-image sample. Raises on a bad sample (callers record it)."""
    where = stage if stage is not None else [""]
    t0 = time.perf_counter()
    sid = str(spec.sample_id)
    if len(spec.uris) != 1:
        from slidescore.errors import ConfigError

        raise ConfigError(f"embed: sample {sid!r} lists {len(spec.uris)} images; embed takes one image per sample")
    where[0] = "planning"
    ep = plan_embed(spec.uris[0], cfg, encoder, out_root, sid)
    if ep is None:
        return lifecycle.skipped(out_root, spec)
    try:
        where[0] = "embedding"
        bar = progress(len(ep.plan.blocks), int(ep.plan.valid.sum())) if progress else None
        depth = cfg.model.prefetch_depth(str(getattr(encoder.device, "type", "cpu")), not is_local(spec.uris[0]))
        try:
            records = blocks_fn(ep, encoder, batch_size=cfg.model.batch_size, depth=depth,
                                   progress=(lambda: bar.update(1)) if bar is not None else None)
        finally:
            if bar is not None:
                bar.close()
        where[0] = "finishing"
        run = finish_embed(ep, encoder, records, t0, write_h5=write_h5)
    except BaseException:
        release_lease(ep.plan.out_dir, ep.plan.run_key)
        raise
    return SampleResult(sid, spec.uris[0], "ok", ep.plan.out_dir, run=run, images=list(spec.uris))


def embed_samples(uris: Sequence[str | SampleSpec], cfg: JobConfig, out_root: str, encoder: Any, *,
                  write_h5: bool = True, progress: Progress | None = None, blocks_fn: EmbedBlocks = embed_blocks,
                  runner: str = "local") -> list[SampleResult]:
    """Embed many samples (blocks in this process, or wherever ``blocks_fn`` sends them); a failing sample is
    recorded and the others go on."""
    t0 = time.perf_counter()
    specs = resolve_samples(uris)
    lifecycle.prepare_output_root(out_root)
    results, rows = [], []
    for result, seconds in lifecycle.each_sample(
            specs, out_root, lambda spec, stage: embed_sample(spec, encoder, cfg, out_root, write_h5=write_h5,
                                                              progress=progress, stage=stage, blocks_fn=blocks_fn)):
        results.append(result)
        rows.append({"sample_id": result.sample_id, "uri": result.uri, "status": result.status,
                     "out_dir": result.out_dir, "error": result.error or None,
                     "patches_embedded": (result.run.get("patches") or {}).get("embedded"), "seconds": seconds})
    write_json(join(out_root, RUN_JSON), {
        "command": "slidescore embed", "runner": runner, "version": __version__, "encoder": encoder.info(),
        "config": cfg.to_dict(), "samples": rows, "seconds": round(time.perf_counter() - t0, 3)})
    return results
