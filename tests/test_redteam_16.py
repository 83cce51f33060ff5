"""Red-team findings on issue 16's changes (training step settings, decoding ahead, index rule),
each a test that failed before its fix."""

import json
import logging

import numpy as np
import pytest
import torch

import crossmodal.index as index_mod
from crossmodal.coco import load_split
from crossmodal.errors import FeatureError
from crossmodal.extract import extract_images, extract_texts
from crossmodal.index import describe
from crossmodal.outputs import OutputConflictError, read_sidecar
from crossmodal.serve import Searcher
from crossmodal.train import load_checkpoint
from img2text import main as img2text_main
from tests.test_integrity_helpers import TinyImages, TinyTexts, train_interrupted_at
from tests.test_serve import run_copy, serve_run_dir  # noqa: F401 (fixtures)


def _args(feats, runs, *extra):
    return ["--features-dir", str(feats), "--runs-dir", str(runs), "--no-progress", *extra]


def _device_bf16(monkeypatch, native: bool):
    """Simulate a CPU with (or without) native bfloat16 matmuls: what ``--precision auto`` looks at."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)


def test_a_run_copied_to_a_device_where_auto_differs_resumes_and_stays_finished(demo_features, tmp_path, monkeypatch):
    """A run trained with the defaults where auto is bf16, killed, then resumed with the defaults on
    a device without native bf16: it resumes in bf16 (to the weights of an uninterrupted run) and,
    finished, is skipped, not refused; asking for fp32 there is refused, naming both values."""
    _device_bf16(monkeypatch, True)
    img2text_main(_args(demo_features, tmp_path / "ref", "--epochs", "2"))
    train_interrupted_at(lambda: img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2")), 1, monkeypatch)
    _device_bf16(monkeypatch, False)  # the run folder is now on another machine
    img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2", "--resume"))
    run, ref = (tmp_path / x / "img2text_fasttext" for x in ("run", "ref"))
    assert json.loads((run / "args.json").read_text())["precision"] == "bf16"
    wa, wb = (load_checkpoint(d / "last.pt")["txt_head"] for d in (ref, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2"))["epochs_run"] == 2  # skipped
    with pytest.raises(OutputConflictError, match='precision: "bf16" -> "fp32"'):
        img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2", "--precision", "fp32"))


class _BatchRounding(TinyImages):
    """TinyImages whose vectors depend (slightly) on the batch they are encoded in, as real
    runtimes' are (EfficientNet-Lite0 under ONNX Runtime: batch 3 vs 4 differ by up to 1.7e-5)."""

    decode_ahead = 2

    def __init__(self, die_at: int | None = None):
        super().__init__()
        self.calls, self.die_at = 0, die_at

    def forward(self, images):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        return super().forward(images) + 1e-3 * len(images)


class _BatchRoundingTexts(TinyTexts):
    def __init__(self, die_at: int | None = None):
        self.calls, self.die_at, self.name = 0, die_at, "bert"  # bert: extract_texts passes batch_size

    def encode(self, texts, batch_size=128):
        self.calls += 1
        if self.calls == self.die_at:
            raise KeyboardInterrupt
        return super().encode(texts) + np.float32(1e-3 * batch_size)


def test_an_image_run_resumed_with_another_batch_size_ends_as_the_uninterrupted_run(small_root, tmp_path):
    """Killed at batch size 4 and resumed at 3 (or the other device's default), the file is the bytes
    of the uninterrupted run: the resume keeps the interrupted run's batches."""
    split = load_split(small_root, "val")
    extract_images(split, _BatchRounding(), tmp_path / "ref" / "i.npy", batch_size=4, progress=False)
    npy = tmp_path / "run" / "i.npy"
    with pytest.raises(KeyboardInterrupt):
        extract_images(split, _BatchRounding(die_at=3), npy, batch_size=4, progress=False)
    extract_images(split, _BatchRounding(), npy, batch_size=3, progress=False)
    assert npy.read_bytes() == (tmp_path / "ref" / "i.npy").read_bytes()



@pytest.mark.parametrize("recorded", ["4", True, -4, None])
def test_a_progress_record_with_a_batch_size_that_is_not_one_resumes_with_the_asked_size(small_root, tmp_path,
                                                                                          recorded):
    """A progress record edited by hand (batch size a string, a bool, negative, or none) is no
    reason for a traceback: the resume encodes with the asked batch size and finishes."""
    import json

    split = load_split(small_root, "val")
    extract_images(split, _BatchRounding(), tmp_path / "ref" / "i.npy", batch_size=4, progress=False)
    npy = tmp_path / "run" / "i.npy"
    with pytest.raises(KeyboardInterrupt):
        extract_images(split, _BatchRounding(die_at=3), npy, batch_size=4, progress=False)
    progress = npy.with_name("i.progress.json")
    state = json.loads(progress.read_text())
    assert state["layout"] == {"batch_size": 4}
    state["layout"] = {"batch_size": recorded}
    progress.write_text(json.dumps(state))
    extract_images(split, _BatchRounding(), npy, batch_size=4, progress=False)
    assert npy.read_bytes() == (tmp_path / "ref" / "i.npy").read_bytes()

def test_a_caption_run_resumed_with_another_batch_size_ends_as_the_uninterrupted_run(small_root, tmp_path):
    split = load_split(small_root, "val")
    extract_texts(split, _BatchRoundingTexts(), tmp_path / "ref" / "t.npy", batch_size=8, chunk=16, progress=False)
    npy = tmp_path / "run" / "t.npy"
    with pytest.raises(KeyboardInterrupt):
        extract_texts(split, _BatchRoundingTexts(die_at=2), npy, batch_size=8, chunk=16, progress=False)
    extract_texts(split, _BatchRoundingTexts(), npy, batch_size=32, chunk=16, progress=False)
    assert npy.read_bytes() == (tmp_path / "ref" / "t.npy").read_bytes()


def test_auto_index_follows_a_changed_gallery_instead_of_refusing_it(run_copy, serve_run_dir, monkeypatch,  # noqa: F811
                                                                     caplog):
    """Embeddings made by the default rule (flat), then the run retrained so that its embeddings
    are stale, and the rule now gives IVF (the gallery crossed the threshold; simulated by lowering
    it): the same command rebuilds them with the rule's index. An explicit kind is still refused."""
    from get_features_captions import main as embed_main

    ck = torch.load(run_copy / "best.pt", weights_only=True)
    ck["img_head"]["net.0.weight"] += 0.01  # retrained: the embeddings' checkpoint changed
    torch.save(ck, run_copy / "best.pt")
    monkeypatch.setattr(index_mod, "AUTO_IVF_FROM", 17)  # the 16 images stay flat, the captions reach it
    with pytest.raises(OutputConflictError, match="index.kind"):
        embed_main(["--run", str(run_copy), "--split", "val", "--index", "hnsw"])
    with caplog.at_level(logging.INFO):
        embed_main(["--run", str(run_copy), "--split", "val"])
    assert "stale" in caplog.text
    side = read_sidecar(run_copy / "embeddings" / "val_emb_text.json")
    assert side["index"]["type"] == "IndexIVFFlat" and side["job"]["index"]["kind"] == "ivf"
    s = Searcher.from_run(run_copy, "val", serve_run_dir["root"])
    assert describe(s.gallery.txt_index)["type"] == "IndexIVFFlat"


def test_an_nlist_too_large_for_the_rules_ivf_gallery_publishes_nothing(run_copy, monkeypatch):  # noqa: F811
    """``--index auto --nlist N`` with N above the IVF gallery's size: the one-line error comes
    before any gallery is replaced (not after the flat image gallery was republished with the
    new job, which the next run without --nlist then refused as other settings)."""
    from get_features_captions import main as embed_main

    monkeypatch.setattr(index_mod, "AUTO_IVF_FROM", 17)  # images (16) flat, captions IVF
    before = {p.name: p.read_bytes() for p in (run_copy / "embeddings").iterdir() if p.suffix != ".lock"}
    with pytest.raises(FeatureError, match="--nlist 100000"):
        embed_main(["--run", str(run_copy), "--split", "val", "--nlist", "100000", "--force"])
    assert {p.name: p.read_bytes() for p in (run_copy / "embeddings").iterdir() if p.suffix != ".lock"} == before
