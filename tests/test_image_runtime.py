"""EfficientNet-Lite image encoding through ONNX Runtime: the same vectors as PyTorch on every
row (cosine >= 0.9999) on generated images (so a clone without ../shared checks it) and on real
COCO images (skipped when absent); the runtime recorded in the sidecar, not a setting; reduced-size
JPEG decoding (``decode="draft"``): never below the input size, and a setting of the features."""

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.coco import load_image, load_split
from crossmodal.errors import ModelError
from crossmodal.image_encoders import EffNetLite0Regions, build_image_encoder
from tests.conftest import shared
from tests.test_text_runtime_batches import assert_same_vectors

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _cos(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _pair(size, cache, **kw):
    return (EffNetLite0Regions(size, runtime="torch", **kw),
            EffNetLite0Regions(size, runtime="onnxruntime", cache_dir=cache, **kw))


def _encode(enc, images, batch):
    with torch.inference_mode():
        x = [enc.preprocess(im) for im in images]
        return torch.cat([enc(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


@pytest.mark.parametrize(("size", "batch", "levels", "pool"), [(128, 4, (1, 2, 3), "mean"), (96, 1, (1,), "max"),
                                                               (160, 3, (1, 2), "mean")])
def test_onnxruntime_gives_pytorch_vectors_on_generated_images(small_root, cache, size, batch, levels, pool):
    split = load_split(small_root, "val")
    images = [load_image(split.image_path(i)) for i in range(len(split.image_ids))]
    torch_enc, ort_enc = _pair(size, cache, levels=levels, pool=pool)
    assert (torch_enc.runtime, ort_enc.runtime) == ("torch", "onnxruntime")
    ref, got = _encode(torch_enc, images, batch), _encode(ort_enc, images, batch)
    assert got.shape == ref.shape == (len(images), 1280) and got.dtype == np.float32
    assert_same_vectors(ref, got)
    assert not np.allclose(got[0], got[1], atol=1e-3)  # rows are their own images


def test_onnxruntime_gives_pytorch_vectors_on_real_images(cache):
    split = load_split(shared("coco-mini"), "train2017")
    images = [load_image(split.image_path(i)) for i in range(0, len(split.image_ids), 5)]
    torch_enc, ort_enc = _pair(256, cache)
    assert_same_vectors(_encode(torch_enc, images, 4), _encode(ort_enc, images, 4))


def test_one_export_per_weights_serves_every_size(cache, monkeypatch):
    import crossmodal.runtimes as rt

    first = EffNetLite0Regions(128, runtime="onnxruntime", cache_dir=cache)
    made = []
    real = rt._export
    monkeypatch.setattr(rt, "_export", lambda *a: (made.append(1), real(*a))[1])
    other = EffNetLite0Regions(224, levels=(1,), runtime="onnxruntime", cache_dir=cache)
    assert other.export == first.export and not made  # same weights: the cached export
    assert first.export.name.startswith("effnet-lite0-backbone-")


def test_sidecar_records_the_runtime_and_features_stay_valid_across_runtimes(small_root, cache, tmp_path):
    from crossmodal.extract import extract_images
    from crossmodal.store import load_features

    split = load_split(small_root, "val")
    torch_enc, ort_enc = _pair(128, cache)
    npy = tmp_path / "val_img_effnet-lite0.npy"
    meta = extract_images(split, torch_enc, npy, progress=False)
    assert meta["runtime"]["name"] == "torch" and "runtime" not in meta["job"]["settings"]
    again = extract_images(split, ort_enc, npy, progress=False)  # same vectors, same job: up to date, kept
    assert again["runtime"]["name"] == "torch" and again["files"] == meta["files"]
    other = tmp_path / "o" / npy.name
    rec = extract_images(split, ort_enc, other, progress=False)["runtime"]
    assert rec["name"] == "onnxruntime" and rec["precision"] == "fp32" and rec["export"] == ort_enc.export.name
    assert len(rec["export_sha256_16"]) == len(rec["weights_sha256_16"]) == 16
    assert_same_vectors(load_features(npy)[0], load_features(other)[0])


def test_auto_and_fallback(tmp_path, monkeypatch, caplog):
    import crossmodal.runtimes as rt

    assert EffNetLite0Regions(96, runtime="auto", cache_dir=tmp_path).runtime == "onnxruntime"
    assert EffNetLite0Regions(96, runtime="auto", device="cuda").runtime == "torch"  # resolved, not run
    with pytest.raises(ModelError, match="CPU only"):
        EffNetLite0Regions(96, runtime="onnxruntime", device="cuda")
    with pytest.raises(ModelError, match="not openvino"):
        EffNetLite0Regions(96, runtime="openvino")
    monkeypatch.setattr(rt, "openvino_bf16", lambda: True)  # auto's pick for captions on a bf16 CPU
    assert EffNetLite0Regions(96, runtime="auto", cache_dir=tmp_path).runtime == "onnxruntime"
    monkeypatch.undo()

    def no_onnx(*a):
        raise ModelError("exporting to ONNX needs the package onnx")

    monkeypatch.setattr(rt, "_export", no_onnx)
    enc = EffNetLite0Regions(96, cache_dir=tmp_path / "empty")
    assert enc.runtime == "torch" and enc.session is None and "encoding with PyTorch" in caplog.text
    assert enc.extra_meta()["runtime"]["name"] == "torch"
    with pytest.raises(ModelError, match="needs the package onnx"):
        EffNetLite0Regions(96, runtime="onnxruntime", cache_dir=tmp_path / "empty")


def _big_jpeg(path, size=(640, 480), seed=0):
    """A photo-like JPEG (smooth gradients and blobs, not noise) of ``size``."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    rng = np.random.default_rng(seed)
    img = np.stack([127 + 100 * np.sin(xx / (20 + 30 * rng.random()) + c) * np.cos(yy / (25 + 20 * rng.random()))
                    for c in range(3)], axis=-1)
    Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(path, quality=90)
    return path


def test_draft_decoding_never_goes_below_the_input_size(tmp_path):
    jpg = _big_jpeg(tmp_path / "a.jpg")
    assert load_image(jpg).size == (640, 480)
    assert load_image(jpg, draft=(256, 256)).size == (640, 480)  # 1/2 would give 240 rows < 256: full size
    assert load_image(jpg, draft=(224, 224)).size == (320, 240)
    assert load_image(jpg, draft=(96, 96)).size == (160, 120)  # 1/4
    assert load_image(jpg, draft=(32, 32)).size == (80, 60)  # 1/8, the smallest libjpeg gives
    png = tmp_path / "a.png"
    Image.open(jpg).save(png)
    assert load_image(png, draft=(32, 32)).size == (640, 480)  # other formats: full decode
    gray = tmp_path / "g.jpg"
    Image.open(jpg).convert("L").save(gray)
    assert load_image(gray, draft=(96, 96)).mode == "RGB"


def test_draft_decoding_is_a_setting_with_close_vectors(tmp_path, small_root):
    from crossmodal.coco import CaptionSplit
    from crossmodal.extract import extract_images
    from crossmodal.outputs import OutputConflictError
    from crossmodal.store import load_features

    folder = tmp_path / "img"
    folder.mkdir()
    names = [_big_jpeg(folder / f"{i:03d}.jpg", (640, 480) if i % 2 else (480, 640), seed=i).name for i in range(6)]
    split = CaptionSplit("x", folder, np.arange(1, 7, dtype=np.int64), names, np.zeros(0, np.int64),
                         np.zeros(0, np.int64), [], "test")
    full = EffNetLite0Regions(128, runtime="torch")
    draft = EffNetLite0Regions(128, runtime="torch", decode="draft")
    assert full.decode_size is None and draft.decode_size == (128, 128)
    assert "decode" not in full.describe()["settings"]  # full-decode features keep their old job
    assert draft.describe()["settings"]["decode"] == "draft"
    a = tmp_path / "full.npy"
    extract_images(split, full, a, progress=False)
    with pytest.raises(OutputConflictError, match="decode"):
        extract_images(split, draft, a, progress=False)
    b = tmp_path / "draft.npy"
    extract_images(split, draft, b, progress=False)
    fa, fb = load_features(a)[0], load_features(b)[0]
    direct = _encode(draft, [load_image(folder / n, draft=(128, 128)) for n in names], 4)
    assert np.allclose(fb, direct, atol=1e-5)  # the extraction decodes as the setting says
    c = _cos(fa, fb)
    assert c.min() > 0.9 and not np.allclose(fa, fb, atol=1e-4)  # close, yet other vectors
    with pytest.raises(ModelError, match="image decoding"):
        EffNetLite0Regions(128, decode="thumbnail")
    assert build_image_encoder("effnet-lite0", input_size=128, decode="draft", runtime="torch",
                               pool="max").describe()["settings"] == {**draft.describe()["settings"], "pool": "max"}


def test_command_line_flags(small_root, tmp_path):
    from make_database_img import main as img_main

    common = ["--coco-root", str(small_root), "--split", "val", "--input-size", "96", "--no-progress",
              "--workers", "0", "--cache-dir", str(tmp_path / "cache")]
    meta = img_main([*common, "--features-dir", str(tmp_path / "a"), "--runtime", "onnxruntime"])
    assert meta["runtime"]["name"] == "onnxruntime" and "decode" not in meta["settings"]
    meta = img_main([*common, "--features-dir", str(tmp_path / "b"), "--runtime", "torch", "--decode", "draft"])
    assert meta["runtime"]["name"] == "torch" and meta["settings"]["decode"] == "draft"
