"""The standard COCO 5K/1K protocols and the ECCV Caption / CxC metrics, against eccv-caption.

Everything runs offline on data made here, keyed by the real Karpathy test ids that eccv-caption
ships: a ``dataset_coco.json`` with the 5,000 test images in shuffled order, their captions
shuffled, some images given a 6th and 7th caption and a few val images added; integer-valued
synthetic embeddings (exact float scores, with ties) in the split's own row order. The project's
exact chunked ranks must give eccv-caption's COCO 1K/5K R@1/5/10 on the same rankings.
"""

import json

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.errors import DataError
from crossmodal.protocols import (
    PUBLISHED,
    _eccv_reference,
    eccv_data_dir,
    eccv_metrics,
    eccv_topk_needed,
    evaluate_split,
    exact_topk,
    published,
    standard_caption_ids,
    standard_order,
)

DIM = 16
SHORT = {"img2text": "i2t", "text2img": "t2i"}


def write_karpathy_file(path, n_extra=400, n_val=30, seed=0):
    """A Karpathy-format file: the real test ids in shuffled order, extra captions, some val images."""
    rng = np.random.default_rng(seed)
    std = standard_caption_ids()
    c2i = json.loads((eccv_data_dir() / "original_caption_to_image.json").read_text())
    caps: dict[int, list[int]] = {}
    for c in std.tolist():
        caps.setdefault(c2i[str(c)][0], []).append(c)
    images = list(caps)
    extra_of = rng.choice(len(images), n_extra, replace=False)
    next_id = 900_000_000
    for n, k in enumerate(extra_of):  # a 6th caption, and for some a 7th
        for _ in range(1 + (n % 3 == 0)):
            caps[images[k]].append(next_id)
            next_id += 1
    entries = []
    for iid in rng.permutation(images).tolist():
        sents = [{"sentid": c, "raw": f"caption {c}", "tokens": ["caption", str(c)], "imgid": iid}
                 for c in rng.permutation(caps[iid]).tolist()]
        entries.append({"split": "test", "filepath": "val2014", "filename": f"COCO_val2014_{iid:012d}.jpg",
                        "cocoid": iid, "imgid": iid, "sentences": sents})
    for v in range(n_val):  # images of another split, interleaved
        iid = 990_000 + v
        sents = [{"sentid": 950_000_000 + 10 * v + j, "raw": f"val {v} {j}", "tokens": [], "imgid": iid}
                 for j in range(5)]
        entries.insert(int(rng.integers(len(entries))), {"split": "val", "filepath": "val2014",
                                                          "filename": f"v{iid}.jpg", "cocoid": iid, "sentences": sents})
    path.write_text(json.dumps({"images": entries, "dataset": "coco"}))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """The split read back through crossmodal.coco, and embeddings in its row order (ids sorted)."""
    root = tmp_path_factory.mktemp("karpathy")
    kfile = write_karpathy_file(root / "dataset_coco.json")
    split = load_split(root, "test", kfile)
    rng = np.random.default_rng(1)
    rows = split.caption_image_rows()
    img = rng.integers(-8, 9, (split.num_images, DIM)).astype(np.float32)
    txt = (img[rows] + rng.integers(-12, 13, (split.num_captions, DIM))).astype(np.float32)
    extra = split.caption_ids >= 900_000_000
    txt[extra] = 4 * img[rows[extra]]  # strong extra captions: they would change the numbers if they were kept
    return split, img, txt, rows


@pytest.fixture(scope="module")
def standard(case):
    """The test's own standard order (straight from coco_test_ids.npy) and its exact similarities."""
    split, img, txt, _ = case
    std = standard_caption_ids()
    cap_row = {c: r for r, c in enumerate(split.caption_ids.tolist())}
    cap_rows = np.array([cap_row[c] for c in std.tolist()])
    std_img = split.caption_image_ids[cap_rows]
    img_order = std_img[::5]
    img_row = {i: r for r, i in enumerate(split.image_ids.tolist())}
    img_std = img[[img_row[i] for i in img_order.tolist()]].astype(np.float64)
    txt_std = txt[cap_rows].astype(np.float64)
    return img_order, std, img_std, txt_std


def ref_topk(q, g, k, chunk=1000):
    """Independent reference: best ``k`` per query, ties by gallery order. Scores here are exact
    integers, so ``score * G - index`` is a unique key that orders by score, then gallery order."""
    import torch

    qt, gt = torch.from_numpy(np.asarray(q, dtype=np.float64)), torch.from_numpy(np.asarray(g, dtype=np.float64))
    down = torch.arange(len(g), dtype=torch.float64)
    out = [torch.topk(torch.addmm(-down, qt[a : a + chunk], gt.T, alpha=len(g)), k, dim=1).indices.numpy()
           for a in range(0, len(q), chunk)]
    return np.concatenate(out)


def merged(top_a, top_b, q, g):
    """Union of two top lists of one query, ranked by (score desc, gallery order)."""
    ids = np.union1d(top_a, top_b)
    return ids[np.lexsort((ids, -(g[ids] @ q)))]


def test_standard_order_from_a_shuffled_file_with_extra_captions(case, standard):
    split, img, txt, _ = case
    img_order, std, _, _ = standard
    assert split.num_images == 5000 and split.num_captions > 25_000  # 6th/7th captions are in the split
    so = standard_order(split.image_ids, split.caption_ids, split.caption_image_ids, "test")
    assert so.cap_ids.tolist() == std.tolist() and so.img_ids.tolist() == img_order.tolist()
    assert split.caption_ids[so.cap_rows].tolist() == std.tolist()
    assert split.image_ids[so.img_rows].tolist() == img_order.tolist()
    assert so.dropped_captions == split.num_captions - 25_000
    # the file's order does not matter: the same split reversed gives the same standard rows' ids
    rev = standard_order(split.image_ids[::-1], split.caption_ids[::-1], split.caption_image_ids[::-1], "test")
    assert rev.cap_ids.tolist() == std.tolist() and split.caption_ids[::-1][rev.cap_rows].tolist() == std.tolist()


def test_1k_and_5k_equal_eccv_caption(case, standard):
    split, img, txt, rows = case
    img_order, std, img_std, txt_std = standard
    args = (img, txt, rows, split.image_ids, split.caption_ids, split.caption_image_ids)
    m5 = evaluate_split(*args, protocol="5k", split="test", chunk=700)
    m1 = evaluate_split(*args, protocol="1k", split="test")
    # the same rankings, listed for eccv-caption: per query the union of its 5K top-10 and its
    # fold's top-10, ranked; eccv-caption's 1K filters a list to the fold, its 5K reads the head
    k = 10
    i2t_5k, t2i_5k = ref_topk(img_std, txt_std, k), ref_topk(txt_std, img_std, k)
    i2t, t2i = {}, {}
    for f in range(5):
        ii, cc = np.arange(1000 * f, 1000 * (f + 1)), np.arange(5000 * f, 5000 * (f + 1))
        i2t_f = cc[ref_topk(img_std[ii], txt_std[cc], k)]
        t2i_f = ii[ref_topk(txt_std[cc], img_std[ii], k)]
        for n, q in enumerate(ii):
            i2t[int(img_order[q])] = std[merged(i2t_5k[q], i2t_f[n], img_std[q], txt_std)].tolist()
        for n, q in enumerate(cc):
            t2i[int(std[q])] = img_order[merged(t2i_5k[q], t2i_f[n], txt_std[q], img_std)].tolist()
    ref = _eccv_reference().compute_all_metrics(i2t, t2i, target_metrics=("coco_1k_recalls", "coco_5k_recalls"),
                                                Ks=(1, 5, 10))
    for d in ("img2text", "text2img"):
        for kk in (1, 5, 10):
            assert m5[f"{d}_R@{kk}"] / 100 == pytest.approx(ref[f"coco_5k_r{kk}"][SHORT[d]], abs=1e-6), (d, kk)
            assert m1[f"{d}_R@{kk}"] / 100 == pytest.approx(ref[f"coco_1k_r{kk}"][SHORT[d]], abs=1e-6), (d, kk)
    # a meaningful case: neither trivial nor hopeless, and 1K is easier than 5K
    assert 5 < m5["img2text_R@1"] < 95 and 5 < m5["text2img_R@1"] < 95
    assert m1["text2img_R@1"] > m5["text2img_R@1"] and m1["rsum"] > m5["rsum"]
    assert m5["protocol_info"]["captions"] == 25_000 and m5["protocol_info"]["dropped_captions"] > 0


ECCV_K = {"img2text": 48, "text2img": 19}  # the most ECCV positives of any query in eccv-caption's files


@pytest.fixture(scope="module")
def eccv_expected(standard):
    """ECCV/CxC metrics computed by eccv-caption on the test's own top-K lists: K from the shipped
    positives counted here, lists from :func:`ref_topk` (not the project's exact_topk)."""
    img_order, std, img_std, txt_std = standard
    ref = _eccv_reference()
    out, tops = {}, {}
    for d, (q, g, qid, gid) in {"img2text": (img_std, txt_std, img_order, std),
                                "text2img": (txt_std, img_std, std, img_order)}.items():
        k = max(10, max(len(v) for v in ref.eccv_gts[SHORT[d]].values()))
        assert k == ECCV_K[d]
        top = gid[ref_topk(q, g, k)]
        tops[d] = (qid, top)
        items = {SHORT[d]: dict(zip(qid.tolist(), top.tolist(), strict=True))}
        e = ref.eccv_metrics(items, SHORT[d])
        out[f"{d}_ECCV_mAP@R"] = 100 * e["eccv_map_at_r"][SHORT[d]]
        out[f"{d}_ECCV_R-P"] = 100 * e["eccv_rprecision"][SHORT[d]]
        for kk in (1, 5, 10):
            out[f"{d}_CxC_R@{kk}"] = 100 * ref.cxc_recalls(items, SHORT[d], K=kk)[SHORT[d]]
    return out, tops


def test_eccv_and_cxc_metrics_through_eccv_caption(standard, eccv_expected):
    img_order, std, img_std, txt_std = standard
    assert eccv_topk_needed() == ECCV_K  # a shorter K would cut mAP@R's lists
    m = eccv_metrics(img_std.astype(np.float32), txt_std.astype(np.float32), img_order, std)
    want, tops = eccv_expected
    ref = _eccv_reference()
    for key, v in want.items():
        assert m[key] == pytest.approx(v, abs=1e-9), key
    for d in ("img2text", "text2img"):
        qid, top = tops[d]
        # ECCV R@1 by hand from the shipped positives: the top-1 item is a positive
        gts = ref.eccv_gts[SHORT[d]]
        top1 = dict(zip(qid.tolist(), top[:, 0].tolist(), strict=True))
        assert m[f"{d}_ECCV_R@1"] == pytest.approx(100 * np.mean([top1[k] in set(v) for k, v in gts.items()]))
        assert 0 < m[f"{d}_ECCV_mAP@R"] <= m[f"{d}_ECCV_R-P"] < 100
    with pytest.raises(DataError, match="need top-"):
        eccv_metrics(img_std, txt_std, img_order, std, directions=("img2text",), topk={"img2text": 5})


def test_exact_topk_breaks_ties_by_gallery_order():
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    g = np.array([[0.0, 1.0], [1.0, 0.0], [2.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=np.float32)
    assert exact_topk(q, g, 3).tolist() == [[2, 1, 3]]
    rng = np.random.default_rng(0)
    q, g = rng.integers(-2, 3, (50, 3)).astype(np.float32), rng.integers(-2, 3, (300, 3)).astype(np.float32)
    np.testing.assert_array_equal(exact_topk(q, g, 12, chunk=7), ref_topk(q.astype(float), g.astype(float), 12))


def test_refuses_a_split_that_is_not_the_karpathy_test_set(case):
    split, img, txt, rows = case
    ids, cids, cimg = split.image_ids, split.caption_ids, split.caption_image_ids
    keep = cimg != ids[0]  # one test image (and its captions) missing
    with pytest.raises(DataError, match=r"split 'test\[1:\]' is not the Karpathy test set: it lacks 5 of the 25,000"):
        standard_order(ids[1:], cids[keep], cimg[keep], "test[1:]")
    with pytest.raises(DataError, match="lacks the embeddings of 1 Karpathy test images"):
        standard_order(ids[1:], cids, cimg, "test")
    with pytest.raises(DataError, match="has 1 images outside it"):
        standard_order(np.r_[ids, 7], cids, cimg, "test+val")
    with pytest.raises(DataError, match="split 'val'.*lacks 25,000 of the 25,000"):
        evaluate_split(img[:3], txt[:3], rows[:3] * 0, ids[:3], cids[:3] + 10**9, cimg[:3], protocol="5k",
                       split="val")
    with pytest.raises(DataError) as e:
        standard_order(ids[1:], cids[keep], cimg[keep], "test[1:]")
    assert str(e.value) and "\n" not in str(e.value)


def test_published_table_is_labelled_and_sourced():
    for r in PUBLISHED:
        assert r["protocol"] in ("1k", "5k") and r["source"] and r["dataset" if "dataset" in r else "source"]
        assert r["text2img_R@1"] is None or r["img2text_R@1"] > r["text2img_R@1"]
    # every published value, as the cited papers give them (README "Standard protocols")
    table = {(r["protocol"], r["model"]): (r["img2text_R@1"], r["text2img_R@1"], r.get("rsum")) for r in PUBLISHED
             if r.get("dataset", "coco") == "coco"}
    assert table == {
        ("1k", "VSE++ (ResNet-152, fine-tuned)"): (64.6, 52.0, 478.6),
        ("5k", "VSE++ (ResNet-152, fine-tuned)"): (41.3, 30.3, None),
        ("1k", "SCAN (t-i + i-t AVG)"): (72.7, 58.8, None),
        ("1k", "VSE∞ (BUTD regions + BERT)"): (79.7, 64.8, None),
        ("5k", "CLIP ViT-B/32 zero-shot"): (50.1, 30.4, None),
    }
    assert {r["model"] for r in published("5k")} == {"VSE++ (ResNet-152, fine-tuned)", "CLIP ViT-B/32 zero-shot"}
    assert all(r["protocol"] == "1k" for r in published("1k")) and len(published("1k")) == 3
    assert published("full") == [] and published("eccv") == []


def fake_run(run, split, img, txt, img_ids, cap_ids, cap_img_ids):
    """A run folder holding only what the metric scripts read: embeddings, sidecars, flat indexes."""
    from crossmodal.embed import embedding_paths
    from crossmodal.index import build_index, save_index
    from crossmodal.store import file_digest, save_features

    run.mkdir(parents=True)
    (run / "best.pt").write_bytes(b"stands for the checkpoint the embeddings came from")
    common = {"split": split, "checkpoint": "best.pt"}
    job = {"inputs": {"checkpoint": file_digest(run / "best.pt")}}
    p = embedding_paths(run, split)
    save_features(p["img"], img, dict(common, kind="img", job=dict(job, kind="img"), ids=img_ids.tolist()))
    save_features(p["text"], txt, dict(common, kind="text", job=dict(job, kind="text"), ids=cap_ids.tolist(),
                                       image_ids=cap_img_ids.tolist()))
    save_index(build_index(txt, "flat"), p["text_index"])
    save_index(build_index(img, "flat"), p["img_index"])
    return run


@pytest.mark.slow
def test_metric_scripts_on_a_karpathy_test_split(case, eccv_expected, tmp_path, capsys):
    from retrieve_img2text import main as i2t_main
    from retrieve_text2img import main as t2i_main

    split, img, txt, rows = case
    args = (img, txt, rows, split.image_ids, split.caption_ids, split.caption_image_ids)
    run = fake_run(tmp_path / "run", "test", img, txt, split.image_ids, split.caption_ids, split.caption_image_ids)
    r = i2t_main(["--run", str(run), "--split", "test", "--protocol", "eccv"])
    out = capsys.readouterr().out
    assert "img2text on test (eccv): 5,000 images x 5 captions in the standard order" in out
    for col in ("ECCV_R@1", "ECCV_R-P", "ECCV_mAP@R", "CxC_R@1", "CxC_R@10"):
        assert col in out and f"img2text_{col}" in r
    want, _ = eccv_expected
    for key, v in want.items():  # the script's numbers are eccv-caption's on the exact lists
        if key.startswith("img2text_"):
            assert r[key] == pytest.approx(v, abs=1e-9), key
    m5 = evaluate_split(*args, protocol="5k", split="test")
    for kk in (1, 5, 10):  # the eccv protocol's R@K are COCO 5K's
        assert r[f"img2text_R@{kk}"] == pytest.approx(m5[f"img2text_R@{kk}"], abs=1e-9)
    assert "published" not in out and "R-Precision x 100" in out  # definitions under the table
    saved = json.loads((run / "retrieval" / "test_img2text_eccv_metrics.json").read_text())
    assert saved["img2text_ECCV_mAP@R"] == r["img2text_ECCV_mAP@R"] and "ECCV_R-P" in saved["protocol_info"][
        "definitions"]
    t = t2i_main(["--run", str(run), "--split", "test", "--protocol", "1k"])
    out = capsys.readouterr().out
    assert "mean of 5 folds" in out and "-- published (for reference, not reproduced here)" in out
    assert "VSE++ (ResNet-152, fine-tuned)" in out and "52.0" in out and "Faghri et al." in out
    assert "CLIP" not in out  # a 5K figure is not shown under 1K numbers
    m1 = evaluate_split(*args, protocol="1k", split="test", directions=("text2img",))
    metric_keys = [k for k, v in m1.items() if k.startswith("text2img_") and isinstance(v, float)]
    assert {"text2img_R@1", "text2img_R@5", "text2img_R@10", "text2img_medr"} <= set(metric_keys)
    for key in metric_keys:
        assert t[key] == pytest.approx(m1[key], abs=1e-9), key
    assert 0 < t["text2img_R@1"] < 100
    t5 = t2i_main(["--run", str(run), "--split", "test", "--protocol", "5k"])
    out = capsys.readouterr().out
    assert t5["text2img_R@1"] == pytest.approx(m5["text2img_R@1"], abs=1e-9)
    for r5 in published("5k"):  # published rows under 5K tables: the 5K ones, and only those
        assert r5["model"] in out and str(r5["text2img_R@1"]) in out
    assert "SCAN" not in out and "VSE∞" not in out


def test_metric_scripts_refuse_another_split_for_the_standard_protocols(case, tmp_path, capsys):
    from retrieve_img2text import main as i2t_main

    split, img, txt, rows = case
    keep = np.flatnonzero(rows < 40)
    run = fake_run(tmp_path / "run", "val", img[:40], txt[keep], split.image_ids[:40], split.caption_ids[keep],
                   split.caption_image_ids[keep])
    with pytest.raises(DataError, match="split 'val' is not the Karpathy test set"):
        i2t_main(["--run", str(run), "--split", "val", "--protocol", "5k"])
    i2t_main(["--run", str(run), "--split", "val"])
    assert "published" not in capsys.readouterr().out  # whole-split numbers: no published rows
