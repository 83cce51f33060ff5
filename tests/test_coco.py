"""The COCO split reader and image decoding: real samples, fixtures, and every bad input."""

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from coco_triplet_dataset import DataError, load_image, load_split
from coco_triplet_dataset import main as dataset_main
from tests.conftest import shared


def _json_counts(ann_file):
    d = json.loads(ann_file.read_text())
    return len(d["images"]), len(d["annotations"]), Counter(a["image_id"] for a in d["annotations"])


def data_root(request, folder: str):
    """``generated``: the ``small_root`` fixture (a clone without ../shared runs these too);
    otherwise a real COCO sample folder of ../shared/data (skipped when absent)."""
    return request.getfixturevalue("small_root") if folder == "generated" else shared(folder)


@pytest.mark.parametrize(
    "folder,split",
    [("generated", "train"), ("generated", "val"), ("coco-tiny", "train"), ("coco-tiny", "val"),
     ("coco-mini", "train2017"), ("coco-captions-val2017", "val2017")],
)
def test_real_samples_counts_match_json(folder, split, request):
    root = data_root(request, folder)
    s = load_split(root, split)
    n_img, n_cap, per_image = _json_counts(root / "annotations" / f"captions_{split}.json")
    assert s.num_images == n_img and s.num_captions == n_cap
    # every caption of every image is kept, 6 and 7 caption images included
    for iid, k in per_image.items():
        assert np.sum(s.caption_image_ids == iid) == k
    assert list(s.image_ids) == sorted(s.image_ids)
    assert len(set(s.caption_ids.tolist())) == n_cap


def test_val2017_keeps_six_and_seven_caption_images():
    s = load_split(shared("coco-captions-val2017"), "val2017")
    counts = np.bincount(s.caption_image_rows())
    assert counts.max() == 7 and np.sum(counts == 6) == 12


@pytest.mark.parametrize("folder,side", [("generated", 96), ("coco-tiny", 160)])
def test_real_images_decode_to_rgb(folder, side, request):
    root = data_root(request, folder)
    s = load_split(root, "val")
    sizes = json.loads((root / "annotations" / "captions_val.json").read_text())["images"]
    size_of = {im["id"]: (im["width"], im["height"]) for im in sizes}
    for i in range(s.num_images):
        im = load_image(s.image_path(i), int(s.image_ids[i]))
        assert im.mode == "RGB" and max(im.size) == side and im.size == size_of[int(s.image_ids[i])]


@pytest.mark.parametrize("folder,split,cut", [("generated", "train", 10), ("coco-mini", "train2017", 100)])
def test_split_slices_partition_images(folder, split, cut, request):
    root = data_root(request, folder)
    whole = load_split(root, split)
    a, b = load_split(root, f"{split}[:{cut}]"), load_split(root, f"{split}[{cut}:]")
    assert a.num_images == cut and b.num_images == whole.num_images - cut
    assert a.image_ids.tolist() + b.image_ids.tolist() == whole.image_ids.tolist()
    assert a.num_captions + b.num_captions == whole.num_captions
    if folder == "coco-mini":
        assert (b.num_images, a.num_captions + b.num_captions) == (30, 650)


def _write_coco(root, split, images, anns):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    data = {"images": images, "annotations": anns}
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))


def _img(i):
    return {"id": i, "file_name": f"{i}.jpg"}


def test_fixture_split_order_and_caption_grouping(tmp_path):
    anns = [{"id": 9, "image_id": 2, "caption": "b"}, {"id": 3, "image_id": 1, "caption": " a  cat "},
            {"id": 1, "image_id": 2, "caption": "c"}]
    _write_coco(tmp_path, "x", [_img(2), _img(1)], anns)
    s = load_split(tmp_path, "x")
    assert s.image_ids.tolist() == [1, 2]
    assert s.caption_ids.tolist() == [3, 1, 9]
    assert s.captions[0] == "a cat"  # whitespace normalised
    assert s.caption_image_rows().tolist() == [0, 1, 1]


def test_karpathy_file_is_a_split_source(tmp_path):
    kp = {"images": [
        {"filepath": "val2014", "filename": "a.jpg", "cocoid": 5, "split": "test",
         "sentences": [{"raw": "one", "sentid": 50}, {"raw": "two", "sentid": 51}]},
        {"filepath": "train2014", "filename": "b.jpg", "cocoid": 7, "split": "restval",
         "sentences": [{"raw": "three", "sentid": 70}]},
        {"filepath": "train2014", "filename": "c.jpg", "cocoid": 8, "split": "train",
         "sentences": [{"raw": "four", "sentid": 80}]},
    ]}
    f = tmp_path / "dataset_coco.json"
    f.write_text(json.dumps(kp))
    test = load_split(tmp_path, "test", karpathy_file=f)
    assert test.image_ids.tolist() == [5] and test.captions == ["one", "two"]
    assert test.image_path(0) == tmp_path / "val2014" / "a.jpg"
    both = load_split(tmp_path, "train+restval", karpathy_file=f)
    assert both.image_ids.tolist() == [7, 8]
    with pytest.raises(DataError, match="not in the Karpathy file"):
        load_split(tmp_path, "dev", karpathy_file=f)


# --- bad input -------------------------------------------------------------------------


def test_missing_annotation_file_names_it(tmp_path):
    with pytest.raises(DataError, match=r"captions_train2014\.json does not exist"):
        load_split(tmp_path, "train2014")


def test_unknown_split_lists_available(tmp_path):
    _write_coco(tmp_path, "val2017", [_img(1)], [{"id": 1, "image_id": 1, "caption": "x"}])
    with pytest.raises(DataError, match="splits available there: val2017"):
        load_split(tmp_path, "val2071")


def test_invalid_json_names_file(tmp_path):
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "captions_x.json").write_text("{not json")
    with pytest.raises(DataError, match="captions_x.json is not valid COCO json"):
        load_split(tmp_path, "x")


def test_image_without_captions(tmp_path):
    _write_coco(tmp_path, "x", [_img(1), _img(2)], [{"id": 1, "image_id": 1, "caption": "x"}])
    with pytest.raises(DataError, match=r"image 2 \(2.jpg\) has no captions"):
        load_split(tmp_path, "x")
    s = load_split(tmp_path, "x", skip_bad=True)
    assert s.image_ids.tolist() == [1] and s.skipped == {"images without captions": [2]}


def test_empty_caption(tmp_path):
    anns = [{"id": 1, "image_id": 1, "caption": "x"}, {"id": 2, "image_id": 1, "caption": "   "}]
    _write_coco(tmp_path, "x", [_img(1)], anns)
    with pytest.raises(DataError, match="caption 2 of image 1 is empty"):
        load_split(tmp_path, "x")
    s = load_split(tmp_path, "x", skip_bad=True)
    assert s.caption_ids.tolist() == [1] and s.skipped["empty captions"] == [2]


def test_caption_of_unknown_image(tmp_path):
    _write_coco(tmp_path, "x", [_img(1)], [{"id": 1, "image_id": 1, "caption": "x"},
                                           {"id": 2, "image_id": 99, "caption": "y"}])
    with pytest.raises(DataError, match="caption 2 refers to image 99"):
        load_split(tmp_path, "x")


def test_missing_image_file(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jpg \(id 3\) does not exist"):
        load_image(tmp_path / "nope.jpg", 3)


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "t.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(p)
    p.write_bytes(p.read_bytes()[:300])
    with pytest.raises(DataError, match=r"t\.jpg \(id 4\) cannot be decoded.*truncated"):
        load_image(p, 4)


def test_corrupt_file(tmp_path):
    p = tmp_path / "c.jpg"
    p.write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match=r"c\.jpg \(id 5\) is not a readable image"):
        load_image(p, 5)


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_any_mode_decodes_to_rgb(tmp_path, mode):
    ext = "jpg" if mode in ("L", "CMYK") else "png"
    p = tmp_path / f"m.{ext}"
    im = Image.new("RGB", (8, 6), (10, 200, 30)).convert(mode)
    if mode == "RGBA":
        im.putalpha(0)  # fully transparent: composited on white
    im.save(p)
    out = load_image(p)
    assert out.mode == "RGB" and out.size == (8, 6)
    if mode == "RGBA":
        assert out.getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("folder", ["generated", "coco-tiny"])
def test_cli_prints_summary(capsys, folder, request):
    root = data_root(request, folder)
    s = load_split(root, "val")
    dataset_main(["--coco-root", str(root), "--split", "val", "--check-images"])
    assert f"split val: {s.num_images} images, {s.num_captions} captions" in capsys.readouterr().out
    if folder == "coco-tiny":
        assert (s.num_images, s.num_captions) == (16, 80)
