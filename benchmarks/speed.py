"""Speed of slidescore against MONAI's sliding-window inference, on the same model, image and output.

Usage (one command, from a fresh clone): ``make bench`` or
``.venv/bin/python benchmarks/speed.py [--size 1024] [--repeats 3] [--out benchmarks/results]``
(needs the ``bench`` extra: ``pip install -e ".[bench]"``, which adds MONAI).

Sections, each timed as the best of ``--repeats`` runs after one warm-up, interleaved so that load
from other processes hits every method alike:

1. **Built-in SmearNet, patch 64 / stride 16**, on a ``--size``² crop of a synthetic smear at
   0.5 µm/px: slidescore dense, slidescore per-patch (``score_array``) and MONAI
   ``sliding_window_inference`` (roi 64, overlap 0.75 → stride 16, ``mode="constant"``, the
   predictor spreads each patch probability over its 64 × 64 pixels). MONAI's per-pixel map is
   averaged over each 16 × 16 cell and compared with slidescore's cell map on the cells at least
   k − 1 = patch/stride − 1 cells from the edges (there they are the same numbers in exact
   arithmetic: a cell's value is the plain mean of the k² patches covering it; nearer the edges
   slidescore's centred grid also averages the patches that start before the image, which MONAI's
   windows do not have).
2. **ResNet-18-style valid network, patch 224 / stride 112** (random weights) on the same kind
   of image: the same three methods (MONAI overlap 0.5 → stride 112).
3. **Arithmetic limit** of dense scoring for both: multiply-adds of scoring every patch alone /
   multiply-adds of one dense pass over the image (convolutions counted by forward hooks).
4. **End to end**: ``score_samples`` on the JPEG-tiled pyramidal TIFF on disk (open, mask, blocks
   with and without read-ahead, mosaic, pyramid, regions, overview and run files; the HTML report
   with crops and Grad-CAM is switched off) vs ``score_array`` on the decoded pixels in memory,
   same model, same patches (the job's foreground mask), same block size.
5. **Peak memory** of ``slidescore score`` on 4k and 16k images (``benchmarks/memory.py``;
   ``--skip-memory`` to leave it out).

Writes ``speed.json`` and ``speed.md`` (markdown tables) under ``--out`` and prints the tables.
Timings on a shared machine are noisy: rerun on a quiet one before quoting them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import slidescore
from slidescore.config import JobConfig
from slidescore.core.types import Box
from slidescore.io import open_image
from slidescore.model import load_model
from slidescore.model.architectures import ValidResNet18
from slidescore.model.card import ModelCard
from slidescore.model.scoring import PatchClassifier, fold_batchnorm
from slidescore.run.local import score_samples
from slidescore.stages.plan import plan_sample

HERE = Path(__file__).resolve().parent


# -- machine ------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
                            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                            "load_average_at_start": list(os.getloadavg()), "slidescore": slidescore.__version__}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


class GpuSampler:
    """GPU utilisation sampled with nvidia-smi every 0.2 s while in use (mean, max); CUDA only."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> GpuSampler:
        if torch.cuda.is_available() and shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, check=False)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.split()[0]))
            self._stop.wait(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def summary(self) -> dict[str, float] | None:
        return {"mean_pct": float(np.mean(self.samples)), "max_pct": float(np.max(self.samples))} if self.samples else None


# -- helpers ------------------------------------------------------------------------------------
def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def best_of(methods: dict[str, Callable[[], np.ndarray]], repeats: int
            ) -> tuple[dict[str, float], dict[str, float], dict[str, np.ndarray]]:
    """Best wall time and least process CPU time (less sensitive to other processes) per method
    over ``repeats`` interleaved rounds; the last outputs."""
    times = {k: float("inf") for k in methods}
    cpu = dict(times)
    outs: dict[str, np.ndarray] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            outs[name] = fn()
            sync()
            times[name] = min(times[name], time.perf_counter() - t0)
            cpu[name] = min(cpu[name], time.process_time() - c0)
    return times, cpu, outs


def count_macs(module: nn.Module, shape: tuple[int, ...], device: torch.device) -> int:
    """Multiply-adds of the convolutions and linear layers of one forward pass."""
    total = 0

    def hook(m: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Conv2d):
            total += out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            total += out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    try:
        with torch.inference_mode():
            module(torch.zeros(shape, device=device))
    finally:
        for h in handles:
            h.remove()
    return total


def arithmetic_limit(clf: PatchClassifier, image_px: int, stride_px: int) -> dict[str, float]:
    p = clf.card.patch_px
    n = ((image_px - p) // stride_px + 1) ** 2
    per_patch = count_macs(clf.module, (1, 3, p, p), clf.device) * n
    dense = count_macs(clf.module, (1, 3, image_px, image_px), clf.device)
    return {"patches": n, "per_patch_gmac": per_patch / 1e9, "dense_gmac": dense / 1e9, "limit": per_patch / dense}


def monai_scorer(clf: PatchClassifier, image: np.ndarray, stride_px: int, batch_size: int,
                 channels_last: bool = False) -> Callable[[], np.ndarray]:
    """MONAI sliding_window_inference on the same normalised input; returns its map per cell.

    The network is the one slidescore runs (BatchNorm folded), in the NCHW layout a module comes in
    (what a MONAI user runs), or with ``channels_last`` its weights converted to NHWC as slidescore
    does by default: a row that shows how much of the difference is memory layout.
    """
    from monai.inferers import sliding_window_inference

    p = clf.card.patch_px
    dev = clf.device
    mean = torch.tensor(clf.card.mean, device=dev).view(1, -1, 1, 1)
    std = torch.tensor(clf.card.std, device=dev).view(1, -1, 1, 1)

    # the same network slidescore runs (BatchNorm folded into the convolutions when it can be)
    net = fold_batchnorm(clf.module) or copy.deepcopy(clf.module)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)

    def predictor(batch: torch.Tensor) -> torch.Tensor:
        probs = clf.probabilities(net(batch))  # (B, K, 1, 1)
        return probs.expand(-1, -1, p, p).contiguous()  # each patch's probability over its pixels

    def run() -> np.ndarray:
        with torch.inference_mode():
            x = torch.from_numpy(image).to(dev).permute(2, 0, 1)[None].float() / 255
            x = (x - mean) / std
            out = sliding_window_inference(x, (p, p), batch_size, predictor, overlap=1 - stride_px / p,
                                           mode="constant", sw_device=dev, device=dev)
        o = out[0].float().cpu().numpy()
        k, h, w = o.shape
        return o.reshape(k, h // stride_px, stride_px, w // stride_px, stride_px).mean(axis=(2, 4))

    return run


MONAI_NHWC = "MONAI sliding_window_inference, network converted to channels_last"


def compare(image: np.ndarray, clf: PatchClassifier, stride_px: int, batch_size: int, repeats: int,
            label: str) -> dict[str, Any]:
    """slidescore dense / per-patch vs MONAI on one image and model."""
    kw = dict(stride_px=stride_px, batch_size=batch_size)
    methods: dict[str, Callable[[], np.ndarray]] = {
        "slidescore dense": lambda: slidescore.score_array(image, clf, mode="dense", **kw),
        "slidescore per-patch": lambda: slidescore.score_array(image, clf, mode="per_patch", **kw),
        "MONAI sliding_window_inference": monai_scorer(clf, image, stride_px, batch_size),
        MONAI_NHWC: monai_scorer(clf, image, stride_px, batch_size, channels_last=True),
    }
    side = clf.card.patch_px + stride_px * (int(np.ceil(np.sqrt(batch_size))) - 1)  # ≥ one full batch of patches
    warm = image[:side, :side]
    # warm-up: the one-time dense self-check, and oneDNN primitives for the shapes timed below
    # (dense: the whole image, cheap; per-patch and MONAI: full batches, from a crop)
    methods["slidescore dense"]()
    slidescore.score_array(warm, clf, mode="per_patch", **kw)
    monai_scorer(clf, warm, stride_px, batch_size)()
    monai_scorer(clf, warm, stride_px, batch_size, channels_last=True)()
    print(f"[{label}] timing {list(methods)} × {repeats} …", file=sys.stderr, flush=True)
    times, cpu, outs = best_of(methods, repeats)
    mp = image.shape[0] * image.shape[1] / 1e6
    # slidescore's grid is centred (docs/architecture.md, invariant 1): it also scores the k - 1 patch positions
    # that start before the image and run past it, so a cell within k - 1 cells of an edge averages padded
    # patches that MONAI's windows (from 0 to the last one inside) do not have. Inside that margin both
    # average the same k² in-image patches: compare there.
    m = clf.card.patch_px // stride_px - 1
    inner = (slice(None), slice(m, -m or None), slice(m, -m or None))
    ref = outs["MONAI sliding_window_inference"][inner]
    monai_s = times["MONAI sliding_window_inference"]
    rows = [{"method": k, "seconds": t, "cpu_seconds": cpu[k], "megapixels_per_s": mp / t, "speedup_vs_monai": monai_s / t,
             "max_abs_diff_vs_monai": float(np.max(np.abs(outs[k][inner] - ref))), "cells_compared": int(ref[0].size)}
            for k, t in times.items()]
    limit = arithmetic_limit(clf, image.shape[0], stride_px)
    dense_vs_pp = times["slidescore per-patch"] / times["slidescore dense"]
    return {"label": label, "image_px": list(image.shape[:2]), "patch_px": clf.card.patch_px, "stride_px": stride_px,
            "batch_size": batch_size, "rows": rows, "arithmetic": limit, "dense_vs_per_patch": dense_vs_pp,
            "fraction_of_limit": dense_vs_pp / limit["limit"],
            "max_abs_diff_dense_vs_per_patch": float(np.max(np.abs(outs["slidescore dense"] - outs["slidescore per-patch"]))),
            "dense_check": clf.scoring_info()}


def resnet_classifier(width: int, device: str) -> PatchClassifier:
    torch.manual_seed(0)
    net = ValidResNet18(width=width)
    card = ModelCard(name=f"resnet18_valid (width {width}, random weights)", patch_px=224, mpp=0.5, classes=("x",),
                     architecture="resnet18_valid", dense=True, network_stride_px=16)
    return PatchClassifier(net, card, device=device)


# -- end to end -----------------------------------------------------------------------------------
def end_to_end(tif: Path, clf: PatchClassifier, work: Path, repeats: int, chunk_cells: int | None) -> dict[str, Any]:
    """The job from the TIFF on disk vs score_array on the decoded pixels, same patches and blocks.

    The job runs with its default configuration (``chunk_cells`` overrides the block size) except
    that the specialist's HTML report (crops, Grad-CAM) is left out: it is not scoring. The three
    methods run interleaved, round after round, and each keeps its best round: on a shared (virtual)
    machine whose speed drifts, every method then sees the same conditions. Each round also pairs
    every job run with the in-memory runs just before and after it; the median of those paired
    ratios is less sensitive than the best rounds to one lucky run.
    """
    tiling = {} if chunk_cells is None else {"chunk_cells": chunk_cells}
    cfgs = {depth: JobConfig.from_dict({"output": {"uri": str(work), "overwrite": True}, "tiling": tiling,
                                        "model": {"prefetch_blocks": depth}, "report": {"enabled": False}})
            for depth in (2, 0)}
    cfg = cfgs[0]
    plan = plan_sample(str(tif), cfg, clf.card, clf.checksum, str(work / "plan"), dry_run=True)
    assert plan is not None
    reader = open_image(str(tif))
    try:
        pixels = reader.read(plan.level, Box(0, 0, *plan.level_shape))
    finally:
        reader.close()
    cells = cfg.tiling.chunk_cells * cfg.tiling.block_chunks

    def in_memory() -> None:
        slidescore.score_array(pixels, clf, stride_px=cfg.tiling.stride_px, valid=plan.valid, chunk_cells=cells)

    def timed_in_memory() -> float:
        sync()
        t0 = time.perf_counter()
        in_memory()
        sync()
        return time.perf_counter() - t0

    best: dict[str, float] = {}
    timings: dict[str, dict[str, Any]] = {}
    paired: dict[str, list[float]] = {f"prefetch_blocks={d}": [] for d in cfgs}
    before = timed_in_memory()  # warm-up round's in-memory run; then each round ends with one
    for i in range(repeats + 1):  # round 0 is the warm-up
        jobs: dict[str, float] = {}
        for depth, c in cfgs.items():
            key = f"prefetch_blocks={depth}"
            with GpuSampler() as gpu:
                t0 = time.perf_counter()
                (res,) = score_samples([str(tif)], c, str(work / f"e2e-prefetch{depth}"), model=clf)
                dt = time.perf_counter() - t0
            if res.status != "ok":
                raise RuntimeError(f"end-to-end run failed: {res.error}")
            jobs[key] = dt
            if i and dt < best.get(key, float("inf")):
                best[key], timings[key] = dt, {**res.run["timings_s"], "gpu_utilisation": gpu.summary()}
        after = timed_in_memory()
        if i:
            best["in memory"] = min(best.get("in memory", float("inf")), after)
            for key, dt in jobs.items():  # this round's job against the in-memory runs on either side of it
                paired[key].append((before + after) / 2 / dt)
        before = after
        print(f"  round {i}: " + ", ".join(f"{k} {v:.2f} s" for k, v in best.items()), file=sys.stderr, flush=True)
    mp = plan.level_shape[0] * plan.level_shape[1] / 1e6
    rows = [{"method": "score_array, decoded pixels in memory", "seconds": best["in memory"], "megapixels_per_s": mp / best["in memory"]}]
    for k, t in timings.items():
        rows.append({"method": f"score_samples from JPEG-tiled TIFF ({k})", "seconds": best[k],
                     "megapixels_per_s": mp / best[k], "timings_s": t,
                     "paired_fractions": paired[k], "paired_fraction_median": float(np.median(paired[k]))})
    for r in rows:
        r["fraction_of_in_memory"] = best["in memory"] / r["seconds"]
        t = r.get("timings_s")
        if t:  # the block loop alone (read, score, blend, write; reads overlap with read-ahead), wall clock
            r["blocks_seconds"] = t["total_s"] - t["open_s"] - t["mask_s"] - t["pyramid_s"] - t["regions_s"]
            r["blocks_fraction_of_in_memory"] = best["in memory"] / r["blocks_seconds"]
    return {"tif": str(tif), "level": plan.level, "level_shape": list(plan.level_shape), "blocks": len(plan.blocks),
            "block_px": cells * cfg.tiling.stride_px, "patches_scored": int(plan.valid.sum()), "rows": rows}


def peak_memory(sizes: list[int], work: Path) -> list[dict[str, Any]]:
    out = subprocess.run([sys.executable, str(HERE / "memory.py"), "--json", "--workdir", str(work), "--sizes", *map(str, sizes)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- report ---------------------------------------------------------------------------------------
def markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    lines = [f"Machine: {m['nproc']} CPU cores ({m['cpu']}), torch {m['torch']} ({m['torch_threads']} threads), "
             f"MONAI {m.get('monai', '-')}, Python {m['python']}{', GPU ' + m['gpu'] if 'gpu' in m else ''}; "
             f"load average at start {m['load_average_at_start'][0]:.1f}.", f"Command: `{res['command']}`", ""]
    for sec in res["compare"]:
        a = sec["arithmetic"]
        lines += [f"**{sec['label']}**, patch {sec['patch_px']} / stride {sec['stride_px']}, image "
                  f"{sec['image_px'][0]} × {sec['image_px'][1]} ({a['patches']} patches), batch {sec['batch_size']}, best of {res['repeats']}:", "",
                  "| method | wall s | CPU s | megapixels/s | × MONAI | max abs diff vs MONAI (inner cells) |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for r in sec["rows"]:
            lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {r['megapixels_per_s']:.3f} | "
                         f"{r['speedup_vs_monai']:.2f}× | {r['max_abs_diff_vs_monai']:.1e} |")
        lines += ["", f"Arithmetic limit (per-patch {a['per_patch_gmac']:.1f} GMAC / dense {a['dense_gmac']:.1f} GMAC): "
                  f"**{a['limit']:.2f}×**; measured dense / per-patch: **{sec['dense_vs_per_patch']:.2f}×** "
                  f"({sec['fraction_of_limit']:.2f} of the limit); dense vs per-patch max abs diff "
                  f"{sec['max_abs_diff_dense_vs_per_patch']:.1e}; dense self-check max diff {sec['dense_check']['dense_max_diff']:.1e}.", ""]
    if res.get("end_to_end"):
        e = res["end_to_end"]
        lines += [f"**End to end** (built-in model, default job configuration, level {e['level']} = {e['level_shape'][0]} × "
                  f"{e['level_shape'][1]} px of `{Path(e['tif']).name}`, {e['blocks']} blocks of {e.get('block_px', '?')} px, "
                  f"{e['patches_scored']} foreground patches, best of {e.get('repeats', res['repeats'])}):", "",
                  "| method | seconds | megapixels/s | × in memory | × in memory, median of rounds | block loop s | block loop × in memory | open + mask s | pyramid s | regions + files s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in e["rows"]:
            t = r.get("timings_s") or {}
            extra = (f"{r['blocks_seconds']:.2f} | {r['blocks_fraction_of_in_memory']:.2f} | {t['open_s'] + t['mask_s']:.2f} | "
                     f"{t['pyramid_s']:.2f} | {t['regions_s']:.2f}" if t else "– | – | – | – | –")
            med = f"{r['paired_fraction_median']:.2f}" if "paired_fraction_median" in r else "–"
            lines.append(f"| {r['method']} | {r['seconds']:.2f} | {r['megapixels_per_s']:.2f} | {r['fraction_of_in_memory']:.2f} | {med} | {extra} |")
        lines.append("")
    if res.get("memory"):
        lines += ["**Peak memory** (`slidescore score`, default config, fresh process):", "",
                  "| image (level 0) | TIFF size | wall time | peak RSS |", "| --- | --- | --- | --- |"]
        for r in res["memory"]:
            lines.append(f"| {r['size']} × {r['size']} | {r['file_mib']:.0f} MiB | {r['seconds']:.1f} s | {r['peak_rss_mib']:.0f} MiB |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=1024, help="SmearNet image edge (px at 0.5 µm/px); (size − 64) %% 16 == 0")
    ap.add_argument("--resnet-size", type=int, default=672, help="ResNet image edge; (size − 224) %% 112 == 0")
    ap.add_argument("--resnet-width", type=int, default=64, help="ResNet base width (64 = ResNet-18)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workdir", default="/tmp/slidescore-bench", help="generated images are cached here")
    ap.add_argument("--e2e-size", type=int, default=16384,
                    help="level-0 edge of the end-to-end smear (0.25 µm/px; the model reads level 1, half of it)")
    ap.add_argument("--e2e-chunk-cells", type=int, default=None, help="block size for end to end (default: the job's)")
    ap.add_argument("--e2e-repeats", type=int, default=5,
                    help="interleaved rounds of the end-to-end comparison (each method keeps its best; the VM's speed drifts)")
    ap.add_argument("--memory-sizes", type=int, nargs="*", default=[4096, 16384])
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-compare", action="store_true", help="leave out the MONAI comparison (end to end and memory only)")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()
    if (args.size - 64) % 16 or (args.resnet_size - 224) % 112:
        ap.error("--size must be 64 + 16·n and --resnet-size 224 + 112·n (the same patches for MONAI and slidescore)")
    logging.basicConfig(level=logging.WARNING)
    from slidescore.offline.demo import generate_smear

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    tif = work / "smear-4096.tif"  # shared with benchmarks/memory.py (same generator and seed)
    if not tif.exists():
        generate_smear(tif, 4096, seed=11, progress=False)
    reader = open_image(str(tif))
    try:  # level 1 is the model's 0.5 µm/px, 2048 × 2048
        big = max(args.size, args.resnet_size)
        if big > reader.levels[1].height:
            ap.error(f"sizes above {reader.levels[1].height} px need a larger smear")
        level1 = reader.read(1, Box(0, 0, big, big))
    finally:
        reader.close()

    res: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": machine(),
                           "repeats": args.repeats, "compare": []}
    smear = load_model("builtin:smearnet", device=args.device)
    # the network's probabilities for every method: score_array would apply the card's calibration
    # (temperature 1.09) per patch, which MONAI's windows know nothing of
    compare_clf = copy.copy(smear)
    compare_clf.card = dataclasses.replace(smear.card, calibration={})
    if not args.skip_compare:
        res["compare"].append(compare(np.ascontiguousarray(level1[: args.size, : args.size]), compare_clf, 16, args.batch_size,
                                      args.repeats, "Built-in SmearNet"))
        resnet = resnet_classifier(args.resnet_width, args.device)
        res["compare"].append(compare(np.ascontiguousarray(level1[: args.resnet_size, : args.resnet_size]), resnet, 112,
                                      max(1, args.batch_size // 16), args.repeats, "ResNet-18-style valid network"))
    print("[end to end] …", file=sys.stderr, flush=True)
    e2e_tif = work / f"smear-{args.e2e_size}.tif"  # shared with benchmarks/memory.py (same generator and seed)
    if not e2e_tif.exists():
        generate_smear(e2e_tif, args.e2e_size, seed=11, progress=False)
    res["end_to_end"] = end_to_end(e2e_tif, smear, work, args.e2e_repeats, args.e2e_chunk_cells)
    res["end_to_end"]["repeats"] = args.e2e_repeats
    if not args.skip_memory:
        print("[peak memory] …", file=sys.stderr, flush=True)
        res["memory"] = peak_memory(args.memory_sizes, work)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "speed.json").write_text(json.dumps(res, indent=2, default=float))
    md = markdown(res)
    (out / "speed.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
