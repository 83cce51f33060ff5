"""Hostile inputs to the run side end as one line: run names that are paths, files that are not
checkpoints (or ask to run code), a malformed LOCAL_RANK, and features that do not fit."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from crossmodal.checkpoints import load_checkpoint, load_state_file
from crossmodal.cli import resolve_device
from crossmodal.encoders import check_features_fit
from crossmodal.errors import DataError, FeatureError, ModelError
from crossmodal.pipeline import parser as pipeline_parser
from tests.conftest import ROOT
from tests.test_runs_common import features_for, train


@pytest.fixture(scope="module")
def run_feats(small_root, tmp_path_factory):
    return features_for(small_root, tmp_path_factory)


@pytest.mark.parametrize("name", ["../../x", "/abs", "a/b", "", "  ", ".", "..", "a\\b", "x\n", " lead", "\u200b"])
def test_run_names_that_are_paths_are_refused_at_parse_time(run_feats, tmp_path, capsys, name):
    runs = tmp_path / "deep" / "runs"
    with pytest.raises(SystemExit) as e:
        train(run_feats, runs, "--name", name)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error: argument --name" in err[-1] and not any("Traceback" in x for x in err)  # usage + one line
    assert not any(tmp_path.rglob("*.json")) and not any(tmp_path.rglob("*.pt"))  # nothing written anywhere


@pytest.mark.parametrize("out", ["../x", "/tmp/x", "a/b", ""])
def test_pipeline_out_that_is_a_path_is_refused(out, capsys):
    with pytest.raises(SystemExit):
        pipeline_parser().parse_args(["--demo", "--out", out])
    assert "argument --out" in capsys.readouterr().err


def test_a_plain_name_is_a_folder_inside_runs_dir(run_feats, tmp_path):
    summary = train(run_feats, tmp_path / "runs", "--name", "my run-1.x", epochs=1)
    assert (tmp_path / "runs" / "my run-1.x" / "done.json").is_file() and summary["name"] == "my run-1.x"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo PWNED",))


def _files(tmp_path) -> dict:
    torch.save({"a": Evil()}, tmp_path / "evil_zip.pt")
    with open(tmp_path / "evil_pickle.pt", "wb") as f:
        pickle.dump({"a": Evil()}, f)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(3)}, good)
    (tmp_path / "truncated.pt").write_bytes(good.read_bytes()[:300])
    (tmp_path / "zero.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("not a checkpoint at all\n")
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "folder.pt").mkdir()
    return {p.stem: p for p in tmp_path.iterdir()}


@pytest.mark.parametrize("kind,reason", [
    ("evil_zip", r"is not a plain state dict: it asks to call (posix|os)\.system; refused to unpickle code"),
    ("evil_pickle", r"is not a PyTorch checkpoint of plain tensors .*refused"),
    ("truncated", r"cannot be read as a PyTorch checkpoint \(truncated or corrupt: \w+"),
    ("zero", r"is empty \(0 bytes"),
    ("text", r"cannot be read as a PyTorch checkpoint|is not a PyTorch checkpoint"),
    ("random", r"cannot be read as a PyTorch checkpoint|is not a PyTorch checkpoint"),
    ("folder", r"is a folder, not a checkpoint file"),
])
def test_files_that_are_not_checkpoints_are_one_line(tmp_path, kind, reason):
    path = _files(tmp_path)[kind]
    for load in (load_state_file, load_checkpoint):
        with pytest.raises(ModelError, match=reason) as e:
            load(path)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg
        assert "weights_only" not in msg and "will likely succeed" not in msg  # never torch's advice to unpickle code


@pytest.mark.parametrize("kind", ["text", "zero", "evil_zip", "truncated"])
def test_detector_weights_that_are_not_a_checkpoint_are_one_line(tmp_path, kind):
    from crossmodal.image_encoders import FasterRCNNRegions

    path = _files(tmp_path)[kind]
    with pytest.raises(ModelError, match=r"--detector-weights .*" + kind) as e:
        FasterRCNNRegions(weights=str(path), min_size=64, max_size=64)
    assert "weights_only" not in str(e.value)
    with pytest.raises(ModelError, match=r"holds a Tensor, not a state dict"):
        torch.save(torch.ones(2), tmp_path / "tensor.pt")
        FasterRCNNRegions(weights=str(tmp_path / "tensor.pt"), min_size=64, max_size=64)


def test_detector_weights_cli_is_one_line_exit_2(small_root, tmp_path):
    bad = tmp_path / "w.pth"
    bad.write_text("hello")
    r = subprocess.run([sys.executable, str(ROOT / "make_database_img.py"), "--coco-root", str(small_root), "--split",
                        "val", "--features-dir", str(tmp_path / "f"), "--encoder", "fasterrcnn", "--detector-weights",
                        str(bad), "--no-progress"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "--detector-weights" in r.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("value", ["abc", "-1", "1.5", "0x1"])
def test_local_rank_that_is_not_a_number_is_one_line(monkeypatch, value):
    monkeypatch.setenv("LOCAL_RANK", value)
    with pytest.raises(DataError, match=rf"LOCAL_RANK={value!r} is not an integer >= 0"):
        resolve_device("cpu")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cpu").type == "cpu"


def test_features_that_do_not_fit_name_the_differing_fields():
    """After the fastText .bin is remade the dims are equal: the line must show what differs."""
    ident = {"kind": "text", "encoder": "fasttext", "settings": {"dim": 300, "epoch": 10},
             "weights": {"file": "ft.bin", "sha256_16": "aaaa"}, "dim": 300}
    ck = {"img_features": {"kind": "img", "encoder": "e", "settings": {}, "weights": {}, "dim": 8},
          "txt_features": ident}
    remade = dict(ident, weights={"file": "ft.bin", "sha256_16": "bbbb"})
    with pytest.raises(FeatureError) as e:
        check_features_fit(ck, ck["img_features"], remade, "of split val")
    msg = str(e.value)
    assert 'weights.sha256_16: "aaaa" -> "bbbb"' in msg and "differ from the checkpoint's in weights" in msg
    assert "dim 300" not in msg
