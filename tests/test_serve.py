"""The search app (crossmodal.serve): every endpoint, every bad input, start-up refusals.

The run served is a small generated one (40 train / 16 val demo images, BERT captions, a
few epochs), built once per session by :func:`serve_run_dir` (also used by test_browser.py).
"""

import copy
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crossmodal.errors import DataError, FeatureError
from crossmodal.serve import Limits, Searcher, caption_key, create_app, decode_upload, resolve_run

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def build_serve_run(base: Path) -> dict:
    """A small trained run with val embeddings under ``base`` (made once; about 10 s)."""
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
        img_main([*common, "--split", split, "--input-size", "128", "--workers", "0"])
        text_main([*common, "--split", split, "--encoder", "bert"])
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
    for mode, color in (("RGBA", (10, 200, 10, 128)), ("L", 128)):
        buf = io.BytesIO()
        Image.new(mode, (40, 30), color).save(buf, format="PNG")
        r = client.post("/api/upload", files={"file": ("x.png", buf.getvalue(), "image/png")})
        assert r.status_code == 200, (mode, r.text)


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
    for evil in ("/images/..%2F..%2Fetc%2Fpasswd", "/thumbs/../../etc/passwd", "/static/../serve.py"):
        assert client.get(evil).status_code in (404, 422), evil


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
        _is_one_line_error(raw, 413)
        many_pixels = _png((200, 120))  # tiny file, 24,000 pixels
        msg = _is_one_line_error(c.post("/api/upload", files={"file": ("p.png", many_pixels, "image/png")}), 413)
        assert "200x120" in msg and "pixels" in msg
        assert c.post("/api/upload", files={"file": ("ok.png", _png((90, 90)), "image/png")}).status_code == 200


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
    return dst


def test_refuses_a_missing_index(run_copy, serve_run_dir):
    (run_copy / "embeddings" / "val_emb_text.faiss").unlink()
    with pytest.raises(FeatureError, match="val_emb_text.faiss"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


def test_refuses_an_index_of_other_embeddings(run_copy, serve_run_dir):
    from crossmodal.index import build_index, save_index

    save_index(build_index(np.eye(8, 128, dtype=np.float32)), run_copy / "embeddings" / "val_emb_img.faiss")
    with pytest.raises(FeatureError, match="holds 8 vectors|val_emb_img.faiss"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


def test_refuses_another_checkpoint(run_copy, serve_run_dir):
    import torch

    ck = torch.load(run_copy / "best.pt", weights_only=True)
    ck["img_head"]["net.0.weight"] += 0.5
    torch.save(ck, run_copy / "best.pt")
    with pytest.raises(FeatureError, match="another (best.pt|checkpoint)"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


def test_refuses_other_split_or_data(run_copy, serve_run_dir):
    with pytest.raises(FeatureError, match="does not exist"):
        Searcher.from_run(run_copy, "train", serve_run_dir["root"])  # no train embeddings
    side = run_copy / "embeddings" / "val_emb_img.json"
    meta = json.loads(side.read_text())
    meta["ids"][0] = 424242
    side.write_text(json.dumps(meta))
    with pytest.raises((DataError, FeatureError), match="424242|ids"):
        Searcher.from_run(run_copy, "val", serve_run_dir["root"])


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
