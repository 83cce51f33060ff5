"""The Flickr 1K protocol (crossmodal/protocols.py) and the Flickr8k human-judgement metrics
(crossmodal/judgements.py), each against a naive reference on seeded random data (with ties)."""

import math

import numpy as np
import pytest

from crossmodal.errors import DataError
from crossmodal.judgements import (
    CROWD_FILE,
    EXPERT_FILE,
    extra_positive_metrics,
    graded_ndcg,
    read_judgements,
)
from crossmodal.metrics import evaluate
from crossmodal.protocols import evaluate_split, flickr_order, published
from crossmodal.store import save_features
from tests.flickr_fixtures import write_judgements
from tests.test_protocols import fake_run


def naive_ranking(sims_row: np.ndarray) -> np.ndarray:
    """Gallery rows best first, ties by gallery order (a stable sort of the negated scores)."""
    return np.argsort(-sims_row, kind="stable")


def naive_metrics(sims: np.ndarray, relevant: list[set[int]]) -> dict:
    """R@1/5/10, P@1/5, mAP, medr of queries (rows of ``sims``) with their relevant gallery items."""
    first, p1, p5, aps = [], [], [], []
    for q, rel in enumerate(relevant):
        order = list(naive_ranking(sims[q]))
        pos = sorted(order.index(r) for r in rel)
        first.append(pos[0])
        p1.append(sum(p < 1 for p in pos) / 1)
        p5.append(sum(p < 5 for p in pos) / 5)
        aps.append(np.mean([(k + 1) / (p + 1) for k, p in enumerate(pos)]))
    first = np.array(first)
    out = {f"R@{k}": 100 * np.mean(first < k) for k in (1, 5, 10)}
    return dict(out, **{"P@1": np.mean(p1), "P@5": np.mean(p5), "mAP": np.mean(aps),
                        "medr": math.floor(np.median(first)) + 1})


def case(seed: int, n_img: int = 30, dim: int = 6):
    """Quantised random embeddings (ties happen), 5 captions per image, Flickr ids, and judged pairs."""
    rng = np.random.default_rng(seed)
    img = rng.integers(-2, 3, (n_img, dim)).astype(np.float32)
    rows = np.repeat(np.arange(n_img), 5)
    txt = (img[rows] + rng.integers(-2, 3, (len(rows), dim))).astype(np.float32)
    img_ids = 1_000_000 + 13 * rng.permutation(n_img)
    cap_ids = img_ids[rows] * 10 + np.tile(np.arange(5), n_img)
    return img, txt, rows, img_ids, cap_ids, rng


def write_random_judgements(folder, img_ids, cap_ids, rng, n_expert=120, n_crowd=120):
    name = lambda pid: f"{pid}_abcdef0123.jpg"  # noqa: E731
    cap = lambda cid: f"{name(cid // 10)}#{cid % 10}"  # noqa: E731
    pairs = {(int(rng.choice(img_ids)), int(rng.choice(cap_ids))) for _ in range(n_expert + n_crowd)}
    pairs = sorted(pairs)
    expert = [(name(i), cap(c), tuple(int(x) for x in rng.integers(1, 5, 3))) for i, c in pairs[:n_expert]]
    crowd_pairs = pairs[n_expert // 2:]  # half of them judged by both
    crowd = [(name(i), cap(c), int(y), int(n)) for (i, c), y, n in zip(
        crowd_pairs, rng.integers(0, 4, len(crowd_pairs)), rng.integers(0, 4, len(crowd_pairs)), strict=True)
        if y + n > 0]
    write_judgements(folder, expert, crowd)
    return expert, crowd


def naive_positive_pairs(expert, crowd) -> set[tuple[int, int]]:
    """The rule, written out: expert mean >= 3; pairs only the crowd judged: yes share >= 0.5."""
    ids = lambda im, cap: (int(im.split("_")[0]), int(cap.split("_")[0]) * 10 + int(cap.split("#")[1]))  # noqa: E731
    judged = {ids(im, cap): np.mean(s) >= 3 for im, cap, s in expert}
    for im, cap, yes, no in crowd:
        judged.setdefault(ids(im, cap), yes / (yes + no) >= 0.5)
    return {k for k, v in judged.items() if v}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("direction", ["img2text", "text2img"])
def test_extra_positive_metrics_equal_a_naive_reference(tmp_path, seed, direction):
    img, txt, rows, img_ids, cap_ids, rng = case(seed)
    expert, crowd = write_random_judgements(tmp_path, img_ids, cap_ids, rng)
    judg = read_judgements(tmp_path)
    got = extra_positive_metrics(img, txt, rows, img_ids, cap_ids, judg, direction, chunk=7)
    positive = naive_positive_pairs(expert, crowd)
    row_of_img = {int(i): r for r, i in enumerate(img_ids)}
    row_of_cap = {int(c): r for r, c in enumerate(cap_ids)}
    if direction == "img2text":
        rel = [set(np.flatnonzero(rows == i).tolist()) for i in range(len(img))]
        for i, c in positive:
            rel[row_of_img[i]].add(row_of_cap[c])
        want = naive_metrics(img @ txt.T, rel)
    else:
        rel = [{int(rows[c])} for c in range(len(txt))]
        for i, c in positive:
            rel[row_of_cap[c]].add(row_of_img[i])
        want = naive_metrics(txt @ img.T, rel)
    assert len(positive) > 10
    for k, v in want.items():
        assert got[f"{direction}_J_{k}"] == pytest.approx(v, abs=1e-9), k
    plain = evaluate(img, txt, rows, directions=(direction,))
    assert got[f"{direction}_J_R@1"] >= plain[f"{direction}_R@1"]  # extra positives only add hits


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_graded_ndcg_equals_a_naive_reference(tmp_path, seed):
    img, txt, rows, img_ids, cap_ids, rng = case(seed)
    expert, _ = write_random_judgements(tmp_path, img_ids, cap_ids, rng, n_crowd=0)
    got = graded_ndcg(img, txt, img_ids, cap_ids, read_judgements(tmp_path))
    by_image: dict[int, list[tuple[int, float]]] = {}
    for im, cap, scores in expert:
        pid, cid = int(im.split("_")[0]), int(cap.split("_")[0]) * 10 + int(cap.split("#")[1])
        by_image.setdefault(pid, []).append((list(cap_ids).index(cid), sum(scores) / 3))
    for k in (5, 10):
        ndcgs = []
        for pid, judged in by_image.items():
            i = list(img_ids).index(pid)
            ranked = sorted(judged, key=lambda rg: (-float(img[i] @ txt[rg[0]]), rg[0]))
            dcg = sum(g / math.log2(r + 2) for r, (_, g) in enumerate(ranked[:k]))
            ideal = sum(g / math.log2(r + 2) for r, g in enumerate(sorted((g for _, g in judged), reverse=True)[:k]))
            ndcgs.append(dcg / ideal)
        assert got[f"img2text_NDCG@{k}"] == pytest.approx(np.mean(ndcgs), abs=1e-12)
    assert got["img2text_NDCG_queries"] == len(by_image) and 0 < got["img2text_NDCG@5"] < 1


def test_judgement_files_rule_and_malformed_lines(tmp_path):
    write_judgements(tmp_path, [("1_a.jpg", "2_b.jpg#0", (3, 3, 2)), ("1_a.jpg", "1_a.jpg#1", (4, 3, 3))],
                     [("1_a.jpg", "2_b.jpg#0", 3, 0), ("3_c.jpg", "1_a.jpg#4", 2, 2), ("3_c.jpg", "2_b.jpg#2", 1, 2)])
    j = read_judgements(tmp_path)
    assert j.img_ids.tolist() == [1, 1, 3, 3] and j.cap_ids.tolist() == [11, 20, 14, 22]
    # expert 2.67 wins over the crowd's 3/3 yes; expert 3.33 positive; crowd only: 2 of 4 yes, 1 of 3 yes
    assert j.positive().tolist() == [True, False, True, False]
    (tmp_path / CROWD_FILE).unlink()
    assert len(read_judgements(tmp_path).img_ids) == 2  # either file alone is enough
    for text, why in (("1_a.jpg\t2_b.jpg#0\t3\t5\t2\n", "not 1-4"), ("1_a.jpg\t2_b.jpg\t3\t3\t2\n", "is not"),
                      ("1_a.jpg\t2_b.jpg#0\t3\t3\n", "4 tab-separated fields")):
        (tmp_path / EXPERT_FILE).write_text("1_a.jpg\t2_b.jpg#1\t1\t1\t1\n" + text)
        with pytest.raises(DataError, match=rf"{EXPERT_FILE}:2: malformed expert judgement \(.*{why}") as e:
            read_judgements(tmp_path)
        assert "\n" not in str(e.value)
    (tmp_path / EXPERT_FILE).unlink()
    with pytest.raises(DataError, match="neither ExpertAnnotations.txt nor CrowdFlowerAnnotations.txt"):
        read_judgements(tmp_path)


def flickr_test_case(seed=0, n_img=1000):
    rng = np.random.default_rng(seed)
    img = rng.standard_normal((n_img, 8)).astype(np.float32)
    rows = np.repeat(np.arange(n_img), 5)
    txt = (img[rows] + 1.5 * rng.standard_normal((len(rows), 8))).astype(np.float32)
    img_ids = 2_000_000 + 7 * rng.permutation(n_img)
    cap_ids = img_ids[rows] * 10 + np.tile(np.arange(5), n_img)
    return img, txt, rows, img_ids, cap_ids


def test_flickr_1k_protocol_orders_and_scores_the_test_split():
    img, txt, rows, img_ids, cap_ids = flickr_test_case()
    shuffle = np.random.default_rng(5).permutation(len(txt))  # any row order of the captions
    m = evaluate_split(img, txt[shuffle], rows[shuffle], img_ids, cap_ids[shuffle], img_ids[rows][shuffle],
                       protocol="1k", split="test", dataset="flickr8k")
    order = np.argsort(img_ids)  # naive: images by id, their captions 0-4
    ref = evaluate(img[order], txt[(order[:, None] * 5 + np.arange(5)).ravel()], rows)
    for k, v in ref.items():
        assert m[k] == pytest.approx(v, abs=1e-12), k
    assert m["protocol_info"]["images"] == 1000 and m["protocol_info"]["folds"] == 1
    so = flickr_order(img_ids, cap_ids, img_ids[rows])
    assert so.cap_ids.tolist() == (np.sort(img_ids)[:, None] * 10 + np.arange(5)).ravel().tolist()
    with pytest.raises(DataError, match="has 999 images: the Flickr 1K protocol"):
        flickr_order(img_ids[:999], cap_ids[:4995], img_ids[rows][:4995], "dev")
    with pytest.raises(DataError, match=rf"caption 3 of image {img_ids[0]}"):
        flickr_order(img_ids, np.delete(cap_ids, 3), np.delete(img_ids[rows], 3), "test")
    with pytest.raises(DataError, match="--protocol 5k is COCO's"):
        evaluate_split(img, txt, rows, img_ids, cap_ids, img_ids[rows], protocol="5k", dataset="flickr30k")


def test_published_flickr_rows():
    f8k = {r["model"]: (r["img2text_R@1"], r["text2img_R@1"], r.get("rsum")) for r in published("1k", "flickr8k")}
    assert f8k == {"Kiros et al. 2014 (VGG + LSTM)": (18.0, 12.5, None), "Karpathy & Fei-Fei 2015": (16.5, 11.8, None),
                   "Klein et al. 2015 (Fisher vectors)": (31.0, 21.2, 300.0)}
    f30k = {r["model"]: (r["img2text_R@1"], r["text2img_R@1"]) for r in published("1k", "flickr30k")}
    assert f30k == {"VSE++ (ResNet-152, fine-tuned)": (52.9, None), "SCAN (t-i + i-t AVG)": (67.4, 48.6),
                    "VSE∞ (BUTD regions + BERT)": (81.7, 61.4)}
    assert published("5k", "flickr8k") == [] and all("source" in r for r in published("1k", "flickr30k"))


def test_metric_script_on_a_flickr8k_test_split(tmp_path, capsys):
    from retrieve_img2text import main as i2t_main
    from retrieve_text2img import main as t2i_main

    img, txt, rows, img_ids, cap_ids = flickr_test_case(1)
    run = fake_run(tmp_path / "run", "test", img, txt, img_ids, cap_ids, img_ids[rows])
    for kind, n in (("img", len(img)), ("text", len(txt))):  # the feature files the embeddings name
        save_features(tmp_path / f"test_{kind}_x.npy", np.zeros((n, 2), np.float32),
                      {"kind": kind, "split": "test", "ids": (img_ids if kind == "img" else cap_ids).tolist(),
                       "source": "flickr8k:/data/Flickr8k.token.txt (Flickr_8k.testImages.txt)"})
    for p in (run / "embeddings").glob("*.json"):
        meta = __import__("json").loads(p.read_text())
        meta["features"] = f"../test_{meta['kind']}_x.npy"  # and made from them (what the readers check)
        fmeta = __import__("json").loads((tmp_path / f"test_{meta['kind']}_x.json").read_text())
        meta["job"]["inputs"][meta["kind"]] = fmeta["files"][f"test_{meta['kind']}_x.npy"]["sha256"]
        p.write_text(__import__("json").dumps(meta))
    t = t2i_main(["--run", str(run), "--split", "test", "--protocol", "1k"])
    out = capsys.readouterr().out
    assert "1,000 images x 5 captions in the standard order of the Flickr8k test" in out
    assert "-- published (for reference, not reproduced here)" in out and "Klein et al. 2015" in out and "21.2" in out
    assert "VSE++" not in out and "rsum 300.0" in out  # COCO's rows are not Flickr8k's
    want = evaluate(img, txt, rows, directions=("text2img",))
    assert t["text2img_R@1"] == pytest.approx(want["text2img_R@1"], abs=1e-12)
    rng = np.random.default_rng(3)
    write_random_judgements(tmp_path / "judged", img_ids, cap_ids, rng)
    r = i2t_main(["--run", str(run), "--split", "test", "--flickr8k-judgements", str(tmp_path / "judged")])
    out = capsys.readouterr().out
    assert "Flickr8k human judgements" in out and "NDCG@5" in out
    ref = graded_ndcg(img, txt, img_ids, cap_ids, read_judgements(tmp_path / "judged"))
    assert r["img2text_NDCG@10"] == pytest.approx(ref["img2text_NDCG@10"]) and r["img2text_J_R@1"] >= r["img2text_R@1"]
