"""Flickr8k and Flickr30k splits (crossmodal/flickr.py through crossmodal.coco.load_split): the official
files and Karpathy's, one id rule for both, and every malformed file as one line naming file and line."""

import json
import subprocess
import sys

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.errors import DataError
from tests.conftest import ROOT, shared
from tests.flickr_fixtures import captions, karpathy_json, make_flickr8k, make_flickr30k, photo_name


@pytest.fixture(scope="module")
def f8k(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr8k")
    splits = make_flickr8k(root, extra_token_lines=(f"{photo_name(3)[1]}.1#0\ta stray caption of a copy",))
    return root, splits


def test_flickr8k_official_files_ids_and_captions(f8k):
    root, splits = f8k
    s = load_split(root, "dev")
    assert s.dataset == "flickr8k" and s.image_dir == root / "Images"
    pids = sorted(photo_name(k)[0] for k in splits["dev"])
    assert s.image_ids.tolist() == pids  # image id = the leading digits of the file name
    assert s.caption_ids.tolist() == [p * 10 + n for p in pids for n in range(5)]  # = image id * 10 + n
    assert s.caption_image_ids.tolist() == [p for p in pids for _ in range(5)]
    k0 = splits["dev"][0]
    assert s.file_names[0] == photo_name(k0)[1] and s.captions_of(pids[0]) == captions(k0)
    assert s.image_path(0).is_file()


def test_flickr8k_joined_and_sliced_splits(f8k):
    root, splits = f8k
    both = load_split(root, "train+dev")
    assert both.num_images == len(splits["train"]) + len(splits["dev"]) and both.num_captions == 5 * both.num_images
    head, tail = load_split(root, "train[:5]"), load_split(root, "train[5:]")
    assert head.num_images == 5 and np.intersect1d(head.image_ids, tail.image_ids).size == 0
    assert sorted([*head.image_ids, *tail.image_ids]) == sorted(load_split(root, "train").image_ids)


def test_a_caption_line_of_an_image_in_no_split_is_ignored(f8k):
    root, splits = f8k
    assert ".jpg.1#0" in (root / "Flickr8k.token.txt").read_text()
    for part, ks in splits.items():
        s = load_split(root, part)
        assert "a stray caption of a copy" not in s.captions and s.num_captions == 5 * len(ks)


def test_official_and_karpathy_files_give_the_same_ids(f8k, tmp_path):
    root, splits = f8k
    kfile = karpathy_json(tmp_path / "dataset_flickr8k.json", splits)
    for official, karpathy in (("train", "train"), ("dev", "val"), ("test", "test")):
        a, b = load_split(root, official), load_split(root, karpathy, karpathy_file=kfile)
        assert b.dataset == "flickr8k" and b.image_dir == a.image_dir
        assert a.image_ids.tolist() == b.image_ids.tolist() and a.caption_ids.tolist() == b.caption_ids.tolist()
        assert a.captions == b.captions and a.file_names == b.file_names


def test_the_official_zip_image_folder_and_explicit_dataset(tmp_path):
    make_flickr8k(tmp_path, 4, 2, 2, image_dir="Flicker8k_Dataset")
    s = load_split(tmp_path, "test", dataset="flickr8k")
    assert s.image_dir == tmp_path / "Flicker8k_Dataset" and s.image_path(0).is_file()
    with pytest.raises(DataError, match="annotations"):  # asked for COCO: COCO's reader says what it lacks
        load_split(tmp_path, "test", dataset="coco")


@pytest.mark.parametrize("line,why", [
    ("1000000_x.jpg 0\tno hash", "expected '<image>.jpg#<0-9>' TAB caption"),
    ("1000000_x.jpg#0 no tab here", "expected '<image>.jpg#<0-9>' TAB caption"),
    ("1000000_x.jpg#12\tnumber too large", "expected '<image>.jpg#<0-9>' TAB caption"),
])
def test_a_malformed_token_line_is_one_line_naming_file_and_line(tmp_path, line, why):
    make_flickr8k(tmp_path, 4, 2, 2, images=False)
    token = tmp_path / "Flickr8k.token.txt"
    lines = token.read_text().splitlines()
    lines.insert(6, line)
    token.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_split(tmp_path, "train")
    assert str(e.value).startswith(f"{token}:7: {why}") and "\n" not in str(e.value) and "--skip-bad" in str(e.value)
    s = load_split(tmp_path, "train", skip_bad=True)  # dropped and counted
    assert s.skipped == {"malformed lines": [7]} and s.num_captions == 20


def test_two_files_with_one_photo_id_are_refused_naming_both(tmp_path):
    make_flickr8k(tmp_path, 4, 2, 2, images=False)
    pid, name = photo_name(0)
    dev = tmp_path / "Flickr_8k.devImages.txt"
    dev.write_text(dev.read_text() + f"{pid}_0123456789.jpg\n")
    with pytest.raises(DataError, match=rf"{name} and {pid}_0123456789.jpg have the same photo id {pid}"):
        load_split(tmp_path, "test")  # every list is checked, whichever split is read
    dev.write_text(dev.read_text().replace(f"{pid}_0123456789.jpg", name))
    with pytest.raises(DataError, match=rf"Flickr_8k.devImages.txt:3: {name} is listed twice"):
        load_split(tmp_path, "train")


def test_a_karpathy_file_with_one_photo_id_twice_is_refused(f8k, tmp_path):
    root, splits = f8k
    kfile = karpathy_json(tmp_path / "dataset_flickr8k.json", splits)
    data = json.loads(kfile.read_text())
    data["images"][1]["filename"] = f"{photo_name(0)[0]}_ffffffffff.jpg"
    kfile.write_text(json.dumps(data))
    with pytest.raises(DataError, match=r"images\[1\]\): .* have the same photo id"):
        load_split(root, "train", karpathy_file=kfile)


def test_bad_names_and_splits(tmp_path):
    make_flickr8k(tmp_path, 4, 2, 2, images=False)
    with pytest.raises(DataError, match="Flickr8k's splits are train/dev/test"):
        load_split(tmp_path, "val")
    (tmp_path / "Flickr_8k.testImages.txt").unlink()
    with pytest.raises(DataError, match="Flickr_8k.testImages.txt does not exist"):
        load_split(tmp_path, "test")
    lst = tmp_path / "Flickr_8k.trainImages.txt"
    lst.write_text(lst.read_text() + "photo.jpg\n")
    with pytest.raises(DataError, match=r"trainImages.txt:5: image file name 'photo.jpg' does not start with a "
                                        r"Flickr photo id"):
        load_split(tmp_path, "dev")


def test_an_image_in_a_split_without_captions_follows_skip_bad(tmp_path):
    make_flickr8k(tmp_path, 4, 2, 2, images=False)
    lst = tmp_path / "Flickr_8k.trainImages.txt"
    lst.write_text(lst.read_text() + "42_abc.jpg\n")
    with pytest.raises(DataError, match=r"image 42 \(42_abc.jpg\) has no captions"):
        load_split(tmp_path, "train")
    assert load_split(tmp_path, "train", skip_bad=True).skipped == {"images without captions": [42]}


def test_flickr30k_results_csv_token_file_and_karpathy_splits(tmp_path):
    ks = make_flickr30k(tmp_path, 12, csv=True, token=False)
    s = load_split(tmp_path, "all")
    assert s.dataset == "flickr30k" and s.image_dir == tmp_path / "flickr30k-images"
    assert s.image_ids.tolist() == sorted(photo_name(k, True)[0] for k in ks)
    assert s.caption_ids[:5].tolist() == [s.image_ids[0] * 10 + n for n in range(5)]
    assert s.captions_of(photo_name(0, True)[0]) == captions(0) and s.image_path(0).is_file()
    make_flickr30k(tmp_path, 12, csv=False, token=True, images=False)
    tok = load_split(tmp_path, "all[:6]")  # the token file, when present, is read
    assert str(tmp_path / "results_20130124.token") in tok.source and tok.num_images == 6
    assert tok.caption_ids.tolist() == s.caption_ids[:30].tolist()
    with pytest.raises(DataError, match="Flickr30k has no official splits"):
        load_split(tmp_path, "test")
    kfile = karpathy_json(tmp_path / "dataset_flickr30k.json", {"train": ks[:8], "dev": ks[8:10], "test": ks[10:]},
                          "flickr30k")
    for found in (None, kfile):  # given, or found in the root
        test = load_split(tmp_path, "test", karpathy_file=found)
        assert test.image_ids.tolist() == s.image_ids[10:].tolist() and test.captions == s.captions[50:]


def test_flickr30k_csv_malformed_row(tmp_path):
    make_flickr30k(tmp_path, 4, bad_row=True, images=False)
    with pytest.raises(DataError, match=r"results.csv:8: expected 'image_name\| comment_number\| comment'"):
        load_split(tmp_path, "all")
    s = load_split(tmp_path, "all", skip_bad=True)
    assert s.skipped == {"malformed lines": [8]} and s.num_captions == 19


def test_karpathy_file_of_another_dataset_is_refused(f8k, tmp_path):
    root, splits = f8k
    kfile = karpathy_json(tmp_path / "k.json", splits, "flickr30k")
    with pytest.raises(DataError, match="--dataset flickr8k, but the Karpathy file .* is of flickr30k"):
        load_split(root, "test", karpathy_file=kfile, dataset="flickr8k")
    kfile.write_text(json.dumps({"images": [{"filename": "1_a.jpg", "split": "test", "sentences": []}]}))
    with pytest.raises(DataError, match="cannot tell its dataset"):
        load_split(root, "test", karpathy_file=kfile)


def test_the_dataset_script_reads_flickr_and_fails_in_one_line(f8k, tmp_path):
    root, _ = f8k
    ok = subprocess.run([sys.executable, "coco_triplet_dataset.py", "--coco-root", str(root), "--split", "dev",
                         "--dataset", "flickr8k"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "split dev: 6 images, 30 captions" in ok.stdout and "flickr8k:" in ok.stdout
    make_flickr8k(tmp_path, 2, 2, 2, images=False, extra_token_lines=("garbage",))
    bad = subprocess.run([sys.executable, "coco_triplet_dataset.py", "--coco-root", str(tmp_path), "--split", "dev"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1 and "Flickr8k.token.txt:31:" in bad.stderr


def test_real_flickr8k_splits():
    root = shared("flickr8k")
    dev = load_split(root, "dev")
    assert dev.num_images == 1000 and dev.num_captions == 5000 and dev.dataset == "flickr8k"
    assert np.all(dev.caption_ids // 10 == dev.caption_image_ids) and set((dev.caption_ids % 10).tolist()) == set(
        range(5))
    train = load_split(root, "train[:20]")
    assert train.num_images == 20 and np.intersect1d(train.image_ids, dev.image_ids).size == 0
    assert int(train.image_ids[0]) == int(train.file_names[0].split("_")[0]) and train.image_path(0).is_file()


def test_every_parser_that_reads_a_dataset_takes_the_dataset_flag(tmp_path, capsys):
    from crossmodal import databases, pipeline, retrieve, serve

    parsers = {"make_database_img": (databases.image_parser(), ["--split", "dev"]),
               "make_database_text": (databases.text_parser(), ["--split", "dev"]),
               "main_retrieve": (retrieve.figures_parser(), ["--run", str(tmp_path)]),
               "pipeline": (pipeline.parser(), []), "serve": (serve.parser(), ["--run", str(tmp_path)])}
    for name, (p, rest) in parsers.items():
        a = p.parse_args(["--coco-root", str(tmp_path), "--dataset", "flickr30k", *rest])
        assert a.dataset == "flickr30k" and p.parse_args(["--coco-root", str(tmp_path), *rest]).dataset == "auto", name
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--coco-root", str(tmp_path), "--dataset", "flickr", *rest])
        assert e.value.code == 2 and "invalid choice: 'flickr'" in capsys.readouterr().err, name
