"""The whole pipeline on full COCO on this machine, estimated from per-stage rates.

Full COCO: 123,287 images and 616,767 captions; the four models (img2text / text2img x
fastText / MiniLM) train on the Karpathy train+restval split (113,287 images, 566,747
captions) for 30 epochs each, validating every epoch on 5,000 images x 25,000 captions.
Each rate is measured here, in this process, on:

- real inputs (``../shared/data``): EfficientNet-Lite0 at 256 px on coco-mini's images
  (decode + encode, the extraction loop); MiniLM and fastText on real COCO captions;
- synthetic inputs of full-COCO shape: training steps on random features of the real
  dimensions (bench.train_throughput's loop), the per-epoch validation metrics on 5K x 25K,
  the heads' embedding of every row.

"before" is the pipeline's defaults when issue 16 was filed, "now" its defaults after issue 16
(Lite0 at 256 px, MiniLM, 384-d captions: the feature settings before the Flickr8k defaults of
384 px and all-mpnet-base-v2, which take longer: docs/runtimes.md), every
stage of both timed in this process, interleaved where they differ (median of ``--rounds``):
images through PyTorch with full-size JPEG decoding (before) and the default image encoder;
MiniLM through PyTorch (before) and the default caption runtime; the training loop as it ran
(``--step exact``, float32) and the default training-step settings (crossmodal/train_step.py);
validation from one sweep of the similarity matrix per direction (before) or one for both;
full-COCO galleries indexed flat (before) or by the default rule (IVF from 100K vectors).
The sums are "before" and "now", and their ratio is printed.

    python -m bench.full_coco [--images 128] [--captions 1000] [--train-steps 60] [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import SHARED, save

N_IMG, N_CAP = 123_287, 616_767
N_TRAIN_IMG, N_TRAIN_CAP = 113_287, 566_747
N_VAL_IMG, N_VAL_CAP = 5_000, 25_000
EPOCHS, MODELS = 30, 4


def _image_rates(n: int, rounds: int) -> dict:
    """Images/s of the extraction loop (decode, preprocess, EfficientNet-Lite0 at 256 px, batch 4)
    on ``n`` real images: PyTorch with full-size decoding (the default when issue 16 was filed)
    and today's default encoder, interleaved, median of ``rounds``."""
    from bench.image_throughput import ours
    from crossmodal.coco import load_split
    from crossmodal.image_encoders import EffNetLite0Regions

    split = load_split(SHARED / "coco-mini", "train2017")
    encs = {"img_torch": EffNetLite0Regions(256, runtime="torch", decode="full"),
            "img_default": EffNetLite0Regions(256)}
    t: dict[str, list[float]] = {k: [] for k in encs}
    for enc in encs.values():
        ours(enc, split, 4, 4, 0)  # warm-up
    for _ in range(rounds):
        for k, enc in encs.items():
            t0 = time.perf_counter()
            ours(enc, split, n, 4, 0)
            t[k].append(n / (time.perf_counter() - t0))
    return {**{k: float(np.median(v)) for k, v in t.items()}, "img_default_runtime": encs["img_default"].runtime}


def _caption_rates(n: int, rounds: int) -> dict[str, float]:
    """Captions/s of MiniLM through PyTorch and ONNX Runtime (interleaved, median), and fastText
    encoding; on real COCO captions."""
    from bench.text_runtimes import _captions
    from crossmodal.text_encoders import BertEncoder

    caps = _captions(n)
    encs = {"torch": BertEncoder(runtime="torch"), "onnxruntime": BertEncoder(runtime="auto")}
    rates: dict[str, list[float]] = {k: [] for k in encs}
    for e in encs.values():
        e.encode(caps[:128])
    for _ in range(rounds):
        for k, e in encs.items():
            t0 = time.perf_counter()
            e.encode(caps)
            rates[k].append(len(caps) / (time.perf_counter() - t0))
    out = {f"minilm_{k}": float(np.median(v)) for k, v in rates.items()}
    out["minilm_default_runtime"] = encs["onnxruntime"].runtime
    return out


def _fasttext(n: int) -> tuple[float, float]:
    """(seconds per training caption, captions/s encoded): fastText 300-d, 10 epochs, trained on
    ``n`` real captions (training time grows linearly with the corpus)."""
    from crossmodal.coco import CaptionSplit, load_split
    from crossmodal.text_encoders import FastTextEncoder, train_fasttext

    full = load_split(SHARED / "coco-captions-val2017", "val2017")
    caps = full.captions[:n]
    sub = CaptionSplit("bench", full.image_dir, full.image_ids, full.file_names, full.caption_ids[:n],
                       full.caption_image_ids[:n], caps, full.source)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = train_fasttext(sub, Path(d), dim=300, epoch=10, bucket=200_000)
        per_cap = (time.perf_counter() - t0) / n
        enc = FastTextEncoder(path)
        t0 = time.perf_counter()
        enc.encode(caps)
        return per_cap, n / (time.perf_counter() - t0)


def _train_epoch_s(steps: int, rounds: int) -> dict[str, float]:
    """Seconds per training epoch (566,747 triplets: Karpathy train+restval, 1.37x the 414,113 of
    train2014 that BENCHMARKS.md's training table counts) for fastText (300-d) and MiniLM (384-d)
    captions, from ``steps`` timed steps of the project's loop on random features with the
    default image encoder's 1,280 dimensions: the loop as it ran (``--step exact``, float32:
    "before") and with today's default training-step settings ("now"), interleaved, median of
    ``rounds``; also this process's float32 matmul GFLOP/s measured just before, and the % of it
    each loop reached (a loaded machine lowers both alike)."""
    from bench.train_throughput import interleaved, matmul_gflops
    from crossmodal.train import DEFAULTS
    from crossmodal.train_step import DEFAULT_PRECISION, DEFAULT_STEP

    out: dict = {"matmul_gflops": matmul_gflops(), "load": os.getloadavg()[0],
                 "default_setting": f"--step {DEFAULT_STEP} --precision {DEFAULT_PRECISION}"}
    settings = {"before": ["--step", "exact", "--precision", "fp32"], "now": []}
    for name, d, enc in (("fasttext", 300, "fasttext"), ("minilm", 384, "bert")):
        res = interleaved(d, DEFAULTS[enc]["negatives"], steps, rounds, settings, d_img=1280)
        for k, (rate, _, gflops) in res.items():
            out[f"{name}_{k}"], out[f"{name}_{k}_peak_pct"] = N_TRAIN_CAP / rate, 100 * gflops / out["matmul_gflops"]
    return out


def _validation_s(rounds: int) -> dict[str, float]:
    """Seconds of one validation (R@K, mAP on 5K x 25K, both directions): one sweep of the
    similarity matrix (now) against one per direction (before), interleaved, median."""
    from bench.metrics_bench import data
    from crossmodal.metrics import evaluate, img2text_relevance, relevant_ranks, text2img_relevance

    img, txt, rows = data(N_VAL_IMG)
    p1, i1 = img2text_relevance(rows, N_VAL_IMG)
    p2, i2 = text2img_relevance(rows)
    t = {"two_sweeps": [], "one_sweep": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        relevant_ranks(img, txt, p1, i1)
        relevant_ranks(txt, img, p2, i2)
        t["two_sweeps"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        evaluate(img, txt, rows)
        t["one_sweep"].append(time.perf_counter() - t0)
    return {k: float(np.median(v)) for k, v in t.items()}


def _embed_s() -> float:
    """Seconds to embed every image and caption of full COCO through trained heads (one model),
    scaled from 50,000 rows of each."""
    import torch

    from crossmodal.heads import ProjectionHead
    from crossmodal.train import embed_bank

    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    embed_bank(ProjectionHead(1280), torch.from_numpy(rng.standard_normal((50_000, 1280), dtype=np.float32)))
    t_img = (time.perf_counter() - t0) / 50_000
    t0 = time.perf_counter()
    embed_bank(ProjectionHead(384), torch.from_numpy(rng.standard_normal((50_000, 384), dtype=np.float32)))
    t_cap = (time.perf_counter() - t0) / 50_000
    return t_img * N_IMG + t_cap * N_CAP


def _index_s() -> dict[str, float]:
    """Seconds to build one model's two gallery indexes over all of full COCO (123K images, 617K
    captions; random unit vectors, 128-d): exact flat (before) and the default rule (now: IVF from
    100K vectors, :func:`crossmodal.index.auto_kind`, whose k-means dominates)."""
    from crossmodal.index import build_index

    rng = np.random.default_rng(0)
    out = {}
    for kind in ("flat", "auto"):
        t0 = time.perf_counter()
        for n in (N_IMG, N_CAP):
            x = rng.standard_normal((n, 128), dtype=np.float32)
            build_index(x / np.linalg.norm(x, axis=1, keepdims=True), kind)
        out[kind] = time.perf_counter() - t0
    return out


def estimate(r: dict) -> list[tuple[str, str, float, float]]:
    """Rows (stage, work, minutes before, minutes now) from the measured rates ``r``."""
    m = 60.0
    t, val = r["train_epoch_s"], r["validation_s"]
    train_before = 2 * EPOCHS * (t["fasttext_before"] + t["minilm_before"]) + MODELS * EPOCHS * val["two_sweeps"]
    train_now = 2 * EPOCHS * (t["fasttext_now"] + t["minilm_now"]) + MODELS * EPOCHS * val["one_sweep"]
    return [
        ("image features", f"{N_IMG:,} images, EfficientNet-Lite0 256 px", N_IMG / r["img_torch"] / m,
         N_IMG / r["img_default"] / m),
        ("MiniLM captions", f"{N_CAP:,} captions", N_CAP / r["minilm_torch"] / m, N_CAP / r["minilm_onnxruntime"] / m),
        ("fastText", f"train on {N_TRAIN_CAP:,}, encode {N_CAP:,}",
         (N_TRAIN_CAP * r["fasttext_train_s_per_cap"] + N_CAP / r["fasttext_caps_s"]) / m,
         (N_TRAIN_CAP * r["fasttext_train_s_per_cap"] + N_CAP / r["fasttext_caps_s"]) / m),
        ("training + validation", f"{MODELS} models x {EPOCHS} epochs of {N_TRAIN_CAP:,} triplets, validated "
         "each epoch", train_before / m, train_now / m),
        ("embeddings + indexes + scoring", f"{MODELS} models: embed and index {N_IMG:,} + {N_CAP:,}, score 5K",
         MODELS * (r["embed_s"] + r["index_s"]["flat"] + val["two_sweeps"]) / m,
         MODELS * (r["embed_s"] + r["index_s"]["auto"] + val["one_sweep"]) / m),
    ]


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=128)
    p.add_argument("--captions", type=int, default=1000)
    p.add_argument("--fasttext-captions", type=int, default=5000)
    p.add_argument("--train-steps", type=int, default=60)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--notes", default=None, help="also append the table to this Markdown file")
    a = p.parse_args(argv)
    from crossmodal.cli import set_threads

    set_threads()
    load0 = os.getloadavg()[0]
    r: dict = _image_rates(a.images, a.rounds)
    r.update(_caption_rates(a.captions, a.rounds))
    r["fasttext_train_s_per_cap"], r["fasttext_caps_s"] = _fasttext(a.fasttext_captions)
    r["train_epoch_s"] = _train_epoch_s(a.train_steps, a.rounds)
    r["validation_s"] = _validation_s(a.rounds)
    r["embed_s"] = _embed_s()
    r["index_s"] = _index_s()
    r["load"] = [load0, os.getloadavg()[0]]
    rows = estimate(r)
    before, now = sum(x[2] for x in rows), sum(x[3] for x in rows)
    t = r["train_epoch_s"]
    lines = [f"1-min load at start / end: {load0:.1f} / {r['load'][1]:.1f} (2 cores)",
             f"rates: images {r['img_torch']:.1f}/s PyTorch, {r['img_default']:.1f}/s {r['img_default_runtime']} "
             f"({r['img_default'] / r['img_torch']:.2f}x); MiniLM {r['minilm_torch']:.0f}/s PyTorch, "
             f"{r['minilm_onnxruntime']:.0f}/s {r['minilm_default_runtime']} "
             f"({r['minilm_onnxruntime'] / r['minilm_torch']:.2f}x); fastText encode {r['fasttext_caps_s']:.0f}/s, "
             f"train {1e6 * r['fasttext_train_s_per_cap']:.0f} us/caption; "
             f"epoch of {N_TRAIN_CAP:,} triplets (fastText / MiniLM) {t['fasttext_before']:.0f} / "
             f"{t['minilm_before']:.0f} s --step exact fp32 at {t['fasttext_before_peak_pct']:.0f}% / "
             f"{t['minilm_before_peak_pct']:.0f}%, {t['fasttext_now']:.0f} / {t['minilm_now']:.0f} s "
             f"{t['default_setting']} at {t['fasttext_now_peak_pct']:.0f}% / {t['minilm_now_peak_pct']:.0f}% "
             f"({t['minilm_before'] / t['minilm_now']:.2f}x MiniLM) of this process's float32 matmul rate "
             f"({t['matmul_gflops']:.0f} GFLOP/s, load {t['load']:.1f}); validation "
             f"{r['validation_s']['two_sweeps']:.2f} s -> {r['validation_s']['one_sweep']:.2f} s; one model's two "
             f"full-COCO indexes {r['index_s']['flat']:.1f} s flat, {r['index_s']['auto']:.1f} s by the rule (IVF)",
             "", "| stage | work | before (min) | now (min) |", "|---|---|---|---|"]
    lines += [f"| {s} | {w} | {b:.0f} | {n:.0f} |" for s, w, b, n in rows]
    lines += [f"| **whole pipeline** | | **{before:.0f}** | **{now:.0f}** |", "",
              f"the whole pipeline on full COCO on this machine: {now:.0f} min (issue 16's defaults: {before:.0f} "
              f"min; now / before = {now / before:.2f})"]
    print("\n".join(lines))
    if a.notes:
        with open(a.notes, "a") as f:
            f.write("\n" + "\n".join(lines) + "\n")
    save("full_coco", {**r, "rows": rows, "before_min": before, "now_min": now})


if __name__ == "__main__":
    main()
