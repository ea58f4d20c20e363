"""The ``slidescore`` command line: ``score`` images with a config, or run the embedded ``demo``.

Exit codes: 0 all samples ok, 1 some samples failed (see ``failures.jsonl``), 2 usage or config
error (nothing was scored).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

from slidescore.errors import ConfigError, ModelLoadError

EXIT_OK, EXIT_SAMPLES_FAILED, EXIT_USAGE = 0, 1, 2


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    def make(n_blocks: int, n_patches: int) -> Any:
        return tqdm(total=n_blocks, unit="block", desc=f"scoring {n_patches:,} patch positions", leave=False, dynamic_ncols=True)

    return make


def cmd_score(args: argparse.Namespace) -> int:
    from slidescore.config import load_config
    from slidescore.model import load_model
    from slidescore.pipeline import score_samples

    cfg = load_config(args.config)
    overrides: dict[str, dict[str, Any]] = {}
    if args.output:
        overrides["output"] = {"uri": args.output}
    if args.overwrite:
        overrides.setdefault("output", {})["overwrite"] = True
    if args.mpp is not None:
        overrides["input"] = {"mpp": args.mpp}
    if args.model:
        overrides["model"] = {"name": args.model}
    if overrides:
        cfg = cfg.replace(**overrides)
    model = load_model(cfg.model.name, device=cfg.model.device)
    t0 = time.perf_counter()
    results = score_samples(args.images, cfg, cfg.output.uri, model=model, progress=_progress_factory(not args.quiet))
    return _summarise(results, cfg.output.uri, time.perf_counter() - t0)


def _summarise(results: list, out_root: str, seconds: float) -> int:
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        if r.status == "failed":
            print(f"FAILED  {r.sample_id}: {r.error}", file=sys.stderr)
            continue
        run = r.run
        pt = run["patches"]
        top = r.regions[0].peak_probability if r.regions else float("nan")
        note = " (already complete, skipped)" if r.status == "skipped" else ""
        print(f"ok      {r.sample_id}: {pt['scored']:,} patches scored, {pt['skipped_background']:,} skipped as background, "
              f"{run['regions']['total']} regions (top peak {top:.3f}) → {r.out_dir}{note}")
    print(f"{len(results) - len(failed)}/{len(results)} samples ok in {seconds:.1f} s; outputs under {out_root}")
    if failed:
        print(f"{len(failed)} sample(s) failed; details in {Path(out_root) / 'failures.jsonl'}", file=sys.stderr)
        return EXIT_SAMPLES_FAILED
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from slidescore.demo import run_demo

    return run_demo(size_px=args.size, out_root=args.output, seed=args.seed, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slidescore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score images and write mosaics, regions and run records")
    s.add_argument("images", nargs="+", help="image paths (tiled TIFF/SVS/OME-TIFF or OME-Zarr); one sample each")
    s.add_argument("--config", "-c", help="job YAML (defaults are used for everything not given)")
    s.add_argument("--output", "-o", help="output folder (overrides output.uri)")
    s.add_argument("--model", help="model (overrides model.name): builtin:NAME, package folder or .pt/.ts file")
    s.add_argument("--mpp", type=float, help="level-0 µm/px for images without resolution metadata (overrides input.mpp)")
    s.add_argument("--overwrite", action="store_true", help="replace finished results of a different run")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)

    d = sub.add_parser("demo", help="generate a synthetic blood smear, score it with the built-in model, report recall")
    d.add_argument("--size", type=int, default=8192, help="edge of the generated smear in level-0 pixels (default 8192)")
    d.add_argument("--output", "-o", default="demo-output", help="output folder (default ./demo-output)")
    d.add_argument("--seed", type=int, default=7, help="random seed of the generated smear")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, ModelLoadError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
