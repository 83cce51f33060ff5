"""Captions/s of the caption encoders on ~24k real captions
(../shared/data/coco-captions-val2017), with the peak memory of each measurement (each runs in
a fresh process). BERT batched (sorted by length) is compared in the same run with BERT one
caption at a time (on a sample), the seed-style loop.

    python -m bench.text_throughput [--single-sample 1000]
"""

from __future__ import annotations

import argparse
import time

from bench.common import SHARED, in_fresh_process, peak_rss_mb, save


def _captions():
    from crossmodal.coco import load_split

    return load_split(SHARED / "coco-captions-val2017", "val2017").captions


def _bert(batch: int, n: int | None, q):
    from crossmodal.text_encoders import BertEncoder

    caps = _captions()[:n] if n else _captions()
    enc = BertEncoder()
    base = peak_rss_mb()
    t0 = time.perf_counter()
    if batch == 1:
        for c in caps:
            enc.encode([c], batch_size=1)
    else:
        enc.encode(caps, batch_size=batch)
    q.put((len(caps) / (time.perf_counter() - t0), peak_rss_mb(), peak_rss_mb() - base))


def _fasttext(q):
    import tempfile
    from pathlib import Path

    from crossmodal.coco import load_split
    from crossmodal.text_encoders import FastTextEncoder, train_fasttext

    train = load_split(SHARED / "coco-mini", "train2017")
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        path = train_fasttext(train, Path(d), dim=300, epoch=10, bucket=200_000)
        t_train = time.perf_counter() - t0
        enc = FastTextEncoder(path)
        caps = _captions()
        base = peak_rss_mb()
        t0 = time.perf_counter()
        enc.encode(caps)
        q.put((len(caps) / (time.perf_counter() - t0), peak_rss_mb(), peak_rss_mb() - base, t_train))


def main(argv=None):
    a = argparse.ArgumentParser()
    a.add_argument("--single-sample", type=int, default=1000)
    a = a.parse_args(argv)
    n_all = len(_captions())
    rows = []
    r1 = in_fresh_process(_bert, 1, a.single_sample)
    rows.append(("BERT (MiniLM-L6) one at a time", a.single_sample, *r1[:3], 1.0))
    for b in (64, 256):
        rb = in_fresh_process(_bert, b, None)
        rows.append((f"BERT (MiniLM-L6) batched {b}, length-sorted", n_all, *rb[:3], rb[0] / r1[0]))
    rf = in_fresh_process(_fasttext)
    rows.append(("fastText 300-d sentence vectors", n_all, *rf[:3], float("nan")))
    print("| encoder | captions | captions/s | peak RSS MB | RSS growth MB | x one-at-a-time |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | {r[5]:.1f} |")
    print(f"fastText training (650 coco-mini captions, 10 epochs, 300-d): {rf[3]:.1f} s")
    save("text_throughput", {"rows": [dict(zip(("encoder", "n", "caps_s", "peak_rss_mb", "rss_growth_mb", "speedup"),
                                                 r, strict=True)) for r in rows], "fasttext_train_s": rf[3]})


if __name__ == "__main__":
    main()
