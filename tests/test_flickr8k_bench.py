"""The Flickr8k bench (bench/flickr8k.py): its COCO-style root follows the project's id rule
(image id = the file name's leading digits, caption id = image id * 10 + caption number), keeps
train and dev apart and reads no other split; its ``defaults`` rows are the scripts' defaults."""

import dataclasses
import json

import pytest
from PIL import Image

from bench import flickr8k
from crossmodal.coco import load_split

NAMES = {"train": ["2513260012_03d33305cf.jpg", "1000268201_693b08cb0e.jpg"], "dev": ["3385593926_d3e9c21170.jpg"],
         "test": ["997722733_0cb5439472.jpg"]}


def _official(tmp_path):
    src = tmp_path / "flickr8k"
    (src / "Images").mkdir(parents=True)
    lines = []
    for split, names in NAMES.items():
        (src / f"Flickr_8k.{split}Images.txt").write_text("\n".join(names) + "\n")
        for name in names:
            Image.new("RGB", (8, 8)).save(src / "Images" / name)
            lines += [f"{name}#{n}\t{split} caption {n} of {name}" for n in (3, 0, 1, 2, 4)]
    (src / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return src


def test_root_follows_the_id_rule_and_reads_only_train_and_dev(tmp_path):
    root = flickr8k.make_root(_official(tmp_path), tmp_path / "root")
    assert sorted(p.name for p in (root / "annotations").iterdir()) == ["captions_dev.json", "captions_train.json"]
    train = json.loads((root / "annotations" / "captions_train.json").read_text())
    assert [i["id"] for i in train["images"]] == [1000268201, 2513260012]
    first = [a for a in train["annotations"] if a["image_id"] == 1000268201]
    assert [a["id"] for a in first] == [10002682010 + n for n in range(5)]
    assert [a["caption"] for a in first] == [f"train caption {n} of 1000268201_693b08cb0e.jpg" for n in range(5)]
    split = load_split(root, "dev")  # the project's own loader reads it
    assert split.image_ids.tolist() == [3385593926] and len(split.captions) == 5
    assert (root / "dev" / NAMES["dev"][0]).resolve() == (tmp_path / "flickr8k" / "Images" / NAMES["dev"][0])
    assert not (root / "train" / NAMES["test"][0]).exists() and not (root / "dev" / NAMES["test"][0]).exists()


def test_image_id_is_the_leading_digits():
    assert flickr8k.image_id("1000268201_693b08cb0e.jpg") == 1000268201
    with pytest.raises(ValueError, match="does not start with digits"):
        flickr8k.image_id("x1000268201.jpg")


def test_defaults_rows_are_the_scripts_defaults():
    cfgs = {c.name: c for c in flickr8k.configs()}
    flickr8k.check_defaults(cfgs)  # passes today
    cfgs["defaults-t2i"] = dataclasses.replace(cfgs["defaults-t2i"], argv=[*cfgs["defaults-t2i"].argv, "--lr", "0.01"])
    with pytest.raises(SystemExit, match="not the scripts' defaults"):
        flickr8k.check_defaults(cfgs)
    cfgs = {c.name: c for c in flickr8k.configs()}
    assert cfgs["defaults"].txt["model"] == "mpnet"  # make_database_text.py's default caption encoder
    cfgs["defaults"] = dataclasses.replace(cfgs["defaults"], txt={**cfgs["defaults"].txt, "model": "minilm"})
    with pytest.raises(SystemExit, match="captions are 'minilm', not make_database_text.py's default 'mpnet'"):
        flickr8k.check_defaults(cfgs)
    cfgs = {c.name: c for c in flickr8k.configs()}
    assert cfgs["defaults-t2i"].img["input_size"] == 384  # make_database_img.py's default
    t2i = cfgs["defaults-t2i"]
    cfgs["defaults-t2i"] = dataclasses.replace(t2i, img={**t2i.img, "input_size": 256})
    with pytest.raises(SystemExit, match="not make_database_img.py's default \\(effnet-lite0 at 384 px\\)"):
        flickr8k.check_defaults(cfgs)
