"""Caption encoding runtimes in one process, interleaved (A B C A B C ...): the project's
BertEncoder (MiniLM-L6) through PyTorch, ONNX Runtime fp32 (the CPU default when installed) and
ONNX Runtime int8 (opt-in), on real COCO captions (../shared/data/coco-captions-val2017),
length-sorted batches. Each rate is reported as a ratio to PyTorch in the same round, with the
machine's load beside it; int8's change of the vectors as cosine to fp32 and caption-to-caption
kNN@10 overlap (its retrieval cost is measured by ``python -m bench.cv_defaults``).

    python -m bench.text_runtimes [--n 4000] [--rounds 3] [--batch-size 128]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from bench.common import SHARED, save


def _captions(n: int) -> list[str]:
    from crossmodal.coco import load_split

    caps = load_split(SHARED / "coco-captions-val2017", "val2017").captions
    return list(np.random.default_rng(0).permutation(np.asarray(caps, dtype=object))[:n])


def knn_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> float:
    """Mean share of each row's k nearest rows (cosine, itself excluded) that two encodings agree on."""
    def knn(x):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        s = x @ x.T
        np.fill_diagonal(s, -np.inf)
        return np.argpartition(-s, k, axis=1)[:, :k]

    ka, kb = knn(a), knn(b)
    return float(np.mean([len(np.intersect1d(x, y)) / k for x, y in zip(ka, kb, strict=True)]))


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-int8", action="store_true")
    a = p.parse_args(argv)
    from crossmodal.cli import set_threads
    from crossmodal.text_encoders import BertEncoder

    set_threads()
    caps = _captions(a.n)
    cache = tempfile.mkdtemp(prefix="text_runtimes_")
    encs = {"torch": BertEncoder(runtime="torch"), "onnxruntime fp32": BertEncoder(runtime="onnxruntime",
                                                                                    cache_dir=cache)}
    if not a.no_int8:
        encs["onnxruntime int8"] = BertEncoder(precision="int8", cache_dir=cache)
    for e in encs.values():
        e.encode(caps[:256], batch_size=a.batch_size)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in encs}
    out: dict[str, np.ndarray] = {}
    loads = []
    for _ in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for name, e in encs.items():
            t0 = time.perf_counter()
            out[name] = e.encode(caps, batch_size=a.batch_size)
            rates[name].append(len(caps) / (time.perf_counter() - t0))
    ratios = {k: [r / t for r, t in zip(v, rates["torch"], strict=True)] for k, v in rates.items()}
    print(f"{len(caps)} real COCO captions, batch {a.batch_size}, length-sorted, {a.rounds} interleaved rounds; "
          f"1-min load at each round's start: {', '.join(f'{x:.1f}' for x in loads)} (2 cores)")
    print("| runtime | captions/s (median) | x PyTorch, per round | min cosine to PyTorch | kNN@10 overlap |")
    print("|---|---|---|---|---|")
    res = {}
    for name in encs:
        cos = cosines(out["torch"], out[name])
        ov = knn_overlap(out["torch"], out[name]) if name != "torch" else 1.0
        print(f"| {name} | {np.median(rates[name]):.0f} | {', '.join(f'{r:.2f}' for r in ratios[name])} | "
              f"{cos.min():.5f} (mean {cos.mean():.4f}) | {ov:.3f} |")
        res[name] = {"caps_s": rates[name], "ratio": ratios[name], "min_cos": float(cos.min()),
                     "mean_cos": float(cos.mean()), "knn10_overlap": ov}
    save("text_runtimes", {"n": len(caps), "batch_size": a.batch_size, "load": loads, "runtimes": res})


if __name__ == "__main__":
    main()
