"""README claims about the search app that test_serve.py does not cover: serving a fastText run,
the server's defaults (loopback, one thread, 10 MB / 40 MP) and its refusal of features of
another encoder. Runs on the small generated run of :func:`tests.test_serve.build_serve_run`."""

import json
import logging
import shutil

import numpy as np
import pytest

from crossmodal.errors import FeatureError, ModelError
from crossmodal.serve import Limits, Searcher, create_app, parser
from tests.test_serve import build_serve_run

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_serve_run(tmp_path_factory.getbasetemp() / "serve_run")


@pytest.fixture(scope="module")
def fasttext_run(paths, tmp_path_factory):
    """An img2text fastText run over the same generated data (its own features folder), with val
    embeddings: what ``make search`` serves when fastText has the best validation rsum."""
    from get_features_captions import main as embed_main
    from img2text import main as train_main
    from make_database_text import main as text_main

    base = tmp_path_factory.mktemp("ft_serve")
    feats = base / "features"
    feats.mkdir()
    for name in ("train_img_effnet-lite0", "val_img_effnet-lite0"):
        for suffix in (".npy", ".json"):
            shutil.copy(paths["features"] / f"{name}{suffix}", feats / f"{name}{suffix}")
    for split in ("train", "val"):
        text_main(["--coco-root", str(paths["root"]), "--split", split, "--features-dir", str(feats), "--no-progress",
                   "--encoder", "fasttext", "--fasttext-dim", "32", "--fasttext-bucket", "2000",
                   "--fasttext-epoch", "5", "--fasttext-train-split", "train"])
    train_main(["--features-dir", str(feats), "--runs-dir", str(base / "runs"), "--epochs", "4", "--no-progress"])
    run = base / "runs" / "img2text_fasttext"
    embed_main(["--run", str(run), "--split", "val"])
    return run


@pytest.mark.slow
def test_a_fasttext_run_is_served(fasttext_run, paths):
    from crossmodal.embed import load_embeddings

    s = Searcher.from_run(fasttext_run, "val", paths["root"])
    assert s.info["text_encoder"].startswith("fasttext") and "fasttext" in s.startup_line()
    img, txt, *_ = load_embeddings(fasttext_run, "val")
    g = s.gallery
    with TestClient(create_app(s)) as c:
        for row in (0, 9, 30):
            body = c.get("/api/text", params={"q": g.cap_text[row], "k": 4}).json()
            true_id = int(g.cap_img_ids[row])
            assert body["query"]["is_caption"] and true_id in body["query"]["true_image_ids"]
            exact = np.asarray(img, dtype=np.float64) @ np.asarray(txt[row], dtype=np.float64)
            assert [h["image_id"] for h in body["images"]] == g.img_ids[np.argsort(-exact, kind="stable")[:4]].tolist()
            np.testing.assert_allclose([h["score"] for h in body["images"]], np.sort(exact)[::-1][:4], atol=1e-3)
            assert all(h["true"] == (h["image_id"] in body["query"]["true_image_ids"]) for h in body["images"])
        iid = int(g.img_ids[2])
        photo = s.image_path(iid).read_bytes()
        up = c.post("/api/upload", params={"k": 3}, files={"file": ("p.jpg", photo, "image/jpeg")}).json()
        assert up["images"][0]["image_id"] == iid and up["images"][0]["score"] > 0.99


def test_server_defaults():
    a = parser().parse_args(["--run", "r", "--coco-root", "c"])
    assert a.host == "127.0.0.1" and a.threads == 1 and a.port == 8000
    assert int(a.max_upload_mb * 2**20) == Limits().max_upload_bytes == 10 * 2**20
    assert a.max_pixels == Limits().max_pixels == 40_000_000


@pytest.mark.parametrize("extra,host,warned,limits", [
    ([], "127.0.0.1", False, (10 * 2**20, 40_000_000)),
    (["--host", "0.0.0.0", "--max-upload-mb", "2", "--max-pixels", "1000"], "0.0.0.0", True, (2 * 2**20, 1000)),
])
def test_server_binds_loopback_with_one_thread_and_warns_otherwise(paths, monkeypatch, caplog, extra, host, warned,
                                                                  limits):
    """``run()`` up to uvicorn: what it binds, the threads it sets, the limits the app enforces."""
    import torch
    import uvicorn

    from crossmodal import serve

    got = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: got.update(kw, app=app))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    caplog.set_level(logging.INFO)
    try:
        serve.run(["--run", str(paths["run"]), "--split", "val", "--coco-root", str(paths["root"]), "--port", "0",
                   *extra])
        threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(old)
    assert got["host"] == host and got["port"] == 0 and threads == 1
    lim = got["app"].state.searcher.limits
    assert (lim.max_upload_bytes, lim.max_pixels) == limits
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert bool([w for w in warnings if f"bound to {host}" in w and "other machines" in w]) == warned, warnings


def test_server_refuses_features_of_another_encoder(paths, tmp_path, monkeypatch):
    """Caption features whose sidecar records other encoder settings than the checkpoint was
    trained on, and an image encoder that rebuilds with other weights: both refused at start-up."""
    from crossmodal.image_encoders import EffNetLite0Regions

    run = tmp_path / "runs" / "copy"
    shutil.copytree(paths["run"], run, ignore=shutil.ignore_patterns("serve_cache"))
    feats = tmp_path / "features"
    shutil.copytree(paths["features"], feats, ignore=shutil.ignore_patterns("*.lock"))
    Searcher.from_run(run, "val", paths["root"])  # the copy is served as it is
    real = EffNetLite0Regions.describe
    monkeypatch.setattr(EffNetLite0Regions, "describe",
                        lambda self: dict(real(self), weights=dict(real(self)["weights"], sha256_16="0" * 16)))
    with pytest.raises(ModelError, match=r"the rebuilt image encoder differs from the one that made image features "
                                         r"\(effnet-lite0\) in weights"):
        Searcher.from_run(run, "val", paths["root"])
    monkeypatch.undo()
    side = feats / "val_text_bert.json"
    meta = json.loads(side.read_text())
    meta["settings"] = dict(meta["settings"], pooling="cls")
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match=r"caption features .*val_text_bert.npy.* differ from the checkpoint's in "
                                           r"settings"):
        Searcher.from_run(run, "val", paths["root"])
