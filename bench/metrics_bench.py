"""The full metric suite (both directions: P@1, P@5, mAP, R@1/5/10, medr, meanr, PR curves)
on 5,000 images x 25,000 captions of random 128-d vectors, against (a) the similarity matmul
alone and (b) a seed-style evaluation (scikit-learn brute-force neighbours over the whole
gallery, i.e. a full sort, then the metrics from the sorted lists), each in a fresh process
for its peak memory. First, the suite and the matmul timed in one process, interleaved (the
ratio to read on a shared machine). Then a 40,000 x 200,000 gallery through the same code, with
its peak memory.

    python -m bench.metrics_bench [--skip-large]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.common import in_fresh_process, peak_rss_mb, save


def data(n_img: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, 128), dtype=np.float32)
    txt = rng.standard_normal((5 * n_img, 128), dtype=np.float32)
    img /= np.linalg.norm(img, axis=1, keepdims=True)
    txt /= np.linalg.norm(txt, axis=1, keepdims=True)
    return img, txt, np.repeat(np.arange(n_img), 5)


def _matmul(n_img, q):
    import torch

    img, txt, _ = data(n_img)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    torch.from_numpy(img) @ torch.from_numpy(txt).T
    q.put((time.perf_counter() - t0, peak_rss_mb() - base, None))


def _ours(n_img, q):
    from crossmodal.metrics import evaluate

    img, txt, rows = data(n_img)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    m = evaluate(img, txt, rows, with_curves=True)
    q.put((time.perf_counter() - t0, peak_rss_mb() - base, {k: v for k, v in m.items() if not k.endswith("_pr")}))


def _seed_style(n_img, q):
    from sklearn.neighbors import NearestNeighbors

    img, txt, rows = data(n_img)
    base = peak_rss_mb()
    t0 = time.perf_counter()
    m = {}
    for d, xq, xb in (("img2text", img, txt), ("text2img", txt, img)):
        nn = NearestNeighbors(n_neighbors=len(xb), algorithm="brute", metric="cosine").fit(xb)
        _, order = nn.kneighbors(xq)  # (Q, G): the full sorted gallery per query
        rel = rows[order] == np.arange(len(xq))[:, None] if d == "img2text" else order == rows[:, None]
        hits = np.cumsum(rel, axis=1)
        ranks1 = np.arange(1, rel.shape[1] + 1)
        m[f"{d}_P@1"] = float(np.mean(hits[:, 0]))
        m[f"{d}_P@5"] = float(np.mean(hits[:, 4] / 5))
        m[f"{d}_mAP"] = float(np.mean((rel * hits / ranks1).sum(1) / rel.sum(1)))
        first = rel.argmax(1)
        for k in (1, 5, 10):
            m[f"{d}_R@{k}"] = float(100 * np.mean(first < k))
        del order, rel, hits
    q.put((time.perf_counter() - t0, peak_rss_mb() - base, m))


def interleaved(n_img: int = 5000, rounds: int = 3) -> list[tuple[float, float, float]]:
    """(load, matmul s, full suite s) per round, both timed in this process, A B A B ...: the
    ratio of each round is what to read on a shared machine."""
    import os

    import torch

    from crossmodal.metrics import evaluate

    img, txt, rows = data(n_img)
    ti, tt = torch.from_numpy(img), torch.from_numpy(txt)
    evaluate(img[:500], txt[:2500], rows[:2500])  # warm-up
    out = []
    for _ in range(rounds):
        load = os.getloadavg()[0]
        t0 = time.perf_counter()
        ti @ tt.T
        t_mm = time.perf_counter() - t0
        t0 = time.perf_counter()
        evaluate(img, txt, rows, with_curves=True)
        out.append((load, t_mm, time.perf_counter() - t0))
    return out


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--skip-large", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    # fresh processes first: a child starts with its parent's peak RSS (Linux keeps the high-water
    # mark across fork and exec), so after the interleaved rounds their growth would read as 0 MB
    t_mm, mem_mm, _ = in_fresh_process(_matmul, 5000)
    t_ours, mem_ours, m_ours = in_fresh_process(_ours, 5000)
    t_seed, mem_seed, m_seed = in_fresh_process(_seed_style, 5000)
    big = None if a.skip_large else in_fresh_process(_ours, 40_000)
    rounds = interleaved(5000, a.rounds)
    print("interleaved in one process (5,000 x 25,000; matmul, full suite, matmul, ...):")
    for load, t_mm_r, t_ours_r in rounds:
        print(f"  load {load:.1f}: matmul {t_mm_r:.2f} s, full suite {t_ours_r:.2f} s, ratio {t_ours_r / t_mm_r:.2f}x")
    ratios = sorted(r[2] / r[1] for r in rounds)
    print(f"full suite / matmul, median of {len(rounds)} rounds: {ratios[len(ratios) // 2]:.2f}x")
    agree = max(abs(m_ours[k] - m_seed[k]) for k in m_seed)
    rows = [("similarity matmul alone (5k x 25k)", t_mm, mem_mm), ("ours: full suite, both directions", t_ours,
            mem_ours), ("seed-style: sklearn brute kNN + full sort", t_seed, mem_seed)]
    print("| 5,000 images x 25,000 captions | seconds | extra peak RSS MB |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.2f} | {r[2]:.0f} |")
    print(f"ours / matmul = {t_ours / t_mm:.1f}x; seed-style / ours = {t_seed / t_ours:.1f}x; "
          f"max metric difference ours vs seed-style: {agree:.2e}")
    out = {"interleaved": [dict(zip(("load", "matmul_s", "suite_s"), r, strict=True)) for r in rounds],
           "matmul_s": t_mm, "ours_s": t_ours, "seed_s": t_seed, "mem_mb": {"matmul": mem_mm, "ours": mem_ours,
           "seed": mem_seed}, "max_metric_diff": agree}
    if big is not None:
        t_big, mem_big, m_big = big
        print(f"40,000 x 200,000: {t_big:.0f} s, extra peak RSS {mem_big:.0f} MB "
              f"(R@1 i2t {m_big['img2text_R@1']:.3f}, chance level)")
        out.update(large_s=t_big, large_mem_mb=mem_big)
    save("metrics_bench", out)


if __name__ == "__main__":
    main()
