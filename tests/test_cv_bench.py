"""The cross-validation bench's own guarantees (bench/cv_defaults.py, bench/cv_features.py): a
fold's fastText model never sees a validation caption, ensembles are the package's
``crossmodal.ensemble.combine``, image settings reach the extractor or are refused, and a run of
a few rows keeps the other rows of the results file."""

import dataclasses
import json

import numpy as np
import pytest

from bench import cv_defaults
from bench.cv_features import Features, check_fasttext_fold, image_kwargs, split_subset
from crossmodal.coco import load_split
from crossmodal.ensemble import averaged_similarity
from crossmodal.errors import FeatureError
from crossmodal.metrics import evaluate
from crossmodal.text_encoders import train_fasttext

SMALL_FT = {"model": "fasttext", "dim": 16, "epoch": 5, "bucket": 2000}


def test_split_subset_keeps_only_the_images_captions(small_root):
    split = load_split(small_root, "train")
    sub = split_subset(split, np.array([5, 0, 2]), "part")
    assert sub.name == "part" and sub.image_ids.tolist() == split.image_ids[[0, 2, 5]].tolist()
    assert set(sub.caption_image_ids.tolist()) == set(sub.image_ids.tolist())
    keep = np.isin(split.caption_image_ids, sub.image_ids)
    assert sub.caption_ids.tolist() == split.caption_ids[keep].tolist()
    assert sub.captions == [c for c, k in zip(split.captions, keep, strict=True) if k]
    assert sub.file_names == [split.file_names[i] for i in (0, 2, 5)]


def test_fasttext_fold_model_sees_only_the_folds_training_captions(small_root, tmp_path):
    feats = Features(small_root, tmp_path, split="train")
    n = feats.split.num_images
    folds = np.array_split(np.arange(n), 3)
    seen = []
    for val_rows in folds[:2]:
        train_rows = np.setdiff1d(np.arange(n), val_rows)
        txt, meta = feats.txt(SMALL_FT, train_rows)
        assert txt.shape == (feats.split.num_captions, 16) and np.isfinite(txt).all()
        assert meta["ids"] == feats.split.caption_ids.tolist()  # every caption of the split is encoded
        model_ids = meta["text_model_train_image_ids"]
        assert sorted(model_ids) == sorted(feats.split.image_ids[train_rows].tolist())
        assert not set(model_ids) & set(feats.split.image_ids[val_rows].tolist())
        seen.append(meta["weights"]["sha256_16"])
    assert seen[0] != seen[1]  # one model per fold
    other = feats.txt({**SMALL_FT, "epoch": 3}, np.setdiff1d(np.arange(n), folds[0]))[1]  # and per setting
    assert other["weights"]["sha256_16"] not in seen
    with pytest.raises(ValueError, match="per fold"):
        feats.txt(SMALL_FT)


def test_fasttext_fold_check_refuses_a_model_that_saw_validation_captions(small_root, tmp_path):
    split = load_split(small_root, "train")
    train_rows, val_rows = np.arange(16), np.arange(16, split.num_images)
    train = split_subset(split, train_rows, "fold")
    ok = train_fasttext(train, tmp_path / "ok", dim=8, epoch=2, bucket=500)
    check_fasttext_fold(ok, train, split.image_ids[val_rows])  # passes
    whole = train_fasttext(split, tmp_path / "leak", dim=8, epoch=2, bucket=500)
    with pytest.raises(AssertionError, match="validation images"):
        check_fasttext_fold(whole, train, split.image_ids[val_rows])
    short = dataclasses.replace(train, caption_ids=train.caption_ids[1:], caption_image_ids=train.caption_image_ids[1:],
                                captions=train.captions[1:])  # the same images, one caption fewer
    model = train_fasttext(short, tmp_path / "short", dim=8, epoch=2, bucket=500)
    with pytest.raises(AssertionError, match="other captions"):
        check_fasttext_fold(model, train, split.image_ids[val_rows])


def test_image_settings_are_routed_by_signature():
    enc, ext = image_kwargs({"input_size": 128, "levels": (1,), "variant": 0, "pool": "max", "workers": 0})
    assert enc == {"input_size": 128, "levels": (1,), "variant": 0, "pool": "max"}
    assert ext == {"batch_size": 4, "workers": 0}
    with pytest.raises(SystemExit, match="no_such_setting"):
        image_kwargs({"input_size": 128, "no_such_setting": 1})


def _run(rng, n_img=6, per=2, d=4, ids=None):
    """A fake bench run: unit embeddings of a validation fold and the ids they embed."""
    i = rng.normal(size=(n_img, d)).astype(np.float32)
    t = rng.normal(size=(n_img * per, d)).astype(np.float32)
    i /= np.linalg.norm(i, axis=1, keepdims=True)
    t /= np.linalg.norm(t, axis=1, keepdims=True)
    rows = np.repeat(np.arange(n_img), per)
    img_ids = np.arange(100, 100 + n_img) if ids is None else ids
    return {"emb": (i, t), "val_cap_img_rows": rows,
            "val_ids": (img_ids, np.arange(1000, 1000 + n_img * per), img_ids[rows])}


def test_bench_ensemble_scores_the_averaged_similarity(monkeypatch):
    rng = np.random.default_rng(0)
    a, b = _run(rng), _run(rng, d=3)
    got = cv_defaults.ensemble([a, b], ["a", "b"])
    sim = averaged_similarity([(a["emb"][0], a["emb"][1]), (b["emb"][0], b["emb"][1])])
    # the same metrics from the written-out averaged similarity: embeddings whose product is it
    want = evaluate(sim, np.eye(sim.shape[1]), a["val_cap_img_rows"], ks=(1, 5))
    assert got["best"]["rsum"] == pytest.approx(want["rsum"])
    other = _run(rng, ids=np.arange(200, 206))
    with pytest.raises(FeatureError, match="other image ids"):
        cv_defaults.ensemble([a, other], ["a", "other"])


def test_a_run_of_some_rows_keeps_the_others(tmp_path, monkeypatch):
    monkeypatch.setattr(cv_defaults, "RESULTS", tmp_path)
    old = {"folds": 5, "seeds": 3, "epochs": 30, "configs": {"a": {}, "b": {}}, "summary": {"a": 1, "b": 2},
           "runs": {"a": [], "b": []}, "extract_s": {"x": 1.0}}
    (tmp_path / "cv.json").write_text(json.dumps(old))
    new = cv_defaults.merged("cv", {"folds": 5, "seeds": 3, "epochs": 30, "configs": {"b": {"n": 1}, "c": {}},
                                    "summary": {"b": 3, "c": 4}, "runs": {"b": [1], "c": []}, "extract_s": {}})
    assert new["summary"] == {"a": 1, "b": 3, "c": 4} and new["configs"]["b"] == {"n": 1}
    assert new["extract_s"] == {"x": 1.0}
    with pytest.raises(SystemExit, match="other folds"):
        cv_defaults.merged("cv", {"folds": 3, "seeds": 3, "epochs": 30})


def test_an_ensemble_is_paired_against_its_members_mean_and_best_member():
    runs = lambda *xs: [{"best": {"rsum": x, "img2text_R@1": 0.0, "text2img_R@1": 0.0, "epoch": 1}, "last_rsum": None}
                        for x in xs]  # noqa: E731
    a, b, ens = runs(10, 20, 30), runs(14, 30, 40), runs(13, 26, 36)
    s = cv_defaults.summarise("ens", ens, a, ("baseline", a), [a, b])
    assert s["ref"] == "members' mean" and s["ref_delta_mean"] == pytest.approx(np.mean([1, 1, 1]))
    assert s["ref_delta_std"] == pytest.approx(0.0)
    assert s["best_member_delta_mean"] == pytest.approx(np.mean([-1, -4, -4]))  # b has the higher mean
    assert s["delta_mean"] == pytest.approx(np.mean([3, 6, 6]))
    cfg = {"ens": cv_defaults.Config("ens", "two runs", members=("a", "b"))}
    row = cv_defaults.table(cfg, {"ens": s}).splitlines()[-1]
    assert "+1.0 ± 0.0 **win** vs members' mean" in row and "loss vs the best member" in row


def test_cached_runs_are_keyed_by_the_training_defaults(monkeypatch):
    """A run cache made under other training defaults (here the step) is not reused for a config
    whose flags did not change: the key holds every resolved training setting."""
    from crossmodal import train_step

    base = next(c for c in cv_defaults.configs() if c.name == "baseline")
    now = cv_defaults.trained_settings(base, 30)
    assert now["precision"] in ("fp32", "bf16")  # auto is resolved, as the runs train
    monkeypatch.setattr(train_step, "DEFAULT_STEP", "exact" if now["step"] == "fast" else "fast")
    other = cv_defaults.trained_settings(base, 30)
    assert other != now and other["step"] != now["step"]
    assert cv_defaults.trained_settings(base, 20) != now  # epochs are in it too
