"""Freshness covers the data, not only its ids (issue 14): edited captions, replaced images, fixed
images that were skipped, a reordered sidecar, a feature file rewritten in place with its size and
mtime kept, a stale shard. Each must be redone or refused, never reused."""

import json
import os

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.errors import DataError, FeatureError
from crossmodal.extract import extract_images, extract_texts, merge_shards
from crossmodal.store import load_features, save_features
from tests.test_integrity_helpers import TinyImages, TinyTexts, copy_root


def _edit_caption(root, split, cid, text):
    ann = root / "annotations" / f"captions_{split}.json"
    data = json.loads(ann.read_text())
    for a in data["annotations"]:
        if a["id"] == cid:
            a["caption"] = text
    ann.write_text(json.dumps(data))


def test_edited_caption_text_redoes_caption_features(small_root, tmp_path, caplog):
    root = copy_root(small_root, tmp_path / "coco")
    npy = tmp_path / "f" / "t.npy"
    split = load_split(root, "val")
    extract_texts(split, TinyTexts(), npy, progress=False)
    cid = int(split.caption_ids[5])
    _edit_caption(root, "val", cid, "an entirely different sentence about nothing")
    caplog.set_level("INFO")
    meta = extract_texts(load_split(root, "val"), TinyTexts(), npy, progress=False)
    arr, _ = load_features(npy)
    assert "is stale (data:" in caplog.text and "up to date" not in caplog.text
    np.testing.assert_array_equal(arr[5], TinyTexts().encode(["an entirely different sentence about nothing"])[0])
    assert meta["ids"] == split.caption_ids.tolist()


def test_replaced_image_file_redoes_image_features(small_root, tmp_path, caplog):
    root = copy_root(small_root, tmp_path / "coco")
    npy = tmp_path / "f" / "i.npy"
    split = load_split(root, "val")
    before = extract_images(split, TinyImages(), npy, progress=False)
    row = load_features(npy)[0][2].copy()
    a, b = split.image_path(2), split.image_path(7)
    a.write_bytes(b.read_bytes())  # same name, another picture
    caplog.set_level("INFO")
    after = extract_images(load_split(root, "val"), TinyImages(), npy, progress=False)
    arr = load_features(npy)[0]
    assert after["job"]["data"] != before["job"]["data"] and "up to date" not in caplog.text
    assert not np.array_equal(arr[2], row) and np.array_equal(arr[2], arr[7])


def test_image_fixed_after_skip_bad_is_redone_without_skip_bad(small_root, tmp_path):
    root = copy_root(small_root, tmp_path / "coco")
    npy = tmp_path / "f" / "i.npy"
    split = load_split(root, "val")
    victim, good = split.image_path(3), split.image_path(3).read_bytes()
    victim.write_bytes(good[:150])
    meta = extract_images(split, TinyImages(), npy, skip_bad=True, progress=False)
    assert meta["skipped_ids"] == [int(split.image_ids[3])]
    with pytest.raises(DataError, match=f"{victim.name}"):  # still bad, no --skip-bad: named, not "up to date"
        extract_images(split, TinyImages(), npy, progress=False)
    victim.write_bytes(good)
    meta = extract_images(load_split(root, "val"), TinyImages(), npy, progress=False)
    assert meta["skipped_ids"] == [] and meta["ids"] == split.image_ids.tolist()


def test_skipped_image_kept_skipped_with_skip_bad_when_unchanged(small_root, tmp_path, caplog):
    root = copy_root(small_root, tmp_path / "coco")
    npy = tmp_path / "f" / "i.npy"
    split = load_split(root, "val")
    split.image_path(3).write_bytes(b"not an image")
    extract_images(split, TinyImages(), npy, skip_bad=True, progress=False)
    caplog.set_level("INFO")
    extract_images(split, TinyImages(), npy, skip_bad=True, progress=False)
    assert "up to date" in caplog.text


def _reversed_ids(meta):
    meta["ids"] = meta["ids"][::-1]


def _swapped_caption_image_ids(meta):
    meta["image_ids"][0], meta["image_ids"][-1] = meta["image_ids"][-1], meta["image_ids"][0]


@pytest.mark.parametrize("extract,encoder,tamper", [(extract_images, TinyImages, _reversed_ids),
                                                    (extract_texts, TinyTexts, _swapped_caption_image_ids)],
                         ids=["reordered-ids", "reordered-caption-image-ids"])
def test_reordered_sidecar_ids_are_refused(small_root, tmp_path, extract, encoder, tamper):
    npy = tmp_path / "f.npy"
    extract(load_split(small_root, "val"), encoder(), npy, progress=False)
    side = npy.with_suffix(".json")
    meta = json.loads(side.read_text())
    tamper(meta)
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match="not the ones its rows were made with"):
        load_features(npy)


def test_older_sidecar_without_rows_digest_is_checked_against_its_job(small_root, tmp_path):
    npy = tmp_path / "i.npy"
    extract_images(load_split(small_root, "val"), TinyImages(), npy, progress=False)
    side = npy.with_suffix(".json")
    meta = json.loads(side.read_text())
    del meta["rows_sha256"]
    side.write_text(json.dumps(meta))
    load_features(npy)  # an older sidecar in order still loads
    meta["ids"][0], meta["ids"][1] = meta["ids"][1], meta["ids"][0]
    side.write_text(json.dumps(meta))
    with pytest.raises(FeatureError, match="not the ones its rows were made with"):
        load_features(npy)


def test_feature_file_rewritten_with_size_and_mtime_kept_is_refused_and_redone(small_root, tmp_path, caplog):
    npy = tmp_path / "i.npy"
    split = load_split(small_root, "val")
    extract_images(split, TinyImages(), npy, progress=False)
    ref = npy.read_bytes()
    st = os.stat(npy)
    arr = np.load(npy)
    arr[[0, 1]] = arr[[1, 0]]  # same size, other rows
    np.save(npy, arr)
    os.utime(npy, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(FeatureError, match="does not match the digest"):
        load_features(npy)
    caplog.set_level("INFO")
    extract_images(split, TinyImages(), npy, progress=False)
    assert "not a finished output" in caplog.text and npy.read_bytes() == ref


def test_a_shard_merge_refuses_non_finite_rows(small_root, tmp_path):
    split = load_split(small_root, "val")
    npy = tmp_path / "i.npy"
    for i in range(2):
        extract_images(split, TinyImages(), npy, shard=(i, 2), progress=False)
    shard = tmp_path / "i.shard1of2.npy"
    arr, meta = load_features(shard, mmap=False)
    arr[2, 1] = np.inf  # a shard made elsewhere, published consistently
    save_features(shard, arr, {k: v for k, v in meta.items() if k != "files"})
    with pytest.raises(FeatureError, match=r"i.npy: row 10 \(id \d+\) holds NaN or infinite values; not published"):
        merge_shards(npy, 2, split, "img")
    assert not npy.exists() and not npy.with_suffix(".json").exists()


def test_stale_shard_is_not_merged(small_root, tmp_path):
    root = copy_root(small_root, tmp_path / "coco")
    npy = tmp_path / "f" / "i.npy"
    split = load_split(root, "val")
    for i in range(2):
        extract_images(split, TinyImages(), npy, shard=(i, 2), progress=False)
    split.image_path(12).write_bytes(split.image_path(1).read_bytes())  # in shard 1, changed after it was made
    with pytest.raises(FeatureError, match=r"shard1of2.npy was made from other data"):
        merge_shards(npy, 2, load_split(root, "val"), "img")
    extract_images(load_split(root, "val"), TinyImages(), npy, shard=(1, 2), progress=False)
    merged = merge_shards(npy, 2, load_split(root, "val"), "img")
    whole = extract_images(load_split(root, "val"), TinyImages(), tmp_path / "g" / "i.npy", progress=False)
    assert merged["job"] == whole["job"]
    assert npy.read_bytes() == (tmp_path / "g" / "i.npy").read_bytes()


def test_fasttext_model_retrained_when_training_captions_change(small_root, tmp_path, caplog):
    from crossmodal.text_encoders import fasttext_model_path, train_fasttext

    root = copy_root(small_root, tmp_path / "coco")
    path = train_fasttext(load_split(root, "train"), tmp_path / "f", dim=8, epoch=1, bucket=500)
    first = json.loads(path.with_suffix(".json").read_text())["job"]
    split = load_split(root, "train")
    _edit_caption(root, "train", int(split.caption_ids[0]), "zebra zebra zebra xylophone")
    caplog.set_level("INFO")
    train_fasttext(load_split(root, "train"), tmp_path / "f", dim=8, epoch=1, bucket=500)
    again = json.loads(fasttext_model_path(tmp_path / "f", "train").with_suffix(".json").read_text())["job"]
    assert again["texts"] != first["texts"] and "is stale (texts:" in caplog.text


def test_image_rewritten_with_its_size_and_mtime_restored_is_still_redone(small_root, tmp_path):
    root = copy_root(small_root, tmp_path / "coco")
    npy = tmp_path / "f" / "i.npy"
    split = load_split(root, "val")
    before = extract_images(split, TinyImages(), npy, progress=False)
    p = split.image_path(4)
    st, data = os.stat(p), bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other pixels
    p.write_bytes(bytes(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))  # the change time cannot be restored
    after = extract_images(load_split(root, "val"), TinyImages(), npy, progress=False)
    assert after["job"]["data"] != before["job"]["data"]


def test_sidecar_ids_that_are_not_integers_are_refused(tmp_path):
    npy = tmp_path / "x.npy"
    save_features(npy, np.ones((2, 2)), {"ids": [1, 2]})
    side = npy.with_suffix(".json")
    for ids in (["1", "2"], [1.0, 2.0], [True, 2]):
        meta = json.loads(side.read_text())
        meta["ids"] = ids
        side.write_text(json.dumps(meta))
        with pytest.raises(FeatureError, match="lists ids that are not integers"):
            load_features(npy)
