"""The embedded demo dataset: COCO layout, captions that describe their image, determinism."""

import json

from crossmodal.coco import load_image, load_split
from crossmodal.demo_data import COLOURS, SHAPES, generate_demo_dataset


def test_layout_counts_and_readability(demo_root):
    meta = json.loads((demo_root / "demo_meta.json").read_text())
    for split, n in (("train", 200), ("val", 50)):
        s = load_split(demo_root, split)
        assert s.num_images == n and meta["splits"][split]["images"] == n
        assert s.num_captions == meta["splits"][split]["captions"] >= 5 * n
        assert load_image(s.image_path(0)).size == (128, 128)
    assert not set(load_split(demo_root, "train").image_ids) & set(load_split(demo_root, "val").image_ids)


def test_captions_are_varied_and_describe_the_scene(demo_root):
    s = load_split(demo_root, "train")
    for iid in s.image_ids[:20]:
        caps = s.captions_of(int(iid))
        assert len(set(caps)) == len(caps) >= 5  # differently worded
        words = [set(c.split()) for c in caps]
        colours = set(COLOURS) & words[0]
        shapes = set(SHAPES) & words[0]
        assert colours and shapes  # the full-list caption names colours and shapes
        for w in words[1:]:  # other captions never name a colour absent from the scene
            assert set(COLOURS) & w <= colours


def test_deterministic_under_seed(tmp_path):
    a = generate_demo_dataset(tmp_path / "a", num_train=6, num_val=2, seed=5, image_size=64)
    b = generate_demo_dataset(tmp_path / "b", num_train=6, num_val=2, seed=5, image_size=64)
    assert a["splits"] == b["splits"]
    for split in ("train", "val"):
        ja = (tmp_path / "a" / "annotations" / f"captions_{split}.json").read_text()
        assert ja == (tmp_path / "b" / "annotations" / f"captions_{split}.json").read_text()
    pa = sorted((tmp_path / "a" / "train").iterdir())[0]
    assert pa.read_bytes() == (tmp_path / "b" / "train" / pa.name).read_bytes()
    c = generate_demo_dataset(tmp_path / "c", num_train=6, num_val=2, seed=6, image_size=64)
    jc = (tmp_path / "c" / "annotations" / "captions_train.json").read_text()
    assert jc != (tmp_path / "a" / "annotations" / "captions_train.json").read_text()
    assert c["bytes"] > 0
