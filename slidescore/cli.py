"""The ``slidescore`` command line: ``score`` images with a config, or run the embedded ``demo``.

Exit codes: 0 all samples ok, 1 some samples failed (see ``failures.jsonl``), 2 usage or config
error (nothing was scored).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from slidescore.errors import ConfigError, ModelLoadError, OutputLocationError

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
    from slidescore.run.local import score_samples

    cfg = load_config(args.config)
    overrides: dict[str, dict[str, Any]] = {}
    if args.output:
        overrides["output"] = {"uri": args.output}
    if args.overwrite:
        overrides.setdefault("output", {})["overwrite"] = True
    if args.mpp is not None:
        overrides["input"] = {"mpp": args.mpp}
    if args.backend:
        overrides.setdefault("input", {})["backend"] = args.backend
    if args.model:
        overrides["model"] = {"name": args.model}
    if args.model_card:
        overrides.setdefault("model", {})["card"] = args.model_card
    if args.operating_point:
        overrides.setdefault("decision", {})["operating_point"] = args.operating_point
    if args.target_prevalence:
        overrides.setdefault("decision", {})["target_prevalence"] = args.target_prevalence
    if args.roi:
        overrides["mask"] = {"roi": args.roi}
    if overrides:
        cfg = cfg.replace(**overrides)
    samples = [*args.images, *(parse_sample_arg(s) for s in args.sample)]
    if not samples:
        raise ConfigError("score: no images given; pass image paths/URIs, or --sample ID=URI1,URI2 for a sample of several images")
    if args.roi and len(samples) != 1:
        raise ConfigError(f"--roi: applies to the one image scored, got {len(samples)} samples; score each image with its own "
                          "--roi, or list 'URI roi=PATH' lines in a manifest (samples.manifest, python -m jobs.score)")
    model = load_model(cfg.model.name, **cfg.model.runtime_options())
    t0 = time.perf_counter()
    results = score_samples(samples, cfg, cfg.output.uri, model=model, progress=_progress_factory(not args.quiet))
    return _summarise(results, cfg.output.uri, time.perf_counter() - t0)


def parse_sample_arg(text: str) -> Any:
    """``ID=URI1,URI2,…`` → a :class:`~slidescore.config.SampleSpec` (URIs may not contain commas),
    optionally followed by a manifest line's per-sample words, separated by whitespace: ``roi=PATH``
    (a one-image sample's region of interest) and ``backend=NAME`` (its reader), as intake passes a
    manifest sample's settings on to the job: ``--sample "ID=URI roi=PATH backend=openslide"``."""
    from slidescore.config import SampleSpec, check_sample_id
    from slidescore.io.open import BACKENDS

    words = text.split()
    settings = {w.partition("=")[0]: w.partition("=")[2] for w in words if w.startswith(("roi=", "backend="))}
    if len(settings) < sum(w.startswith(("roi=", "backend=")) for w in words) or "" in settings.values():
        raise ConfigError(f"--sample: expected at most one roi=PATH and one backend=NAME after ID=URI1,URI2,…, got {text!r}")
    if settings:
        text = " ".join(w for w in words if not w.startswith(("roi=", "backend=")))
    sid, sep, rest = text.partition("=")
    uris = tuple(u.strip() for u in rest.split(",") if u.strip())
    if not sep or not uris:
        raise ConfigError(f"--sample: expected ID=URI1,URI2,… (a sample id, '=', comma-separated image URIs), got {text!r}")
    check_sample_id(sid.strip(), "--sample")
    if len(set(uris)) != len(uris):
        raise ConfigError(f"--sample: an image is listed twice in {text!r}; list each image once")
    backend = settings.get("backend", "auto")
    if backend not in BACKENDS:
        raise ConfigError(f"--sample: backend={backend} is not a reader; expected one of {list(BACKENDS)}")
    if "roi" in settings and len(uris) > 1:
        raise ConfigError(f"--sample: roi= applies to one image; sample {sid.strip()!r} has {len(uris)} — give each "
                          "image its own --sample with its own roi=")
    return SampleSpec(sid.strip(), uris, roi=settings.get("roi"), backend=backend)


def _summarise(results: list, out_root: str, seconds: float) -> int:
    from slidescore.io.outputs import join

    failed = [r for r in results if r.status == "failed"]
    for r in results:
        if r.status == "failed":
            print(f"FAILED  {r.sample_id}: {r.error}", file=sys.stderr)
            continue
        if r.status == "skipped":  # its outputs are those of an earlier run: say so, not this run's figures
            total = (r.run.get("regions") or {}).get("total") if isinstance(r.run, dict) else None
            print(f"skipped {r.sample_id}: already complete from an earlier run"
                  f"{f' ({total} regions)' if total is not None else ''} → {r.out_dir}")
            continue
        run = r.run
        pt = run["patches"]
        top = f" (top peak {r.regions[0].peak_probability:.3f})" if r.regions else ""
        print(f"ok      {r.sample_id}: {pt['scored']:,} patches scored, {pt['skipped_background']:,} skipped as background, "
              f"{run['regions']['total']} regions{top} → {r.out_dir}")
    print(f"{len(results) - len(failed)}/{len(results)} samples ok in {seconds:.1f} s; outputs under {out_root}")
    if failed:
        print(f"{len(failed)} sample(s) failed; details in {join(out_root, 'failures.jsonl')}", file=sys.stderr)
        return EXIT_SAMPLES_FAILED
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    if getattr(args, "kind", "smear") == "field":  # several labels at once, in map coordinates (issue #20)
        from slidescore.offline.demo_field import run_field_demo

        return run_field_demo(size_px=args.size or 4096, out_root=args.output, seed=args.seed, progress=not args.quiet)
    from slidescore.offline.demo import run_demo

    return run_demo(size_px=args.size or 8192, out_root=args.output, seed=args.seed, progress=not args.quiet)


def cmd_view(args: argparse.Namespace) -> int:
    from slidescore.report.viewer import open_viewer, resolve_sample_dir

    try:
        sample_dir = resolve_sample_dir(args.output, args.sample)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        import napari  # noqa: F401
    except ImportError:
        print("error: `slidescore view` needs napari; install the optional extra: pip install 'slidescore[view]'", file=sys.stderr)
        return EXIT_USAGE
    open_viewer(sample_dir, image=args.image)
    return EXIT_OK


def cmd_serve(args: argparse.Namespace) -> int:
    from slidescore.report.webview import serve

    try:
        serve(args.output, args.sample, host=args.host, port=args.port, image=args.image)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # the address is taken or cannot be bound
        print(f"error: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return EXIT_USAGE
    return EXIT_OK


def cmd_embed(args: argparse.Namespace) -> int:
    """``slidescore embed``: per-patch encoder embeddings on the global grid (slidescore.run.embed)."""
    from slidescore.config import load_config
    from slidescore.model.vit import load_encoder
    from slidescore.run.embed import embed_samples

    cfg = load_config(args.config)
    encoder = load_encoder(args.encoder, device=args.device, amp=args.amp)
    stride = args.stride or (cfg.tiling.stride_px if args.config else encoder.card.patch_px)
    tiling: dict[str, Any] = {"stride_px": stride}
    if not args.config:  # blocks of about 4k level pixels: a few hundred patches per block at stride 224
        tiling["chunk_cells"] = max(1, 4096 // stride)
    overrides: dict[str, dict[str, Any]] = {"tiling": tiling, "output": {"uri": args.output, "overwrite": args.overwrite}}
    if args.mpp is not None:
        overrides["input"] = {"mpp": args.mpp}
    if args.batch_size:
        overrides["model"] = {"batch_size": args.batch_size}
    cfg = cfg.replace(**overrides)
    t0 = time.perf_counter()
    results = embed_samples(args.images, cfg, args.output, encoder, write_h5=not args.no_h5,
                            progress=None if args.quiet else _progress_factory(True))
    failed = [r for r in results if r.status == "failed"]
    for r in results:
        if r.status == "failed":
            print(f"FAILED  {r.sample_id}: {r.error}", file=sys.stderr)
        elif r.status == "skipped":
            print(f"skipped {r.sample_id}: already complete from an earlier run → {r.out_dir}")
        else:
            pt = r.run["patches"]
            print(f"ok      {r.sample_id}: {pt['embedded']:,} patches embedded ({pt['dim']} values each), "
                  f"{pt['background']:,} background → {r.out_dir}")
    print(f"{len(results) - len(failed)}/{len(results)} samples ok in {time.perf_counter() - t0:.1f} s; encoder "
          f"{encoder.card.name} (checksum {encoder.checksum[:12]}…)")
    return EXIT_SAMPLES_FAILED if failed else EXIT_OK


def _add_embed_command(sub: Any) -> None:
    e = sub.add_parser("embed", help="write per-patch encoder embeddings (Zarr on the patch grid + HDF5 coords/features)")
    e.add_argument("images", nargs="+", help="image paths or URLs; one sample each")
    e.add_argument("--encoder", required=True, help="a .safetensors ViT with its .json config beside it, a folder with "
                                                   "encoder.json + weights.safetensors, or an encoder + head package")
    e.add_argument("--output", "-o", required=True, help="output folder or URL (s3://bucket/prefix)")
    e.add_argument("--config", "-c", help="job YAML (tiling, mask, input, limits; default: stride = the encoder's patch)")
    e.add_argument("--stride", type=int, help="patch stride in pixels at the encoder's µm/px (default: its patch size)")
    e.add_argument("--mpp", type=float, help="level-0 µm/px for images without resolution metadata")
    e.add_argument("--batch-size", type=int, help="patches per forward pass (default: the config's model.batch_size)")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--amp", default="off", choices=["off", "bf16", "fp16"], help="CUDA autocast dtype")
    e.add_argument("--no-h5", action="store_true", help="write only embeddings.zarr, not features.h5")
    e.add_argument("--overwrite", action="store_true", help="replace finished embeddings of a different run")
    e.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_embed)


def cmd_train(args: argparse.Namespace) -> int:
    from slidescore.offline.train import Augmentation, TrainOptions, run_train

    opts = TrainOptions(
        epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr, width=args.width,
        balance=args.balance, val_frac=args.val_frac, seed=args.seed, augmentation=Augmentation.parse(args.augment),
        device=args.device, positive=args.positive, name=args.name, pad_value=args.pad_value, progress=not args.quiet,
    )
    if args.encoder:  # a head on a frozen encoder's cached embeddings (slidescore.offline.train_head)
        from slidescore.offline.train_head import run_train_head

        card = run_train_head(args.data, args.output, opts, encoder=args.encoder, head=args.head, hidden=args.hidden,
                              mpp=args.mpp, resize=args.resize, group_regex=args.group_regex,
                              synthetic_smears=args.synthetic_smears, synthetic_size_px=args.synthetic_size,
                              encoder_device=args.device)
    else:
        card = run_train(args.data, args.output, opts, mpp=args.mpp, resize=args.resize, group_regex=args.group_regex,
                         synthetic_smears=args.synthetic_smears, synthetic_size_px=args.synthetic_size)
    val = card.metrics["validation"]
    for c, m in val["per_class"].items():
        print(f"{c}: validation AUC-ROC {m['auc_roc']:.4f}, AUC-PR {m['auc_pr']:.4f} ({m['n_pos']} positive, {m['n_neg']} negative patches)")
    if card.head == "multilabel_sigmoid":  # a sigmoid per class: each class's own figures at threshold 0.5
        for c, m in val["per_class"].items():
            print(f"{c}: at threshold 0.5 precision {m['precision']:.3f}, recall {m['recall']:.3f}, "
                  f"specificity {m['specificity']:.3f} (TN FP / FN TP {m['confusion']})")
    else:
        print(f"confusion {val['confusion_labels']} (rows true, columns predicted): {val['confusion']}")
    print(f"best epoch {card.training['best_epoch']}/{card.training['epochs_run']} on {card.training['device']}; "
          f"wrote {args.output} ({'weights.safetensors' if args.encoder else 'weights.pt'}, card.json, plots/)")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from slidescore.offline.calibrate import run_calibrate, summary_lines

    given = bool(args.precision or args.recall)  # neither: the defaults precision_0.90 and recall_0.999
    card, dest = run_calibrate(args.model, args.valset, out=args.output, in_place=args.in_place, method=args.method,
                               precisions=tuple(args.precision or (() if given else ("0.90",))),
                               recalls=tuple(args.recall or (() if given else ("0.999",))),
                               resize=args.resize, group_regex=args.group_regex, device=args.device,
                               prevalence=args.prevalence)
    print("\n".join(summary_lines(card)))
    print(f"wrote {dest / 'card.json'}")
    return EXIT_OK


def _add_decide_commands(sub: Any) -> None:
    """``train`` and ``calibrate`` (issue #7)."""
    t = sub.add_parser("train", help="train a patch classifier (SmearNet) and write a model package")
    t.add_argument("data", help="class folder (one subfolder of patches per class), annotation table (.csv/.parquet: "
                                "image, y, x, h, w, label — or labels, e.g. Fish;Sugar, for a multi-label model with a "
                                "sigmoid per class; without y, x, h, w the image column names patch files) or synthetic[:SEED]")
    t.add_argument("--output", "-o", required=True, help="model package folder to write")
    t.add_argument("--mpp", type=float, help="µm/px of the patches (class folders) or to read tables at")
    t.add_argument("--resize", type=int, help="resize every folder patch to PX × PX (mixed-size folders)")
    t.add_argument("--positive", help="positive class of two (default: the one not named uninfected/negative/...)")
    t.add_argument("--balance", default="bias_init", choices=["downsample", "class_weights", "bias_init", "none"])
    t.add_argument("--augment", default="default", help="none, default, or key=value list: flips, rot90, brightness, "
                                                        "contrast, saturation, sharpness")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--patience", type=int, default=3, help="early stopping: epochs without a better validation loss")
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--width", type=int, default=32, help="SmearNet channel width")
    t.add_argument("--encoder", help="train only a head on this frozen encoder's embeddings: a .safetensors ViT with its "
                                     ".json config beside it, a folder with encoder.json + weights.safetensors, or an "
                                     "encoder + head package; writes card.json + weights.safetensors")
    t.add_argument("--head", default="linear", choices=["linear", "mlp"], help="head on the encoder (with --encoder)")
    t.add_argument("--hidden", type=int, default=256, help="hidden width of the mlp head (with --encoder)")
    t.add_argument("--val-frac", type=float, default=0.2, help="fraction of patches (whole source images) for validation")
    t.add_argument("--group-regex", help="regex on file stems whose group 1 names the source image (default: before _cell_N)")
    t.add_argument("--synthetic-smears", type=int, default=4)
    t.add_argument("--synthetic-size", type=int, default=1536, help="level-0 edge of each synthetic smear (0.25 µm/px)")
    t.add_argument("--pad-value", type=int, default=255, help="fill beyond image borders at scoring time")
    t.add_argument("--name", help="model name in the card (default: the output folder name)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="auto", help="auto, cpu or cuda")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    t.set_defaults(func=cmd_train)

    c = sub.add_parser("calibrate", help="calibrate a model on a validation set and store operating points in its card")
    c.add_argument("model", help="model package folder or builtin:NAME")
    c.add_argument("valset", help="validation data, as for train (class folder, table or synthetic[:SEED])")
    dest = c.add_mutually_exclusive_group(required=True)
    dest.add_argument("--output", "-o", help="write a new model package here")
    dest.add_argument("--in-place", action="store_true", help="update the model package itself")
    c.add_argument("--method", default="temperature", choices=["temperature", "isotonic"])
    c.add_argument("--precision", "--target-precision", action="append", metavar="P",
                   help="operating point at target precision P, a threshold per class (repeatable; default 0.90)")
    c.add_argument("--recall", "--target-recall", action="append", metavar="R",
                   help="operating point at target recall R, a threshold per class (repeatable; default 0.999)")
    c.add_argument("--prevalence", default="auto", choices=["auto", "training", "calibration"],
                   help="reference prevalence for prior shift (auto: the card's, else the validation set's)")
    c.add_argument("--resize", type=int, help="resize folder patches to PX × PX")
    c.add_argument("--group-regex", help="as for train")
    c.add_argument("--device", default="auto")
    c.set_defaults(func=cmd_calibrate)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="slidescore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score images and write mosaics, regions and run records")
    s.add_argument("images", nargs="*", help="image paths or URLs (tiled TIFF/SVS/OME-TIFF or OME-Zarr); one sample each")
    s.add_argument("--sample", action="append", default=[], metavar="ID=URI1,URI2",
                   help="a sample of several images (fields of one smear), ranked together; repeatable; may end with "
                        "' roi=PATH' (one image) and ' backend=NAME' (its reader), as in a manifest")
    s.add_argument("--config", "-c", help="job YAML (defaults are used for everything not given)")
    s.add_argument("--output", "-o", help="output folder or URL, e.g. s3://bucket/results (overrides output.uri)")
    s.add_argument("--model", help="model (overrides model.name): builtin:NAME, a package or WSInfer-zoo folder, or a "
                   ".onnx, .pt2, .safetensors or TorchScript .pt/.ts file with its card beside it")
    s.add_argument("--model-card", metavar="CARD_JSON", help="the card of a model file that has none beside it (overrides model.card)")
    s.add_argument("--mpp", type=float, help="level-0 µm/px for images without resolution metadata (overrides input.mpp)")
    s.add_argument("--operating-point", help="named operating point of the model card (overrides decision.operating_point)")
    s.add_argument("--target-prevalence", type=float, nargs="+", metavar="P",
                   help="prevalence of the target data, one per class or one for all (overrides decision.target_prevalence)")
    s.add_argument("--roi", metavar="PATH", help="region of interest of the one image scored (overrides mask.roi): a GeoJSON "
                   "of polygons in level-0 pixels (QuPath export) or map coordinates (GeoTIFF), or a mask image (PNG/TIFF/"
                   "OME-Zarr labels, nonzero = inside); patches at least mask.min_inside_frac inside are scored")
    s.add_argument("--backend", choices=["auto", "tifffile", "openslide", "dicom"], help="reader of the images "
                   "(overrides input.backend; per sample: --sample 'ID=URI backend=NAME')")
    s.add_argument("--overwrite", action="store_true", help="replace finished results of a different run")
    s.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    s.set_defaults(func=cmd_score)

    d = sub.add_parser("demo", help="generate a synthetic blood smear, score it with the built-in model, report recall")
    d.add_argument("--kind", choices=["smear", "field"], default="smear",
                   help="smear: a blood smear and the parasite model (default); field: a GeoTIFF field scene with four "
                        "overlapping cloud patterns and the multi-label model")
    d.add_argument("--size", type=int, default=None,
                   help="edge of the generated image in level-0 pixels (default 8192 for a smear, 4096 for a field)")
    d.add_argument("--output", "-o", default="demo-output", help="output folder (default ./demo-output)")
    d.add_argument("--seed", type=int, default=7, help="random seed of the generated smear")
    d.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    d.set_defaults(func=cmd_demo)
    _add_decide_commands(sub)
    _add_embed_command(sub)

    v = sub.add_parser("view", help="open a sample's image, probability maps and regions in napari (extra: slidescore[view])")
    v.add_argument("output", help="a sample's output folder, or the output root of a run (then --sample picks one)")
    v.add_argument("--sample", help="sample id under the output root (default: the first)")
    v.add_argument("--image", help="source image URI, if it moved since scoring (default: the one in run.json)")
    v.set_defaults(func=cmd_view)

    w = sub.add_parser("serve", help="show a sample's slide, probability overlay and regions in the browser (zoomable web viewer)")
    w.add_argument("output", help="a sample's output folder, or the output root of a run (then --sample picks one)")
    w.add_argument("--sample", help="sample id under the output root (default: the first)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    w.add_argument("--port", type=int, default=0, help="port (default 0: any free port; the URL is printed)")
    w.add_argument("--image", help="source image URI, if it moved since scoring (default: the one in run.json)")
    w.set_defaults(func=cmd_serve)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except (ConfigError, ModelLoadError, OutputLocationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
