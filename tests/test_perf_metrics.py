"""The one-sweep ranks of both directions (crossmodal.metrics.both_ranks, used by evaluate)
equal the per-direction reference relevant_ranks exactly: ties (quantised vectors, duplicate
images and captions), 5-7 captions per image, chunk sizes, and the fallback when the float32
error band is exceeded. The metrics themselves are checked against a naive argsort in
tests/test_metrics.py."""

import logging

import numpy as np
import pytest

import crossmodal.metrics as M


def _case(seed, n_img=37, dim=16, quantise=False, duplicates=False):
    """Quantised: small integers, every dot product exact in float32, many exact ties."""
    rng = np.random.default_rng(seed)
    per = rng.choice([5, 6, 7], size=n_img, p=[0.6, 0.25, 0.15])
    cap_img = rng.permutation(np.repeat(np.arange(n_img), per))
    img = rng.standard_normal((n_img, dim)).astype(np.float32)
    txt = rng.standard_normal((len(cap_img), dim)).astype(np.float32)
    if quantise:
        img, txt = np.round(img), np.round(txt)
    if duplicates:  # identical images and captions: exact ties across the band, broken by gallery order
        img[5::7] = img[3]
        txt[10::9] = txt[2]
    return img, txt, cap_img


def _reference(img, txt, cap_img, chunk):
    """Ranks by definition (items scored above, then equal ones earlier in the gallery) from the
    similarity values the code sees: the same chunked float32 matmul, img @ txt.T."""
    import torch

    ti, tt = torch.from_numpy(img), torch.from_numpy(txt).t().contiguous()
    sims = np.concatenate([(ti[a : a + chunk] @ tt).numpy() for a in range(0, len(img), chunk)])
    p1, i1 = M.img2text_relevance(cap_img, len(img))
    i2t = []
    for q in range(len(img)):
        row = sims[q]
        i2t += sorted(int((row > row[c]).sum() + (row[:c] == row[c]).sum()) for c in i1[p1[q] : p1[q + 1]])
    t2i = [int((sims[:, c] > sims[i, c]).sum() + (sims[:i, c] == sims[i, c]).sum()) for c, i in enumerate(cap_img)]
    return np.array(i2t), np.array(t2i)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("quantise", "duplicates"), [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("chunk", [1, 6, 1024])
def test_both_ranks_equal_the_reference(seed, quantise, duplicates, chunk):
    img, txt, cap_img = _case(seed, quantise=quantise, duplicates=duplicates)
    ref_i2t, ref_t2i = _reference(img, txt, cap_img, chunk)
    i2t, t2i = M.both_ranks(img, txt, cap_img, chunk=chunk)
    np.testing.assert_array_equal(i2t, ref_i2t)
    np.testing.assert_array_equal(t2i, ref_t2i)


def test_both_ranks_on_a_larger_gallery_of_near_ties():
    rng = np.random.default_rng(7)
    img = rng.standard_normal((300, 128)).astype(np.float32)
    img[150:] = img[:150] + 1e-7 * rng.standard_normal((150, 128)).astype(np.float32)  # scores within the band
    cap_img = np.repeat(np.arange(300), 5)
    txt = img[cap_img] + 0.5 * rng.standard_normal((1500, 128)).astype(np.float32)
    ref = _reference(img, txt, cap_img, 64)
    got = M.both_ranks(img, txt, cap_img, chunk=64)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_array_equal(got[1], ref[1])


def test_an_exceeded_band_falls_back_to_the_reference(monkeypatch, caplog):
    img, txt, cap_img = _case(3, dim=64)
    monkeypatch.setattr(M, "_BAND", -1.0)  # an empty band: no caption's own score lies in it
    with caplog.at_level(logging.WARNING, logger="crossmodal.metrics"):
        got = M.both_ranks(img, txt, cap_img, chunk=8)
    assert "recomputed directly" in caplog.text
    np.testing.assert_array_equal(got[1], _reference(img, txt, cap_img, 8)[1])


def test_evaluate_one_direction_equals_both():
    img, txt, cap_img = _case(1, quantise=True)
    both = M.evaluate(img, txt, cap_img, chunk=5, with_curves=True)
    for d in M.DIRECTIONS:
        one = M.evaluate(img, txt, cap_img, directions=(d,), chunk=5, with_curves=True)
        for k, v in one.items():
            if k.endswith("_pr"):
                np.testing.assert_array_equal(v[0], both[k][0])
            else:
                assert v == both[k], k
