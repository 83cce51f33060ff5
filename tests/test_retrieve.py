"""The back half: embeddings + Faiss indexes, metric scripts, query figures, index agreement."""

import json

import numpy as np
import pytest
from PIL import Image

from crossmodal.errors import DataError, FeatureError
from crossmodal.index import build_index, search
from crossmodal.store import load_features, save_features
from get_features_captions import main as embed_main
from img2text_bert import main as train_main
from main_retrieve import main as figures_main
from retrieve_img2text import main as i2t_main
from retrieve_text2img import main as t2i_main


@pytest.fixture(scope="module")
def run_dir(demo_features, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    train_main(["--features-dir", str(demo_features), "--runs-dir", str(runs), "--epochs", "8", "--no-progress"])
    run = runs / "img2text_bert"
    embed_main(["--run", str(run), "--split", "val"])
    return run


def test_embeddings_are_normalised_and_indexed(run_dir):
    img, im = load_features(run_dir / "embeddings" / "val_emb_img.npy")
    txt, tm = load_features(run_dir / "embeddings" / "val_emb_text.npy")
    assert img.shape == (50, 128) and txt.shape[1] == 128 and len(tm["image_ids"]) == len(txt)
    np.testing.assert_allclose(np.linalg.norm(img, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)
    assert (run_dir / "embeddings" / "val_emb_img.faiss").is_file()


def test_metric_scripts(run_dir, capsys):
    from crossmodal.coco import rows_of
    from crossmodal.metrics import evaluate

    img, im = load_features(run_dir / "embeddings" / "val_emb_img.npy")
    txt, tm = load_features(run_dir / "embeddings" / "val_emb_text.npy")
    rows = rows_of(np.asarray(im["ids"]), np.asarray(tm["image_ids"]))
    want = evaluate(np.asarray(img), np.asarray(txt), rows)  # the stored embeddings, scored directly
    r = i2t_main(["--run", str(run_dir), "--split", "val"])
    out = capsys.readouterr().out
    assert "img2text on val (full): 50 queries" in out and "P@1" in out and "R@10" in out
    keys = ("P@1", "P@5", "mAP", "R@1", "R@5", "R@10", "medr", "meanr")
    for k in keys:
        assert r[f"img2text_{k}"] == pytest.approx(want[f"img2text_{k}"], abs=1e-9), k
    assert r["queries"] == 50 and r["gallery"] == len(txt) == len(tm["ids"])
    saved = json.loads((run_dir / "retrieval" / "val_img2text_full_metrics.json").read_text())
    assert all(saved[f"img2text_{k}"] == r[f"img2text_{k}"] for k in keys)
    t = t2i_main(["--run", str(run_dir), "--split", "val"])
    for k in keys:
        assert t[f"text2img_{k}"] == pytest.approx(want[f"text2img_{k}"], abs=1e-9), k
    assert t["queries"] == len(txt) and t["gallery"] == 50
    assert 0 < want["img2text_R@1"] < 100 and 0 < want["text2img_R@1"] < 100  # neither trivial nor hopeless
    lines = [json.loads(x) for x in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [x["direction"] for x in lines if x["type"] == "eval"][-2:] == ["img2text", "text2img"]
    pr = Image.open(run_dir / "figures" / "pr_val_img2text_full.png")
    assert pr.size[0] > 300 and pr.size[1] > 250


def test_faiss_topk_agrees_with_exact(run_dir):
    """The saved Faiss top-10 lists (flat index) are the exact ranking, up to the order of
    exactly tied captions (demo captions repeat word for word across images)."""
    img, _ = load_features(run_dir / "embeddings" / "val_emb_img.npy")
    txt, _ = load_features(run_dir / "embeddings" / "val_emb_text.npy")
    saved_I = np.load(run_dir / "retrieval" / "val_img2text_full_top10_I.npy")
    sims = np.asarray(img, dtype=np.float64) @ np.asarray(txt, dtype=np.float64).T
    exact = np.argsort(-sims, axis=1, kind="stable")[:, :10]
    exact_scores = np.take_along_axis(sims, exact, 1)
    for I in (saved_I, search(build_index(txt, "flat"), img, 10)[1]):
        np.testing.assert_allclose(np.take_along_axis(sims, I, 1), exact_scores, atol=1e-5)
        top = -np.sort(-sims, axis=1)[:, :11]
        gap = top[:, :-1] - top[:, 1:]  # (Q, 10): gap after each of the top 10
        before = np.c_[np.full(len(top), np.inf), gap[:, :-1]]
        distinct = np.minimum(before, gap) > 1e-5  # not tied with a neighbour
        assert np.array_equal(I[distinct], exact[distinct])


def test_approximate_indexes_recall():
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((50, 32))
    xb = (centres[rng.integers(0, 50, 5000)] + 0.3 * rng.standard_normal((5000, 32))).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[:200] + 0.05 * rng.standard_normal((200, 32)).astype(np.float32)
    _, truth = search(build_index(xb, "flat"), xq, 10)
    recall = lambda got: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, truth, strict=True)])  # noqa: E731
    assert recall(search(build_index(xb, "ivf"), xq, 10)[1]) > 0.9
    assert recall(search(build_index(xb, "hnsw"), xq, 10)[1]) > 0.9
    assert recall(search(build_index(xb, "ivf", nlist=64, nprobe=64), xq, 10)[1]) == 1.0  # all cells: exact


def test_figures(run_dir, demo_root):
    paths = figures_main(["--run", str(run_dir), "--coco-root", str(demo_root), "--split", "val", "--random", "1",
                          "--query-text", "a large red circle in the centre"])
    assert len(paths) == 3
    for p in paths:
        im = Image.open(p)
        assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 250
        assert len(np.unique(np.asarray(im.convert("L")))) > 20  # not a blank canvas
    with pytest.raises(DataError, match="no query given"):
        figures_main(["--run", str(run_dir), "--coco-root", str(demo_root), "--split", "val"])
    with pytest.raises(FeatureError, match="no image with this id"):
        figures_main(["--run", str(run_dir), "--coco-root", str(demo_root), "--split", "val", "--query-id", "7"])


def test_embed_refuses_features_of_another_encoder(run_dir, demo_features, tmp_path):
    import shutil

    feats = tmp_path / "f"
    shutil.copytree(demo_features, feats)
    arr, meta = load_features(feats / "val_text_bert.npy", mmap=False)
    save_features(feats / "val_text_bert.npy", arr, dict(meta, settings={"pooling": "cls", "max_length": 64}))
    with pytest.raises(FeatureError, match="caption features of split val .* differ from the checkpoint's in settings"):
        embed_main(["--run", str(run_dir), "--split", "val", "--features-dir", str(feats)])
