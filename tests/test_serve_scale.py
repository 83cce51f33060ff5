"""What the search server uses at scale: the index rule by gallery size (``--index auto``, the
pipeline's default) and that the server loads what was built; the query encoders' runtimes
(their vectors equal the feature files'); the answers' JSON (returned without FastAPI's encoder).
Runs on the small generated run of :func:`tests.test_serve.build_serve_run`."""

import logging

import numpy as np
import pytest

import crossmodal.index as index_mod
from crossmodal.index import auto_kind, build_index, describe, resolve_kind, search
from crossmodal.serve import Searcher, create_app
from tests.test_serve import run_copy, serve_run_dir  # noqa: F401 (fixtures)

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _clustered(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    """(n, d) unit vectors around 200 centres: the structure real embeddings have and IVF relies on."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((200, d)))
    return _unit(centres[rng.integers(0, 200, n)] + 0.5 * _unit(rng.standard_normal((n, d))))


def test_auto_index_kind_by_gallery_size():
    # the documented rule, as literals (README, get_features_captions.py --help): flat below 100,000
    # vectors, IVF from there; not the constant itself, which a change would move with the test
    assert auto_kind(99_999) == "flat" and auto_kind(100_000) == "ivf"
    assert resolve_kind("auto", 99_999) == "flat" and resolve_kind("auto", 100_000) == "ivf"
    from crossmodal.embed import parser

    assert "flat (exact) below 100,000 vectors, ivf from there" in " ".join(parser().format_help().split())
    assert auto_kind(25_000) == "flat"  # a 5K split's captions stay exact
    assert auto_kind(123_287) == "ivf" and auto_kind(616_767) == "ivf"  # full COCO's images and captions
    assert resolve_kind("hnsw", 10) == "hnsw" and resolve_kind("flat", 10**7) == "flat"  # a kind asked for is kept
    assert resolve_kind("auto", 10) == "flat"
    with pytest.raises(ValueError, match="unknown index kind"):
        resolve_kind("annoy", 10)
    assert describe(build_index(_clustered(500), "auto"))["type"] == "IndexFlatIP"


def test_auto_ivf_recall_against_flat_on_generated_data(monkeypatch):
    """Past the threshold ``auto`` builds IVF; its top 10 are flat's (recall@10 >= 0.95) on
    clustered data. The threshold is lowered so that the test stays small."""
    monkeypatch.setattr(index_mod, "AUTO_IVF_FROM", 5_000)
    xb = _clustered(20_000)
    xq = _unit(xb[::100] + 0.3 * _unit(np.random.default_rng(1).standard_normal((200, xb.shape[1]))))
    ivf = build_index(xb, "auto")
    d = describe(ivf)
    assert d["type"] == "IndexIVFFlat" and d["nlist"] == index_mod.default_nlist(20_000) and d["nprobe"] == 16
    _, want = search(build_index(xb, "flat"), xq, 10)
    _, got = search(ivf, xq, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.tolist(), want.tolist(), strict=True)])
    assert recall >= 0.95, recall


def test_pipeline_builds_by_the_rule_and_the_server_loads_it(run_copy, serve_run_dir, monkeypatch, caplog):  # noqa: F811
    """get_features_captions.py's default (auto) picks each gallery's index by its size; the
    sidecar records it and the server searches the index that was built (IVF answers = flat's
    here: 2 cells, all probed)."""
    from get_features_captions import main as embed_main

    emb = run_copy / "embeddings"
    before = (emb / "val_emb_img.npy").stat().st_mtime_ns
    with caplog.at_level(logging.INFO):
        embed_main(["--run", str(run_copy), "--split", "val"])  # flat job (small galleries): still fresh
    assert "up to date" in caplog.text and (emb / "val_emb_img.npy").stat().st_mtime_ns == before

    flat = Searcher.from_run(run_copy, "val", serve_run_dir["root"])
    n_img, n_cap = len(flat.gallery.img_ids), len(flat.gallery.cap_ids)
    assert n_img < n_cap
    monkeypatch.setattr(index_mod, "AUTO_IVF_FROM", n_cap)  # captions reach it, images do not
    embed_main(["--run", str(run_copy), "--split", "val", "--force"])
    from crossmodal.outputs import read_sidecar

    assert read_sidecar(emb / "val_emb_img.json")["index"]["type"] == "IndexFlatIP"
    side = read_sidecar(emb / "val_emb_text.json")
    assert side["index"]["type"] == "IndexIVFFlat" and side["job"]["index"]["kind"] == "ivf"

    s = Searcher.from_run(run_copy, "val", serve_run_dir["root"])
    assert describe(s.gallery.txt_index)["type"] == "IndexIVFFlat"
    assert describe(s.gallery.img_index)["type"] == "IndexFlatIP"
    with TestClient(create_app(s)) as c:
        info = c.get("/api/info").json()
        assert info["index"] == "IndexFlatIP" and info["caption_index"] == "IndexIVFFlat"
        for iid in s.gallery.img_ids[:4].tolist():
            got = c.get(f"/api/image/{iid}", params={"k": 5}).json()["captions"]
            want = flat.image_query(iid, 5)["captions"]
            assert [h["caption_id"] for h in got] == [h["caption_id"] for h in want]
    with caplog.at_level(logging.INFO):  # the same rule again: fresh, not a conflict
        caplog.clear()
        embed_main(["--run", str(run_copy), "--split", "val"])
    assert "up to date" in caplog.text


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_query_encoders_run_the_fastest_runtime_and_equal_the_feature_files(serve_run_dir):  # noqa: F811
    """The server's caption and image encoders (rebuilt from the feature sidecars, runtime auto:
    OpenVINO bf16 for captions on a CPU with bf16, ONNX Runtime fp32 for images) give the feature
    files' vectors (cosine >= 0.9999 on every row) and PyTorch's; /api/info names the runtimes."""
    import torch

    from crossmodal.coco import load_image
    from crossmodal.runtimes import onnxruntime_version, resolve_runtime
    from crossmodal.store import load_features
    from crossmodal.text_encoders import BertEncoder

    s = Searcher.from_run(serve_run_dir["run"], "val", serve_run_dir["root"])
    want_text = resolve_runtime("auto", "cpu")
    assert s.text_encoder.runtime == want_text
    assert s.image_encoder.runtime == ("onnxruntime" if onnxruntime_version() else "torch")
    assert s.info["runtimes"]["text"].startswith(want_text) and s.info["runtimes"]["image"].startswith(
        s.image_encoder.runtime)
    assert s.info["runtimes"]["text"] in s.startup_line()

    txt, tm = load_features(serve_run_dir["features"] / "val_text_bert.npy")
    text_of = dict(zip(s.gallery.cap_ids.tolist(), s.gallery.cap_text, strict=True))
    rows = list(range(0, len(tm["ids"]), 4))
    sentences = [text_of[int(tm["ids"][r])] for r in rows]
    served = s.text_encoder.encode(sentences)
    assert _cos(served, np.asarray(txt[rows])).min() >= 0.9999
    assert _cos(served, BertEncoder(runtime="torch").encode(sentences)).min() >= 0.9999

    img, im = load_features(serve_run_dir["features"] / "val_img_effnet-lite0.npy")
    ids = [int(i) for i in im["ids"][:6]]
    with torch.inference_mode():
        served = s.image_encoder([s.image_encoder.preprocess(load_image(s.gallery.image_paths[i], i))
                                  for i in ids]).numpy()
    assert _cos(served, np.asarray(img[:6])).min() >= 0.9999


def test_answers_are_the_queries_dicts_as_json(serve_run_dir):  # noqa: F811
    """The endpoints return the query's dict as JSON (no FastAPI encoder in between): equal values."""
    s = Searcher.from_run(serve_run_dir["run"], "val", serve_run_dir["root"])
    iid = int(s.gallery.img_ids[3])
    with TestClient(create_app(s)) as c:
        for url, params, direct in (
                (f"/api/image/{iid}", {"k": 7}, lambda: s.image_query(iid, 7)),
                ("/api/text", {"q": s.gallery.cap_text[2], "k": 5}, lambda: s.text_query(s.gallery.cap_text[2], 5))):
            r = c.get(url, params=params)
            assert r.status_code == 200 and r.headers["content-type"] == "application/json"
            got, want = r.json(), direct()
            assert set(got.pop("ms")) == set(want.pop("ms"))
            assert got == want
