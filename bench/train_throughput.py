"""Training throughput (triplets/s) on features of full-COCO-train size (82,783 images,
414,113 captions; random vectors of the real dims), against a seed-style loop measured in the
same run: per-sample ``Dataset.__getitem__`` through a ``DataLoader`` of batch 32. Also the
achieved GFLOP/s against this machine's own float32 matmul GFLOP/s.

    python -m bench.train_throughput [--steps 300]

Seconds per epoch are extrapolated from ``--steps`` timed steps (after a warm-up).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from bench.common import save
from crossmodal.heads import random_negative_loss
from crossmodal.train import Pairs, Trainer, build_parser
from crossmodal.triplets import TripletCOCO_Img2Text

N_IMG, N_CAP = 82_783, 414_113


def matmul_gflops(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def head_flops(d_in: int, hidden: int = 1024, out: int = 128) -> int:
    """Forward multiply-adds x2 per row of one head."""
    return 2 * (d_in * hidden + hidden * out)


def step_flops(d_img: int, d_txt: int, batch: int, negatives: str) -> float:
    """Forward + backward (~3x forward) FLOPs of one img2text step."""
    if negatives == "random":  # anchor image, positive and negative caption
        fwd = batch * (head_flops(d_img) + 2 * head_flops(d_txt))
    else:  # one image and one caption per pair, plus the B x B similarity
        fwd = batch * (head_flops(d_img) + head_flops(d_txt)) + 2 * batch * batch * 128
    return 3.0 * fwd


def ours(d_txt: int, negatives: str, steps: int, batch: int = 128, d_img: int = 1024):
    """(triplets/s, s/epoch of N_CAP triplets, GFLOP/s) of the project's loop; image features ``d_img``-d."""
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.standard_normal((N_IMG, d_img), dtype=np.float32))
    txt = torch.from_numpy(rng.standard_normal((N_CAP, d_txt), dtype=np.float32))
    rows = np.repeat(np.arange(N_IMG), 5)
    rows = np.concatenate([rows, rng.integers(0, N_IMG, N_CAP - len(rows))])
    args = build_parser("img2text", "fasttext").parse_args(["--features-dir", ".", "--negatives", negatives,
                                                            "--batch-size", str(batch)])
    tr = Trainer(args, Pairs(img, txt, rows, {}, {}, np.ones(N_CAP, bool)), None, torch.device("cpu"))
    epoch_idx = {"img2text": tr.i2t.epoch_indices(0)} if negatives == "random" else {}
    perm = np.random.default_rng(1).permutation(N_CAP)

    def step(s):
        b = perm[s * batch : (s + 1) * batch]
        loss = tr._loss(b, epoch_idx)
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()

    for s in range(10):
        step(s)
    t0 = time.perf_counter()
    for s in range(10, 10 + steps):
        step(s)
    dt = (time.perf_counter() - t0) / steps
    return batch / dt, dt * N_CAP / batch, step_flops(d_img, d_txt, batch, negatives) / dt / 1e9


def seed_style(d_txt: int, steps: int, batch: int = 32):
    rng = np.random.default_rng(0)
    img = rng.standard_normal((N_IMG, 1024), dtype=np.float32)
    txt = rng.standard_normal((N_CAP, d_txt), dtype=np.float32)
    rows = np.concatenate([np.repeat(np.arange(N_IMG), 5), rng.integers(0, N_IMG, N_CAP - 5 * N_IMG)])
    ds = TripletCOCO_Img2Text(rows, N_IMG, img_feats=img, text_feats=txt)
    from crossmodal.heads import ProjectionHead

    hi, ht = ProjectionHead(1024), ProjectionHead(d_txt)
    opt = torch.optim.Adam(list(hi.parameters()) + list(ht.parameters()), lr=1e-3)
    loader = DataLoader(ds, batch_size=batch, shuffle=True)
    it = iter(loader)
    t0 = None
    for s in range(steps + 5):
        if s == 5:
            t0 = time.perf_counter()
        a, p, n = next(it)
        loss = random_negative_loss(hi(a), ht(p), ht(n))
        opt.zero_grad()
        loss.backward()
        opt.step()
    dt = (time.perf_counter() - t0) / steps
    return batch / dt, dt * N_CAP / batch, step_flops(1024, d_txt, batch, "random") / dt / 1e9


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    a = p.parse_args(argv)
    peak = matmul_gflops()
    print(f"machine float32 matmul: {peak:.0f} GFLOP/s ({torch.get_num_threads()} threads)")
    rows = []
    for d_txt, label in ((300, "fastText 300"), (384, "BERT MiniLM 384"), (768, "BERT base 768")):
        base = seed_style(d_txt, a.steps)
        rows.append((label, "seed-style DataLoader, batch 32, random negs", *base, 1.0))
        for neg in ("random", "hardest"):
            r = ours(d_txt, neg, a.steps)
            rows.append((label, f"tensor-indexed batch 128, {neg} negs", *r, r[0] / base[0]))
    print("| captions | loop | triplets/s | s/epoch | GFLOP/s | % of matmul | x seed-style |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {100 * r[4] / peak:.0f}% | {r[5]:.1f} |")
    save("train_throughput", {"matmul_gflops": peak, "rows": [
        dict(zip(("text", "loop", "triplets_s", "s_epoch", "gflops", "speedup"), r, strict=True)) for r in rows]})


if __name__ == "__main__":
    main()
