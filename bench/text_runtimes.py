"""Caption encoding runtimes in one process, interleaved (A B C A B C ...): the project's
BertEncoder (MiniLM-L6) on real COCO captions (../shared/data/coco-captions-val2017) through

- PyTorch *before*: the path as it was (batches sorted by character count, padded to their
  longest caption; commit 691c8a7), the baseline of every ratio;
- PyTorch, ONNX Runtime fp32, OpenVINO (bf16 matmuls where the CPU has them: the CPU default
  there) and OpenVINO forced to f32, all on batches sorted by token count (the encoder now);
- ONNX Runtime int8 (opt-in, lossy).

Each rate is a ratio to PyTorch-before in the same round, with the machine's load beside it;
the change of the vectors as min cosine to PyTorch and caption-to-caption kNN@10 overlap
(int8's retrieval cost is measured by ``python -m bench.cv_defaults``). Also the share of
tokenising and padding in the default's time.

    python -m bench.text_runtimes [--n 4000] [--rounds 3] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

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


@torch.inference_mode()
def pytorch_before(enc, texts: list[str], batch_size: int) -> np.ndarray:
    """(N, H): the PyTorch path before batching by token count: batches of captions sorted by
    character count, each tokenised and padded to its longest caption."""
    from crossmodal.text_batches import pool

    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.empty((len(texts), enc.dim), dtype=np.float32)
    for s in range(0, len(texts), batch_size):
        idx = order[s : s + batch_size]
        tok = enc.tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=enc.max_length,
                            return_tensors="pt")
        out[idx] = pool(enc.model(**tok).last_hidden_state, tok["attention_mask"], enc.pooling).numpy()
    return out


def _encoders(int8: bool) -> dict:
    """name -> encode(texts, batch_size) for every runtime installed."""
    from crossmodal.runtimes import OvSession, onnxruntime_version, openvino_version
    from crossmodal.text_encoders import BertEncoder

    cache = tempfile.mkdtemp(prefix="text_runtimes_")
    torch_enc = BertEncoder(runtime="torch")
    encs = {"PyTorch before (char-sorted)": lambda t, b: pytorch_before(torch_enc, t, b), "torch": torch_enc.encode}
    if onnxruntime_version():
        encs["onnxruntime fp32"] = BertEncoder(runtime="onnxruntime", cache_dir=cache).encode
    if openvino_version():
        ov = BertEncoder(runtime="openvino", cache_dir=cache)
        encs[f"openvino ({ov.session.precision} matmuls)"] = ov.encode
        if ov.session.precision != "f32":
            ov32 = BertEncoder(runtime="openvino", cache_dir=cache)
            ov32.session = OvSession(ov32.export, hint="f32")
            encs["openvino (f32 matmuls)"] = ov32.encode
    if int8 and onnxruntime_version():
        encs["onnxruntime int8"] = BertEncoder(precision="int8", cache_dir=cache).encode
    return encs


def _tokenising_rate(caps: list[str], batch_size: int) -> float:
    """Captions/s of tokenising, sorting and padding alone (what every runtime pays on top)."""
    from crossmodal.text_batches import token_sorted_batches
    from crossmodal.text_encoders import BertEncoder

    tok = BertEncoder(runtime="torch").tokenizer
    t0 = time.perf_counter()
    for _ in token_sorted_batches(tok, caps, batch_size, 64):
        pass
    return len(caps) / (time.perf_counter() - t0)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=4000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-int8", action="store_true")
    a = p.parse_args(argv)
    from crossmodal.cli import set_threads

    set_threads()
    caps = _captions(a.n)
    encs = _encoders(not a.no_int8)
    base = next(iter(encs))
    for f in encs.values():
        f(caps[:256], a.batch_size)  # warm-up
    rates: dict[str, list[float]] = {k: [] for k in encs}
    out: dict[str, np.ndarray] = {}
    loads = []
    for _ in range(a.rounds):
        loads.append(os.getloadavg()[0])
        for name, f in encs.items():
            t0 = time.perf_counter()
            out[name] = f(caps, a.batch_size)
            rates[name].append(len(caps) / (time.perf_counter() - t0))
    tok_rate = _tokenising_rate(caps, a.batch_size)
    ratios = {k: [r / t for r, t in zip(v, rates[base], strict=True)] for k, v in rates.items()}
    print(f"{len(caps)} real COCO captions, batch {a.batch_size}, {a.rounds} interleaved rounds, "
          f"{torch.get_num_threads()} threads; 1-min load at each round's start: "
          f"{', '.join(f'{x:.1f}' for x in loads)} ({os.cpu_count()} cores)")
    print("| runtime | captions/s (median) | x PyTorch before, per round | x PyTorch now (median) "
          "| min cosine to PyTorch | kNN@10 overlap |")
    print("|---|---|---|---|---|---|")
    res = {}
    for name in encs:
        cos = cosines(out["torch"], out[name])
        ov = knn_overlap(out["torch"], out[name]) if name != "torch" else 1.0
        now = float(np.median([r / t for r, t in zip(rates[name], rates["torch"], strict=True)]))
        print(f"| {name} | {np.median(rates[name]):.0f} | {', '.join(f'{r:.2f}' for r in ratios[name])} | "
              f"{now:.2f} | {cos.min():.5f} (mean {cos.mean():.5f}) | {ov:.3f} |")
        res[name] = {"caps_s": rates[name], "ratio": ratios[name], "ratio_now": now, "min_cos": float(cos.min()),
                     "mean_cos": float(cos.mean()), "knn10_overlap": ov}
    fastest = max((k for k in encs if "int8" not in k), key=lambda k: np.median(rates[k]))
    print(f"tokenising + sorting + padding alone: {tok_rate:.0f} captions/s, "
          f"{100 * np.median(rates[fastest]) / tok_rate:.1f}% of {fastest}'s time")
    save("text_runtimes", {"n": len(caps), "batch_size": a.batch_size, "load": loads, "runtimes": res,
                           "tokenising_caps_s": tok_rate})


if __name__ == "__main__":
    main()
