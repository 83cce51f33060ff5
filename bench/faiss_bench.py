"""Faiss query latency and QPS for flat, IVF and HNSW indexes over 128-d L2-normalised
vectors (inner product), with recall@10 against exact search.

    python -m bench.faiss_bench [--gallery 200000] [--queries 2000]

The gallery is clustered (like real embeddings), not uniform on the sphere.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import save
from crossmodal.index import build_index, describe, search


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--gallery", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=2000)
    a = p.parse_args(argv)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((1000, 128)).astype(np.float32)
    xb = centres[rng.integers(0, 1000, a.gallery)] + 0.5 * rng.standard_normal((a.gallery, 128), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(a.gallery, a.queries, replace=False)] + 0.1 * rng.standard_normal((a.queries, 128),
                                                                                        dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)
    rows = []
    truth = None
    # "auto": the pipeline's default rule by gallery size (crossmodal.index.auto_kind), as it builds it
    for kind, kw in (("flat", {}), ("auto", {}), ("ivf", {"nprobe": 8}), ("ivf", {"nprobe": 32}),
                     ("hnsw", {"ef_search": 64}), ("hnsw", {"ef_search": 256})):
        t0 = time.perf_counter()
        index = build_index(xb, kind, **kw)
        t_build = time.perf_counter() - t0
        t0 = time.perf_counter()
        _, I = search(index, xq, 10)
        t_batch = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(100):
            search(index, xq[i : i + 1], 10)
        lat_ms = (time.perf_counter() - t0) / 100 * 1000
        if truth is None:
            truth = I
        recall = float(np.mean([len(set(x) & set(y)) / 10 for x, y in zip(I, truth, strict=True)]))
        rows.append((kind, describe(index), t_build, a.queries / t_batch, lat_ms, recall))
    print(f"| index ({a.gallery:,} x 128) | params | build s | QPS (batch) | latency ms (1 query) | recall@10 |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        params = {k: v for k, v in r[1].items() if k in ("nlist", "nprobe", "M", "efSearch")}
        kind = f"auto ({describe_kind(r[1])})" if r[0] == "auto" else r[0]
        print(f"| {kind} | {params or '-'} | {r[2]:.1f} | {r[3]:.0f} | {r[4]:.2f} | {r[5]:.3f} |")
    save("faiss_bench", {"gallery": a.gallery, "queries": a.queries, "rows": [
        {"kind": r[0], "index": r[1], "build_s": r[2], "qps": r[3], "latency_ms": r[4], "recall10": r[5]}
        for r in rows]})


def describe_kind(d: dict) -> str:
    return {"IndexFlatIP": "flat", "IndexIVFFlat": "ivf", "IndexHNSWFlat": "hnsw"}.get(d["type"], d["type"])


if __name__ == "__main__":
    main()
