"""Caption encoding through ONNX Runtime: the same vectors as PyTorch on every row (cosine >=
0.9999) over batch shapes and padding lengths; the export cached by the weights' digest through
crossmodal.outputs; the runtime recorded in the sidecar; auto's choice; int8 as another setting."""

import pytest

from crossmodal.coco import load_split
from crossmodal.errors import ModelError
from tests.test_text_runtime_batches import (
    _captions,
    _cos,
    assert_equal_on_every_row,
    assert_equal_with_pooling_and_length,
    assert_same_vectors,
)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from crossmodal.text_encoders import BertEncoder

    cache = tmp_path_factory.mktemp("cache")
    return BertEncoder(runtime="torch"), BertEncoder(runtime="onnxruntime", cache_dir=cache), cache


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_onnxruntime_gives_pytorch_vectors_on_every_row(encoders, small_root, batch_size):
    torch_enc, ort_enc, _ = encoders
    assert (torch_enc.runtime, ort_enc.runtime) == ("torch", "onnxruntime")
    assert_equal_on_every_row(torch_enc, ort_enc, small_root, batch_size)


@pytest.mark.parametrize(("pooling", "max_length"), [("cls", 64), ("mean", 12)])
def test_onnxruntime_equal_with_other_pooling_and_length(encoders, small_root, pooling, max_length):
    torch_enc, ort_enc, _ = encoders
    assert_equal_with_pooling_and_length(torch_enc, ort_enc, small_root, pooling, max_length)


def test_export_is_reused_and_remade_when_corrupt(encoders, monkeypatch):
    import crossmodal.runtimes as rt
    from crossmodal.outputs import read_sidecar
    from crossmodal.text_encoders import BertEncoder

    _, ort_enc, cache = encoders
    made = []
    real = rt._export
    monkeypatch.setattr(rt, "_export", lambda *a: (made.append(1), real(*a))[1])
    again = BertEncoder(runtime="onnxruntime", cache_dir=cache)
    assert again.export == ort_enc.export and not made  # same weights: the cached export
    side = read_sidecar(ort_enc.export.with_suffix(".json"))
    assert side["job"]["weights_sha256_16"] == rt.weights_digest(BertEncoder(runtime="torch").model)
    data = ort_enc.export.read_bytes()
    ort_enc.export.write_bytes(data[: len(data) // 2])  # a truncated copy is never taken as finished
    try:
        redone = BertEncoder(runtime="onnxruntime", cache_dir=cache)
        assert made == [1] and redone.export.read_bytes() == data
    finally:
        ort_enc.export.write_bytes(data)


def test_other_weights_get_another_export(tmp_path, monkeypatch):
    import torch

    import crossmodal.runtimes as rt

    monkeypatch.setattr(rt, "_export", lambda module, example, outputs, dynamic, out: out.write_bytes(b"onnx"))
    net = torch.nn.Linear(3, 2)
    ex = {"x": torch.zeros(1, 3)}
    a, job = rt.export_onnx(net, ex, ["y"], {}, "lin", folder=tmp_path)
    assert rt.export_onnx(net, ex, ["y"], {}, "lin", folder=tmp_path)[0] == a
    with torch.no_grad():
        net.weight[0, 0] += 1e-3
    b, job_b = rt.export_onnx(net, ex, ["y"], {}, "lin", folder=tmp_path)
    assert b != a and job_b["weights_sha256_16"] != job["weights_sha256_16"] and a.is_file() and b.is_file()


def test_sidecar_records_the_runtime_and_features_stay_valid_across_runtimes(encoders, small_root, tmp_path):
    from crossmodal.extract import extract_texts
    from crossmodal.store import load_features

    torch_enc, ort_enc, _ = encoders
    split = load_split(small_root, "val")
    npy = tmp_path / "val_text_bert.npy"
    meta = extract_texts(split, torch_enc, npy, progress=False)
    assert meta["runtime"]["name"] == "torch"
    again = extract_texts(split, ort_enc, npy, progress=False)  # same vectors, same job: up to date, kept
    assert again["runtime"]["name"] == "torch" and again["files"] == meta["files"]
    meta = extract_texts(split, ort_enc, tmp_path / "o" / "val_text_bert.npy", progress=False)
    rt = meta["runtime"]
    assert rt["name"] == "onnxruntime" and rt["precision"] == "fp32" and rt["export"] == ort_enc.export.name
    assert len(rt["export_sha256_16"]) == len(rt["weights_sha256_16"]) == 16
    a, b = load_features(npy)[0], load_features(tmp_path / "o" / "val_text_bert.npy")[0]
    assert_same_vectors(a, b)


def test_auto_picks_onnxruntime_on_cpu_only_when_installed(monkeypatch):
    import crossmodal.runtimes as rt

    monkeypatch.setattr(rt, "openvino_bf16", lambda: False)  # OpenVINO's turn: tests/test_text_runtime_openvino.py
    assert rt.resolve_runtime("auto", "cpu") == "onnxruntime"
    assert rt.resolve_runtime("auto", "cuda") == "torch" and rt.resolve_runtime("torch", "cpu") == "torch"
    with pytest.raises(ModelError, match="CPU only"):
        rt.resolve_runtime("onnxruntime", "cuda")
    with pytest.raises(ModelError, match="int8 precision runs through ONNX Runtime"):
        rt.resolve_runtime("torch", "cpu", "int8")
    monkeypatch.setattr(rt, "onnxruntime_version", lambda: None)
    assert rt.resolve_runtime("auto", "cpu") == "torch"
    with pytest.raises(ModelError, match="pip install"):
        rt.resolve_runtime("onnxruntime", "cpu")


def test_auto_falls_back_to_pytorch_when_the_export_fails(tmp_path, monkeypatch, caplog):
    import crossmodal.runtimes as rt
    from crossmodal.text_encoders import BertEncoder

    def no_onnx(*a):
        raise ModelError("exporting to ONNX needs the package onnx")

    monkeypatch.setattr(rt, "_export", no_onnx)
    enc = BertEncoder(cache_dir=tmp_path)
    assert enc.runtime == "torch" and enc.model is not None and "encoding with PyTorch" in caplog.text
    assert enc.extra_meta(tmp_path / "x.npy")["runtime"]["name"] == "torch"
    with pytest.raises(ModelError, match="needs the package onnx"):
        BertEncoder(runtime="onnxruntime", cache_dir=tmp_path)


def test_int8_is_another_setting_close_to_fp32(encoders, small_root):
    from crossmodal.text_encoders import BertEncoder

    torch_enc, _, cache = encoders
    q = BertEncoder(precision="int8", cache_dir=cache)
    assert q.runtime == "onnxruntime" and q.describe()["settings"]["precision"] == "int8"
    assert "precision" not in torch_enc.describe()["settings"]  # fp32 features keep their old job
    caps = _captions(small_root)
    cos = _cos(torch_enc.encode(caps), q.encode(caps))
    assert 0.8 < cos.mean() < 0.9999  # lossy, yet close
    assert q.extra_meta(cache / "x.npy")["runtime"]["precision"] == "int8"


def test_a_failed_export_is_one_line_and_leaves_nothing(tmp_path):
    import torch

    import crossmodal.runtimes as rt

    class Broken(torch.nn.Module):
        def forward(self, x):
            raise TypeError("unsupported input")

    with pytest.raises(ModelError, match="ONNX export into .* failed .*unsupported input.*--runtime torch"):
        rt.export_onnx(Broken(), {"x": torch.zeros(1, 2)}, ["y"], {}, "broken", folder=tmp_path)
    assert not [p for p in (tmp_path / "onnx").iterdir() if p.suffix == ".onnx"]
