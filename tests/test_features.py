"""Feature databases: shapes, row order, determinism, refusal of mismatches, resume, shards,
bad images, and the fastText train-split rule."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from crossmodal.coco import load_split
from crossmodal.errors import DataError, FeatureError, ModelError
from crossmodal.image_encoders import EffNetLite0Regions, FasterRCNNRegions
from crossmodal.outputs import OutputConflictError
from crossmodal.store import load_features, save_features
from make_database_img import main as img_main
from make_database_text import main as text_main
from tests.conftest import ROOT, shared

IMG = ["--encoder", "effnet-lite0", "--input-size", "128", "--workers", "0", "--batch-size", "4", "--no-progress"]


def data_root(request, where: str):
    """The dataset a test runs on: ``generated`` (the ``small_root`` fixture, so a clone without
    ../shared checks it too) or a real COCO sample folder of ../shared/data (skipped when absent)."""
    return request.getfixturevalue("small_root") if where == "generated" else shared(where)


ROOTS = pytest.mark.parametrize("where", ["generated", "coco-tiny"])


def _img(root, split, feats, *extra):
    return img_main(["--coco-root", str(root), "--split", split, "--features-dir", str(feats), *IMG, *extra])


@ROOTS
def test_image_features_shape_order_and_determinism(tmp_path, request, where):
    root = data_root(request, where)
    meta = _img(root, "val", tmp_path / "a")
    arr, side = load_features(tmp_path / "a" / "val_img_effnet-lite0.npy")
    split = load_split(root, "val")
    assert arr.shape == (16, 1280) and arr.dtype == np.float32 and arr.flags["C_CONTIGUOUS"]
    assert side["ids"] == split.image_ids.tolist() == meta["ids"]
    assert np.isfinite(arr).all() and np.abs(arr).sum(1).min() > 0
    assert side["weights"]["file"].startswith("efficientnet-lite0") and side["settings"]["input_size"] == 128
    _img(root, "val", tmp_path / "b")
    assert (tmp_path / "a" / "val_img_effnet-lite0.npy").read_bytes() == (
        tmp_path / "b" / "val_img_effnet-lite0.npy").read_bytes()
    # a row is the features of its own image: encode image 5 alone
    enc = EffNetLite0Regions(128)
    from crossmodal.coco import load_image

    with torch.inference_mode():
        one = enc([enc.preprocess(load_image(split.image_path(r))) for r in (5, 11)]).numpy()
    np.testing.assert_allclose(one, arr[[5, 11]], rtol=1e-4, atol=1e-4)
    assert not np.allclose(arr[5], arr[11], atol=1e-3)  # two images, two rows


def test_up_to_date_output_is_skipped_other_settings_refused_force_redoes(small_root, tmp_path, caplog):
    _img(small_root, "val", tmp_path)
    npy = tmp_path / "val_img_effnet-lite0.npy"
    t0, before = npy.stat().st_mtime_ns, npy.read_bytes()
    caplog.set_level("INFO")
    _img(small_root, "val", tmp_path)
    assert npy.stat().st_mtime_ns == t0 and "up to date" in caplog.text
    with pytest.raises(OutputConflictError, match=r"val_img_effnet-lite0.npy was made with other settings "
                                                  r"\(settings.input_size: 128 -> 96\); pass --force"):
        _img(small_root, "val", tmp_path, "--input-size", "96")
    assert npy.read_bytes() == before and not list(tmp_path.glob("*partial*"))  # nothing touched
    _img(small_root, "val", tmp_path, "--input-size", "96", "--force")
    assert load_features(npy)[1]["settings"]["input_size"] == 96


def test_sidecar_mismatch_is_refused(tmp_path):
    npy = tmp_path / "x.npy"
    save_features(npy, np.ones((3, 4)), {"ids": [1, 2, 3]})
    side = json.loads(npy.with_suffix(".json").read_text())
    side["count"] = 5
    npy.with_suffix(".json").write_text(json.dumps(side))
    with pytest.raises(FeatureError, match=r"has shape \(3, 4\) but its sidecar .*x.json says"):
        load_features(npy)
    npy.with_suffix(".json").unlink()
    with pytest.raises(FeatureError, match="sidecar .*x.json of .*x.npy does not exist"):
        load_features(npy)


def test_resume_after_interruption_is_byte_identical(small_root, tmp_path, monkeypatch):
    root = small_root
    _img(root, "train", tmp_path / "ref")
    calls = {"n": 0}
    orig = EffNetLite0Regions.forward

    def dying(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, images)

    monkeypatch.setattr(EffNetLite0Regions, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        _img(root, "train", tmp_path / "run")
    progress = json.loads((tmp_path / "run" / "train_img_effnet-lite0.progress.json").read_text())
    assert progress["done"] == 8  # two batches of 4 kept
    resumed = []
    monkeypatch.setattr(EffNetLite0Regions, "forward", lambda self, images: (resumed.append(len(images)),
                                                                             orig(self, images))[1])
    _img(root, "train", tmp_path / "run")
    assert (tmp_path / "run" / "train_img_effnet-lite0.npy").read_bytes() == (
        tmp_path / "ref" / "train_img_effnet-lite0.npy").read_bytes()
    assert sum(resumed) == 24 - 8  # the 8 finished rows were not encoded again
    assert not (tmp_path / "run" / "train_img_effnet-lite0.progress.json").exists()


@pytest.mark.slow
def test_resume_after_sigkill(small_root, tmp_path):
    root = small_root
    _img(root, "train", tmp_path / "ref")
    cmd = [sys.executable, str(ROOT / "make_database_img.py"), "--coco-root", str(root), "--split", "train",
           "--features-dir", str(tmp_path / "run"), *IMG]
    cmd[cmd.index("--batch-size") + 1] = "4"
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = tmp_path / "run" / "train_img_effnet-lite0.progress.json"
    deadline = time.time() + 120
    while time.time() < deadline:
        if progress.is_file() and json.loads(progress.read_text() or "{}").get("done", 0) >= 4:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = json.loads(progress.read_text())["done"]
    assert 4 <= done < 24, "the run should have been killed mid-way"
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    assert (tmp_path / "run" / "train_img_effnet-lite0.npy").read_bytes() == (
        tmp_path / "ref" / "train_img_effnet-lite0.npy").read_bytes()


def test_shards_merge_to_the_unsharded_result(small_root, tmp_path):
    root = small_root
    _img(root, "train", tmp_path / "one")
    for i in range(3):
        _img(root, "train", tmp_path / "sh", "--shard", str(i), "--num-shards", "3")
    with pytest.raises(FeatureError, match="shard files missing"):
        _img(root, "train", tmp_path / "sh", "--merge", "--num-shards", "4")
    _img(root, "train", tmp_path / "sh", "--merge", "--num-shards", "3")
    a, ma = load_features(tmp_path / "one" / "train_img_effnet-lite0.npy")
    b, mb = load_features(tmp_path / "sh" / "train_img_effnet-lite0.npy")
    assert ma["ids"] == mb["ids"] and ma["job"] == mb["job"]
    # "the same file an unsharded run would" write: the same bytes
    assert (tmp_path / "one" / "train_img_effnet-lite0.npy").read_bytes() == (
        tmp_path / "sh" / "train_img_effnet-lite0.npy").read_bytes()
    assert ma["files"]["train_img_effnet-lite0.npy"]["sha256"] == mb["files"]["train_img_effnet-lite0.npy"]["sha256"]


def test_shards_from_torchrun_environment(small_root, tmp_path, monkeypatch):
    root = small_root
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    meta = _img(root, "val", tmp_path / "env")
    assert meta["job"]["rows"] == [8, 16]
    env_shard = tmp_path / "env" / "val_img_effnet-lite0.shard1of2.npy"
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")
    flags = _img(root, "val", tmp_path / "flags", "--shard", "1", "--num-shards", "2")
    assert flags["ids"] == meta["ids"] == load_split(root, "val").image_ids[8:16].tolist()
    assert env_shard.read_bytes() == (tmp_path / "flags" / env_shard.name).read_bytes()  # rank 1 of 2 = shard 1
    _img(root, "val", tmp_path / "flags", "--shard", "0", "--num-shards", "2")
    _img(root, "val", tmp_path / "flags", "--merge", "--num-shards", "2")
    _img(root, "val", tmp_path / "one")
    assert (tmp_path / "flags" / "val_img_effnet-lite0.npy").read_bytes() == (
        tmp_path / "one" / "val_img_effnet-lite0.npy").read_bytes()


FT_SHARD = ("--encoder", "fasttext", "--fasttext-dim", "16", "--fasttext-bucket", "2000", "--fasttext-epoch", "2",
            "--fasttext-train-split", "train")


def _caption_shards(root, tmp, encoder) -> tuple[dict, dict, str]:
    """An unsharded extraction of val's captions in ``tmp/one``, and 3 shards merged in ``tmp/sh``."""
    name = f"val_text_{encoder[1]}"
    one = _txt(root, "val", tmp / "one", *encoder)
    if encoder[1] == "fasttext":  # the shards reuse the one model
        shutil.copytree(tmp / "one", tmp / "sh", ignore=shutil.ignore_patterns("val_*", "*.lock"))
    parts = [_txt(root, "val", tmp / "sh", *encoder, "--shard", str(i), "--num-shards", "3") for i in range(3)]
    assert sum((p["ids"] for p in parts), []) == one["ids"] and all(p["ids"] for p in parts)
    assert sum((p["image_ids"] for p in parts), []) == one["image_ids"]
    with pytest.raises(FeatureError, match="shard files missing"):
        _txt(root, "val", tmp / "sh", *encoder, "--merge", "--num-shards", "4")
    merged = _txt(root, "val", tmp / "sh", *encoder, "--merge", "--num-shards", "3")
    assert merged["ids"] == one["ids"] and merged["image_ids"] == one["image_ids"] and merged["job"] == one["job"]
    return one, merged, name


@pytest.fixture(scope="module")
def bert_shards(small_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bert_shards")
    _, _, name = _caption_shards(small_root, tmp, ("--encoder", "bert", "--bert-model", "minilm", "--batch-size", "8"))
    return np.load(tmp / "one" / f"{name}.npy"), np.load(tmp / "sh" / f"{name}.npy"), tmp, name


def test_caption_features_shard_and_merge_to_the_unsharded_file(small_root, tmp_path, bert_shards):
    """README: caption features shard the same way (rows of the split), and the merge writes the
    same file as an unsharded run (fastText: byte for byte; BERT: the same vectors to float32 noise)."""
    _, _, name = _caption_shards(small_root, tmp_path, FT_SHARD)
    assert (tmp_path / "sh" / f"{name}.npy").read_bytes() == (tmp_path / "one" / f"{name}.npy").read_bytes()
    one, merged, _, _ = bert_shards
    # BERT: the same vectors to float32 noise, not the same bytes: a caption is padded to the longest of its
    # length-sorted batch, and a shard's batches are not the whole split's (README, "Sharding extraction")
    np.testing.assert_allclose(merged, one, rtol=0, atol=2e-6)  # row order kept
    assert not np.array_equal(merged[::-1], one)


def _copy_with_bad_image(src, tmp_path):
    import shutil

    root = tmp_path / "coco"
    shutil.copytree(src, root)
    split = load_split(root, "val")
    victim = split.image_path(3)
    victim.write_bytes(victim.read_bytes()[:200])  # truncated JPEG
    return root, victim, int(split.image_ids[3])


def test_corrupt_image_is_named_or_skipped_and_counted(small_root, tmp_path, caplog):
    root, victim, vid = _copy_with_bad_image(small_root, tmp_path)
    with pytest.raises(DataError, match=rf"{victim.name} \(id {vid}\) cannot be decoded"):
        _img(root, "val", tmp_path / "f")
    meta = _img(root, "val", tmp_path / "f", "--skip-bad")
    assert meta["skipped_ids"] == [vid] and meta["count"] == 15 and vid not in meta["ids"]
    assert "1 unreadable images skipped" in caplog.text


@pytest.mark.slow
@ROOTS
def test_fasterrcnn_wiring_and_state_dict_loading(tmp_path, request, where):
    torch.manual_seed(0)
    enc = FasterRCNNRegions("random", top_n=20, min_size=128, max_size=160)
    path = tmp_path / "det.pth"
    torch.save(enc.model.state_dict(), path)
    root = data_root(request, where)
    args = ["--encoder", "fasterrcnn", "--detector-weights", str(path), "--top-n", "20", "--min-size", "128",
            "--max-size", "160", "--workers", "0", "--batch-size", "4", "--no-progress"]
    meta = img_main(["--coco-root", str(root), "--split", "val", "--features-dir", str(tmp_path), *args])
    arr, side = load_features(tmp_path / "val_img_fasterrcnn.npy")
    assert arr.shape == (16, 1024) and side["weights"]["source"] == "file" and meta["settings"]["top_n"] == 20
    # the loaded file gives the same features as the in-memory model
    from crossmodal.coco import load_image

    split = load_split(root, "val")
    with torch.inference_mode():
        direct = enc([enc.preprocess(load_image(split.image_path(i))) for i in range(4)]).numpy()
    np.testing.assert_allclose(direct, arr[:4], rtol=1e-3, atol=1e-4)
    assert not np.allclose(direct[0], direct[1], atol=1e-4)  # each row is its own image
    # objectness-weighted pooling differs from the plain mean of the same image alone (the same
    # proposals: a batch of one both times, as padding in a batch changes the features)
    x0 = [enc.preprocess(load_image(split.image_path(0)))]
    with torch.inference_mode():
        mean0 = enc(x0).numpy()
        enc.pooling = "objectness"
        weighted, again = enc(x0).numpy(), enc(x0).numpy()
    assert weighted.shape == (1, 1024) and np.array_equal(weighted, again)
    assert not np.allclose(weighted[0], mean0[0], rtol=1e-4, atol=1e-5)


def test_fasterrcnn_without_weights_names_both_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights as W

    def offline(*_a, **_k):
        raise OSError("offline")

    monkeypatch.setattr(W.DEFAULT.__class__, "get_state_dict", offline)
    with pytest.raises(ModelError, match="--detector-weights PATH") as e:
        FasterRCNNRegions("torchvision")
    assert "download them once" in str(e.value)
    with pytest.raises(ModelError, match="no such file"):
        FasterRCNNRegions(str(tmp_path / "missing.pth"))


def _txt(root, split, feats, *extra):
    return text_main(["--coco-root", str(root), "--split", split, "--features-dir", str(feats), "--no-progress",
                      *extra])


FT = ["--encoder", "fasttext", "--fasttext-dim", "32", "--fasttext-bucket", "2000", "--fasttext-epoch", "3"]


def test_fasttext_model_is_trained_once_and_records_its_images(small_root, tmp_path):
    root = small_root
    meta = _txt(root, "val", tmp_path, *FT, "--fasttext-train-split", "train")
    assert meta["weights"]["train_split"] == "train" and meta["dim"] == 32
    train = load_split(root, "train")
    model_side = json.loads((tmp_path / "train_model_fasttext.json").read_text())
    assert model_side["job"]["train_split"] == "train" and model_side["job"]["threads"] == 1
    # the images whose captions trained it: training refuses the model when they leave the train split
    assert model_side["image_ids"] == train.image_ids.tolist() == meta["text_model_train_image_ids"]
    assert meta["text_model_path"] == "train_model_fasttext.bin"  # relative to the features folder
    mtime = (tmp_path / "train_model_fasttext.bin").stat().st_mtime_ns
    tr = _txt(root, "train", tmp_path, *FT)  # the same model is reused, not retrained
    assert (tmp_path / "train_model_fasttext.bin").stat().st_mtime_ns == mtime
    assert tr["weights"]["sha256_16"] == meta["weights"]["sha256_16"]
    arr, side = load_features(tmp_path / "train_text_fasttext.npy")
    assert arr.shape == (train.num_captions, 32) and side["ids"] == train.caption_ids.tolist()
    assert side["image_ids"] == train.caption_image_ids.tolist()
    with pytest.raises(OutputConflictError, match=r"train_model_fasttext.bin was made with other settings "
                                                  r"\(dim: 32 -> 16\)"):
        _txt(root, "train", tmp_path, *FT, "--fasttext-dim", "16")


def test_fasttext_training_is_reproducible_across_processes(small_root, tmp_path):
    """One thread, a fixed seed and a fresh interpreter: a model trained from this test process
    (torch loaded, a long history) is byte-identical to one trained from a bare subprocess."""
    from crossmodal.text_encoders import train_fasttext

    code = ("import sys; from crossmodal.coco import load_split; from crossmodal.text_encoders import train_fasttext;"
            "print(train_fasttext(load_split(sys.argv[1], 'train'), sys.argv[2], dim=16, epoch=2, bucket=2000))")
    subprocess.run([sys.executable, "-c", code, str(small_root), str(tmp_path / "a")], cwd=ROOT, check=True,
                   capture_output=True)
    here = train_fasttext(load_split(small_root, "train"), tmp_path / "b", dim=16, epoch=2, bucket=2000)
    assert here.read_bytes() == (tmp_path / "a" / "train_model_fasttext.bin").read_bytes()



def _interpreter_at(folder):
    """``folder/bin/python``: this interpreter reached through a symlink (with the venv's pyvenv.cfg
    and lib beside it when it runs in one, so its site-packages, fastText included, are found)."""
    (folder / "bin").mkdir(parents=True)
    if sys.prefix != sys.base_prefix:
        shutil.copy(os.path.join(sys.prefix, "pyvenv.cfg"), folder / "pyvenv.cfg")
        (folder / "lib").symlink_to(os.path.join(sys.prefix, "lib"))
    (folder / "bin" / "python").symlink_to(sys.executable)
    return str(folder / "bin" / "python")


def test_fasttext_model_is_the_same_whatever_the_interpreter_path(small_root, tmp_path, monkeypatch):
    """The interpreter's path (where a clone or venv lives) shapes the worker's heap; fastText starts
    90% of its rows from uninitialised memory unless the worker zeroes it: same bytes, first settings."""
    from crossmodal.text_encoders import _ATTEMPTS, _train_in_subprocess, normalise_caption

    corpus = "\n".join(normalise_caption(c) for c in load_split(small_root, "val").captions) + "\n"
    models = []
    for name in ("a", "b" * 120):
        monkeypatch.setattr(sys, "executable", _interpreter_at(tmp_path / name / "venv"))
        work = tmp_path / name / "work"
        work.mkdir()
        (work / "corpus.txt").write_text(corpus)
        assert _train_in_subprocess(work, dim=8, epoch=1, bucket=300, threads=1) == tuple(_ATTEMPTS[0])
        models.append((work / "model.bin").read_bytes())
    assert models[0] == models[1]

@ROOTS
def test_fasttext_pretrained_model_is_used(tmp_path, request, where):
    root = data_root(request, where)
    _txt(root, "train", tmp_path / "a", *FT)
    meta = _txt(root, "val", tmp_path / "b", "--encoder", "fasttext",
                "--fasttext-model", str(tmp_path / "a" / "train_model_fasttext.bin"))
    assert meta["weights"]["source"] == "pretrained" and not (tmp_path / "b" / "train_model_fasttext.bin").exists()
    with pytest.raises(ModelError, match="no.bin is not a fastText .bin model"):
        (tmp_path / "no.bin").write_bytes(b"not a model")
        _txt(root, "val", tmp_path / "b", "--encoder", "fasttext", "--fasttext-model", str(tmp_path / "no.bin"))


@ROOTS
def test_bert_features_pooling_and_row_order(tmp_path, request, where):
    root = data_root(request, where)
    meta = _txt(root, "val", tmp_path / "m", "--encoder", "bert", "--bert-model", "minilm", "--batch-size", "16")
    arr, side = load_features(tmp_path / "m" / "val_text_bert.npy")
    split = load_split(root, "val")
    assert arr.shape == (split.num_captions, 384) and side["settings"]["pooling"] == "mean"
    assert side["ids"] == split.caption_ids.tolist() and side["image_ids"] == split.caption_image_ids.tolist()
    from crossmodal.text_encoders import BertEncoder

    enc = BertEncoder()
    lengths = [len(c) for c in split.captions]
    rows = sorted({7, int(np.argmin(lengths)), int(np.argmax(lengths))})  # sorting by length keeps row order
    for r in rows:
        np.testing.assert_allclose(enc.encode([split.captions[r]])[0], arr[r], rtol=1e-4, atol=1e-5)
    assert not np.allclose(arr[rows[0]], arr[rows[-1]], atol=1e-3)
    cls = _txt(root, "val", tmp_path / "c", "--encoder", "bert", "--bert-model", "minilm", "--pooling", "cls")
    assert cls["settings"]["pooling"] == "cls"
    assert not np.allclose(load_features(tmp_path / "c" / "val_text_bert.npy")[0], arr)
    assert meta["weights"]["architecture"] == "bert"


def test_caption_extraction_resumes_byte_identical(small_root, tmp_path, monkeypatch):
    from crossmodal.extract import extract_texts
    from crossmodal.text_encoders import BertEncoder

    split, enc = load_split(small_root, "val"), BertEncoder()
    ref = extract_texts(split, enc, tmp_path / "ref" / "v.npy", chunk=16, progress=False)
    orig, calls = BertEncoder.encode, {"n": 0}

    def dying(self, texts, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return orig(self, texts, **kw)

    monkeypatch.setattr(BertEncoder, "encode", dying)
    with pytest.raises(KeyboardInterrupt):
        extract_texts(split, enc, tmp_path / "run" / "v.npy", chunk=16, progress=False)
    assert json.loads((tmp_path / "run" / "v.progress.json").read_text())["done"] == 32
    monkeypatch.setattr(BertEncoder, "encode", orig)
    calls["n"] = 0
    monkeypatch.setattr(BertEncoder, "encode", lambda self, texts, **kw: (calls.__setitem__("n", calls["n"] + len(
        texts)), orig(self, texts, **kw))[1])
    meta = extract_texts(split, enc, tmp_path / "run" / "v.npy", chunk=16, progress=False)
    assert calls["n"] == split.num_captions - 32  # only the rows not yet written were encoded
    assert (tmp_path / "run" / "v.npy").read_bytes() == (tmp_path / "ref" / "v.npy").read_bytes()
    assert meta["ids"] == ref["ids"] and meta["image_ids"] == ref["image_ids"]


@ROOTS
def test_unknown_bert_model_is_a_clear_error(tmp_path, request, where):
    with pytest.raises(ModelError, match="give --bert-model a local folder"):
        _txt(data_root(request, where), "val", tmp_path, "--encoder", "bert", "--bert-model",
             str(tmp_path / "nothing"))


def test_slices_of_one_split_get_their_own_files(tmp_path):
    from crossmodal.store import feature_path

    a, b = feature_path(tmp_path, "train2017[:70]", "img", "x"), feature_path(tmp_path, "train2017[70:]", "img", "x")
    assert a != b and a.name == "train2017_0-70_img_x.npy" and b.name == "train2017_70-end_img_x.npy"
    assert feature_path(tmp_path, "train2017", "img", "x").name == "train2017_img_x.npy"
