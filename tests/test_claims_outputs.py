"""README "Safety" claims that test_outputs.py does not cover: readers hold shared locks (a run
cannot be retrained under its embedding, scoring or figures; features cannot be replaced under a
training; a fastText model being trained is not read), a full disk while writing a checkpoint or a
Faiss index, the saved fastText model reloaded and compared before it is published, the figure
script refusing embeddings of another checkpoint, and scores rebuilt when the embeddings change.
All on data the tests generate (``small_root``)."""

import errno
import json

import numpy as np
import pytest
import torch

import crossmodal.text_encoders as te
from crossmodal.errors import FeatureError, ModelError
from crossmodal.outputs import DiskFullError, OutputBusyError, locked
from crossmodal.store import load_features
from get_features_captions import main as embed_main
from main_retrieve import main as figures_main
from retrieve_img2text import main as i2t_main
from tests import test_outputs
from tests.test_outputs import _copy, _img, _train, _txt

feats = test_outputs.feats  # the fixture: image and fastText features of small_root, made once per module


@pytest.fixture
def run(feats, tmp_path):
    """A trained run with val embeddings, in its own folder."""
    _train(feats, tmp_path)
    run = tmp_path / "img2text_fasttext"
    embed_main(["--run", str(run), "--split", "val"])
    return run


# --- readers lock shared -----------------------------------------------------------------------


def test_a_run_being_trained_is_not_read(run, small_root):
    with locked(run / "run"):  # a training of this run is in progress
        for reader in (lambda: embed_main(["--run", str(run), "--split", "val", "--force"]),
                       lambda: i2t_main(["--run", str(run), "--split", "val"]),
                       lambda: figures_main(["--run", str(run), "--coco-root", str(small_root), "--split", "val",
                                             "--random", "1"])):
            with pytest.raises(OutputBusyError, match=r"run .*img2text_fasttext is in use by pid"):
                reader()


def test_a_run_is_not_retrained_while_it_is_embedded_or_scored(run, feats, monkeypatch):
    """Each reader holds the run's lock shared for its whole job: a training that starts meanwhile
    (here: from inside the reader's work) is refused and the checkpoint stays."""
    import crossmodal.retrieve as retrieve
    from crossmodal.runs import Run

    before = (run / "best.pt").read_bytes()
    tried = []

    def retrain_meanwhile(real):
        def inner(*a, **k):
            with pytest.raises(OutputBusyError, match="img2text_fasttext"):
                _train(feats, run.parent, "--force")
            tried.append(real.__name__)
            return real(*a, **k)
        return inner

    monkeypatch.setattr(Run, "_embed", retrain_meanwhile(Run._embed))
    monkeypatch.setattr(retrieve, "_score", retrain_meanwhile(retrieve._score))
    embed_main(["--run", str(run), "--split", "val", "--force"])
    i2t_main(["--run", str(run), "--split", "val"])
    assert tried == ["_embed", "_score"] and (run / "best.pt").read_bytes() == before


def test_features_are_not_replaced_under_a_training(feats, small_root, tmp_path, monkeypatch):
    from crossmodal.train import Trainer

    f = _copy(feats, tmp_path / "f")
    npy = f / "train_img_effnet-lite0.npy"
    before = npy.read_bytes()
    orig, tried = Trainer.train_epoch, []

    def replace_features_meanwhile(self, epoch):
        if epoch == 0:
            with pytest.raises(OutputBusyError, match="train_img_effnet-lite0.npy"):
                _img(small_root, "train", f, "--input-size", "80", "--force")
            tried.append(epoch)
        return orig(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", replace_features_meanwhile)
    _train(f, tmp_path / "runs")
    assert tried == [0] and npy.read_bytes() == before


def test_a_fasttext_model_being_trained_is_neither_read_nor_trained_twice(small_root, tmp_path):
    model = tmp_path / "train_model_fasttext.bin"
    with locked(model):  # another process trains it now
        for split in ("val", "train"):
            with pytest.raises(OutputBusyError, match=r"fastText model .*train_model_fasttext.bin is in use by pid"):
                _txt(small_root, split, tmp_path)
    assert not model.exists() and not list(tmp_path.glob("*_text_fasttext.npy"))
    _txt(small_root, "val", tmp_path)  # released: it trains now
    assert model.is_file()


# --- disk full ---------------------------------------------------------------------------------


def _full_for(monkeypatch, suffix: str):
    """Writes to files whose name contains ``suffix`` fail as on a full disk (ENOSPC)."""
    real_open = open

    def full(*_a):
        raise OSError(errno.ENOSPC, "No space left on device")

    def full_open(path, mode="r", *a, **k):
        f = real_open(path, mode, *a, **k)
        if "w" in mode and "b" in mode and suffix in str(path):
            f.write = full
        return f

    monkeypatch.setattr("builtins.open", full_open)


def test_disk_full_writing_a_checkpoint_is_one_line(feats, tmp_path, monkeypatch):
    _full_for(monkeypatch, ".pt")
    with pytest.raises(DiskFullError, match=r"^no space left on device writing .*img2text_fasttext/.*\.pt.*, "
                                            r"[\d.]+ MB needed, [\d.]+ MB free$"):
        _train(feats, tmp_path)
    monkeypatch.undo()
    run = tmp_path / "img2text_fasttext"
    assert not (run / "best.pt").exists() and not (run / "done.json").exists()  # nothing passes as trained
    assert _train(feats, tmp_path)["epochs_run"] == 2  # space again: trained


def test_disk_full_writing_a_faiss_index_is_one_line(feats, tmp_path, monkeypatch):
    _train(feats, tmp_path)
    run = tmp_path / "img2text_fasttext"
    _full_for(monkeypatch, ".faiss")
    with pytest.raises(DiskFullError, match=r"^no space left on device writing .*val_emb_img.*\.faiss.*, "
                                            r"[\d.]+ MB needed, [\d.]+ MB free$"):
        embed_main(["--run", str(run), "--split", "val"])
    monkeypatch.undo()
    with pytest.raises(FeatureError):  # the embeddings were not published without their index
        load_features(run / "embeddings" / "val_emb_img.npy")
    embed_main(["--run", str(run), "--split", "val"])
    assert load_features(run / "embeddings" / "val_emb_img.npy")[0].shape == (16, 128)


def test_a_fasttext_model_that_does_not_reload_as_trained_is_not_published(small_root, tmp_path, monkeypatch):
    """The worker saves, reloads and compares: a short write (here, the file cut after saving, as
    a full disk would) fails the job instead of publishing a model."""
    short = te._WORKER.replace('    m.save_model(a["output"])',
                               '    m.save_model(a["output"]); open(a["output"], "r+b").truncate(4096)')
    assert short != te._WORKER
    monkeypatch.setattr(te, "_WORKER", short)
    with pytest.raises((ModelError, DiskFullError), match=r"does not reload as trained|no space left"):
        _txt(small_root, "val", tmp_path)
    assert not (tmp_path / "train_model_fasttext.bin").exists()
    assert not (tmp_path / "train_model_fasttext.json").exists()


# --- provenance of derived outputs ----------------------------------------------------------


def test_figures_refuse_embeddings_of_another_checkpoint(run, small_root):
    figures_main(["--run", str(run), "--coco-root", str(small_root), "--split", "val", "--random", "1"])
    ck = torch.load(run / "best.pt", weights_only=True)
    ck["img_head"]["net.0.bias"] += 1.0
    torch.save(ck, run / "best.pt")
    with pytest.raises(FeatureError, match=r"val_emb_img.npy were made from another checkpoint"):
        figures_main(["--run", str(run), "--coco-root", str(small_root), "--split", "val", "--random", "1"])


def test_scores_are_rebuilt_when_the_embeddings_change(run, caplog):
    from crossmodal.coco import rows_of
    from crossmodal.metrics import evaluate

    def expected():
        img, im = load_features(run / "embeddings" / "val_emb_img.npy")
        txt, tm = load_features(run / "embeddings" / "val_emb_text.npy")
        return evaluate(np.asarray(img), np.asarray(txt), rows_of(np.asarray(im["ids"]), np.asarray(tm["image_ids"])))

    saved = run / "retrieval" / "val_img2text_full_metrics.json"
    first = i2t_main(["--run", str(run), "--split", "val"])
    assert first["img2text_mAP"] == pytest.approx(expected()["img2text_mAP"], abs=1e-12)
    t0 = saved.stat().st_mtime_ns
    caplog.set_level("INFO")
    i2t_main(["--run", str(run), "--split", "val"])
    assert saved.stat().st_mtime_ns == t0 and "up to date: skipped" in caplog.text  # nothing changed: kept
    ck = torch.load(run / "best.pt", weights_only=True)  # another checkpoint in the run (scores kept) ...
    ck["txt_head"]["net.0.bias"] += 0.5
    torch.save(ck, run / "best.pt")
    embed_main(["--run", str(run), "--split", "val"])  # ... other embeddings
    assert saved.is_file()
    caplog.clear()
    again = i2t_main(["--run", str(run), "--split", "val"])
    assert "up to date" not in caplog.text and saved.stat().st_mtime_ns != t0
    want = expected()
    assert again["img2text_mAP"] == pytest.approx(want["img2text_mAP"], abs=1e-12)
    assert json.loads(saved.read_text())["img2text_R@1"] == pytest.approx(want["img2text_R@1"], abs=1e-12)
