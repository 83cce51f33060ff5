"""Issue 23, cases 3-5: model exports identified by their content where they are used, one runtime
per output, and read-only or full storage.

- An ONNX export edited in place (same size and mtime) is never used: the bytes a session loads
  are hashed and compared with the digest recorded when the export was made; a mismatch is
  exported again (logged), and the feature sidecar records the digest of what ran.
- A resume or a shard merge never mixes runtimes: an interrupted ONNX Runtime extraction resumed
  without ONNX Runtime starts over; shards of two runtimes are refused in one line; a shard that
  finds another one making the export waits for it instead of falling back to PyTorch.
- A read-only or full export cache: ``auto`` falls back to PyTorch (logged), an explicit runtime is
  one line with the path and the size needed; a finished export in a read-only cache is used.
  The server serves thumbnails of a run on read-only storage from a writable cache.

Read-only and full storage are simulated by patching ``os.open``, ``os.mkdir`` and ``open`` for
paths under one folder (EROFS / ENOSPC): the tests run as root, whom ``chmod`` does not stop, and
mounting a small tmpfs needs privileges a test does not have.
"""

import builtins
import errno
import hashlib
import io
import json
import logging
import os
import threading
import time

import numpy as np
import pytest
import torch

from crossmodal.coco import load_split
from crossmodal.errors import FeatureError, ModelError
from crossmodal.extract import extract_images, merge_shards
from crossmodal.store import load_features
from tests.test_serve import serve_run_dir  # noqa: F401 (the serve tests' trained run, made once)

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _cos(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _sha16(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _enc(runtime, cache, size=96):
    from crossmodal.image_encoders import EffNetLite0Regions

    return EffNetLite0Regions(size, runtime=runtime, cache_dir=cache)


def halve_largest_initializer(path):
    """Halve the largest weight tensor of an ONNX file in place, keeping its size and mtime."""
    import onnx
    from onnx import numpy_helper

    st = os.stat(path)
    data = path.read_bytes()
    model = onnx.load_from_string(data)
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    old = init.raw_data
    new = (numpy_helper.to_array(init) * 0.5).astype(np.float32).tobytes()
    assert data.count(old) == 1 and len(new) == len(old)
    path.write_bytes(data.replace(old, new))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size and os.stat(path).st_mtime_ns == st.st_mtime_ns


# --- simulated storage -----------------------------------------------------------------------


def _under(path, root) -> bool:
    try:
        return os.path.abspath(os.fspath(path)).startswith(os.fspath(root))
    except TypeError:  # a file descriptor
        return False


class _FullFile(io.RawIOBase):
    """A file on a full disk: every write fails as the kernel says it (no file name)."""

    def writable(self):
        return True

    def seekable(self):
        return True

    def seek(self, offset, whence=0):
        return 0

    def tell(self):
        return 0

    def write(self, b):
        raise OSError(errno.ENOSPC, "No space left on device")


def read_only(monkeypatch, root, err=errno.EROFS):
    """Everything under ``root`` behaves as on a read-only mount (``err``: EROFS) or a full disk
    (ENOSPC: new files can be opened, no byte can be written)."""
    root = os.path.abspath(root)
    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def fail(path):
        raise OSError(err, os.strerror(err), os.fspath(path))

    def os_open(path, flags, *a, **kw):
        if flags & writing and _under(path, root) and err == errno.EROFS:
            fail(path)
        return real_os_open(path, flags, *a, **kw)

    def mkdir(path, *a, **kw):
        if _under(path, root) and err == errno.EROFS and not os.path.isdir(path):
            fail(path)
        return real_mkdir(path, *a, **kw)

    def b_open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and _under(file, root):
            if err == errno.EROFS:
                fail(file)
            return io.BufferedWriter(_FullFile()) if "b" in mode else io.TextIOWrapper(
                io.BufferedWriter(_FullFile()))
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(builtins, "open", b_open)
    monkeypatch.setattr(io, "open", b_open)


# --- case 3: an export edited in place ---------------------------------------------------------


def test_an_image_export_edited_in_place_is_never_used_and_the_sidecar_records_what_ran(small_root, tmp_path,
                                                                                        caplog):
    split = load_split(small_root, "val")
    cache = tmp_path / "cache"
    ref = extract_images(split, _enc("torch", None), tmp_path / "ref" / "i.npy", progress=False)
    genuine = _enc("onnxruntime", cache)
    genuine_digest = _sha16(genuine.export)
    halve_largest_initializer(genuine.export)
    caplog.set_level(logging.INFO)
    meta = extract_images(split, _enc("onnxruntime", cache), tmp_path / "run" / "i.npy", progress=False)
    got, want = load_features(tmp_path / "run" / "i.npy")[0], load_features(tmp_path / "ref" / "i.npy")[0]
    assert _cos(want, got).min() >= 0.9999  # halved weights gave cosine 0.66
    assert "exporting it again" in caplog.text and "does not hold the bytes it was exported with" in caplog.text
    assert meta["runtime"]["name"] == "onnxruntime" and ref["runtime"]["name"] == "torch"
    assert meta["runtime"]["export_sha256_16"] == genuine_digest == _sha16(genuine.export)  # re-exported, whole


def test_the_sidecar_records_the_digest_of_the_bytes_that_ran(tmp_path, monkeypatch):
    """Edited after the check (between export and load): the sidecar never vouches for the genuine digest."""
    import crossmodal.runtimes as rt

    enc = _enc("onnxruntime", tmp_path)
    real_open = rt._open
    edited = []

    def open_after_an_edit(path, runtime):
        if not edited:
            halve_largest_initializer(path)
            edited.append(_sha16(path))
        return real_open(path, runtime)

    with monkeypatch.context() as m:
        m.setattr(rt, "_open", open_after_an_edit)
        again = _enc("onnxruntime", tmp_path)
    rec = again.extra_meta()["runtime"]
    assert rec["export_sha256_16"] == again.session.sha256_16 == _sha16(again.export) == enc.session.sha256_16
    assert edited and edited[0] != rec["export_sha256_16"]
    # the export republished by another process while this one runs the old bytes: the record
    # still names what ran here, not what the export's sidecar says now
    side = again.export.with_suffix(".json")
    meta = json.loads(side.read_text())
    meta["files"][again.export.name]["sha256"] = "0123456789abcdef"
    side.write_text(json.dumps(meta))
    assert again.extra_meta()["runtime"]["export_sha256_16"] == again.session.sha256_16 != "0123456789abcdef"


class _Mlp(torch.nn.Module):
    """A small module with a named input, as the caption encoders' (``x`` (B, 16) -> (B, 8))."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.Tanh(), torch.nn.Linear(64, 8))

    def forward(self, x):
        return self.net(x)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_a_caption_runtime_export_edited_in_place_is_exported_again(tmp_path, runtime, caplog):
    """The caption encoders' path (start_session, ONNX Runtime and OpenVINO) on a small module."""
    import crossmodal.runtimes as rt

    pytest.importorskip(runtime)
    torch.manual_seed(0)
    net = _Mlp().eval()
    x = torch.randn(5, 16)
    ex = {"x": x}
    path, _ = rt.start_session(net, ex, "mlp", runtime, folder=tmp_path, output="y", axes={0: "batch"})
    genuine = _sha16(path)
    halve_largest_initializer(path)
    caplog.set_level(logging.INFO)
    path2, session = rt.start_session(net, ex, "mlp", runtime, folder=tmp_path, output="y", axes={0: "batch"})
    with torch.no_grad():
        want = net(x).numpy()
    np.testing.assert_allclose(session.run({"x": x.numpy()}), want, rtol=1e-2, atol=1e-3)
    assert path2 == path and "exporting it again" in caplog.text
    rec = rt.runtime_record(runtime, session=session)
    assert rec["export_sha256_16"] == session.sha256_16 == genuine == _sha16(path)


# --- case 4: one runtime per output -------------------------------------------------------------


def _killed_after(split, enc, npy, monkeypatch, chunks):
    from crossmodal.store import ResumableWriter

    orig, n = ResumableWriter.write, {"n": 0}

    def dying(self, *a, **kw):
        n["n"] += 1
        if n["n"] > chunks:
            raise KeyboardInterrupt
        return orig(self, *a, **kw)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ResumableWriter, "write", dying)
        extract_images(split, enc, npy, batch_size=4, progress=False)


def test_a_resume_without_onnxruntime_starts_over_instead_of_mixing_runtimes(small_root, tmp_path, monkeypatch,
                                                                            caplog):
    import crossmodal.runtimes as rt

    split = load_split(small_root, "val")
    torch_ref = tmp_path / "ref" / "i.npy"
    extract_images(split, _enc("torch", None), torch_ref, batch_size=4, progress=False)
    npy = tmp_path / "run" / "i.npy"
    _killed_after(split, _enc("auto", tmp_path / "cache"), npy, monkeypatch, 2)  # rows 0-7 from ONNX Runtime
    monkeypatch.setattr(rt, "onnxruntime_version", lambda: None)  # ONNX Runtime uninstalled
    enc = _enc("auto", tmp_path / "cache")
    assert enc.runtime == "torch"
    caplog.set_level(logging.INFO)
    meta = extract_images(split, enc, npy, batch_size=4, progress=False)
    assert "rows 0-7 were encoded by onnxruntime" in caplog.text and "starting over" in caplog.text
    assert meta["runtime"]["name"] == "torch"
    assert npy.read_bytes() == torch_ref.read_bytes()  # every row from PyTorch


def test_a_resume_with_the_same_runtime_continues(small_root, tmp_path, monkeypatch, caplog):
    split = load_split(small_root, "val")
    ref = tmp_path / "ref" / "i.npy"
    extract_images(split, _enc("onnxruntime", tmp_path / "cache"), ref, batch_size=4, progress=False)
    npy = tmp_path / "run" / "i.npy"
    _killed_after(split, _enc("onnxruntime", tmp_path / "cache"), npy, monkeypatch, 2)
    caplog.set_level(logging.INFO)
    extract_images(split, _enc("onnxruntime", tmp_path / "cache"), npy, batch_size=4, progress=False)
    assert "resuming" in caplog.text and "starting over" not in caplog.text
    assert npy.read_bytes() == ref.read_bytes()


def test_shards_of_two_runtimes_are_refused_in_one_line(small_root, tmp_path):
    split = load_split(small_root, "val")
    npy = tmp_path / "i.npy"
    extract_images(split, _enc("onnxruntime", tmp_path / "cache"), npy, shard=(0, 2), progress=False)
    extract_images(split, _enc("torch", None), npy, shard=(1, 2), progress=False)
    with pytest.raises(FeatureError, match=r"cannot merge: .*shard0of2.* encoded by onnxruntime .*shard1of2.* by "
                                           r"torch .*one runtime per output") as e:
        merge_shards(npy, 2, split, "img")
    assert "\n" not in str(e.value) and not npy.exists()
    extract_images(split, _enc("onnxruntime", tmp_path / "cache"), npy, shard=(1, 2), progress=False, force=True)
    meta = merge_shards(npy, 2, split, "img")
    assert meta["runtime"]["name"] == "onnxruntime"
    whole = extract_images(split, _enc("onnxruntime", tmp_path / "cache"), tmp_path / "w" / "i.npy", progress=False)
    assert npy.read_bytes() == (tmp_path / "w" / "i.npy").read_bytes() and whole["ids"] == meta["ids"]


def test_a_shard_waits_for_the_export_another_one_is_making(tmp_path):
    """Two shards started together on an empty cache: the second finds the first making the export
    (its lock held) and waits for it, instead of encoding with PyTorch (a merge of mixed runtimes)."""
    from crossmodal.locks import locked

    path = _enc("onnxruntime", tmp_path).export
    held, release = threading.Event(), threading.Event()

    def maker():
        with locked(path, what="ONNX export"):
            held.set()
            release.wait(10)

    t = threading.Thread(target=maker)
    t.start()
    held.wait(10)
    threading.Timer(1.0, release.set).start()
    t0 = time.monotonic()
    try:
        enc = _enc("auto", tmp_path)
    finally:
        release.set()
        t.join()
    assert enc.runtime == "onnxruntime" and time.monotonic() - t0 >= 0.9


# --- case 5: read-only and full storage ----------------------------------------------------------


@pytest.mark.parametrize("err", [errno.EROFS, errno.ENOSPC])
def test_a_read_only_or_full_export_cache(tmp_path, monkeypatch, caplog, err):
    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(monkeypatch, cache, err)
    caplog.set_level(logging.INFO)
    enc = _enc("auto", cache)  # auto: PyTorch, logged
    assert enc.runtime == "torch" and enc.session is None
    assert "ONNX export cache cannot be written" in caplog.text and "encoding with PyTorch" in caplog.text
    with pytest.raises(ModelError) as e:
        _enc("onnxruntime", cache)  # explicit: one line with the path and the size needed
    line = str(e.value)
    assert "\n" not in line and str(cache / "onnx" / "effnet-lite0-backbone-") in line and "MB" in line
    assert ("Read-only file system" if err == errno.EROFS else "no space left") in line
    assert "--cache-dir" in line and "--runtime torch" in line
    monkeypatch.undo()
    assert not [p.name for p in (cache / "onnx").glob("*.tmp*")] if (cache / "onnx").exists() else True


def test_a_finished_export_in_a_read_only_cache_is_used(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    made = _enc("onnxruntime", cache)
    for p in (cache / "onnx").glob("*.lock"):
        p.unlink()  # a cache copied without its lock files
    read_only(monkeypatch, cache)
    enc = _enc("onnxruntime", cache)
    assert enc.runtime == "onnxruntime" and enc.session.sha256_16 == made.session.sha256_16
    assert not list((cache / "onnx").glob("*.lock"))


def test_the_command_line_with_a_read_only_cache(small_root, tmp_path, monkeypatch, caplog):
    from make_database_img import main as img_main

    cache = tmp_path / "cache"
    cache.mkdir()
    read_only(monkeypatch, cache)
    common = ["--coco-root", str(small_root), "--split", "val", "--input-size", "64", "--no-progress",
              "--workers", "0", "--cache-dir", str(cache)]
    caplog.set_level(logging.INFO)
    meta = img_main([*common, "--features-dir", str(tmp_path / "a")])
    assert meta["runtime"]["name"] == "torch" and "encoding with PyTorch" in caplog.text
    with pytest.raises(ModelError, match=r"cannot be written \(Read-only file system\): .*onnx.* needs about"):
        img_main([*common, "--features-dir", str(tmp_path / "b"), "--runtime", "onnxruntime"])


def test_a_full_disk_names_the_file_and_the_space(tmp_path):
    from crossmodal.outputs import DiskFullError, disk_errors

    with pytest.raises(DiskFullError, match=r"writing .*x\.npy, 2\.0 MB needed, [\d.]+ MB free"), \
            disk_errors(tmp_path / "x.npy", 2_000_000):
        raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_while_a_feature_file_is_created_names_it(tmp_path, monkeypatch):
    """The partial array's header is the first write of an extraction: its failure names the file."""
    from crossmodal.outputs import DiskFullError
    from crossmodal.store import ResumableWriter

    read_only(monkeypatch, tmp_path / "f", errno.ENOSPC)
    with pytest.raises(DiskFullError, match=r"i\.partial\.npy, 0\.0 MB needed"):
        ResumableWriter(tmp_path / "f" / "i.npy", 10, 4, {"kind": "x"})


def test_thumbnails_of_a_run_on_read_only_storage(serve_run_dir, tmp_path, monkeypatch, caplog):  # noqa: F811
    """Every /thumbs/ID.jpg was a 500 with a traceback: they come from the user's cache instead."""
    from fastapi.testclient import TestClient

    from crossmodal.serve import Searcher, create_app

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "home_cache"))
    searcher = Searcher.from_run(serve_run_dir["run"], "val", serve_run_dir["root"],
                                 cache_dir=tmp_path / "ro" / "serve_cache")
    read_only(monkeypatch, tmp_path / "ro")
    caplog.set_level(logging.INFO)
    with TestClient(create_app(searcher)) as client:
        for iid in searcher.gallery.img_ids[:3].tolist():
            r = client.get(f"/thumbs/{iid}.jpg")
            assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg", r.text
            assert r.content[:2] == b"\xff\xd8"
    assert "Traceback" not in caplog.text and "error serving" not in caplog.text
    assert "cannot be written" in caplog.text
    assert len(list((tmp_path / "home_cache" / "crossmodal" / "thumbs").rglob("*.jpg"))) == 3
    assert not (tmp_path / "ro").exists()


def test_a_full_disk_line_of_the_scripts_names_the_free_space(tmp_path):
    from crossmodal.cli import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "f" / "x.npy")))
    assert str(tmp_path / "f" / "x.npy") in line and re_search(r"\(\d+\.\d MB free there\)", line)


def test_a_full_disk_while_a_figure_is_saved_names_it(tmp_path, monkeypatch):
    import matplotlib.figure

    from crossmodal.figures import _save
    from crossmodal.outputs import DiskFullError

    def full(*a, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", full)
    import matplotlib.pyplot as plt

    with pytest.raises(DiskFullError, match=r"writing .*pr\.png.* MB free"):
        _save(plt.figure(), tmp_path / "pr.png")
    assert list(tmp_path.iterdir()) == []


def re_search(pattern, text):
    import re

    return re.search(pattern, text)
