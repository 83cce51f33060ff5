"""Demo data through the outputs module, and inputs that are contained (issue 14): a regeneration
killed half-way is never the same dataset; annotation file names stay inside the COCO root;
duplicate ids are refused; captions are strings with a visible character; torchrun's RANK and
WORLD_SIZE are checked."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from crossmodal.coco import load_split
from crossmodal.demo_data import generate_demo_dataset
from crossmodal.errors import DataError
from crossmodal.extract import resolve_shard
from crossmodal.outputs import OutputBusyError, locked
from tests.conftest import ROOT
from tests.test_integrity_helpers import Killed, run_killed_at


def _sizes(root):
    return {Image.open(p).size for p in (root / "train").glob("*.jpg")} | {
        Image.open(p).size for p in (root / "val").glob("*.jpg")}


def test_demo_regeneration_killed_half_way_is_never_accepted(tmp_path, monkeypatch):
    out = tmp_path / "demo"
    generate_demo_dataset(out, num_train=6, num_val=3, seed=0, image_size=64)
    total, _ = run_killed_at(lambda: generate_demo_dataset(tmp_path / "count", 6, 3, 0, 80), 0, monkeypatch,
                             mid_write=True)
    for k in (2, total // 2, total - 1):
        assert run_killed_at(lambda: generate_demo_dataset(out, 6, 3, 0, 80), k, monkeypatch, mid_write=True)[1]
        assert not (out / "demo_meta.json").exists()  # not a finished dataset of either size
        meta = generate_demo_dataset(out, num_train=6, num_val=3, seed=0, image_size=64)
        assert _sizes(out) == {(64, 64)} and meta["params"]["image_size"] == 64
    generate_demo_dataset(out, num_train=6, num_val=3, seed=0, image_size=80)
    assert _sizes(out) == {(80, 80)} and not (out / ".demo.tmp").exists()


def test_demo_dataset_with_a_damaged_file_is_regenerated(tmp_path, caplog):
    out = tmp_path / "demo"
    generate_demo_dataset(out, num_train=4, num_val=2, seed=0, image_size=48)
    victim = sorted((out / "train").glob("*.jpg"))[1]
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    caplog.set_level("INFO")
    generate_demo_dataset(out, num_train=4, num_val=2, seed=0, image_size=48)
    assert victim.read_bytes() == good and "regenerating the demo dataset" in caplog.text


def test_demo_dataset_smaller_regeneration_removes_the_extra_files(tmp_path):
    out = tmp_path / "demo"
    generate_demo_dataset(out, num_train=5, num_val=2, seed=0, image_size=48)
    generate_demo_dataset(out, num_train=3, num_val=2, seed=0, image_size=48)
    assert len(list((out / "train").glob("*.jpg"))) == 3
    assert load_split(out, "train").num_images == 3


def test_demo_dataset_is_locked_and_validates_its_sizes(tmp_path):
    out = tmp_path / "demo"
    with locked(out / "demo_meta.json"), pytest.raises(OutputBusyError, match="demo dataset"):
        generate_demo_dataset(out, num_train=2, num_val=1, seed=0, image_size=32)
    for bad in ({"num_train": 0}, {"num_val": -1}, {"image_size": 0}):
        with pytest.raises(DataError, match=f"{next(iter(bad))} must be a whole number"):
            generate_demo_dataset(out, **{"num_train": 2, "num_val": 1, "image_size": 32, **bad})
    r = subprocess.run([sys.executable, "-m", "crossmodal.demo_data", "--out", str(out), "--image-size", "-5"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--image-size" in r.stderr and "Traceback" not in r.stderr


def _coco(root, images, anns, split="s"):
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / split).mkdir(exist_ok=True)
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


@pytest.mark.parametrize("name", ["../../etc/hostname", "/etc/hostname", "a/../../b.jpg", None, "", 5, "..\\x.jpg"])
def test_annotation_file_name_must_stay_inside_the_root(tmp_path, name):
    root = _coco(tmp_path, [{"id": 7, "file_name": name}], [{"id": 1, "image_id": 7, "caption": "a cat"}])
    with pytest.raises(DataError, match=r"captions_s.json: image 7 has file_name .*(outside|not a file name)"):
        load_split(root, "s")


def test_karpathy_file_names_must_stay_inside_the_root(tmp_path):
    kf = tmp_path / "k.json"
    for fp, fn in (("..", "x.jpg"), ("val2014", "../../x.jpg"), ("/etc", "hostname")):
        kf.write_text(json.dumps({"images": [{"split": "test", "cocoid": 3, "filepath": fp, "filename": fn,
                                              "sentences": [{"sentid": 1, "raw": "a dog"}]}]}))
        with pytest.raises(DataError, match="image 3 has file_name"):
            load_split(tmp_path, "test", kf)


def test_duplicate_image_and_caption_ids_are_refused(tmp_path):
    root = _coco(tmp_path, [{"id": 7, "file_name": "a.jpg"}, {"id": 7, "file_name": "b.jpg"}],
                 [{"id": 1, "image_id": 7, "caption": "a cat"}])
    with pytest.raises(DataError, match=r"duplicate image ids 7: each must appear once"):
        load_split(root, "s")
    root = _coco(tmp_path, [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}],
                 [{"id": 1, "image_id": 7, "caption": "a cat"}, {"id": 1, "image_id": 8, "caption": "a dog"},
                  {"id": 2, "image_id": 8, "caption": "a dog"}, {"id": 2, "image_id": 7, "caption": "x"}])
    with pytest.raises(DataError, match=r"duplicate caption ids 1, 2: each must appear once"):
        load_split(root, "s", skip_bad=True)  # never skipped: which one is meant cannot be told


@pytest.mark.parametrize("caption, says", [
    (5, "is not a string (it is int 5)"), (None, "is not a string (it is null"), (["a"], "is not a string (it is list"),
    ("\u200b", "has no visible character"), ("\u00a0 \u200b\u2060", "has no visible character"), ("  ", "is empty")])
def test_captions_must_be_strings_with_visible_text(tmp_path, caption, says):
    root = _coco(tmp_path, [{"id": 7, "file_name": "a.jpg"}],
                 [{"id": 1, "image_id": 7, "caption": "a cat"}, {"id": 2, "image_id": 7, "caption": caption}])
    with pytest.raises(DataError, match=r"caption 2 of image 7 " + __import__("re").escape(says)):
        load_split(root, "s")
    s = load_split(root, "s", skip_bad=True)
    assert s.caption_ids.tolist() == [1] and sum(len(v) for v in s.skipped.values()) == 1


@pytest.mark.parametrize("rank, world, says", [("x", "2", "RANK='x' is not a whole number"),
                                               ("-1", "2", "RANK='-1'"), ("0", "0", "WORLD_SIZE='0'"),
                                               ("2", "2", "the rank must be below"), ("1", "1.5", "WORLD_SIZE"),
                                               ("", "2", "RANK=''"), ("٣", "9", "RANK='٣'")])
def test_torchrun_environment_out_of_range_is_one_line(monkeypatch, rank, world, says):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", world)
    with pytest.raises(DataError, match=__import__("re").escape(says)):
        resolve_shard(None, None)
    assert resolve_shard(1, 3) == (1, 3)  # explicit flags win


def test_torchrun_environment_error_exits_2_from_the_script(small_root, tmp_path):
    import os

    env = dict(os.environ, RANK="5", WORLD_SIZE="2")
    r = subprocess.run([sys.executable, "make_database_img.py", "--coco-root", str(small_root), "--split", "val",
                        "--features-dir", str(tmp_path), "--no-progress"], cwd=ROOT, env=env, capture_output=True,
                       text=True)
    assert r.returncode == 2 and "RANK=5 and WORLD_SIZE=2" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_killed_is_not_an_exception():
    assert not issubclass(Killed, Exception)


def test_a_tampered_demo_record_cannot_delete_files_outside_the_dataset(tmp_path):
    out = tmp_path / "demo"
    generate_demo_dataset(out, num_train=2, num_val=1, seed=0, image_size=32)
    victim = tmp_path / "precious.txt"
    victim.write_text("x")
    meta = json.loads((out / "demo_meta.json").read_text())
    meta["files"].update({str(victim): {}, "../precious.txt": {}, "train/../../precious.txt": {}})
    (out / "demo_meta.json").write_text(json.dumps(meta))
    generate_demo_dataset(out, num_train=2, num_val=1, seed=0, image_size=32)
    assert victim.exists()


@pytest.mark.parametrize("value", [2**70, -3, "1e3", True, "١٢"])
def test_image_ids_out_of_range_are_one_line(tmp_path, value):
    root = _coco(tmp_path, [{"id": value, "file_name": "a.jpg"}], [{"id": 1, "image_id": 7, "caption": "a cat"}])
    with pytest.raises(DataError, match="is not an integer id"):
        load_split(root, "s")


@pytest.mark.parametrize("split", ["../x", "a/b", "..", ".", "x\\y"])
def test_split_names_are_names_not_paths(tmp_path, split):
    with pytest.raises(DataError, match="not a path"):
        load_split(tmp_path, split)


def test_a_demo_record_that_claims_other_settings_is_not_believed(tmp_path):
    out = tmp_path / "demo"
    generate_demo_dataset(out, num_train=3, num_val=2, seed=0, image_size=32)
    meta = json.loads((out / "demo_meta.json").read_text())
    meta["params"]["image_size"] = 48  # the files are still 32 px
    (out / "demo_meta.json").write_text(json.dumps(meta))
    generate_demo_dataset(out, num_train=3, num_val=2, seed=0, image_size=48)
    assert _sizes(out) == {(48, 48)}
