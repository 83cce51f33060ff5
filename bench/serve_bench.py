"""Latency and throughput of the search app (``crossmodal.serve``), one client against 8
concurrent ones, with query batching off and on, on a COCO-5K-sized gallery (5,000 images,
25,000 captions) or, with ``--scale full``, a full-COCO-sized one (123,287 images, 616,767
captions).

The heads and the encoders are a real run's (default: the demo's best model, after ``make
demo``; else a small run built like the tests' one, with images at 256 px, the demo's before the 384 px default); the
gallery is synthetic: unit vectors in clusters (an image's captions lie near it), made-up
captions, indexes of the ``--index`` / ``--caption-index`` kinds (default ``auto``: the
pipeline's rule by size, flat at 5K, IVF at full scale; an approximate index is kept in the temp
folder for the next run), so the index side has the real sizes.

Measured, each as p50/p95:

- (5K only) in process: the caption encoder alone, ``Searcher.text_query``, decode + image
  encoder alone, ``Searcher.upload_query``;
- through the app over loopback HTTP (``GET /api/text``, ``POST /api/upload`` multipart with a
  real COCO photo from ../shared/data/coco-mini when present, ``GET /api/image/{id}``), with
  1 client (``--queries`` requests) and ``--clients`` concurrent clients (threads, each its own
  keep-alive connection, ``--per-client`` requests each), for each ``--modes`` (batching off:
  ``--max-batch 0``; on: ``--max-batch`` / ``--batch-wait-ms``): one server process per mode;
- CPU time per timed request of the client process (``--client``: httpx, or Python's
  http.client with the same requests) and of the server process, and the means of the
  server's own ``ms`` fields;
- the server's start-up time (model load; synthetic gallery + index build) and its resident
  memory (after start-up, and its peak over the whole run).

For an approximate index (``ivf`` / ``hnsw``) the server measures its recall@10 against exact
search (flat) on ``--recall-queries`` queries before it starts serving.

    python -m bench.serve_bench [--run runs/demo --coco-root data/demo]          # 5K, ~1.5 min
    python -m bench.serve_bench --scale full --modes on                          # full COCO, ~1 min (+80 s once)
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
    from crossmodal.index import INDEX_CHOICES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a run, or a pipeline output (its best model)")
    p.add_argument("--coco-root", default="data/demo")
    p.add_argument("--split", default="val")
    p.add_argument("--scale", choices=sorted(SCALES), default="5k", help="gallery size (default %(default)s)")
    p.add_argument("--index", choices=INDEX_CHOICES, default="auto", help="the image index (text queries search "
                   "it); default auto: the pipeline's rule by size (crossmodal.index.auto_kind)")
    p.add_argument("--caption-index", choices=INDEX_CHOICES, default="auto",
                   help="the caption index (image-id and upload queries search it); default auto")
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
    p.add_argument("--client", choices=sorted(CLIENTS), default="httpx",
                   help="HTTP client of the benchmark: httpx, or Python's http.client (same requests, less "
                        "client CPU on the server's cores; default %(default)s)")
    p.add_argument("--serve-port-file", default=None, help=argparse.SUPPRESS)  # internal: server mode
    return p


def _run_and_root(a) -> tuple[str, str]:
    if Path(a.run).is_dir():
        return a.run, a.coco_root
    from tests.test_serve import build_serve_run  # no demo run: a small one, images at 256 px (the demo's before)

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


def cached_index(xb: np.ndarray, kind: str) -> tuple[object, str]:
    """``build_index(xb, kind)``, an approximate one kept in the temp folder under the digest of
    ``xb`` (N, d) and its kind (the synthetic gallery is the same in every run: an IVF over 616K
    captions takes minutes to train here) -> (index, "built" or "cached")."""
    import hashlib

    from crossmodal.index import build_index, load_index, resolve_kind, save_index

    kind = resolve_kind(kind, len(xb))
    if kind == "flat":
        return build_index(xb, kind), "built"
    digest = hashlib.sha256(np.ascontiguousarray(xb, dtype=np.float32).tobytes()).hexdigest()[:16]
    path = Path(tempfile.gettempdir()) / "serve_bench_indexes" / f"{kind}-{len(xb)}x{xb.shape[1]}-{digest}.faiss"
    if path.is_file():
        return load_index(path, expect_ntotal=len(xb)), "cached"
    index = build_index(xb, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_index(index, path)
    return index, "built"


def synthetic_searcher(a, run: str, coco_root: str, timings: dict | None = None):
    """The run's heads and encoders over a synthetic gallery of the ``--scale``'s size."""
    from crossmodal.index import describe
    from crossmodal.serve import Gallery, Searcher

    timings = {} if timings is None else timings
    t0 = time.perf_counter()
    s = Searcher.from_run(run, a.split, coco_root)
    t1 = time.perf_counter()
    n_img, n_cap = SCALES[a.scale]
    img, txt = synthetic_embeddings(n_img, n_cap, s.info["dim"])
    img_ids, cap_ids, cap_img_ids = synthetic_ids(n_img, n_cap)
    t2 = time.perf_counter()
    (img_index, img_src), (txt_index, txt_src) = cached_index(img, a.index), cached_index(txt, a.caption_index)
    t3 = time.perf_counter()
    rows = np.random.default_rng(1).integers(0, n_cap, a.recall_queries)
    recall = {}  # queries: captions for the image index, images for the caption index
    if describe(img_index)["type"] != "IndexFlatIP":
        recall["images"] = round(recall_at_10(img_index, img, txt[rows]), 4)
    if describe(txt_index)["type"] != "IndexFlatIP":
        recall["captions"] = round(recall_at_10(txt_index, txt, img[rows % n_img]), 4)
    if recall:
        timings["recall@10_vs_flat"] = recall
    del txt
    s.gallery = Gallery(img_ids=img_ids, cap_ids=cap_ids, cap_img_ids=cap_img_ids,
                        cap_text=[f"synthetic caption number {i} of the benchmark gallery" for i in range(n_cap)],
                        img_emb=img, img_index=img_index, txt_index=txt_index)
    t4 = time.perf_counter()
    s.info.update(images=n_img, captions=n_cap, index=describe(img_index)["type"],
                  caption_index=describe(txt_index)["type"])
    timings.update(model_load_s=round(t1 - t0, 2), embeddings_s=round(t2 - t1, 2), index_build_s=round(t3 - t2, 2),
                   gallery_s=round(t4 - t3, 2), image_index=describe(img_index), caption_index=describe(txt_index),
                   index_source={"images": img_src, "captions": txt_src})
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


class Request(tuple):
    """One HTTP request as both clients send it: (method, path with its query string, body bytes or
    None, headers)."""

    __slots__ = ()

    def __new__(cls, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        return super().__new__(cls, (method, path, body, headers or {}))


def multipart(field: str, filename: str, data: bytes, ctype: str) -> tuple[bytes, dict]:
    """A multipart/form-data body of one file and its Content-Type header (what httpx's
    ``files=`` sends, built once so that both clients send the same bytes)."""
    boundary = "serve-bench-7d1f0c2a9b"
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            f"Content-Type: {ctype}\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head + data + tail, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class HttpxClient:
    """httpx.Client: one keep-alive connection (HTTP/1.1)."""

    def __init__(self, url: str):
        import httpx

        self.c = httpx.Client(base_url=url, timeout=120)

    def send(self, req: Request) -> tuple[int, bytes]:
        method, path, body, headers = req
        r = self.c.request(method, path, content=body, headers=headers)
        return r.status_code, r.content

    def close(self):
        self.c.close()


class StdlibClient:
    """Python's http.client: the same requests over one keep-alive HTTP/1.1 connection (it sets
    TCP_NODELAY), with less Python per request than httpx."""

    def __init__(self, url: str):
        import http.client
        from urllib.parse import urlsplit

        u = urlsplit(url)
        self.c = http.client.HTTPConnection(u.hostname, u.port, timeout=120)

    def send(self, req: Request) -> tuple[int, bytes]:
        method, path, body, headers = req
        self.c.request(method, path, body=body, headers=headers)
        r = self.c.getresponse()
        return r.status, r.read()

    def close(self):
        self.c.close()


CLIENTS = {"httpx": HttpxClient, "stdlib": StdlibClient}


def cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process (``pid`` None) or of ``pid``
    (from /proc, Linux; NaN elsewhere)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def throughput(url: str, make_request, clients: int, per_client: int, warmup: int = 0, client: str = "httpx",
               server_pid: int | None = None) -> dict:
    """``clients`` threads, each with its own keep-alive connection (``client``: httpx or
    stdlib), ``warmup`` untimed then ``per_client`` timed requests each (all start together
    after the warm-up). Besides latency: CPU per timed request of this (client) process and of
    the server process, and the means of the server's own ``ms`` fields."""
    lat: list[float] = []
    bodies: list[bytes] = []
    lock = threading.Lock()
    errors = []
    ready = threading.Barrier(clients + 1)
    done = threading.Barrier(clients + 1)

    def worker(c: int):
        conn = CLIENTS[client](url)
        try:
            for i in range(warmup):
                conn.send(make_request(c * per_client + i))
            ready.wait()
            for i in range(per_client):
                req = make_request(c * per_client + i)
                t0 = time.perf_counter()
                status, body = conn.send(req)
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    (bodies if status == 200 else errors).append(body)
                    lat.append(dt)
            done.wait()
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    t0, c0, s0 = time.perf_counter(), cpu_s(), cpu_s(server_pid) if server_pid else float("nan")
    done.wait()
    wall, c1, s1 = time.perf_counter() - t0, cpu_s(), cpu_s(server_pid) if server_pid else float("nan")
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0][:300]!r}")
    n = len(lat)
    fields: dict[str, list[float]] = {}
    for b in bodies:
        for k, v in json.loads(b).get("ms", {}).items():
            fields.setdefault(k, []).append(v)
    return {"clients": clients, "requests": n, "wall_s": round(wall, 2), "req_per_s": round(n / wall, 1),
            **pct(lat), "client_cpu_ms": round((c1 - c0) * 1000 / n, 2),
            "server_cpu_ms": round((s1 - s0) * 1000 / n, 2),
            "server_ms": {k: round(float(np.mean(v)), 2) for k, v in fields.items()}}


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


def measure_mode(a, url: str, sentences: list[str], photo: bytes, img_ids: np.ndarray, server_pid: int) -> dict:
    """1 client and ``--clients`` clients, for text, upload and image-id queries."""
    from urllib.parse import urlencode

    body, headers = multipart("file", "photo.jpg", photo, "image/jpeg")
    texts = [Request("GET", "/api/text?" + urlencode({"q": t, "k": 10})) for t in sentences]
    requests = {
        "text": lambda i: texts[i % len(texts)],
        "upload": lambda i: Request("POST", "/api/upload?k=10", body, headers),
        "image id": lambda i: Request("GET", f"/api/image/{int(img_ids[(i * 7919) % len(img_ids)])}?k=10"),
    }
    out = {}
    for name, req in requests.items():
        out[name] = {1: throughput(url, req, 1, a.queries, a.warmup, a.client, server_pid),
                     a.clients: throughput(url, req, a.clients, a.per_client, 2, a.client, server_pid)}
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

    load0 = os.getloadavg()
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
            results[mode] = measure_mode(a, url, sentences, photo, img_ids, server.pid)
            info.update({f"end_{k}": v for k, v in rss_mb(server.pid).items()})
            startup[mode] = info
        finally:
            server.terminate()
            server.wait(30)
    load = os.getloadavg()
    first = startup[modes[0]]
    print(f"\nGallery {n_img:,} images / {n_cap:,} captions (synthetic; --index {a.index}: "
          f"{first['image_index']['type']}, --caption-index {a.caption_index}: {first['caption_index']['type']}); "
          f"server: "
          f"{first['startup_line']}; upload: {photo_name}, {len(photo) / 1e3:.0f} kB; k = 10; "
          f"batching on: --max-batch {a.max_batch} --max-upload-batch {a.max_upload_batch} --batch-wait-ms "
          f"{a.batch_wait_ms:g}; load average {load0[0]:.1f} at the start, {load[0]:.1f} at the end\n")
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
    print(f"\nCPU per request (ms; client {a.client}: this process; server: its process; both on the same "
          f"cores) and the server's own ms fields (means):\n")
    print("| mode | query | clients | client CPU | server CPU | server ms fields |\n|---|---|---|---|---|---|")
    for m in modes:
        for name in results[m]:
            for c in (1, a.clients):
                r = results[m][name][c]
                msf = ", ".join(f"{k} {v:g}" for k, v in r["server_ms"].items())
                print(f"| {m} | {name} | {c} | {r['client_cpu_ms']:.2f} | {r['server_cpu_ms']:.2f} | {msf} |")
    print()
    for m in modes:
        i = startup[m]
        print(f"server start-up (batching {m}): {i['process_ready_s']:.1f} s to the first answer (model load "
              f"{i['model_load_s']:.1f} s, embeddings {i['embeddings_s']:.1f} s, indexes {i['index_build_s']:.1f} s, "
              f"gallery tables {i['gallery_s']:.1f} s); RSS {i.get('rss_mb', '?')} MB after start-up, peak "
              f"{i.get('end_peak_mb', '?')} MB" + (f"; recall@10 vs flat {i['recall@10_vs_flat']}"
                                                  if "recall@10_vs_flat" in i else "")
              + f"; indexes {i['index_source']}")
    out = {"gallery": {"images": n_img, "captions": n_cap, "image_index": a.index, "caption_index": a.caption_index},
           "model": model, "upload": photo_name, "upload_bytes": len(photo), "loadavg_start": load0, "loadavg": load,
           "client": a.client,
           "batching": {"max_batch": a.max_batch, "max_upload_batch": a.max_upload_batch, "wait_ms": a.batch_wait_ms},
           "in_process": rows, "http": {m: {n: {str(c): r for c, r in v.items()} for n, v in results[m].items()}
                                        for m in modes}, "startup": startup}
    name = "serve_bench" if a.scale == "5k" else f"serve_bench_{a.scale}_{a.index}_{a.caption_index}"
    name += "" if a.client == "httpx" else f"_{a.client}"
    print(f"\nsaved {save(name, out)}")
    return out


if __name__ == "__main__":
    main()
