"""Images/s of the image encoders on real COCO images (../shared/data/coco-mini), against a
seed-style loop measured in the same run: one image at a time, 800-px input, decoding in the
main process, ``torch.no_grad`` instead of ``inference_mode``, default memory layout and
allocator. Each measurement runs in a fresh process (the allocator setting is process-wide).

    python -m bench.image_throughput [--images 130] [--frcnn-images 16] [--part all|runtimes|loops]
                                     [--size 256] [--rounds 3]

``--part runtimes``: EfficientNet-Lite0 at 256 px through the whole extraction (batch 4, no
decoding worker: the CPU defaults) with PyTorch or ONNX Runtime, full or reduced-size (``draft``)
JPEG decoding, decoding in the main thread before each batch (``serial``) or in a thread a few
batches ahead (``ahead``, ONNX Runtime's default), all in one process, in interleaved rounds
(best of each), as ratios against today's path (PyTorch, full decoding, serial), with the cosine
of each row to today's features and whether they equal the serial ONNX Runtime ones to the bit.

Faster R-CNN runs with random weights here (no COCO weights offline); its cost does not
depend on the weights (the RPN keeps top-N proposals either way).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from bench.common import SHARED, in_fresh_process, save, timed
from crossmodal.coco import load_image, load_split
from crossmodal.extract import extract_images
from crossmodal.image_encoders import EffNetLite0Regions, FasterRCNNRegions


def seed_style(enc, split, n: int) -> np.ndarray:
    enc.channels_last = False
    (enc.net if hasattr(enc, "net") else enc.model).to(memory_format=torch.contiguous_format)
    out = []
    with torch.no_grad():
        for i in range(n):
            out.append(enc([enc.preprocess(load_image(split.image_path(i)))]).numpy()[0])
    return np.stack(out)


def ours(enc, split, n: int, batch: int, workers: int, prefetch: int | None = None) -> np.ndarray:
    from crossmodal.coco import CaptionSplit

    sub = CaptionSplit(split.name, split.image_dir, split.image_ids[:n], split.file_names[:n],
                       split.caption_ids[:0], split.caption_image_ids[:0], [], split.source)
    with tempfile.TemporaryDirectory() as d:
        extract_images(sub, enc, Path(d) / "x.npy", batch_size=batch, workers=workers, progress=False,
                       prefetch=prefetch)
        return np.load(Path(d) / "x.npy")


def cos(a, b):
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))))


def knn_overlap(a, b, k=5):
    def knn(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argsort(-s, axis=1)[:, :k]

    ka, kb = knn(a), knn(b)
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(ka, kb, strict=True)]))


def _encoder(kind: str, size: int):
    if kind == "effnet-lite0":
        return EffNetLite0Regions(size, runtime="torch")  # the loops compared here are PyTorch ones
    torch.manual_seed(0)
    return FasterRCNNRegions("random", top_n=100, min_size=size, max_size=round(size * 1333 / 800))


def _runtimes(n, size, rounds, q):
    q.put(runtimes(n, size, rounds))


def _measure(kind, size, batch, n, workers, q):
    """Images/s and features of one configuration (batch 0 = seed-style), in its own process."""
    split = load_split(SHARED / "coco-mini", "train2017")
    enc = _encoder(kind, size)
    if batch == 0:
        t, f = timed(lambda: seed_style(enc, split, n))
    else:
        t, f = timed(lambda: ours(enc, split, n, batch, workers))
    q.put((n / t, f))


RUNTIME_PATHS = (("torch", "full", "serial"), ("torch", "draft", "serial"), ("onnxruntime", "full", "serial"),
                 ("onnxruntime", "full", "ahead"), ("onnxruntime", "draft", "ahead"))


def runtimes(n: int, size: int = 256, rounds: int = 3) -> list[dict]:
    """Images/s of the (runtime, decode, decoding thread) paths of EfficientNet-Lite0 in this process."""
    from crossmodal.perf import keep_freed_memory

    keep_freed_memory()
    split = load_split(SHARED / "coco-mini", "train2017")
    with tempfile.TemporaryDirectory() as cache:
        encs = {(rt, dec): EffNetLite0Regions(size, runtime=rt, decode=dec, cache_dir=cache)
                for rt, dec, _ in RUNTIME_PATHS}
        best, feats = dict.fromkeys(RUNTIME_PATHS, float("inf")), {}
        ours(encs["torch", "full"], split, 8, 4, 0, 0)  # warm-up: first-call allocations, page cache
        for _ in range(rounds):
            for rt, dec, how in RUNTIME_PATHS:  # ahead: the encoder's default (decode_ahead batches)
                enc = encs[rt, dec]
                t, feats[rt, dec, how] = timed(lambda enc=enc, how=how: ours(enc, split, n, 4, 0,
                                                                              0 if how == "serial" else None))
                best[rt, dec, how] = min(best[rt, dec, how], t)
    base, ref = best["torch", "full", "serial"], feats["torch", "full", "serial"]
    out = []
    for (rt, dec, how), t in best.items():
        f = feats[rt, dec, how]
        c = np.sum(f * ref, 1) / (np.linalg.norm(f, axis=1) * np.linalg.norm(ref, axis=1))
        out.append({"runtime": rt, "decode": dec, "decoding": how, "input": size, "img_s": n / t, "speedup": base / t,
                    "cos_min": float(c.min()), "cos_mean": float(c.mean()),
                    "bit_equal_to_ort_serial": bool(np.array_equal(f, feats["onnxruntime", dec, "serial"]))
                    if ("onnxruntime", dec, "serial") in feats else None})
    return out


def print_runtimes(rows: list[dict], n: int) -> None:
    print(f"load average {os.getloadavg()[0]:.1f}")
    print(f"EfficientNet-Lite0, {rows[0]['input']} px, {n} real COCO images, batch 4, 0 decoding workers, "
          f"{torch.get_num_threads()} threads (best of interleaved rounds, one process)")
    print("| runtime | JPEG decoding | decoded | images/s | x today's path | cos to today's (min / mean) | "
          "= ORT serial, bit for bit |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        same = {True: "yes", False: "no", None: "-"}[r["bit_equal_to_ort_serial"]]
        print(f"| {r['runtime']} | {r['decode']} | {r['decoding']} | {r['img_s']:.1f} | {r['speedup']:.2f} | "
              f"{r['cos_min']:.5f} / {r['cos_mean']:.5f} | {same} |")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=130)
    p.add_argument("--frcnn-images", type=int, default=16)
    p.add_argument("--part", choices=["all", "runtimes", "loops"], default="all")
    p.add_argument("--size", type=int, default=256, help="input px of the runtimes part")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the runtimes part (best of)")
    a = p.parse_args(argv)
    if a.part in ("all", "runtimes"):
        rt_rows = in_fresh_process(_runtimes, a.images, a.size, a.rounds)
        print_runtimes(rt_rows, a.images)
        print("saved", save(f"image_runtimes_{a.size}", {"rows": rt_rows, "images": a.images}))
    if a.part == "runtimes":
        return
    rows = []
    configs = {"effnet-lite0": (a.images, [(800, 1, 0), (800, 1, 1), (512, 4, 1), (384, 4, 1), (256, 4, 1),
                                           (256, 4, 0), (224, 4, 1)]),
               "fasterrcnn": (a.frcnn_images, [(800, 1, 0), (800, 4, 1), (600, 1, 0), (480, 1, 0)])}
    for kind, (n, runs) in configs.items():
        base, f_base = in_fresh_process(_measure, kind, 800, 0, n, 0)
        label = kind + (" (random weights)" if kind == "fasterrcnn" else "")
        rows.append((label, "seed-style: 1 at a time, no_grad", 800, base, 1.0, 1.0, 1.0))
        for size, batch, workers in runs:
            r, f = in_fresh_process(_measure, kind, size, batch, n, workers)
            rows.append((label, f"ours: batch {batch}, {workers} decoding worker(s)", size, r, r / base,
                         cos(f, f_base), knn_overlap(f, f_base, k=5 if n > 50 else 3)))
    print("| encoder | loop | input px | images/s | x seed-style | cos to seed-style 800 px | kNN@5 overlap |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.2f} |")
    keys = ("encoder", "loop", "input", "img_s", "speedup", "cos", "knn")
    print("saved", save("image_throughput", {"rows": [dict(zip(keys, r, strict=True)) for r in rows],
                                             "images": a.images, "frcnn_images": a.frcnn_images}))


if __name__ == "__main__":
    main()
