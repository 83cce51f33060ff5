"""Triplet datasets: negatives never match the anchor, sampling is reproducible."""

import numpy as np
import pytest
import torch

from coco_triplet_dataset import TripletCOCO_Img2Text, TripletCOCO_Text2Img, load_split


def _layout(seed=0, n_img=7):
    rng = np.random.default_rng(seed)
    per = rng.integers(5, 8, size=n_img)  # 5, 6 or 7 captions per image
    return rng.permutation(np.repeat(np.arange(n_img), per)), n_img


@pytest.mark.parametrize("cls", [TripletCOCO_Img2Text, TripletCOCO_Text2Img])
def test_negatives_never_belong_to_the_anchor(cls):
    rows, n_img = _layout()
    ds = cls(rows, n_img, seed=3)
    for epoch in range(20):
        a, p, n = ds.epoch_indices(epoch)
        if cls is TripletCOCO_Img2Text:
            assert np.array_equal(rows[p], a)  # positive caption is of the anchor image
            assert np.all(rows[n] != a)  # negative caption is of another image
        else:
            assert np.array_equal(rows[a], p)
            assert np.all(n != p) and n.min() >= 0 and n.max() < n_img


def test_text2img_negatives_cover_all_other_images():
    rows = np.zeros(4000, dtype=np.int64)
    rows[::2] = 1
    n = TripletCOCO_Text2Img(rows, 4, seed=0).epoch_indices(0)[2]
    assert set(n[rows == 0].tolist()) == {1, 2, 3}


@pytest.mark.parametrize("cls", [TripletCOCO_Img2Text, TripletCOCO_Text2Img])
def test_reproducible_under_seed(cls):
    rows, n_img = _layout()
    a = cls(rows, n_img, seed=1).epoch_indices(4)
    b = cls(rows, n_img, seed=1).epoch_indices(4)
    c = cls(rows, n_img, seed=2).epoch_indices(4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[2], c[2])


def test_getitem_serves_feature_rows():
    rows, n_img = _layout()
    img = torch.randn(n_img, 4)
    txt = np.random.default_rng(0).standard_normal((len(rows), 3)).astype(np.float32)
    ds = TripletCOCO_Img2Text(rows, n_img, img_feats=img, text_feats=txt)
    ds.set_epoch(2)
    a, p, n = ds.epoch_indices(2)
    x, y, z = ds[5]
    assert torch.equal(x, img[a[5]]) and np.allclose(y.numpy(), txt[p[5]]) and np.allclose(z.numpy(), txt[n[5]])
    ds2 = TripletCOCO_Text2Img(rows, n_img, img_feats=img, text_feats=txt)
    x, y, z = ds2[0]
    assert x.shape == (3,) and y.shape == (4,) and z.shape == (4,)


def test_needs_two_images():
    with pytest.raises(ValueError, match="at least two images"):
        TripletCOCO_Img2Text(np.zeros(5, dtype=np.int64), 1)


def test_on_demo_split(demo_root):
    s = load_split(demo_root, "train")
    ds = TripletCOCO_Img2Text(s.caption_image_rows(), s.num_images, seed=0)
    a, p, n = ds.epoch_indices(0)
    assert len(ds) == s.num_captions
    assert np.all(s.caption_image_ids[n] != s.image_ids[a])
