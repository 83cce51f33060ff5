"""Caption encoding through OpenVINO (bf16 matmuls where the CPU has them): PyTorch's vectors on
every row (cosine >= 0.9999) over batch shapes, pooling, padding lengths and real COCO captions;
the ONNX export shared with ONNX Runtime; the runtime and its inference precision in the sidecar;
auto's choice."""

import pytest

from crossmodal.coco import load_split
from crossmodal.errors import ModelError
from tests.conftest import shared
from tests.test_text_runtime_batches import (
    assert_equal_on_every_row,
    assert_equal_with_pooling_and_length,
    assert_same_vectors,
)

pytest.importorskip("openvino")
pytest.importorskip("onnx")


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    from crossmodal.text_encoders import BertEncoder

    cache = tmp_path_factory.mktemp("cache")
    return BertEncoder(runtime="torch"), BertEncoder(runtime="openvino", cache_dir=cache), cache


@pytest.mark.parametrize("batch_size", [1, 5, 64])
def test_openvino_gives_pytorch_vectors_on_every_row(encoders, small_root, batch_size):
    torch_enc, ov_enc, _ = encoders
    assert ov_enc.runtime == "openvino" and ov_enc.session.precision in ("bf16", "f32")
    assert_equal_on_every_row(torch_enc, ov_enc, small_root, batch_size)


@pytest.mark.parametrize(("pooling", "max_length"), [("cls", 64), ("mean", 12)])
def test_openvino_equal_with_other_pooling_and_length(encoders, small_root, pooling, max_length):
    torch_enc, ov_enc, _ = encoders
    assert_equal_with_pooling_and_length(torch_enc, ov_enc, small_root, pooling, max_length)


def test_openvino_equal_on_real_coco_captions(encoders):
    """bf16's margin is measured on real captions: 600 of coco-captions-val2017, every row."""
    torch_enc, ov_enc, _ = encoders
    caps = list(load_split(shared("coco-captions-val2017"), "val2017").captions[:600])
    assert_same_vectors(torch_enc.encode(caps, batch_size=64), ov_enc.encode(caps, batch_size=64))


def test_openvino_reads_the_onnx_export_and_records_itself(encoders, small_root, tmp_path, monkeypatch):
    import crossmodal.runtimes as rt
    from crossmodal.extract import extract_texts
    from crossmodal.store import load_features
    from crossmodal.text_encoders import BertEncoder

    torch_enc, ov_enc, cache = encoders
    monkeypatch.setattr(rt, "_export", lambda *a: pytest.fail("exported twice"))
    if rt.onnxruntime_version():
        assert BertEncoder(runtime="onnxruntime", cache_dir=cache).export == ov_enc.export  # one export, both
    split = load_split(small_root, "val")
    meta = extract_texts(split, ov_enc, tmp_path / "val_text_bert.npy", progress=False)
    r = meta["runtime"]
    assert r["name"] == "openvino" and r["inference_precision"] == ov_enc.session.precision
    assert r["export"] == ov_enc.export.name and len(r["weights_sha256_16"]) == 16 and r["version"]
    # the same job as PyTorch's features (equal vectors): a PyTorch run keeps them
    again = extract_texts(split, torch_enc, tmp_path / "val_text_bert.npy", progress=False)
    assert again["runtime"]["name"] == "openvino" and again["files"] == meta["files"]
    ref = torch_enc.encode(list(split.captions))
    assert_same_vectors(ref, load_features(tmp_path / "val_text_bert.npy")[0])


def test_auto_picks_openvino_where_the_cpu_has_bf16(monkeypatch):
    import crossmodal.runtimes as rt

    monkeypatch.setattr(rt, "openvino_bf16", lambda: True)
    assert rt.resolve_runtime("auto", "cpu") == "openvino"
    assert rt.resolve_runtime("auto", "cuda") == "torch"
    if rt.onnxruntime_version():
        assert rt.resolve_runtime("auto", "cpu", "int8") == "onnxruntime"  # int8 is ONNX Runtime's
    with pytest.raises(ModelError, match="openvino runs fp32"):
        rt.resolve_runtime("openvino", "cpu", "int8")
    with pytest.raises(ModelError, match="CPU only"):
        rt.resolve_runtime("openvino", "cuda")
    monkeypatch.setattr(rt, "openvino_bf16", lambda: False)
    assert rt.resolve_runtime("auto", "cpu") == ("onnxruntime" if rt.onnxruntime_version() else "torch")
    monkeypatch.setattr(rt, "openvino_version", lambda: None)
    with pytest.raises(ModelError, match="needs the package openvino"):
        rt.resolve_runtime("openvino", "cpu")


def test_a_corrupt_export_is_one_line(tmp_path):
    import crossmodal.runtimes as rt

    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(ModelError, match=r"OpenVINO cannot load .*bad\.onnx") as e:
        rt.OvSession(bad)
    assert "\n" not in str(e.value)
