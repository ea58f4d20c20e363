"""Per-patch embeddings with a ViT-B/16-sized encoder: slidescore vs MONAI vs a DataLoader-per-patch loop.

Usage: ``.venv/bin/python benchmarks/encoder.py [--size 2016] [--strides 224 112] [--batch 64]
[--depth 12] [--device auto] [--amp bf16] [--repeats 2] [--out benchmarks/results]`` (MONAI from the
``bench`` extra).

The encoder is :func:`slidescore.model.vit.build_vit` ``vit_base_patch16_224`` with random weights
(86 M parameters, 224-px patches, scaled-dot-product attention); the image is a ``--size``² random
RGB texture (``--size`` − 224 should be a multiple of every stride, so the three methods see the same
windows). Every window ``[0, size − 224]`` at the stride is embedded by:

* **slidescore**: :meth:`~slidescore.model.vit.PatchEncoder.embed_block`, the path of ``slidescore
  embed``: the uint8 image crosses to the device once, normalised per batch on the device, each batch
  one gather from a strided ``unfold`` view (no per-patch Python), NHWC, autocast (``--amp``, CUDA only);
* **MONAI** ``sliding_window_inference`` (roi 224, overlap 1 − stride/224, ``with_coord=True`` so the
  predictor files each window's embedding under its location; it returns a 1-channel map for MONAI to
  blend, as its segmentation-style API requires);
* **DataLoader per patch**, the way WSInfer and TRIDENT feed patch models: a ``Dataset`` whose
  ``__getitem__`` cuts one patch with numpy and normalises it on the CPU (ToTensor + Normalize), a
  ``DataLoader`` (``--workers``) batching them, one forward per batch (here from an in-memory image, which
  favours it: they read each patch from the slide file).

All three return the same (N, 768) float32 embeddings (max abs difference printed; the bf16 row is
compared with fp32). Times are the best of ``--repeats`` after a warm-up. Writes ``encoder.json`` and
``encoder.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slidescore.model.card import ModelCard
from slidescore.model.vit import PatchEncoder, build_vit

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as most pathology encoders
P = 224


def ours(enc: PatchEncoder, img: np.ndarray, stride: int, batch: int) -> np.ndarray:
    n = (img.shape[0] - P) // stride + 1
    return enc.embed_block(img, np.ones((n, n), bool), stride, batch_size=batch).reshape(n * n, -1)


@torch.inference_mode()
def monai(enc: PatchEncoder, img: np.ndarray, stride: int, batch: int) -> np.ndarray:
    from monai.inferers import sliding_window_inference

    n = (img.shape[0] - P) // stride + 1
    out = np.full((n, n, enc.dim), np.nan, np.float32)
    mean = torch.tensor(MEAN, device=enc.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=enc.device).view(1, 3, 1, 1)
    x = ((torch.from_numpy(img).to(enc.device).permute(2, 0, 1)[None].float() / 255.0) - mean) / std

    def predictor(win: torch.Tensor, location: Any) -> torch.Tensor:
        emb = enc.module(win).float().cpu().numpy()
        for i, (_, _, ys, xs) in enumerate(location):
            out[ys.start // stride, xs.start // stride] = emb[i]
        return win[:, :1]

    sliding_window_inference(x, (P, P), batch, predictor, overlap=1 - stride / P, mode="constant", with_coord=True)
    return out.reshape(n * n, -1)


class PatchDataset(torch.utils.data.Dataset):
    """One patch per item, cut and normalised on the CPU (torchvision's ToTensor + Normalize, written out)."""

    def __init__(self, img: np.ndarray, stride: int) -> None:
        self.img, self.stride = img, stride
        self.n = (img.shape[0] - P) // stride + 1
        self.mean = np.array(MEAN, np.float32)[:, None, None]
        self.std = np.array(STD, np.float32)[:, None, None]

    def __len__(self) -> int:
        return self.n * self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        y, x = (i // self.n) * self.stride, (i % self.n) * self.stride
        patch = self.img[y : y + P, x : x + P].transpose(2, 0, 1).astype(np.float32) / 255.0
        return torch.from_numpy((patch - self.mean) / self.std)


def make_loader_method(workers: int) -> Callable[[PatchEncoder, np.ndarray, int, int], np.ndarray]:
    @torch.inference_mode()
    def loader(enc: PatchEncoder, img: np.ndarray, stride: int, batch: int) -> np.ndarray:
        dl = torch.utils.data.DataLoader(PatchDataset(img, stride), batch_size=batch, num_workers=workers,
                                         pin_memory=enc.device.type == "cuda")
        return np.concatenate([enc.module(b.to(enc.device)).float().cpu().numpy() for b in dl])
    return loader


def best_of(fn: Callable[[], np.ndarray], repeats: int, sync: bool) -> tuple[float, np.ndarray]:
    out = fn()  # warm-up (and the outputs)
    times = []
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=2016)
    ap.add_argument("--strides", type=int, nargs="+", default=[224, 112])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--depth", type=int, default=12, help="transformer blocks (12 = ViT-B/16)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--amp", default="bf16", choices=["off", "bf16", "fp16"], help="extra slidescore row (CUDA only)")
    ap.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vit = build_vit("vit_base_patch16_224", depth=args.depth)
    card = ModelCard(name="vit_base_patch16_224-random", patch_px=P, mpp=0.5, classes=("embedding",), mean=MEAN,
                     std=STD)
    enc = PatchEncoder(vit, card, device=args.device)
    cuda = enc.device.type == "cuda"
    img = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    methods: list[tuple[str, Callable[..., np.ndarray]]] = [
        ("slidescore embed_block (fp32)", ours), ("MONAI sliding_window_inference", monai),
        (f"DataLoader per patch ({args.workers} workers)", make_loader_method(args.workers))]
    rows = []
    for stride in args.strides:
        if (args.size - P) % stride:
            raise SystemExit(f"--size {args.size}: size − 224 must be a multiple of stride {stride}")
        n = ((args.size - P) // stride + 1) ** 2
        ref = None
        for name, fn in methods:
            sec, out = best_of(lambda fn=fn, s=stride: fn(enc, img, s, args.batch), args.repeats, cuda)
            ref = out if ref is None else ref
            rows.append({"stride": stride, "method": name, "patches": n, "seconds": round(sec, 3),
                         "patches_per_s": round(n / sec, 1), "max_abs_diff_vs_slidescore": float(np.abs(out - ref).max())})
            print(rows[-1], flush=True)
        if cuda and args.amp != "off":
            amp_enc = PatchEncoder(vit, card, device=args.device, amp=args.amp)
            sec, out = best_of(lambda e=amp_enc, s=stride: ours(e, img, s, args.batch), args.repeats, cuda)
            rows.append({"stride": stride, "method": f"slidescore embed_block ({args.amp} autocast)", "patches": n,
                         "seconds": round(sec, 3), "patches_per_s": round(n / sec, 1),
                         "max_abs_diff_vs_slidescore": float(np.abs(out - ref).max())})
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name(enc.device) if cuda else f"CPU ({platform.processor() or platform.machine()}, " \
                                                                 f"{torch.get_num_threads()} threads)"
    meta = {"device": device, "torch": torch.__version__, "size": args.size, "depth": args.depth, "batch": args.batch}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "encoder.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"ViT-B/16-sized encoder (depth {args.depth}, random weights), {args.size}² image, batch {args.batch}, "
             f"{device}, torch {torch.__version__}", "",
             "| stride | method | patches | s | patches/s | max abs diff |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['stride']} | {r['method']} | {r['patches']} | {r['seconds']} | {r['patches_per_s']} | "
              f"{r['max_abs_diff_vs_slidescore']:.2g} |" for r in rows]
    (args.out / "encoder.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
