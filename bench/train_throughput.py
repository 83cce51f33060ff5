"""Training throughput (triplets/s) on features of full-COCO-train size (82,783 images,
414,113 captions; random vectors of the real dims), against a seed-style loop measured in the
same run: per-sample ``Dataset.__getitem__`` through a ``DataLoader`` of batch 32. Also the
achieved GFLOP/s against this machine's own float32 (and bfloat16) matmul GFLOP/s.

The project's loop is timed in each training-step setting (crossmodal/train_step.py): ``--step
exact`` (the loop as it always ran, bit for bit), ``--step fast`` and ``--step fast --precision
bf16``, interleaved in one process over ``--rounds`` rounds (median), on the same features, so
their ratio does not depend on what else the machine is doing.

    python -m bench.train_throughput [--steps 200] [--rounds 3]

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
# training-step settings compared (crossmodal/train_step.py); "exact" is the loop before they existed; the
# default is --step fast --precision auto (bf16 where the CPU has native bfloat16 matmuls)
SETTINGS = {"exact": ["--step", "exact", "--precision", "fp32"], "fast": ["--step", "fast", "--precision", "fp32"],
            "fast+bf16": ["--step", "fast", "--precision", "bf16"]}


def matmul_gflops(n: int = 2048, reps: int = 10, dtype=torch.float32) -> float:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
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


def features(d_txt: int, d_img: int = 1024) -> Pairs:
    """Random features of full-COCO-train shape: (N_IMG, d_img) images, (N_CAP, d_txt) captions."""
    rng = np.random.default_rng(0)
    img = torch.from_numpy(rng.standard_normal((N_IMG, d_img), dtype=np.float32))
    txt = torch.from_numpy(rng.standard_normal((N_CAP, d_txt), dtype=np.float32))
    rows = np.repeat(np.arange(N_IMG), 5)
    rows = np.concatenate([rows, rng.integers(0, N_IMG, N_CAP - len(rows))])
    return Pairs(img, txt, rows, {}, {}, np.ones(N_CAP, bool))


def loop(pairs: Pairs, negatives: str, batch: int = 128, argv=()):
    """One step of the project's loop (:class:`Trainer`, img2text, the flags ``argv``): a function
    of the step number, after 10 warm-up steps."""
    args = build_parser("img2text", "fasttext").parse_args(["--features-dir", ".", "--negatives", negatives,
                                                            "--batch-size", str(batch), *argv])
    tr = Trainer(args, pairs, None, torch.device("cpu"))
    tr.heads.start_epoch(args.seed, 0)
    tr.img_head.train(), tr.txt_head.train()
    epoch_idx = {"img2text": tr.i2t.epoch_indices(0)} if negatives == "random" else {}
    perm = np.random.default_rng(1).permutation(len(pairs.txt))

    def step(s):
        b = perm[(s * batch) % (len(perm) - batch):][:batch]
        loss = tr._loss(b, epoch_idx)
        tr.opt.zero_grad(set_to_none=True)
        loss.backward()
        tr.opt.step()

    for s in range(10):
        step(s)
    return step


def timed(step, steps: int, start: int = 10) -> float:
    """Seconds per step over ``steps`` steps."""
    t0 = time.perf_counter()
    for s in range(start, start + steps):
        step(s)
    return (time.perf_counter() - t0) / steps


def rates(dt: float, d_img: int, d_txt: int, negatives: str, batch: int = 128) -> tuple[float, float, float]:
    """(triplets/s, s/epoch of N_CAP triplets, GFLOP/s) from seconds per step."""
    return batch / dt, dt * N_CAP / batch, step_flops(d_img, d_txt, batch, negatives) / dt / 1e9


def ours(d_txt: int, negatives: str, steps: int, batch: int = 128, d_img: int = 1024, argv=()):
    """(triplets/s, s/epoch of N_CAP triplets, GFLOP/s) of the project's loop with flags ``argv``."""
    return rates(timed(loop(features(d_txt, d_img), negatives, batch, argv), steps), d_img, d_txt, negatives, batch)


def interleaved(d_txt: int, negatives: str, steps: int, rounds: int, settings: dict, d_img: int = 1024) -> dict:
    """{setting: (triplets/s, s/epoch, GFLOP/s)} of each of ``settings`` (name -> flags), timed in
    turn over ``rounds`` rounds on the same features; the median step time of each."""
    pairs = features(d_txt, d_img)
    steps_of = {k: loop(pairs, negatives, argv=v) for k, v in settings.items()}
    dts: dict[str, list[float]] = {k: [] for k in settings}
    for r in range(rounds):
        for k, step in steps_of.items():
            dts[k].append(timed(step, steps, start=10 + r * steps))
    return {k: rates(float(np.median(v)), d_img, d_txt, negatives) for k, v in dts.items()}


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
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)
    import os

    load0 = os.getloadavg()[0]
    peak, peak_bf16 = matmul_gflops(), matmul_gflops(dtype=torch.bfloat16)
    print(f"machine matmul (2048^3): float32 {peak:.0f} GFLOP/s, bfloat16 {peak_bf16:.0f} GFLOP/s "
          f"({torch.get_num_threads()} threads)")
    rows = []
    for d_txt, label in ((300, "fastText 300"), (384, "BERT MiniLM 384"), (768, "BERT base 768")):
        base = seed_style(d_txt, a.steps)
        rows.append((label, "seed-style DataLoader, batch 32, random negs", *base, 1.0))
        for neg in ("random", "hardest"):
            res = interleaved(d_txt, neg, a.steps, a.rounds, SETTINGS)
            for k, r in res.items():
                rows.append((label, f"batch 128, {neg} negs, {' '.join(SETTINGS[k])}", *r,
                             r[0] / base[0], r[0] / res["exact"][0]))
    print(f"1-min load at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f}")
    print("| captions | loop | triplets/s | s/epoch | GFLOP/s | % of fp32 matmul | % of bf16 matmul | x seed-style "
          "| x exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        x_exact = f"{r[6]:.2f}" if len(r) > 6 else ""
        print(f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.1f} | {100 * r[4] / peak:.0f}% | "
              f"{100 * r[4] / peak_bf16:.0f}% | {r[5]:.1f} | {x_exact} |")
    save("train_throughput", {"matmul_gflops": peak, "matmul_gflops_bf16": peak_bf16, "rows": [
        dict(zip(("text", "loop", "triplets_s", "s_epoch", "gflops", "x_seed_style", "x_exact"), r, strict=False))
        for r in rows]})


if __name__ == "__main__":
    main()
