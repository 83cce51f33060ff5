"""The search app (crossmodal.serve): every endpoint, every bad input, start-up refusals.

The run served is a small generated one (40 train / 16 val demo images, BERT captions, a
few epochs), built once per session by :func:`serve_run_dir` (also used by test_browser.py).
"""

import contextlib
import copy
import io
import json
import logging
import select
import shutil
import socket
import threading
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal.errors import DataError, FeatureError
from crossmodal.serve import Limits, Searcher, caption_key, create_app, decode_upload, resolve_run

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def build_serve_run(base: Path, input_size: int = 128) -> dict:
    """A small trained run with val embeddings under ``base`` (made once; about 10 s); images
    encoded at ``input_size`` px (bench/serve_bench.py: 256, the demo's)."""
    from crossmodal.demo_data import generate_demo_dataset
    from get_features_captions import main as embed_main
    from img2text_bert import main as train_main
    from make_database_img import main as img_main
    from make_database_text import main as text_main

    paths = {"root": base / "data", "features": base / "features", "run": base / "runs" / "tiny"}
    if (base / "done").is_file():
        return paths
    generate_demo_dataset(paths["root"], num_train=40, num_val=16, seed=0, image_size=112)
    common = ["--coco-root", str(paths["root"]), "--features-dir", str(paths["features"]), "--no-progress"]
    for split in ("train", "val"):
        img_main([*common, "--split", split, "--input-size", str(input_size), "--workers", "0"])
        text_main([*common, "--split", split, "--encoder", "bert", "--bert-model", "minilm"])
    train_main(["--features-dir", str(paths["features"]), "--runs-dir", str(base / "runs"), "--name", "tiny",
                "--epochs", "4", "--no-progress"])
    embed_main(["--run", str(paths["run"]), "--split", "val"])
    (base / "done").write_text("ok")
    return paths


@pytest.fixture(scope="session")
def serve_run_dir(tmp_path_factory) -> dict:
    return build_serve_run(tmp_path_factory.getbasetemp() / "serve_run")


@pytest.fixture(scope="module")
def searcher(serve_run_dir) -> Searcher:
    return Searcher.from_run(serve_run_dir["run"], "val", serve_run_dir["root"])


@pytest.fixture(scope="module")
def client(searcher):
    with TestClient(create_app(searcher)) as c:
        yield c


def _jpeg(searcher, row: int = 1) -> bytes:
    return searcher.image_path(int(searcher.gallery.img_ids[row])).read_bytes()


def _png(size=(64, 48), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def _is_one_line_error(r, status: int) -> str:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and body["error"] and "\n" not in body["error"], body
    return body["error"]


def test_startup_line_and_info(searcher, client):
    line = searcher.startup_line()
    assert "tiny" in line and "split val: 16 images" in line and "IndexFlatIP" in line and "captions" in line
    info = client.get("/api/info").json()
    assert info["run"] == "tiny" and info["split"] == "val" and info["images"] == 16
    assert info["captions"] == len(searcher.gallery.cap_ids) and info["index"] == "IndexFlatIP"
    assert info["image_encoder"] == "effnet-lite0" and info["text_encoder"].startswith("bert")
    assert "img2text_R@1" in info["metrics"] and info["limits"]["max_k"] == 100
    assert "run_dir" not in info  # no server paths leak


def _stored(searcher):
    """The stored embeddings the server was loaded from: (img (N_img, d), txt (N_cap, d)), float64."""
    from crossmodal.embed import load_embeddings

    img, txt, *_ = load_embeddings(searcher.run_dir, searcher.split_name)
    return np.asarray(img, dtype=np.float64), np.asarray(txt, dtype=np.float64)


def test_text_query_marks_the_true_image(searcher, client):
    g = searcher.gallery
    row = 5
    text, true_id = g.cap_text[row], int(g.cap_img_ids[row])
    r = client.get("/api/text", params={"q": "  " + text.upper() + ". ", "k": 16})  # case, spaces, period ignored
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["query"]["is_caption"] and true_id in body["query"]["true_image_ids"]
    imgs = body["images"]
    assert len(imgs) == 16 and {i["image_id"] for i in imgs} == set(g.img_ids.tolist())
    scores = [i["score"] for i in imgs]
    assert scores == sorted(scores, reverse=True) and all(-1.0001 <= s <= 1.0001 for s in scores)
    marked = {i["image_id"] for i in imgs if i["true"]}
    assert true_id in marked and marked == set(body["query"]["true_image_ids"])
    first = imgs[0]
    assert first["thumb_url"] == f"/thumbs/{first['image_id']}.jpg" and first["url"] == f"/images/{first['image_id']}"
    assert first["captions"] and all(isinstance(c, str) for c in first["captions"])
    assert set(body["ms"]) >= {"encode", "search", "total"}


def test_text_query_scores_are_the_stored_embeddings(searcher, client):
    """The caption typed as it is stored encodes to its stored embedding: the k=5 images and
    their scores are the exact top 5 of stored image embeddings x stored caption embedding."""
    g = searcher.gallery
    img, txt = _stored(searcher)
    for row in (5, 17, 40):
        exact = img @ txt[row]  # (N_img,)
        body = client.get("/api/text", params={"q": g.cap_text[row], "k": 5}).json()
        got = body["images"]
        assert len(got) == 5
        for hit in got:
            assert hit["score"] == pytest.approx(exact[g.img_row[hit["image_id"]]], abs=1e-3), (row, hit)
        want = np.sort(exact)[::-1][:5]
        np.testing.assert_allclose([h["score"] for h in got], want, atol=1e-3)
        assert [h["image_id"] for h in got] == g.img_ids[np.argsort(-exact, kind="stable")[:5]].tolist()


def test_free_sentence_marks_nothing(client):
    body = client.get("/api/text", params={"q": "a purple elephant reading a newspaper", "k": 3}).json()
    assert len(body["images"]) == 3 and not body["query"]["is_caption"]
    assert not any(i["true"] for i in body["images"])


def test_image_query_captions_and_more_like_this(searcher, client):
    g = searcher.gallery
    iid = int(g.img_ids[3])
    n_cap = len(g.cap_ids)
    body = client.get(f"/api/image/{iid}", params={"k": 100}).json()
    caps = body["captions"]
    assert len(caps) == min(100, n_cap)
    own = {int(c) for c, i in zip(g.cap_ids, g.cap_img_ids, strict=True) if i == iid}
    assert {c["caption_id"] for c in caps if c["true"]} == own & {c["caption_id"] for c in caps}
    assert all(c["image_id"] == iid for c in caps if c["true"]) and caps[0]["text"]
    assert body["query"]["captions"] == searcher._true_captions(iid) and body["query"]["thumb_url"]
    sims = body["images"]
    assert len(sims) == 15 and iid not in {s["image_id"] for s in sims}  # more like this: not itself
    small = client.get(f"/api/image/{iid}", params={"k": 2}).json()
    assert len(small["captions"]) == 2 and len(small["images"]) == 2


def test_image_query_is_the_exact_top_k_of_the_stored_embeddings(searcher, client):
    """At k=5 (fewer than the captions) the captions and "more like this" images are the exact
    top 5 of the stored embeddings (demo captions repeat word for word: tied scores may swap)."""
    g = searcher.gallery
    img, txt = _stored(searcher)
    for row in (0, 3, 11):
        iid = int(g.img_ids[row])
        body = client.get(f"/api/image/{iid}", params={"k": 5}).json()
        cap_scores = txt @ img[row]  # (N_cap,)
        cap_row = {int(c): r for r, c in enumerate(g.cap_ids)}
        caps = body["captions"]
        assert len(caps) == 5 and len({c["caption_id"] for c in caps}) == 5
        got = [cap_scores[cap_row[c["caption_id"]]] for c in caps]
        np.testing.assert_allclose(got, np.sort(cap_scores)[::-1][:5], atol=1e-4)  # the 5 best, best first
        np.testing.assert_allclose([c["score"] for c in caps], got, atol=1e-3)
        exact = np.argsort(-cap_scores, kind="stable")[:5]
        distinct = np.abs(cap_scores[exact][:, None] - np.delete(cap_scores, exact)[None]).min(1) > 1e-5
        distinct &= np.abs(np.subtract.outer(cap_scores[exact], cap_scores[exact]) + 2 * np.eye(5)).min(1) > 1e-5
        got_ids = [c["caption_id"] for c, d in zip(caps, distinct, strict=True) if d]
        assert got_ids == g.cap_ids[exact][distinct].tolist()  # untied captions: the exact ones, in order
        sims = img @ img[row]
        sims[row] = -np.inf  # more like this: never itself
        want = g.img_ids[np.argsort(-sims, kind="stable")[:5]].tolist()
        assert [i["image_id"] for i in body["images"]] == want, (iid, body["images"])


def test_upload_of_a_split_image_finds_itself(searcher, client):
    """The rebuilt image encoder + head reproduce the stored embedding: the image is its own nearest."""
    iid = int(searcher.gallery.img_ids[1])
    r = client.post("/api/upload", params={"k": 5}, files={"file": ("photo.jpg", _jpeg(searcher), "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["images"][0]["image_id"] == iid and body["images"][0]["score"] > 0.99
    assert len(body["captions"]) == 5 and not any(c["true"] for c in body["captions"])
    assert body["query"]["type"] == "upload" and body["query"]["width"] > 0
    raw = client.post("/api/upload", content=_jpeg(searcher), headers={"content-type": "image/jpeg"}).json()
    assert raw["images"][0]["image_id"] == iid
    png = client.post("/api/upload", params={"k": 3}, files={"file": ("red.png", _png(), "image/png")})
    assert png.status_code == 200 and len(png.json()["images"]) == 3


def test_rgba_and_grey_uploads_are_accepted(client):
    """A transparent PNG is the image composited on white, a grey one its RGB copy: both give
    exactly the results of the equivalent RGB upload (the same nearest captions and scores)."""

    def png(im):
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)
    alpha = rng.integers(0, 255, (30, 40, 1), dtype=np.uint8)
    on_white = (rgb * (alpha / 255.0) + 255 * (1 - alpha / 255.0)).round().astype(np.uint8)
    grey = rng.integers(0, 255, (30, 40), dtype=np.uint8)
    cases = {"RGBA": (Image.fromarray(np.concatenate([rgb, alpha], 2), "RGBA"), Image.fromarray(on_white, "RGB")),
             "L": (Image.fromarray(grey, "L"), Image.fromarray(np.repeat(grey[..., None], 3, 2), "RGB"))}
    results = {}
    for mode, (im, same_as_rgb) in cases.items():
        got, want = (client.post("/api/upload", params={"k": 8}, files={"file": ("x.png", png(x), "image/png")})
                     for x in (im, same_as_rgb))
        assert got.status_code == 200 and want.status_code == 200, (mode, got.text, want.text)
        strip = lambda b: [(c["caption_id"], c["score"]) for c in b["captions"]] + [  # noqa: E731
            (i["image_id"], i["score"]) for i in b["images"]]
        for a, b in zip(strip(got.json()), strip(want.json()), strict=True):
            assert a[0] == b[0] and a[1] == pytest.approx(b[1], abs=2e-3), (mode, a, b)
        results[mode] = strip(got.json())
    assert results["RGBA"] != results["L"]  # two different images: two different answers


def test_thumbnails_are_cached_and_served_by_id_only(searcher, client, serve_run_dir):
    iid = int(searcher.gallery.img_ids[0])
    r = client.get(f"/thumbs/{iid}.jpg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    im = Image.open(io.BytesIO(r.content))
    assert max(im.size) <= Limits().thumb_size
    cached = list((serve_run_dir["run"] / "serve_cache").rglob(f"{iid}_*.jpg"))
    assert len(cached) == 1 and not list(cached[0].parent.glob("*.tmp"))
    mtime = cached[0].stat().st_mtime_ns
    assert client.get(f"/thumbs/{iid}.jpg").content == r.content and cached[0].stat().st_mtime_ns == mtime
    full = client.get(f"/images/{iid}")
    assert full.status_code == 200 and full.content == searcher.image_path(iid).read_bytes()
    _is_one_line_error(client.get("/thumbs/999999999.jpg"), 404)
    _is_one_line_error(client.get("/images/999999999"), 404)
    _is_one_line_error(client.get("/images/abc"), 422)


@contextlib.contextmanager
def live_server(app):
    """``app`` served by a real uvicorn in a thread on a free loopback port; yields the port."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.02)
    assert srv.started, "uvicorn did not start"
    try:
        yield sock.getsockname()[1]
    finally:
        srv.should_exit = True
        thread.join(10)
        sock.close()


def _read_response(conn, timeout: float = 10) -> tuple[int, bytes]:
    """(status, body) of one HTTP/1.1 response read from ``conn`` (its Content-Length, or to the close)."""
    conn.settimeout(timeout)
    data, length = b"", None
    with contextlib.suppress(ConnectionResetError):
        while length is None or len(data) < length:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
            if length is None and b"\r\n\r\n" in data:
                head = data.split(b"\r\n\r\n", 1)[0].lower()
                for line in head.split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        length = len(head) + 4 + int(line.split(b":")[1])
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """GET ``target`` byte for byte as given (no client normalises ``..`` or ``%2F``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        return _read_response(conn)


def test_raw_traversal_paths_get_404_and_no_file(searcher):
    """Paths sent raw to a real uvicorn: ``..`` and encoded slashes reach the app as sent."""
    from crossmodal import serve

    secret = serve.STATIC_DIR.parent / "serve.py"
    with live_server(create_app(searcher)) as port:
        assert raw_get(port, f"/images/{int(searcher.gallery.img_ids[0])}")[0] == 200  # the server answers
        for evil in ("/thumbs/../../../../../../etc/passwd", "/images/../../../../../../etc/passwd",
                     "/images/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/thumbs/..%2F..%2Fetc%2Fpasswd.jpg",
                     "/static/../serve.py", "/static/..%2Fserve.py", "/static/%2E%2E/serve.py",
                     "/static/..%2F..%2F..%2F..%2F..%2F..%2Fetc%2Fpasswd", "/static//etc/passwd"):
            status, body = raw_get(port, evil)
            assert status == 404, (evil, status, body[:200])
            assert b"root:" not in body and b"def create_app" not in body, evil
            assert set(json.loads(body)) == {"error"}, (evil, body[:200])
    assert b"def create_app" in secret.read_bytes()  # the file the traversal aims at exists


def test_page_and_static_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "/static/app.js" in page.text and "/static/style.css" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # offline: no CDN
    for name in ("app.js", "style.css"):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and len(r.content) > 500
        assert "https://" not in r.text
    assert client.get("/docs").status_code == 404  # FastAPI's docs page would load a CDN
    assert "/api/text" in client.get("/openapi.json").json()["paths"]


@pytest.mark.parametrize("params,status,words", [
    ({"q": "", "k": 5}, 422, "blank"),
    ({"q": "   \t ", "k": 5}, 422, "blank"),
    ({"q": "a \ufffd dog", "k": 5}, 422, "not UTF-8"),
    ({"q": "a dog " * 100, "k": 5}, 413, "limit is 500"),
    ({"q": "a dog", "k": 0}, 422, "between 1 and 100"),
    ({"q": "a dog", "k": 101}, 422, "between 1 and 100"),
    ({"q": "a dog", "k": -3}, 422, "between 1 and 100"),
    ({"q": "a dog", "k": "ten"}, 422, "k:"),
    ({"k": 5}, 422, "q:"),
])
def test_bad_text_queries(client, params, status, words):
    msg = _is_one_line_error(client.get("/api/text", params=params), status)
    assert words in msg, msg


def test_control_characters_in_a_text_query_separate_words_and_never_reach_the_encoder(searcher, client,
                                                                                       monkeypatch):
    seen = []
    orig = searcher.text_encoder.encode
    monkeypatch.setattr(searcher.text_encoder, "encode", lambda texts: seen.extend(texts) or orig(texts))
    for q in ("a dog\x00", "a\x1b[31mdog\x07", "\x00\x01 a dog"):
        r = client.get("/api/text", params={"q": q, "k": 3})
        assert r.status_code == 200, q
        assert not any(unicodedata.category(c) == "Cc" for c in r.json()["query"]["text"]), q
    assert seen and not any(unicodedata.category(c) == "Cc" for t in seen for c in t), seen
    assert "a dog" in seen and "a [31mdog" in seen


def test_text_query_of_bytes_that_are_not_utf8_is_refused(client):
    msg = _is_one_line_error(client.get("/api/text?q=a%FF%FEdog&k=5"), 422)
    assert "not UTF-8" in msg, msg


def test_bad_image_queries(searcher, client):
    assert "not in split val" in _is_one_line_error(client.get("/api/image/123456789"), 404)
    _is_one_line_error(client.get("/api/image/a-cat"), 422)
    iid = int(searcher.gallery.img_ids[0])
    assert "between 1 and 100" in _is_one_line_error(client.get(f"/api/image/{iid}", params={"k": 1000}), 422)
    _is_one_line_error(client.get("/api/nothing"), 404)
    _is_one_line_error(client.delete("/api/info"), 405)


def _truncated_jpeg(searcher) -> bytes:
    data = _jpeg(searcher)
    return data[: len(data) // 2]


def test_bad_uploads_get_clear_4xx_and_the_server_keeps_serving(searcher, client):
    def up(data, **kw):
        return client.post("/api/upload", files={"file": ("f", data, "application/octet-stream")}, **kw)

    assert "not a JPEG or PNG" in _is_one_line_error(up(b"just some text, not an image"), 415)
    gif = io.BytesIO()
    Image.new("RGB", (8, 8)).save(gif, format="GIF")
    assert "not a JPEG or PNG" in _is_one_line_error(up(gif.getvalue()), 415)
    assert "truncated or corrupt" in _is_one_line_error(up(_truncated_jpeg(searcher)), 422)
    png = _png((50, 50))
    assert "truncated or corrupt" in _is_one_line_error(up(png[: len(png) - 30]), 422)
    assert "empty" in _is_one_line_error(up(b""), 422)
    _is_one_line_error(client.post("/api/upload", content=b""), 422)
    assert "between 1 and 100" in _is_one_line_error(up(png, params={"k": 0}), 422)
    no_field = client.post("/api/upload", files={"photo": ("f.png", png, "image/png")})
    assert "'file'" in _is_one_line_error(no_field, 422)
    assert client.get("/api/info").status_code == 200
    assert client.get("/api/text", params={"q": "a red circle"}).status_code == 200


def test_upload_limits_bytes_and_pixels(searcher):
    small = copy.copy(searcher)
    small.limits = Limits(max_upload_bytes=20_000, max_pixels=100 * 100)
    with TestClient(create_app(small)) as c:
        big = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(big).save(buf, format="PNG")  # ~43 kB of noise
        assert len(buf.getvalue()) > 20_000
        msg = _is_one_line_error(c.post("/api/upload", files={"file": ("n.png", buf.getvalue(), "image/png")}), 413)
        assert "limit" in msg
        raw = c.post("/api/upload", content=buf.getvalue(), headers={"content-type": "image/png"})
        assert "20000" in _is_one_line_error(raw, 413)
        many_pixels = _png((200, 120))  # tiny file, 24,000 pixels
        msg = _is_one_line_error(c.post("/api/upload", files={"file": ("p.png", many_pixels, "image/png")}), 413)
        assert "200x120" in msg and "pixels" in msg
        assert c.post("/api/upload", files={"file": ("ok.png", _png((90, 90)), "image/png")}).status_code == 200


def _send_until_answered(port: int, head: bytes, chunks, wait_after: int) -> tuple[int, bytes, int]:
    """Send ``head`` then ``chunks`` (HTTP/1.1 chunked) until the server answers; after
    ``wait_after`` bytes of body, wait for the answer instead of sending on. Returns (status,
    body, body bytes sent before the answer)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(head)
        for chunk in chunks:
            if select.select([conn], [], [], 0)[0]:
                break  # answered
            if sent > wait_after:
                select.select([conn], [], [], 10)  # the server must answer now, without the rest
                break
            try:
                conn.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        if not select.select([conn], [], [], 0)[0]:
            return 0, b"", sent  # no answer while the body was still coming
        status, body = _read_response(conn)
        return status, body, sent


def test_upload_is_refused_before_the_body_is_read(searcher):
    """A body over the limit is refused while it streams in (the Content-Length check, and the
    cap on bytes read for chunked bodies that announce no length), not after it is all read."""
    small = copy.copy(searcher)
    small.limits = Limits(max_upload_bytes=20_000)
    cap = 20_000 + 64 * 1024  # the limit + room for a multipart form's headers
    head = (b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    with live_server(create_app(small)) as port:
        chunks = (bytes(8192) for _ in range(2000))  # 16 MB offered, 8 kB at a time
        status, body, sent = _send_until_answered(port, head, chunks, wait_after=cap + 16 * 1024)
        assert status == 413, (status, sent)
        assert cap < sent <= cap + 32 * 1024, sent  # read past the cap, refused at once
        assert "limit of 20000 bytes" in json.loads(body)["error"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # an announced length: no body read
            conn.sendall(b"POST /api/upload HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         b"Content-Length: 1000000000\r\n\r\n" + bytes(1000))
            ready = select.select([conn], [], [], 10)[0]
            assert ready, "no answer to a 1 GB Content-Length before its body came"
            status, body = _read_response(conn)
        assert status == 413 and "limit of 20000 bytes" in json.loads(body)["error"]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:  # under the limit: served
            png = _png((30, 30))
            conn.sendall(b"POST /api/upload?k=2 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                         + f"Content-Length: {len(png)}\r\nConnection: close\r\n\r\n".encode() + png)
            status, body = _read_response(conn)
        assert status == 200 and len(json.loads(body)["images"]) == 2


def test_pil_decompression_bomb_is_refused(monkeypatch):
    """Past our own pixel limit, PIL's bomb warning (an error here) is caught too."""
    from PIL import Image as PILImage

    from crossmodal.serve import QueryError

    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)
    for size in ((40, 30), (100, 100)):  # warning (> limit) and error (> 2x limit)
        with pytest.raises(QueryError) as e:
            decode_upload(_png(size), Limits(max_pixels=10**9))
        assert e.value.status == 413 and "too large" in e.value.message


def test_caption_key():
    assert caption_key("  A dog  on a Beach. ") == caption_key("a dog on a beach") == "a dog on a beach"


# --- start-up refusals ---------------------------------------------------------------------


@pytest.fixture
def run_copy(serve_run_dir, tmp_path):
    dst = tmp_path / "runs" / "copy"
    shutil.copytree(serve_run_dir["run"], dst, ignore=shutil.ignore_patterns("serve_cache"))
    (tmp_path / "features").symlink_to(serve_run_dir["features"])  # where the sidecars say (../../features)
    return dst


def test_refuses_a_missing_index(run_copy, serve_run_dir):
    (run_copy / "embeddings" / "val_emb_text.faiss").unlink()
    with pytest.raises(FeatureError, match="val_emb_text.faiss"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


def test_refuses_an_index_of_other_embeddings(run_copy, serve_run_dir):
    """An index republished with a matching digest in its sidecar (so only the size check is
    left to catch it): 8 vectors for 16 embeddings."""
    from crossmodal.index import build_index, save_index
    from crossmodal.outputs import file_record

    index = run_copy / "embeddings" / "val_emb_img.faiss"
    save_index(build_index(np.eye(8, 128, dtype=np.float32)), index)
    side = run_copy / "embeddings" / "val_emb_img.json"
    meta = json.loads(side.read_text())
    meta["files"]["val_emb_img.faiss"] = file_record(index)
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match=r"val_emb_img.faiss holds 8 vectors, its embeddings 16"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


def test_refuses_another_checkpoint(run_copy, serve_run_dir):
    import torch

    ck = torch.load(run_copy / "best.pt", weights_only=True)
    ck["img_head"]["net.0.weight"] += 0.5
    torch.save(ck, run_copy / "best.pt")
    with pytest.raises(FeatureError, match="another (best.pt|checkpoint)"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


def test_refuses_other_split_or_data(run_copy, serve_run_dir):
    with pytest.raises(FeatureError, match=r"val_emb_img.npy does not exist|train_emb_img.npy does not exist"):
        Searcher.from_run(run_copy, "train", serve_run_dir["root"])  # no train embeddings
    other = serve_run_dir["root"].parent / "other_data"  # a COCO folder whose val split has other images
    if not other.is_dir():
        from crossmodal.demo_data import generate_demo_dataset

        generate_demo_dataset(other, num_train=4, num_val=4, seed=5, image_size=64)
    with pytest.raises(DataError, match=r"list \d+ image ids and \d+ caption ids that split 'val' of .*other_data"):
        Searcher.from_run(run_copy, "val", other)


def test_refuses_embeddings_whose_ids_disagree_naming_file_and_id(run_copy, serve_run_dir):
    from crossmodal.store import rows_digest

    side = run_copy / "embeddings" / "val_emb_img.json"
    meta = json.loads(side.read_text())
    lost = meta["ids"][0]
    meta["ids"][0] = 424242  # image embeddings of another image: its captions' image is gone
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match=r"val_emb_img.npy are not the ones its rows were made with"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])  # edited ids: their recorded digest differs
    meta["rows_sha256"] = rows_digest(meta)  # a consistent sidecar of other images
    side.write_text(json.dumps(meta))
    with pytest.raises((DataError, FeatureError)) as e:
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])
    msg = str(e.value)
    assert "val_emb_img" in msg and ("424242" in msg or str(lost) in msg), msg


def test_cli_refusal_is_one_line_exit_2(run_copy, serve_run_dir, caplog):
    from crossmodal.serve import main

    (run_copy / "embeddings" / "val_emb_img.faiss").unlink()
    caplog.set_level(logging.ERROR)
    with pytest.raises(SystemExit) as e:
        main(["--run", str(run_copy), "--split", "val", "--coco-root", str(serve_run_dir["root"]), "--port", "8765"])
    assert e.value.code == 2
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0].getMessage() and "faiss" in errors[0].getMessage()


def test_pipeline_output_resolves_to_its_best_model(tmp_path):
    for name in ("img2text_fasttext", "img2text_bert"):
        (tmp_path / name).mkdir()
    results = {"img2text_fasttext": {"img2text_R@1": 10.0, "text2img_R@1": 5.0},
               "img2text_bert": {"img2text_R@1": 20.0, "text2img_R@10": 30.0},
               "gone": {"img2text_R@1": 99.0}}
    (tmp_path / "summary.json").write_text(json.dumps({"results": results}))
    run, how = resolve_run(tmp_path)
    assert run == tmp_path / "img2text_bert" and "rsum (50.0)" in how
    with pytest.raises(FeatureError, match="no such folder"):
        resolve_run(tmp_path / "missing")
    with pytest.raises(FeatureError, match="neither a training run"):
        resolve_run(tmp_path / "img2text_bert")
