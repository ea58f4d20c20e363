"""Ray job entrypoint: per-patch encoder embeddings (``slidescore embed``) on the cluster this job runs on.

``python -m jobs.embed --config job.yaml --encoder PATH [--output DIR] [--uri URI ...] [--no-h5] [--overwrite]``,
usually through ``ray job submit --working-dir . -- python -m jobs.embed …``. Samples come from the config
or ``--uri`` (one image per sample), the pool from ``cluster``; tiling (``tiling.stride_px``: a divisor of
the encoder's patch), mask and ``model.batch_size`` from the config, as ``slidescore embed -c`` takes them. Outputs per sample are those of
``slidescore embed`` (``embeddings.zarr``, ``features.h5``, ``run.json``, ``_SUCCESS``).

Exit codes: 0 all samples ok, 1 some samples failed (see ``failures.jsonl``), 2 usage, config, encoder
or cluster error (nothing was embedded).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from jobs.score import EXIT_OK, EXIT_SAMPLES_FAILED, EXIT_USAGE, refuse_relative_paths_in_ray_copy
from slidescore.errors import ConfigError, ModelLoadError, OutputLocationError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jobs.embed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", "-c", required=True, help="job YAML (samples, tiling, mask, cluster)")
    p.add_argument("--encoder", required=True, help="the encoder, as for `slidescore embed --encoder`")
    p.add_argument("--output", "-o", help="output folder (overrides output.uri)")
    p.add_argument("--uri", action="append", default=[], metavar="URI", help="embed this image (repeatable); "
                   "replaces the config's samples section")
    p.add_argument("--no-h5", action="store_true", help="write embeddings.zarr only, no features.h5")
    p.add_argument("--overwrite", action="store_true", help="re-embed samples whose outputs belong to another run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from slidescore.config import load_config
    from slidescore.model.vit import load_encoder
    from slidescore.run.ray import ClusterError, embed_samples_ray

    try:
        cfg = load_config(args.config)
        encoder = load_encoder(args.encoder, device="cpu")  # the actors move it to their device
        overrides: dict[str, Any] = {"output": {"uri": args.output or cfg.output.uri, "overwrite": args.overwrite}}
        cfg = cfg.replace(**overrides)
        uris: list[Any] = list(args.uri) or cfg.samples.list_samples()
        if not uris:
            raise ConfigError("samples: no images to embed; list them in samples.uris / samples.manifest or give --uri")
        refuse_relative_paths_in_ray_copy(uris, cfg.output.uri)
        results = embed_samples_ray(uris, cfg, cfg.output.uri, encoder, write_h5=not args.no_h5)
    except (ConfigError, ModelLoadError, OutputLocationError, ClusterError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    for r in results:
        if r.status == "failed":
            print(f"FAILED   {r.sample_id}: {r.error}", file=sys.stderr)
        else:
            print(f"{r.status:<8} {r.sample_id} → {r.out_dir}")
    n_bad = sum(r.status == "failed" for r in results)
    print(f"{len(results) - n_bad}/{len(results)} samples ok; encoder {encoder.card.name} (checksum {encoder.checksum[:12]}…)")
    return EXIT_SAMPLES_FAILED if n_bad else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
