"""Red-team findings on issue 16's changes (training step settings, decoding ahead, index rule),
each a test that failed before its fix."""

import json

import pytest
import torch

from crossmodal.outputs import OutputConflictError
from crossmodal.train import Trainer, load_checkpoint
from img2text import main as img2text_main


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
    orig = Trainer.train_epoch

    def dying(self, epoch):
        if epoch == 1:
            raise KeyboardInterrupt
        return orig(self, epoch)

    monkeypatch.setattr(Trainer, "train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2"))
    monkeypatch.setattr(Trainer, "train_epoch", orig)
    _device_bf16(monkeypatch, False)  # the run folder is now on another machine
    img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2", "--resume"))
    run, ref = (tmp_path / x / "img2text_fasttext" for x in ("run", "ref"))
    assert json.loads((run / "args.json").read_text())["precision"] == "bf16"
    wa, wb = (load_checkpoint(d / "last.pt")["txt_head"] for d in (ref, run))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2"))["epochs_run"] == 2  # skipped
    with pytest.raises(OutputConflictError, match='precision: "bf16" -> "fp32"'):
        img2text_main(_args(demo_features, tmp_path / "run", "--epochs", "2", "--precision", "fp32"))
