"""Metrics against a naive full-argsort reference written here, on random data with ties,
images with 5/6/7 captions, and tiny cases worked by hand."""

import numpy as np
import pytest

from crossmodal.metrics import evaluate, evaluate_protocol, pr_curve, relevant_ranks, text2img_relevance


def naive(img, txt, cap_img):
    """Full stable argsort per query; every metric from the ranked list, straight from DESIGN.md."""
    out = {}
    for d in ("img2text", "text2img"):
        sims = img @ txt.T if d == "img2text" else txt @ img.T
        per_q = []
        for qi in range(len(sims)):
            order = np.argsort(-sims[qi], kind="stable")
            rel = (cap_img[order] == qi) if d == "img2text" else (order == cap_img[qi])
            per_q.append(rel)
        P = lambda k, per_q=per_q: np.mean([r[:k].sum() / k for r in per_q])  # noqa: E731
        aps = []
        firsts = []
        for r in per_q:
            hit_pos = np.flatnonzero(r) + 1
            aps.append(np.mean(np.arange(1, len(hit_pos) + 1) / hit_pos))
            firsts.append(hit_pos[0])
        firsts = np.array(firsts)
        out.update({f"{d}_P@1": P(1), f"{d}_P@5": P(5), f"{d}_mAP": np.mean(aps)})
        for k in (1, 5, 10):
            out[f"{d}_R@{k}"] = 100 * np.mean(firsts <= k)
        out[f"{d}_medr"] = np.floor(np.median(firsts - 1)) + 1
        out[f"{d}_meanr"] = firsts.mean()
        curve_p = np.mean([np.cumsum(r) / np.arange(1, len(r) + 1) for r in per_q], axis=0)
        curve_r = np.mean([np.cumsum(r) / r.sum() for r in per_q], axis=0)
        out[f"{d}_pr"] = (curve_p, curve_r)
    return out


def random_case(seed, n_img=23, dim=4, quantise=True):
    rng = np.random.default_rng(seed)
    per = rng.choice([5, 6, 7], size=n_img, p=[0.6, 0.25, 0.15])
    cap_img = rng.permutation(np.repeat(np.arange(n_img), per))
    img = rng.standard_normal((n_img, dim)).astype(np.float32)
    txt = rng.standard_normal((len(cap_img), dim)).astype(np.float32)
    if quantise:  # small integers: many exact ties in the similarities
        img, txt = np.round(img), np.round(txt)
    return img, txt, cap_img


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("quantise", [True, False])
def test_matches_naive_reference(seed, quantise):
    img, txt, cap_img = random_case(seed, quantise=quantise)
    got = evaluate(img, txt, cap_img, chunk=7, with_curves=True)
    ref = naive(img, txt, cap_img)
    for k, v in ref.items():
        if k.endswith("_pr"):
            np.testing.assert_allclose(got[k][0], v[0], err_msg=k)
            np.testing.assert_allclose(got[k][1], v[1], err_msg=k)
        else:
            assert got[k] == pytest.approx(v, abs=1e-9), k
    assert got["rsum"] == pytest.approx(sum(ref[f"{d}_R@{k}"] for d in ("img2text", "text2img") for k in (1, 5, 10)))


def test_ties_broken_by_gallery_order_by_hand():
    # one image query; gallery of four captions all scoring the same: ranks = gallery positions
    img = np.array([[1.0, 0.0]], dtype=np.float32)
    txt = np.array([[1.0, 0.0]] * 4, dtype=np.float32)
    ptr, idx = np.array([0, 2]), np.array([3, 1])
    ranks = relevant_ranks(img, txt, ptr, idx)
    assert ranks.tolist() == [1, 3]  # sorted; caption 1 at 0-based rank 1, caption 3 at rank 3


def test_tiny_case_by_hand():
    # 2 images, 4 captions (captions 0,1 of image 0; 2,3 of image 1), 1-d embeddings
    img = np.array([[1.0], [-1.0]], dtype=np.float32)
    txt = np.array([[0.9], [-0.2], [-0.8], [0.5]], dtype=np.float32)
    cap_img = np.array([0, 0, 1, 1])
    m = evaluate(img, txt, cap_img)
    # image 0 ranks captions 0 (0.9), 3 (0.5), 1 (-0.2), 2: relevant at ranks 1, 3 -> AP = (1/1 + 2/3)/2
    # image 1 ranks captions 2 (0.8), 1 (0.2), 3 (-0.5), 0: relevant at ranks 1, 3 -> AP the same
    assert m["img2text_mAP"] == pytest.approx((1 + 2 / 3) / 2)
    assert m["img2text_P@1"] == 1.0 and m["img2text_R@1"] == 100.0
    # captions: 0 -> img0 first; 1 (-0.2) -> img1 (0.2) first, img0 second; 2 -> img1 first; 3 -> img0 first (wrong)
    assert m["text2img_R@1"] == 50.0 and m["text2img_P@1"] == 0.5
    assert m["text2img_medr"] == 1.0 and m["text2img_meanr"] == 1.5
    assert m["text2img_mAP"] == pytest.approx((1 + 0.5 + 1 + 0.5) / 4)


def test_pr_curve_ends_at_full_recall():
    img, txt, cap_img = random_case(3)
    prec, rec = evaluate(img, txt, cap_img, with_curves=True)["img2text_pr"]
    assert rec[-1] == pytest.approx(1.0) and np.all(np.diff(rec) >= -1e-12)
    assert len(prec) == len(txt) and prec[-1] == pytest.approx(len(txt) / len(img) / len(txt))


def test_one_k_protocol_is_the_mean_over_folds():
    rng = np.random.default_rng(0)
    n = 2000
    cap_img = np.repeat(np.arange(n), 5)
    img = rng.standard_normal((n, 8)).astype(np.float32)
    txt = (img[cap_img] + rng.standard_normal((5 * n, 8))).astype(np.float32)
    m1k = evaluate_protocol(img, txt, cap_img, "1k")
    f0 = evaluate(img[:1000], txt[:5000], cap_img[:5000])
    f1 = evaluate(img[1000:], txt[5000:], cap_img[5000:] - 1000)
    for k in ("img2text_R@1", "text2img_mAP", "rsum"):
        assert m1k[k] == pytest.approx((f0[k] + f1[k]) / 2)
    full = evaluate_protocol(img, txt, cap_img, "full")
    assert full["text2img_R@1"] < m1k["text2img_R@1"]  # a bigger gallery is harder
    with pytest.raises(ValueError, match="5,000-image"):
        evaluate_protocol(img, txt, cap_img, "5k")


def test_relevance_csr_for_text2img():
    ptr, idx = text2img_relevance(np.array([2, 0, 1]))
    assert ptr.tolist() == [0, 1, 2, 3] and idx.tolist() == [2, 0, 1]
    assert pr_curve(np.array([0, 1, 2]), ptr, 3)[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3])
