"""Flickr8k and Flickr30k roots through every stage: the pipeline (--dataset, train/dev), then the
test split through make_database_img/text -> get_features_captions -> retrieve_* -> main_retrieve ->
the search server's Searcher; a Flickr30k root (results.csv + Karpathy json) through the scripts;
the leak check by image id across Flickr splits; and a slice of the real Flickr8k."""

import json

import numpy as np
import pytest

from crossmodal import databases, embed, retrieve, train
from crossmodal.errors import DataError
from crossmodal.pipeline import MODELS
from crossmodal.pipeline import run as pipeline_run
from crossmodal.searcher import Searcher
from crossmodal.text_encoders import DEFAULT_BERT
from tests.conftest import shared
from tests.flickr_fixtures import karpathy_json, make_flickr8k, make_flickr30k, photo_name

SMALL = ["--input-size", "64", "--no-progress"]


def _features(root, split, feats, *data, bert_model="minilm"):
    databases.run_image(["--coco-root", str(root), *data, "--split", split, "--features-dir", str(feats), *SMALL])
    databases.run_text(["--coco-root", str(root), *data, "--split", split, "--features-dir", str(feats),
                        "--encoder", "bert", "--bert-model", bert_model, "--no-progress"])


@pytest.mark.slow
def test_flickr8k_root_through_the_pipeline_scoring_figures_and_server(tmp_path, monkeypatch):
    root = tmp_path / "Flickr8k"
    splits = make_flickr8k(root, 16, 8, 8)
    monkeypatch.chdir(tmp_path)
    summary = pipeline_run(["--dataset", "flickr8k", "--coco-root", str(root), "--train-split", "train",
                            "--val-split", "dev", "--out", "f8k", "--epochs", "1", "--input-size", "64",
                            "--fasttext-dim", "16", "--fasttext-bucket", "2000", "--fasttext-epoch", "3", "--quiet"])
    assert set(summary["results"]) == {f"{d}_{e}" for _, d, e in MODELS}
    assert "Results on dev (8 images, 40 captions)" in summary["header"]
    meta = json.loads((tmp_path / "features" / "f8k" / "dev_img_effnet-lite0.json").read_text())
    assert meta["ids"] == sorted(photo_name(k)[0] for k in splits["dev"]) and meta["source"].startswith("flickr8k:")
    assert all(p.is_file() for figs in summary["figures"].values() for p in map(__import__("pathlib").Path, figs))

    run = tmp_path / "runs" / "f8k" / "img2text_bert"  # the held-out test split, stage by stage
    _features(root, "test", tmp_path / "features" / "f8k", "--dataset", "flickr8k", bert_model=DEFAULT_BERT)
    embed.run(["--run", str(run), "--split", "test"])
    for direction in ("img2text", "text2img"):
        m = retrieve.run_metrics(["--run", str(run), "--split", "test"], direction)
        assert m["queries"] == (8 if direction == "img2text" else 40) and 0 <= m[f"{direction}_R@1"] <= 100
    figs = retrieve.run_figures(["--run", str(run), "--split", "test", "--coco-root", str(root), "--random", "1",
                                 "--query-text", "a red circle"])
    assert len(figs) == 3 and all(p.is_file() for p in figs)
    s = Searcher.from_run(run, "test", root, dataset="flickr8k")
    assert s.gallery.img_ids.tolist() == sorted(photo_name(k)[0] for k in splits["test"])
    with pytest.raises(DataError, match="share 16 images"):  # train images are never scored
        embed.run(["--run", str(run), "--split", "train"])


@pytest.mark.slow
def test_flickr30k_results_csv_and_karpathy_splits_through_the_scripts(tmp_path, monkeypatch):
    root = tmp_path / "flickr30k"
    ks = make_flickr30k(root, 24, csv=True, bad_row=True)
    kfile = karpathy_json(root / "dataset_flickr30k.json", {"train": ks[:16], "dev": ks[16:20], "test": ks[20:]},
                          "flickr30k")
    monkeypatch.chdir(tmp_path)
    feats = tmp_path / "features"
    with pytest.raises(DataError, match=r"results.csv:8: expected"):  # the official file, malformed row
        _features(root, "all", feats)
    for split in ("train", "val"):
        _features(root, split, feats, "--karpathy-file", str(kfile))
    train.run(["--features-dir", str(feats), "--runs-dir", "runs", "--train-split", "train", "--val-split", "val",
               "--epochs", "1", "--no-progress"], direction="text2img", text_encoder="bert")
    run = tmp_path / "runs" / "text2img_bert"
    embed.run(["--run", str(run), "--split", "val"])
    m = retrieve.run_metrics(["--run", str(run), "--split", "val"], "text2img")
    assert m["queries"] == 20 and m["gallery"] == 4
    s = Searcher.from_run(run, "val", root, str(kfile))
    assert s.gallery.img_ids.tolist() == [photo_name(k, True)[0] for k in ks[16:20]]


@pytest.mark.slow
def test_a_slice_of_the_real_flickr8k(tmp_path, monkeypatch):
    root = shared("flickr8k")
    monkeypatch.chdir(tmp_path)
    feats = tmp_path / "features"
    for split in ("train[:20]", "dev[:10]"):
        _features(root, split, feats)
    train.run(["--features-dir", str(feats), "--runs-dir", "runs", "--train-split", "train[:20]",
               "--val-split", "dev[:10]", "--epochs", "2", "--no-progress"], direction="img2text", text_encoder="bert")
    run = tmp_path / "runs" / "img2text_bert"
    embed.run(["--run", str(run), "--split", "dev[:10]"])
    m = retrieve.run_metrics(["--run", str(run), "--split", "dev[:10]"], "img2text")
    assert m["queries"] == 10 and m["gallery"] == 50 and np.isfinite(m["img2text_mAP"])
    s = Searcher.from_run(run, "dev[:10]", root)
    assert len(s.gallery.img_ids) == 10
