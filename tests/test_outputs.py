"""Outputs are owned for their whole life (crossmodal.outputs): locked while written, published
whole, judged by content, never replaced or mixed silently, never leaking held-out images.

Everything here runs on data the tests generate (``small_root``), so a clone without ../shared
checks these guarantees too."""

import errno
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from crossmodal import outputs
from crossmodal.errors import DataError, FeatureError, ModelError
from crossmodal.outputs import DiskFullError, OutputBusyError, OutputConflictError, locked
from crossmodal.store import ResumableWriter, load_features, save_features
from get_features_captions import main as embed_main
from img2text import main as train_main
from make_database_img import main as img_main
from make_database_text import main as text_main
from retrieve_img2text import main as i2t_main
from tests.conftest import ROOT
from tests.test_integrity_helpers import train_interrupted_at

IMG = ["--encoder", "effnet-lite0", "--input-size", "96", "--workers", "0", "--batch-size", "4", "--no-progress"]
FT = ["--encoder", "fasttext", "--fasttext-dim", "16", "--fasttext-bucket", "2000", "--fasttext-epoch", "3",
      "--fasttext-train-split", "train", "--no-progress"]


def _img(root, split, feats, *extra):
    return img_main(["--coco-root", str(root), "--split", split, "--features-dir", str(feats), *IMG, *extra])


def _txt(root, split, feats, *extra):
    return text_main(["--coco-root", str(root), "--split", split, "--features-dir", str(feats), *FT, *extra])


@pytest.fixture(scope="module")
def feats(small_root, tmp_path_factory):
    """Image and fastText features of the small generated dataset, made once (read-only for tests)."""
    d = tmp_path_factory.mktemp("feats")
    for split in ("train", "val"):
        _img(small_root, split, d)
        _txt(small_root, split, d)
    return d


def _copy(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


def _train(features, runs, *extra):
    return train_main(["--features-dir", str(features), "--runs-dir", str(runs), "--epochs", "2", "--no-progress",
                       *extra])


def _digests(folder):
    return {p.relative_to(folder).as_posix(): outputs.file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock")}


# --- locks -----------------------------------------------------------------------------------


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    target = tmp_path / "x.npy"
    with locked(target):
        with pytest.raises(OutputBusyError, match=rf"x.npy is in use by pid {os.getpid()} .* since "), \
                locked(target):
            pass
        with pytest.raises(OutputBusyError), locked(target, shared=True):  # a reader waits for no writer either
            pass
    with locked(target, shared=True), locked(target, shared=True), pytest.raises(OutputBusyError), \
            locked(target):  # readers share the lock, a writer is kept out
        pass
    with locked(target):  # released on exit
        pass


def test_a_second_extraction_of_a_file_being_written_exits_with_one_line(small_root, tmp_path):
    """While one job holds a feature file (here: this test process), another process asking for it,
    with other settings, exits 2 with one line naming the holder, and touches nothing."""
    out = tmp_path / "f"
    _img(small_root, "train", out)
    before = _digests(out)
    cmd = [sys.executable, str(ROOT / "make_database_img.py"), "--coco-root", str(small_root), "--split", "train",
           "--features-dir", str(out), *IMG, "--input-size", "80", "--force"]
    with locked(out / "train_img_effnet-lite0.npy"):
        second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert second.returncode == 2 and "Traceback" not in second.stderr
    last = second.stderr.strip().splitlines()[-1]
    assert f"train_img_effnet-lite0.npy is in use by pid {os.getpid()}" in last
    assert _digests(out) == before


# --- publication and crashes -------------------------------------------------------------------


def test_kill_between_array_and_sidecar_is_never_taken_as_finished(small_root, tmp_path, monkeypatch):
    _img(small_root, "val", tmp_path)
    npy = tmp_path / "val_img_effnet-lite0.npy"
    calls = {"n": 0}
    real = outputs.write_json

    def dies_before_sidecar(path, obj):
        if str(path).endswith("val_img_effnet-lite0.json"):
            raise KeyboardInterrupt  # the array is renamed into place, its sidecar not yet written
        calls["n"] += 1
        return real(path, obj)

    monkeypatch.setattr(outputs, "write_json", dies_before_sidecar)
    with pytest.raises(KeyboardInterrupt):
        _img(small_root, "val", tmp_path, "--input-size", "80", "--force")
    monkeypatch.setattr(outputs, "write_json", real)
    # the new array now sits under the old sidecar: a reader refuses it, a rerun redoes it
    with pytest.raises(FeatureError, match="does not match the digest in its sidecar"):
        load_features(npy)
    meta = _img(small_root, "val", tmp_path)
    assert meta["settings"]["input_size"] == 96 and load_features(npy)[0].shape == (16, 1280)


def test_corrupt_or_foreign_partial_is_discarded_and_redone(small_root, tmp_path, caplog):
    _img(small_root, "val", tmp_path / "ref")
    want = (tmp_path / "ref" / "val_img_effnet-lite0.npy").read_bytes()
    out = tmp_path / "run"
    out.mkdir()
    partial, progress = out / "val_img_effnet-lite0.partial.npy", out / "val_img_effnet-lite0.progress.json"
    caplog.set_level("WARNING")
    for bad_partial, bad_progress in ((b"\x93NUMPY garbage", None), (b"", "{torn"),
                                      (None, {"job": {"other": 1}, "shape": [16, 1280], "done": 8, "skipped": []})):
        if bad_partial is not None:
            partial.write_bytes(bad_partial)
        if bad_progress is not None:
            progress.write_text(bad_progress if isinstance(bad_progress, str) else json.dumps(bad_progress))
        _img(small_root, "val", out)
        assert (out / "val_img_effnet-lite0.npy").read_bytes() == want
        assert not partial.exists() and not progress.exists()
        (out / "val_img_effnet-lite0.npy").unlink()
    assert caplog.text.count("discarding the partial output") == 3  # one logged line per case


def test_zero_byte_and_truncated_outputs_are_redone(small_root, tmp_path, caplog):
    _img(small_root, "val", tmp_path)
    npy = tmp_path / "val_img_effnet-lite0.npy"
    want = npy.read_bytes()
    for damage in (b"", want[: len(want) // 2]):
        npy.write_bytes(damage)
        with pytest.raises(FeatureError, match="val_img_effnet-lite0.npy"):
            load_features(npy)
        caplog.clear()
        _img(small_root, "val", tmp_path)
        assert npy.read_bytes() == want and "is not a finished output" in caplog.text


def test_force_starts_clean_over_a_corrupt_partial(small_root, tmp_path):
    out = tmp_path / "f"
    out.mkdir()
    (out / "val_img_effnet-lite0.partial.npy").write_bytes(b"junk")
    (out / "val_img_effnet-lite0.progress.json").write_text("{}")
    meta = _img(small_root, "val", out, "--force")
    assert meta["count"] == 16 and not (out / "val_img_effnet-lite0.partial.npy").exists()


def test_disk_full_is_one_line(tmp_path, monkeypatch):
    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*x.partial.npy, 0.1 MB needed"):
        ResumableWriter(tmp_path / "x.npy", 100, 256, {"job": 1})
    monkeypatch.undo()

    real_open = open

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and "b" in mode:
            f.write = full
        return f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(DiskFullError, match=r"no space left on device writing .*y.tmp.npy, .* MB needed"):
        save_features(tmp_path / "y.npy", np.ones((10, 4)), {"ids": list(range(10))})
    monkeypatch.undo()
    assert not (tmp_path / "y.npy").exists()


def test_a_torn_results_line_is_skipped_and_never_swallows_the_next(tmp_path, caplog):
    log = tmp_path / "results.jsonl"
    outputs.append_jsonl(log, {"epoch": 0})
    with open(log, "a") as f:
        f.write('{"epoch": 1, "lo')  # a writer killed mid-line
    outputs.append_jsonl(log, {"epoch": 2})
    caplog.set_level("WARNING")
    assert outputs.read_jsonl(log) == [{"epoch": 0}, {"epoch": 2}]
    assert "line 2 is torn" in caplog.text


# --- settings and run folders -----------------------------------------------------------------


def test_run_with_other_arguments_is_refused_until_force_or_new_name(feats, tmp_path, caplog):
    first = _train(feats, tmp_path)
    run = tmp_path / "img2text_fasttext"
    first_rows = outputs.read_jsonl(run / "results.jsonl")
    before = _digests(run)
    with pytest.raises(OutputConflictError, match=r"run .*img2text_fasttext holds a model trained with other "
                                                  r"arguments or features \(lr: 0.001 -> 0.01\)"):
        _train(feats, tmp_path, "--lr", "0.01")
    assert _digests(run) == before  # nothing of the finished run changed
    other = _train(feats, tmp_path, "--lr", "0.01", "--name", "lr01")
    assert other["run_dir"].endswith("lr01") and _digests(run) == before
    caplog.set_level("INFO")
    _train(feats, tmp_path, "--lr", "0.01", "--force")
    assert "starts afresh" in caplog.text
    assert json.loads((run / "args.json").read_text())["lr"] == 0.01
    rows = outputs.read_jsonl(run / "results.jsonl")  # afresh: only the new training's epochs
    assert [r["epoch"] for r in rows] == [0, 1] and all(r["type"] == "epoch" for r in rows)
    first_rsums = [r["val_rsum"] for r in first_rows]
    assert first["best"]["epoch"] == first_rsums.index(max(first_rsums)) and first["epochs_run"] == 2


def test_resume_appends_to_results_and_ignores_a_torn_line(feats, tmp_path, monkeypatch):
    train_interrupted_at(lambda: _train(feats, tmp_path, "--epochs", "4"), 2, monkeypatch)
    results = tmp_path / "img2text_fasttext" / "results.jsonl"
    kept = results.read_text()
    with open(results, "a") as f:
        f.write('{"type": "epoch", "epo')
    summary = _train(feats, tmp_path, "--epochs", "4")
    text = results.read_text()
    assert text.startswith(kept)  # append-only: the earlier lines are untouched
    rows = outputs.read_jsonl(results)
    assert [r["epoch"] for r in rows] == [0, 1, 2, 3] and summary["epochs_run"] == 4


# --- leaks ------------------------------------------------------------------------------------


def test_overlapping_train_and_val_images_are_refused(small_root, tmp_path):
    f = tmp_path / "f"
    for split in ("train", "train[0:12]"):
        _img(small_root, split, f)
        _txt(small_root, split, f)
    with pytest.raises(DataError, match=r"training split 'train' and validation split 'train\[0:12\]' share 12 "
                                        r"images"):
        _train(f, tmp_path, "--val-split", "train[0:12]")


def test_fasttext_trained_on_held_out_captions_is_refused(small_root, tmp_path):
    f = tmp_path / "f"
    for split in ("train", "val"):
        _img(small_root, split, f)
        text_main(["--coco-root", str(small_root), "--split", split, "--features-dir", str(f), *FT[:-3],
                   "--fasttext-train-split", "val", "--no-progress"])
    with pytest.raises(DataError, match=r"trained on captions of 16 images outside the training split 'train'"):
        _train(f, tmp_path)


def test_scoring_on_training_images_is_refused(small_root, feats, tmp_path):
    f = _copy(feats, tmp_path / "f")
    _img(small_root, "train[0:8]", f)
    _txt(small_root, "train[0:8]", f)
    _train(f, tmp_path)
    with pytest.raises(DataError, match=r"split 'train\[0:8\]' and the training split 'train' of run .* share 8"):
        embed_main(["--run", str(tmp_path / "img2text_fasttext"), "--split", "train[0:8]"])


# --- provenance -------------------------------------------------------------------------------


def test_embeddings_of_an_older_checkpoint_are_refused_then_rebuilt(feats, tmp_path, caplog):
    run = tmp_path / "img2text_fasttext"
    _train(feats, tmp_path)
    embed_main(["--run", str(run), "--split", "val"])
    i2t_main(["--run", str(run), "--split", "val"])
    from retrieve_text2img import main as t2i_main

    t2i_main(["--run", str(run), "--split", "val"])
    assert (run / "retrieval").is_dir() and len(outputs.read_jsonl(run / "results.jsonl")) == 4
    _train(feats, tmp_path, "--force")  # retrained
    # --force removed what belonged to the old model: embeddings, scores (metrics, top-k lists,
    # PR figures) and their rows in results.jsonl
    assert not (run / "embeddings").exists() and not (run / "retrieval").exists()
    assert [(r["type"], r["epoch"]) for r in outputs.read_jsonl(run / "results.jsonl")] == [("epoch", 0),
                                                                                            ("epoch", 1)]
    embed_main(["--run", str(run), "--split", "val"])
    import torch  # now change the checkpoint behind the embeddings' back

    ck = torch.load(run / "best.pt", weights_only=True)
    ck["img_head"]["net.0.bias"] += 1.0
    torch.save(ck, run / "best.pt")
    with pytest.raises(FeatureError, match="were made from another checkpoint"):
        i2t_main(["--run", str(run), "--split", "val"])
    caplog.set_level("INFO")
    embed_main(["--run", str(run), "--split", "val", "--checkpoint", "best.pt"])
    assert "is stale" in caplog.text
    i2t_main(["--run", str(run), "--split", "val"])


def test_force_removes_the_old_models_score_figures(feats, tmp_path):
    run = tmp_path / "img2text_fasttext"
    _train(feats, tmp_path)
    embed_main(["--run", str(run), "--split", "val"])
    i2t_main(["--run", str(run), "--split", "val"])
    assert (run / "figures" / "pr_val_img2text_full.png").is_file()
    _train(feats, tmp_path, "--force")
    assert not list((run / "figures").glob("pr_*"))


def test_checkpoint_of_another_run_is_refused(feats, tmp_path):
    _train(feats, tmp_path)
    _train(feats, tmp_path, "--name", "other", "--hidden", "64")
    with pytest.raises(ModelError, match=r"does not belong to run .*img2text_fasttext .*hidden"):
        embed_main(["--run", str(tmp_path / "img2text_fasttext"), "--split", "val", "--checkpoint",
                    "../other/best.pt"])


def test_truncated_index_is_refused_and_rebuilt(feats, tmp_path, caplog):
    run = tmp_path / "img2text_fasttext"
    _train(feats, tmp_path)
    embed_main(["--run", str(run), "--split", "val"])
    index = run / "embeddings" / "val_emb_text.faiss"
    index.write_bytes(index.read_bytes()[:100])
    with pytest.raises(FeatureError, match="val_emb_text.faiss does not match the digest"):
        i2t_main(["--run", str(run), "--split", "val"])
    caplog.set_level("WARNING")
    embed_main(["--run", str(run), "--split", "val"])
    assert "is not a finished output" in caplog.text
    n_caps = len(load_features(run / "embeddings" / "val_emb_text.npy")[1]["ids"])
    r = i2t_main(["--run", str(run), "--split", "val"])
    assert r["gallery"] == n_caps and r["queries"] == 16  # the rebuilt index holds every caption


def test_project_moved_elsewhere_keeps_working(feats, tmp_path, monkeypatch):
    """Sidecar paths resolve against the run folder, not the working directory."""
    proj = tmp_path / "proj"
    _copy(feats, proj / "features")
    monkeypatch.chdir(proj)
    train_main(["--features-dir", "features", "--runs-dir", "runs", "--epochs", "1", "--no-progress"])
    moved = tmp_path / "moved"
    shutil.move(str(proj), str(moved))
    monkeypatch.chdir(tmp_path)
    run = moved / "runs" / "img2text_fasttext"
    embed_main(["--run", str(run), "--split", "val"])
    assert i2t_main(["--run", str(run), "--split", "val"])["queries"] == 16
