"""Latency and throughput of the search app (``crossmodal.serve``) on a COCO-5K-sized gallery:
5,000 images and 25,000 captions.

The heads and the encoders are a real run's (default: the demo's best model, after ``make
demo``; else the small run the tests build); the gallery is synthetic (random unit vectors and
made-up captions, flat Faiss indexes), so the index side has the size of the 5K test set.

Measured, each as p50/p95 over ``--queries`` queries after a warm-up:

- text query: the caption encoder alone (one sentence), then encode + head + search in
  process (``Searcher.text_query``), then the app over loopback HTTP (``GET /api/text``);
- image upload (a real COCO photo from ../shared/data/coco-mini when present): decode +
  preprocess + image encoder alone, then the whole upload query in process, then through the
  app (``POST /api/upload``, multipart);
- image-id query through the app;
- throughput with ``--clients`` concurrent clients (threads, each its own keep-alive
  connection), ``--per-client`` requests each: a bounded loop that stops by itself.

The server runs in its own process (uvicorn, as ``python -m crossmodal.serve`` runs it).

    python -m bench.serve_bench [--run runs/demo --coco-root data/demo] [--queries 100 --clients 8 --per-client 20]
"""

from __future__ import annotations

import argparse
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", default="runs/demo", help="a run, or a pipeline output (its best model)")
    p.add_argument("--coco-root", default="data/demo")
    p.add_argument("--split", default="val")
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--queries", type=int, default=100, help="timed queries per measurement")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--per-client", type=int, default=20, help="requests per client in the throughput runs")
    p.add_argument("--threads", type=int, default=1, help="torch/Faiss threads per query (the server's default)")
    p.add_argument("--serve-port-file", default=None, help=argparse.SUPPRESS)  # internal: server mode
    return p


def _run_and_root(a) -> tuple[str, str]:
    if Path(a.run).is_dir():
        return a.run, a.coco_root
    from tests.test_serve import build_serve_run  # no demo run: the tests' small one

    base = Path(tempfile.gettempdir()) / "crossmodal_serve_bench_run"
    print(f"{a.run} not found (run `make demo` for the demo model): using a small generated run in {base}")
    paths = build_serve_run(base)
    return str(paths["run"]), str(paths["root"])


def synthetic_searcher(a, run: str, coco_root: str):
    """The run's heads and encoders over a synthetic gallery of ``--images`` x ``--captions-per-image``."""
    from crossmodal.index import build_index
    from crossmodal.serve import Gallery, Searcher

    s = Searcher.from_run(run, a.split, coco_root)
    rng = np.random.default_rng(0)
    d = s.info["dim"]
    n_img, n_cap = a.images, a.images * a.captions_per_image

    def unit(n):
        x = rng.standard_normal((n, d)).astype(np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    img, txt = unit(n_img), unit(n_cap)
    img_ids = np.arange(1, n_img + 1, dtype=np.int64) * 7
    s.gallery = Gallery(img_ids=img_ids, cap_ids=np.arange(n_cap, dtype=np.int64) + 10**6,
                        cap_img_ids=np.repeat(img_ids, a.captions_per_image),
                        cap_text=[f"synthetic caption number {i} of the benchmark gallery" for i in range(n_cap)],
                        img_emb=img, img_index=build_index(img), txt_index=build_index(txt))
    s.info.update(images=n_img, captions=n_cap)
    return s


def serve(a) -> None:
    """Server mode: the synthetic searcher behind uvicorn on a free loopback port (written to a file)."""
    import uvicorn

    from crossmodal.serve import create_app, set_threads

    set_threads(a.threads)
    s = synthetic_searcher(a, a.run, a.coco_root)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # uvicorn sets TCP_NODELAY when it binds the port itself, not on a socket it is given; without
    # it every keep-alive response waits ~40 ms for a delayed ACK (accepted sockets inherit it)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(s), log_level="warning", access_log=False))
    tmp = Path(a.serve_port_file + ".tmp")
    tmp.write_text(str(sock.getsockname()[1]))
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


def throughput(url: str, make_request, clients: int, per_client: int) -> dict:
    """``clients`` threads, each with its own keep-alive connection, ``per_client`` requests each."""
    import httpx

    lat: list[float] = []
    lock = threading.Lock()
    errors = []

    def worker(c: int):
        with httpx.Client(base_url=url, timeout=60) as client:
            for i in range(per_client):
                t0 = time.perf_counter()
                r = make_request(client, c * per_client + i)
                dt = (time.perf_counter() - t0) * 1000
                if r.status_code != 200:
                    errors.append(r.text)
                with lock:
                    lat.append(dt)

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests, first: {errors[0]}")
    return {"clients": clients, "requests": len(lat), "wall_s": round(wall, 2), "req_per_s": round(len(lat) / wall, 1),
            **pct(lat)}


def main(argv=None) -> dict:
    a = parser().parse_args(argv)
    if a.serve_port_file:
        serve(a)
        return {}
    import httpx
    import torch

    from crossmodal.serve import decode_upload, set_threads

    run, coco_root = _run_and_root(a)
    port_file = Path(tempfile.mkdtemp(prefix="serve_bench_")) / "port"
    cmd = [sys.executable, "-m", "bench.serve_bench", "--run", run, "--coco-root", coco_root, "--split", a.split,
           "--images", str(a.images), "--captions-per-image", str(a.captions_per_image),
           *(["--threads", str(a.threads)] if a.threads else []), "--serve-port-file", str(port_file)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    server = subprocess.Popen(cmd, env=env)  # same working directory: runs may record relative paths
    try:
        deadline = time.time() + 600
        while not port_file.is_file():  # let the server load alone, then load the same parts here
            if server.poll() is not None or time.time() > deadline:
                raise SystemExit("the benchmark server did not start")
            time.sleep(0.2)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        threads = set_threads(a.threads)
        s = synthetic_searcher(a, run, coco_root)  # the same parts in this process: the in-process rows
        words = ["dogs", "cats", "circles", "people", "squares", "horses", "triangles"]
        sentences = [f"a photo of {n} small {words[n % len(words)]} next to a red bus"
                     for n in range(a.warmup + a.queries)]
        photo_name, photo = upload_photo()
        print(f"server: {s.startup_line()}")
        rows = {}
        enc = s.text_encoder
        rows["text: caption encoder alone"] = pct(timed_ms(lambda t: enc.encode([t]), sentences, a.warmup))
        rows["text: encode + head + search, in process"] = pct(
            timed_ms(lambda t: s.text_query(t, 10), sentences, a.warmup))
        n_up = a.warmup + a.queries
        image_enc = s.image_encoder

        def encode_alone(_):
            with torch.inference_mode():
                image_enc([image_enc.preprocess(decode_upload(photo, s.limits))])

        rows["upload: decode + image encoder alone"] = pct(timed_ms(encode_alone, [None] * n_up, a.warmup))
        rows["upload: decode + encode + head + search, in process"] = pct(
            timed_ms(lambda _: s.upload_query(photo, 10), [None] * n_up, a.warmup))
        other = 2 if threads == 1 else 1  # the same in-process queries with another thread count
        set_threads(other)
        n_other = a.warmup + min(a.queries, 40)
        rows[f"text: encode + head + search, in process, {other} threads"] = pct(
            timed_ms(lambda t: s.text_query(t, 10), sentences[:n_other], a.warmup))
        rows[f"upload: decode + encode + head + search, in process, {other} threads"] = pct(
            timed_ms(lambda _: s.upload_query(photo, 10), [None] * n_other, a.warmup))
        set_threads(a.threads)
        img_ids = s.gallery.img_ids
        with httpx.Client(base_url=url, timeout=60) as c:
            while True:
                try:
                    c.get("/api/info").raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.2)

            def get_text(t):
                c.get("/api/text", params={"q": t, "k": 10}).raise_for_status()

            def post_photo(_):
                c.post("/api/upload", params={"k": 10},
                       files={"file": ("photo.jpg", photo, "image/jpeg")}).raise_for_status()

            rows["text: GET /api/text over loopback"] = pct(timed_ms(get_text, sentences, a.warmup))
            rows["upload: POST /api/upload over loopback"] = pct(timed_ms(post_photo, [None] * n_up, a.warmup))
            rows["image id: GET /api/image/{id} over loopback"] = pct(timed_ms(
                lambda i: c.get(f"/api/image/{int(img_ids[i % len(img_ids)])}", params={"k": 10}).raise_for_status(),
                list(range(n_up)), a.warmup))
        conc = {
            "text": throughput(url, lambda cl, i: cl.get("/api/text", params={"q": sentences[i % len(sentences)],
                                                                              "k": 10}), a.clients, a.per_client),
            "upload": throughput(url, lambda cl, i: cl.post("/api/upload", params={"k": 10}, files={
                "file": ("photo.jpg", photo, "image/jpeg")}), a.clients, a.per_client),
            "image id": throughput(url, lambda cl, i: cl.get(f"/api/image/{int(img_ids[i % len(img_ids)])}",
                                                             params={"k": 10}), a.clients, a.per_client),
        }
    finally:
        server.terminate()
        server.wait(30)
    load = os.getloadavg()
    print(f"\nGallery {a.images:,} images / {a.images * a.captions_per_image:,} captions (synthetic, flat index); "
          f"model {s.info['run']} ({s.info['text_encoder']}, {s.info['image_encoder']} "
          f"{s.image_encoder.describe()['settings'].get('input_size', '')} px); upload: {photo_name}, "
          f"{len(photo) / 1e3:.0f} kB; k = 10; load average {load[0]:.1f}\n")
    print("| query | what is timed | p50 ms | p95 ms |")
    print("|---|---|---|---|")
    for name, r in rows.items():
        q, what = name.split(": ", 1)
        print(f"| {q} | {what} | {r['p50_ms']:.1f} | {r['p95_ms']:.1f} |")
    print("\n| query | concurrent clients | requests | requests/s | p50 ms | p95 ms |\n|---|---|---|---|---|---|")
    for name, r in conc.items():
        print(f"| {name} | {r['clients']} | {r['requests']} | {r['req_per_s']:.1f} | {r['p50_ms']:.1f} "
              f"| {r['p95_ms']:.1f} |")
    out = {"gallery": {"images": a.images, "captions": a.images * a.captions_per_image}, "model": s.info["run"],
           "upload": photo_name, "upload_bytes": len(photo), "loadavg": load, "latency": rows, "throughput": conc}
    print(f"\nsaved {save('serve_bench', out)}")
    return out


if __name__ == "__main__":
    main()
