"""Latency and throughput of the search app (``crossmodal.serve``), one client against 8
concurrent ones, with query batching off and on, on a COCO-5K-sized gallery (5,000 images,
25,000 captions) or, with ``--scale full``, a full-COCO-sized one (123,287 images, 616,767
captions).

The heads and the encoders are a real run's (default: the demo's best model, after ``make
demo``; else a small run built like the tests' one, with images at 256 px as in the demo); the
gallery is synthetic: unit vectors in clusters (an image's captions lie near it), made-up
captions, indexes of the ``--index`` / ``--caption-index`` kinds (flat by default), so the
index side has the real sizes.

Measured, each as p50/p95:

- (5K only) in process: the caption encoder alone, ``Searcher.text_query``, decode + image
  encoder alone, ``Searcher.upload_query``;
- through the app over loopback HTTP (``GET /api/text``, ``POST /api/upload`` multipart with a
  real COCO photo from ../shared/data/coco-mini when present, ``GET /api/image/{id}``), with
  1 client (``--queries`` requests) and ``--clients`` concurrent clients (threads, each its own
  keep-alive connection, ``--per-client`` requests each), for each ``--modes`` (batching off:
  ``--max-batch 0``; on: ``--max-batch`` / ``--batch-wait-ms``): one server process per mode;
- the server's start-up time (model load; synthetic gallery + index build) and its resident
  memory (after start-up, and its peak over the whole run).

For an approximate index (``ivf`` / ``hnsw``) the server measures its recall@10 against exact
search (flat) on ``--recall-queries`` queries before it starts serving.

    python -m bench.serve_bench [--run runs/demo --coco-root data/demo]          # 5K, ~1.5 min
    python -m bench.serve_bench --scale full --index ivf --modes on              # full COCO, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench.common import SHARED, save

ROOT = Path(__file__).resolve().parents[1]
SCALES = {"5k": (5000, 25000), "full": (123_287, 616_767)}  # COCO 2017 train + val: images, captions
WORDS = ["dogs", "cats", "circles", "people", "squares", "horses", "triangles"]


def parser() -> argparse.ArgumentParser:
    from crossmodal.batching import DEFAULT_MAX_BATCH, DEFAULT_MAX_IMAGE_BATCH, DEFAULT_WAIT_MS
    from crossmodal.index import INDEX_KINDS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a run, or a pipeline output (its best model)")
    p.add_argument("--coco-root", default="data/demo")
    p.add_argument("--split", default="val")
    p.add_argument("--scale", choices=sorted(SCALES), default="5k", help="gallery size (default %(default)s)")
    p.add_argument("--index", choices=INDEX_KINDS, default="flat", help="the image index (text queries search it)")
    p.add_argument("--caption-index", choices=INDEX_KINDS, default="flat",
                   help="the caption index (image-id and upload queries search it)")
    p.add_argument("--queries", type=int, default=100, help="timed queries of one client")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=20, help="requests per client in the concurrent runs")
    p.add_argument("--threads", type=int, default=1, help="torch/Faiss threads per query (the server's default)")
    p.add_argument("--modes", default="off,on", help="batching modes to compare, in order (off, on)")
    p.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH, help="batching on: queries per batch")
    p.add_argument("--batch-wait-ms", type=float, default=DEFAULT_WAIT_MS, help="batching on: longest wait")
    p.add_argument("--max-upload-batch", type=int, default=DEFAULT_MAX_IMAGE_BATCH, help="batching on: uploads "
                   "per batch (default %(default)s, the server's)")
    p.add_argument("--recall-queries", type=int, default=200)
    p.add_argument("--serve-port-file", default=None, help=argparse.SUPPRESS)  # internal: server mode
    return p


def _run_and_root(a) -> tuple[str, str]:
    if Path(a.run).is_dir():
        return a.run, a.coco_root
    from tests.test_serve import build_serve_run  # no demo run: a small one, images at the demo's 256 px

    base = Path(tempfile.gettempdir()) / "crossmodal_serve_bench_run_256"
    print(f"{a.run} not found (run `make demo` for the demo model): using a small generated run in {base}")
    paths = build_serve_run(base, input_size=256)
    return str(paths["run"]), str(paths["root"])


def synthetic_ids(n_img: int, n_cap: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image ids (n_img,), caption ids (n_cap,), the image of each caption (n_cap,): captions
    spread over the images as evenly as their counts allow (5 or 6 each at full COCO)."""
    img_ids = np.arange(1, n_img + 1, dtype=np.int64) * 7
    return img_ids, np.arange(n_cap, dtype=np.int64) + 10**6, img_ids[np.arange(n_cap) % n_img]


def synthetic_embeddings(n_img: int, n_cap: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors: images (n_img, d) around 1,000 cluster centres, each caption (n_cap, d) near
    its image (the order of :func:`synthetic_ids`): the structure an approximate index relies on."""
    rng = np.random.default_rng(seed)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    centres = unit(rng.standard_normal((1000, d), dtype=np.float32))
    img = unit(centres[rng.integers(0, len(centres), n_img)] + 0.6 * unit(rng.standard_normal((n_img, d),
                                                                                               dtype=np.float32)))
    txt = img[np.arange(n_cap) % n_img]
    txt = unit(txt + 0.8 * unit(rng.standard_normal((n_cap, d), dtype=np.float32)))
    return img.astype(np.float32), txt.astype(np.float32)


def recall_at_10(index, xb: np.ndarray, xq: np.ndarray) -> float:
    """Mean overlap of ``index``'s top 10 with exact inner-product search's top 10 (Q queries)."""
    from crossmodal.index import build_index, search

    exact = build_index(xb, "flat")
    _, want = search(exact, xq, 10)
    _, got = search(index, xq, 10)
    return float(np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.tolist(), want.tolist(), strict=True)]))


def synthetic_searcher(a, run: str, coco_root: str, timings: dict | None = None):
    """The run's heads and encoders over a synthetic gallery of the ``--scale``'s size."""
    from crossmodal.index import build_index, describe
    from crossmodal.serve import Gallery, Searcher

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    s = Searcher.from_run(run, a.split, coco_root)
    t1 = time.perf_counter()
    n_img, n_cap = SCALES[a.scale]
    img, txt = synthetic_embeddings(n_img, n_cap, s.info["dim"])
    img_ids, cap_ids, cap_img_ids = synthetic_ids(n_img, n_cap)
    t2 = time.perf_counter()
    img_index, txt_index = build_index(img, a.index), build_index(txt, a.caption_index)
    t3 = time.perf_counter()
    rows = np.random.default_rng(1).integers(0, n_cap, a.recall_queries)
    recall = {}  # queries: captions for the image index, images for the caption index
    if a.index != "flat":
        recall["images"] = round(recall_at_10(img_index, img, txt[rows]), 4)
    if a.caption_index != "flat":
        recall["captions"] = round(recall_at_10(txt_index, txt, img[rows % n_img]), 4)
    if recall:
        timings["recall@10_vs_flat"] = recall
    del txt
    s.gallery = Gallery(img_ids=img_ids, cap_ids=cap_ids, cap_img_ids=cap_img_ids,
                        cap_text=[f"synthetic caption number {i} of the benchmark gallery" for i in range(n_cap)],
                        img_emb=img, img_index=img_index, txt_index=txt_index)
    t4 = time.perf_counter()
    s.info.update(images=n_img, captions=n_cap, index=describe(img_index)["type"])
    timings.update(model_load_s=round(t1 - t0, 2), embeddings_s=round(t2 - t1, 2), index_build_s=round(t3 - t2, 2),
                   gallery_s=round(t4 - t3, 2), image_index=describe(img_index), caption_index=describe(txt_index))
    return s


def serve(a) -> None:
    """Server mode: the synthetic searcher behind uvicorn on a free loopback port; the port and the
    start-up timings are written to a file (JSON)."""
    import uvicorn

    from crossmodal.serve import create_app, set_threads

    t0 = time.perf_counter()
    set_threads(a.threads)
    timings: dict = {}
    s = synthetic_searcher(a, a.run, a.coco_root, timings)
    s.set_batching(a.max_batch, a.batch_wait_ms, a.max_upload_batch)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # uvicorn sets TCP_NODELAY when it binds the port itself, not on a socket it is given; without
    # it every keep-alive response waits ~40 ms for a delayed ACK (accepted sockets inherit it)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(s), log_level="warning", access_log=False))
    import gc

    gc.freeze()  # as crossmodal.serve.run does
    tmp = Path(a.serve_port_file + ".tmp")
    tmp.write_text(json.dumps({"port": sock.getsockname()[1], "startup_s": round(time.perf_counter() - t0, 2),
                               "startup_line": s.startup_line(), **timings}))
    os.replace(tmp, a.serve_port_file)
    srv.run(sockets=[sock])


def pct(ms: list[float]) -> dict:
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p95_ms": round(float(np.percentile(ms, 95)), 2), "mean_ms": round(float(np.mean(ms)), 2)}


def timed_ms(fn, items, warmup: int) -> list[float]:
    for x in items[:warmup]:
        fn(x)
    out = []
    for x in items[warmup:]:
        t0 = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def upload_photo() -> tuple[str, bytes]:
    folder = SHARED / "coco-mini" / "train2017"
    photos = sorted(folder.glob("*.jpg"))[:1] if folder.is_dir() else []
    if photos:
        return f"COCO photo {photos[0].name}", photos[0].read_bytes()
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(buf, "JPEG")
    return "synthetic 640x480 JPEG (../shared/data/coco-mini not found)", buf.getvalue()


def throughput(url: str, make_request, clients: int, per_client: int, warmup: int = 0) -> dict:
    """``clients`` threads, each with its own keep-alive connection, ``warmup`` untimed then
    ``per_client`` timed requests each (all start together after the warm-up)."""
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    errors = []
    ready = threading.Barrier(clients + 1)

    def worker(c: int):
        with httpx.Client(base_url=url, timeout=120) as client:
            for i in range(warmup):
                make_request(client, c * per_client + i)
            ready.wait()
            for i in range(per_client):
                t0 = time.perf_counter()
                r = make_request(client, c * per_client + i)
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    errors.append(r.text)
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return {"clients": clients, "requests": len(lat), "wall_s": round(wall, 2), "req_per_s": round(len(lat) / wall, 1),
            **pct(lat)}


def rss_mb(pid: int) -> dict:
    """Resident memory of a process now and at its peak (MB), from /proc (Linux; {} elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return {}
    return {k: round(int(fields[f].split()[0]) / 1024) for k, f in (("rss_mb", "VmRSS"), ("peak_mb", "VmHWM"))}


def start_server(a, run: str, coco_root: str, on: bool):
    """A server process of the synthetic gallery -> (process, url, its start-up record)."""
    port_file = Path(tempfile.mkdtemp(prefix="serve_bench_")) / "port"
    cmd = [sys.executable, "-m", "bench.serve_bench", "--run", run, "--coco-root", coco_root, "--split", a.split,
           "--scale", a.scale, "--index", a.index, "--caption-index", a.caption_index,
           "--recall-queries", str(a.recall_queries),
           "--threads", str(a.threads), "--max-batch", str(a.max_batch if on else 0), "--max-upload-batch",
           str(a.max_upload_batch if on else 0), "--batch-wait-ms", str(a.batch_wait_ms),
           "--serve-port-file", str(port_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    server = subprocess.Popen(cmd, env=env)  # same working directory: runs may record relative paths
    deadline = time.time() + 900
    while not port_file.is_file():
        if server.poll() is not None or time.time() > deadline:
            server.kill()
            raise SystemExit("the benchmark server did not start")
        time.sleep(0.1)
    info = json.loads(port_file.read_text())
    url = f"http://127.0.0.1:{info['port']}"
    import httpx

    while True:
        try:
            httpx.get(url + "/api/info", timeout=5).raise_for_status()
            break
        except httpx.TransportError:
            time.sleep(0.1)
    info["process_ready_s"] = round(time.perf_counter() - t0, 2)  # from launch to the first answer
    info.update(rss_mb(server.pid))
    return server, url, info


def measure_mode(a, url: str, sentences: list[str], photo: bytes, img_ids: np.ndarray) -> dict:
    """1 client and ``--clients`` clients, for text, upload and image-id queries."""
    requests = {
        "text": lambda cl, i: cl.get("/api/text", params={"q": sentences[i % len(sentences)], "k": 10}),
        "upload": lambda cl, i: cl.post("/api/upload", params={"k": 10},
                                        files={"file": ("photo.jpg", photo, "image/jpeg")}),
        "image id": lambda cl, i: cl.get(f"/api/image/{int(img_ids[(i * 7919) % len(img_ids)])}", params={"k": 10}),
    }
    out = {}
    for name, req in requests.items():
        out[name] = {1: throughput(url, req, 1, a.queries, warmup=a.warmup),
                     a.clients: throughput(url, req, a.clients, a.per_client, warmup=2)}
    return out


def in_process_rows(a, s, sentences: list[str], photo: bytes) -> dict:
    import torch

    from crossmodal.serve import decode_upload

    rows = {}
    enc, image_enc = s.text_encoder, s.image_encoder
    s.set_batching(0, 0)
    rows["text: caption encoder alone"] = pct(timed_ms(lambda t: enc.encode([t]), sentences, a.warmup))
    rows["text: encode + head + search, in process"] = pct(timed_ms(lambda t: s.text_query(t, 10), sentences,
                                                                    a.warmup))
    n_up = a.warmup + a.queries

    def encode_alone(_):
        with torch.inference_mode():
            image_enc([image_enc.preprocess(decode_upload(photo, s.limits))])

    rows["upload: decode + image encoder alone"] = pct(timed_ms(encode_alone, [None] * n_up, a.warmup))
    rows["upload: decode + encode + head + search, in process"] = pct(
        timed_ms(lambda _: s.upload_query(photo, 10), [None] * n_up, a.warmup))
    return rows


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.serve_port_file:
        serve(a)
        return {}
    from crossmodal.serve import set_threads

    modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if not modes or set(modes) - {"off", "on"}:
        raise SystemExit(f"--modes {a.modes!r}: give off, on or off,on")
    run, coco_root = _run_and_root(a)
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)  # building the run may have set INFO: a line per request
    n_img, n_cap = SCALES[a.scale]
    sentences = [f"a photo of {n} small {WORDS[n % len(WORDS)]} next to a red bus"
                 for n in range(a.warmup + max(a.queries, a.clients * a.per_client))]
    photo_name, photo = upload_photo()
    img_ids = synthetic_ids(n_img, n_cap)[0]
    rows, model = {}, {}
    if a.scale == "5k":  # the same parts in this process: the in-process rows (skipped at full scale: memory)
        set_threads(a.threads)
        s = synthetic_searcher(a, run, coco_root)
        rows = in_process_rows(a, s, sentences, photo)
        model = {"run": s.info["run"], "text_encoder": s.info["text_encoder"], "image_encoder": s.info["image_encoder"],
                 "input_size": s.image_encoder.describe()["settings"].get("input_size", "")}
        del s
    results, startup = {}, {}
    for mode in modes:
        server, url, info = start_server(a, run, coco_root, mode == "on")
        try:
            results[mode] = measure_mode(a, url, sentences, photo, img_ids)
            info.update({f"end_{k}": v for k, v in rss_mb(server.pid).items()})
            startup[mode] = info
        finally:
            server.terminate()
            server.wait(30)
    load = os.getloadavg()
    first = startup[modes[0]]
    print(f"\nGallery {n_img:,} images / {n_cap:,} captions (synthetic; image index {a.index}, caption index "
          f"{a.caption_index}); server: "
          f"{first['startup_line']}; upload: {photo_name}, {len(photo) / 1e3:.0f} kB; k = 10; "
          f"batching on: --max-batch {a.max_batch} --max-upload-batch {a.max_upload_batch} --batch-wait-ms "
          f"{a.batch_wait_ms:g}; load average {load[0]:.1f}\n")
    if rows:
        print("| query | what is timed (in process, one at a time) | p50 ms | p95 ms |\n|---|---|---|---|")
        for name, r in rows.items():
            q, what = name.split(": ", 1)
            print(f"| {q} | {what} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
        print()
    head = " | ".join(f"{m}: req/s | {m}: p50 ms | {m}: p95 ms" for m in modes)
    print(f"| query (HTTP) | clients | {head} |\n|---|---|" + "---|" * (3 * len(modes)))
    for name in results[modes[0]]:
        for c in (1, a.clients):
            cells = " | ".join(f"{results[m][name][c]['req_per_s']:.1f} | {results[m][name][c]['p50_ms']:.1f} | "
                               f"{results[m][name][c]['p95_ms']:.1f}" for m in modes)
            print(f"| {name} | {c} | {cells} |")
    print()
    for m in modes:
        ratios = ", ".join(f"{name} {results[m][name][a.clients]['p95_ms'] / results[m][name][1]['p95_ms']:.2f}x"
                           for name in results[m])
        print(f"batching {m}: p95 with {a.clients} clients / p95 with 1 client: {ratios}")
    for m in modes:
        i = startup[m]
        print(f"server start-up (batching {m}): {i['process_ready_s']:.1f} s to the first answer (model load "
              f"{i['model_load_s']:.1f} s, embeddings {i['embeddings_s']:.1f} s, indexes {i['index_build_s']:.1f} s, "
              f"gallery tables {i['gallery_s']:.1f} s); RSS {i.get('rss_mb', '?')} MB after start-up, peak "
              f"{i.get('end_peak_mb', '?')} MB" + (f"; recall@10 vs flat {i['recall@10_vs_flat']}"
                                                  if "recall@10_vs_flat" in i else ""))
    out = {"gallery": {"images": n_img, "captions": n_cap, "image_index": a.index, "caption_index": a.caption_index},
           "model": model, "upload": photo_name,
           "upload_bytes": len(photo), "loadavg": load, "batching": {"max_batch": a.max_batch,
                                                                     "max_upload_batch": a.max_upload_batch,
                                                                     "wait_ms": a.batch_wait_ms},
           "in_process": rows, "http": {m: {n: {str(c): r for c, r in v.items()} for n, v in results[m].items()}
                                        for m in modes}, "startup": startup}
    name = "serve_bench" if a.scale == "5k" else f"serve_bench_{a.scale}_{a.index}_{a.caption_index}"
    print(f"\nsaved {save(name, out)}")
    return out


if __name__ == "__main__":
    main()
