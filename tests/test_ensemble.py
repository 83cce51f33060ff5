"""Ensembles: several runs scored as one by averaging their similarities.

Every metric of an ensemble (whole split, Karpathy 5K and 1K, ECCV Caption / CxC) must equal a
naive reference computed here from the averaged similarity matrix written out, with a full
stable argsort per query. Member embeddings are integer-valued and four members are averaged, so
every score is exact in float32 and ties are real (they must break by gallery order)."""

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.ensemble import averaged_similarity, combine
from crossmodal.errors import FeatureError
from crossmodal.metrics import evaluate
from crossmodal.protocols import _eccv_reference, eccv_topk_needed, evaluate_split, standard_order
from tests.test_protocols import write_karpathy_file

M = 4  # 1/sqrt(4) = 0.5: the ensemble's scores stay exact


def member(img, txt, rows, img_ids, cap_ids, cap_img_ids, split="val", run="a"):
    im = {"split": split, "ids": list(map(int, img_ids)), "checkpoint": "best.pt", "epoch": 3, "run": run}
    tm = {"split": split, "ids": list(map(int, cap_ids)), "image_ids": list(map(int, cap_img_ids)), "run": run}
    return img, txt, rows, im, tm


def random_members(n_img=31, seed=0):
    """Four members of different widths over one split: images with 5, 6 or 7 captions."""
    rng = np.random.default_rng(seed)
    rows = np.concatenate([np.full(5 + (i % 3), i) for i in range(n_img)])
    rng.shuffle(rows)
    img_ids, cap_ids = 1000 + np.arange(n_img), 50_000 + np.arange(len(rows))
    out = []
    for m in range(M):
        d = 3 + m
        img = rng.integers(-2, 3, (n_img, d)).astype(np.float32)
        txt = (img[rows] * (m % 2) + rng.integers(-2, 3, (len(rows), d))).astype(np.float32)
        out.append(member(img, txt, rows, img_ids, cap_ids, img_ids[rows], run=f"r{m}"))
    return out


def naive_metrics(sims: np.ndarray, cap_img: np.ndarray) -> dict:
    """Every metric straight from DESIGN.md, from a written-out (N_img, N_cap) similarity matrix:
    a full stable argsort of every query's row, then the relevant flags in ranked order."""
    out = {}
    for d, s in (("img2text", sims), ("text2img", sims.T)):
        order = np.argsort(-s, kind="stable", axis=1)
        hits = cap_img[order] == np.arange(len(s))[:, None] if d == "img2text" else order == cap_img[:, None]
        ranks = np.arange(1, s.shape[1] + 1)
        first = hits.argmax(axis=1) + 1
        out[f"{d}_P@1"] = hits[:, :1].mean()
        out[f"{d}_P@5"] = hits[:, :5].sum(axis=1).mean() / 5
        out[f"{d}_mAP"] = np.mean((np.cumsum(hits, axis=1) / ranks * hits).sum(axis=1) / hits.sum(axis=1))
        for k in (1, 5, 10):
            out[f"{d}_R@{k}"] = 100 * np.mean(first <= k)
        out[f"{d}_medr"] = np.floor(np.median(first - 1)) + 1
        out[f"{d}_meanr"] = first.mean()
    return out


def test_ensemble_metrics_equal_the_naive_reference_on_averaged_similarities():
    members = random_members()
    img, txt, rows, im, tm = combine(members, [f"r{m}" for m in range(M)])
    assert img.shape == (31, sum(3 + m for m in range(M))) and txt.shape[1] == img.shape[1]
    sims = averaged_similarity(members)
    np.testing.assert_array_equal(img.astype(np.float64) @ txt.T.astype(np.float64), sims)  # exact here
    assert len(np.unique(sims)) < sims.size / 4  # many ties: gallery order decides
    got = evaluate(img, txt, rows, chunk=7)
    ref = naive_metrics(sims, rows)
    for k, v in ref.items():
        assert got[k] == pytest.approx(v, abs=1e-12), k
    # the ensemble is not simply one of its members
    assert any(evaluate(*m[:3])["rsum"] != got["rsum"] for m in members)
    assert [x["run"] for x in im["members"]] == ["r0", "r1", "r2", "r3"] and im["run"] == "r0+r1+r2+r3"
    assert tm["dim"] == img.shape[1]


def test_members_must_embed_the_same_split_with_the_same_ids():
    members = random_members()
    names = [f"r{m}" for m in range(M)]
    bad = list(members)
    img, txt, rows, im, tm = bad[2]
    bad[2] = (img, txt, rows, dict(im, ids=im["ids"][::-1]), tm)
    with pytest.raises(FeatureError, match="member r2 has other image ids than r0"):
        combine(bad, names)
    bad[2] = (img, txt, rows, im, dict(tm, ids=tm["ids"][1:] + tm["ids"][:1]))
    with pytest.raises(FeatureError, match="member r2 has other caption ids than r0"):
        combine(bad, names)
    bad[2] = (img, txt, rows, dict(im, split="test"), tm)
    with pytest.raises(FeatureError, match="member r2 has other split than r0"):
        combine(bad, names)
    with pytest.raises(FeatureError, match="at least one run"):
        combine([], [])
    single = combine(members[:1], names[:1])
    assert single[0] is members[0][0]


@pytest.fixture(scope="module")
def karpathy_members(tmp_path_factory):
    """Four integer-valued members over a Karpathy-format test split (shuffled, extra captions)."""
    root = tmp_path_factory.mktemp("karpathy_ens")
    split = load_split(root, "test", write_karpathy_file(root / "dataset_coco.json"))
    rows = split.caption_image_rows()
    rng = np.random.default_rng(7)
    members = []
    for _ in range(M):
        img = rng.integers(-6, 7, (split.num_images, 8)).astype(np.float32)
        txt = (img[rows] + rng.integers(-9, 10, (split.num_captions, 8))).astype(np.float32)
        members.append(member(img, txt, rows, split.image_ids, split.caption_ids, split.caption_image_ids, "test"))
    return split, members


@pytest.mark.slow
def test_ensemble_under_the_1k_5k_and_eccv_protocols(karpathy_members):
    split, members = karpathy_members
    img, txt, rows, im, tm = combine(members, [f"r{m}" for m in range(M)])
    args = (img, txt, rows, im["ids"], tm["ids"], tm["image_ids"])
    so = standard_order(split.image_ids, split.caption_ids, split.caption_image_ids, "test")
    std_rows = np.repeat(np.arange(5000), 5)
    std = [(mi[so.img_rows], mt[so.cap_rows], None, None, None) for mi, mt, *_ in members]

    m1k = evaluate_split(*args, protocol="1k", split="test", chunk=900)
    folds = []
    for f in range(5):
        fold = [(a[1000 * f:1000 * (f + 1)], b[5000 * f:5000 * (f + 1)]) for a, b, *_ in std]
        folds.append(naive_metrics(averaged_similarity(fold), std_rows[:5000]))
    for d in ("img2text", "text2img"):
        for k in (1, 5, 10):
            assert m1k[f"{d}_R@{k}"] == pytest.approx(np.mean([fm[f"{d}_R@{k}"] for fm in folds]), abs=1e-9)
        assert m1k[f"{d}_mAP"] == pytest.approx(np.mean([fm[f"{d}_mAP"] for fm in folds]), abs=1e-12)

    m = evaluate_split(*args, protocol="eccv", split="test", chunk=900)
    ref = _eccv_reference()
    need = eccv_topk_needed()
    short = {"img2text": "i2t", "text2img": "t2i"}
    for d in ("img2text", "text2img"):
        firsts, tops = [], []
        pairs = [(s[0], s[1]) if d == "img2text" else (s[1], s[0]) for s in std]  # (queries, gallery) per member
        n_gal = len(pairs[0][1])
        for a in range(0, len(pairs[0][0]), 1000):  # the averaged similarities of a block of queries
            sims = averaged_similarity([(q[a:a + 1000], g) for q, g in pairs])
            # scores are multiples of 1/M: score * M * G - gallery index orders by score, then gallery order
            key = np.rint(sims * M) * n_gal - np.arange(n_gal)
            q_rows = np.arange(a, a + len(sims))
            rel = 5 * q_rows[:, None] + np.arange(5) if d == "img2text" else std_rows[q_rows, None]
            best_rel = np.take_along_axis(key, rel, 1).max(axis=1)
            firsts.append((key > best_rel[:, None]).sum(axis=1) + 1)
            part = np.argpartition(-key, need[d], axis=1)[:, :need[d]]
            tops.append(np.take_along_axis(part, np.argsort(-np.take_along_axis(key, part, 1), axis=1), 1))
        first, top = np.concatenate(firsts), np.concatenate(tops)
        for k in (1, 5, 10):  # 5K R@K from the same full-matrix ranking
            assert m[f"{d}_R@{k}"] == pytest.approx(100 * np.mean(first <= k), abs=1e-9)
        qid, gid = (so.img_ids, so.cap_ids) if d == "img2text" else (so.cap_ids, so.img_ids)
        items = {short[d]: dict(zip(qid.tolist(), gid[top].tolist(), strict=True))}
        e = ref.eccv_metrics(items, short[d])
        assert m[f"{d}_ECCV_mAP@R"] == pytest.approx(100 * e["eccv_map_at_r"][short[d]], abs=1e-9)
        assert m[f"{d}_ECCV_R-P"] == pytest.approx(100 * e["eccv_rprecision"][short[d]], abs=1e-9)
        assert m[f"{d}_CxC_R@5"] == pytest.approx(100 * ref.cxc_recalls(items, short[d], K=5)[short[d]])


@pytest.fixture(scope="module")
def two_runs(small_root, tmp_path_factory):
    """Two small runs on one set of features (img2text and text2img heads), embedded on val."""
    from get_features_captions import main as embed_main
    from tests.test_runs_common import FAST, features_for, train
    from text2img import main as t2i_train

    feats = features_for(small_root, tmp_path_factory)
    runs = tmp_path_factory.mktemp("ens_runs")
    train(feats, runs, epochs=2)
    t2i_train(["--features-dir", str(feats), "--runs-dir", str(runs), "--epochs", "2", *FAST])
    pair = [runs / "img2text_fasttext", runs / "text2img_fasttext"]
    for r in pair:
        embed_main(["--run", str(r), "--split", "val"])
    return pair


def test_scripts_score_an_ensemble_as_its_averaged_similarity(two_runs, capsys):
    """The scripts' numbers and top-k lists are those of :func:`combine` over the runs' stored
    embeddings (whose equality with the naive averaged-similarity reference is tested above on exact
    data; trained float embeddings have near-ties that float32 and float64 may order differently)."""
    from crossmodal.embed import load_embeddings
    from crossmodal.protocols import exact_topk
    from retrieve_img2text import main as i2t
    from retrieve_text2img import main as t2i

    a, b = two_runs
    members = [load_embeddings(r, "val") for r in two_runs]
    img, txt, rows, _, _ = combine(members, [a.name, b.name])
    ref = evaluate(img, txt, rows)
    assert all(evaluate(*m[:3]) != ref for m in members)  # not one of its members
    sims = averaged_similarity(members)
    for direction, script in (("img2text", i2t), ("text2img", t2i)):
        rec = script(["--run", str(a), "--run", str(b), "--split", "val", "--k", "5"])
        assert [m["run"] for m in rec["members"]] == [a.name, b.name]
        for key in ("R@1", "R@5", "R@10", "P@1", "P@5", "mAP", "medr", "meanr"):
            assert rec[f"{direction}_{key}"] == pytest.approx(ref[f"{direction}_{key}"], abs=1e-12), key
        out = a.parent / f"ensemble_{a.name}+{b.name}" / "retrieval"
        top = np.load(out / f"val_{direction}_full_top5_I.npy")
        q, g = (img, txt) if direction == "img2text" else (txt, img)
        s = sims if direction == "img2text" else sims.T
        # the exact top 5 (Faiss orders equal or float32-tied scores, e.g. of identical captions, its own way)
        np.testing.assert_allclose(np.take_along_axis(s, top, 1), np.take_along_axis(s, exact_topk(q, g, 5), 1),
                                   atol=1e-6)
        first = members[0][:2] if direction == "img2text" else members[0][1::-1]
        assert not np.array_equal(top, exact_topk(*first, 5))  # not the first member's lists
        # and the lists hold the best averaged similarities (to float32 precision)
        np.testing.assert_allclose(np.take_along_axis(s, top, 1), -np.sort(-s, axis=1)[:, :5], atol=1e-5)
        assert f"{a.name}+{b.name}" in capsys.readouterr().out
        again = script(["--run", str(a), "--run", str(b), "--split", "val", "--k", "5"])  # up to date: same record
        assert again == rec
    single = i2t(["--run", str(a), "--split", "val"])
    assert "members" not in single and (a / "retrieval" / "val_img2text_full_metrics.json").is_file()


def test_an_ensemble_of_one_run_twice_is_refused(two_runs):
    from crossmodal.errors import DataError
    from retrieve_img2text import main as i2t

    with pytest.raises(DataError, match="given twice"):
        i2t(["--run", str(two_runs[0]), "--run", str(two_runs[0]), "--split", "val"])
    with pytest.raises(DataError, match="give two or more --run"):
        i2t(["--run", str(two_runs[0]), "--out", str(two_runs[0].parent / "x"), "--split", "val"])


def test_figures_of_an_ensemble_and_its_typed_queries(two_runs, small_root):
    """A typed sentence goes through every member's caption encoder and head: a val caption typed in
    lands on its own stored ensemble vector, and the figures go to the ensemble's folder."""
    from crossmodal.coco import load_split
    from crossmodal.runs import open_runs
    from main_retrieve import main as figures

    a, b = two_runs
    split = load_split(small_root, "val")
    with open_runs(two_runs, "val") as scored:
        txt, tm = scored.emb[1], scored.emb[4]
        text_of = dict(zip(split.caption_ids.tolist(), split.captions, strict=True))
        rows = [0, 7, len(txt) - 1]
        vecs = scored.encode_sentences([text_of[tm["ids"][r]] for r in rows])
    assert vecs.shape == (3, txt.shape[1])
    np.testing.assert_allclose(vecs, txt[rows], atol=1e-5)
    written = figures(["--run", str(a), "--run", str(b), "--split", "val", "--coco-root", str(small_root),
                       "--random", "1", "--query-text", "a red circle", "--k", "3"])
    folder = a.parent / f"ensemble_{a.name}+{b.name}" / "figures"
    assert len(written) == 3 and all(p.parent == folder and p.stat().st_size > 5000 for p in written)
