"""Images decoded in a thread ahead of the encoder (``extract_images``'s ``prefetch``, ONNX
Runtime's default): the same feature file, to the bit, as decoding each batch in the main thread
(generated images at several batch sizes, real COCO images when ../shared is there); an unreadable
image in the middle is still the one-line error (nothing published) or a counted skip with
``--skip-bad``; another error comes through whole; the thread ends with the extraction; an
interrupted run resumes to the same bytes. Batches are written in chunks of several batches on
large shards (at most ``MAX_CHUNKS`` per shard): the same file, skips in the right rows, resumable."""

import threading

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.errors import DataError
from crossmodal.extract import batches_per_chunk, extract_images
from tests.conftest import shared
from tests.test_integrity_helpers import TinyImages, copy_root


class AheadImages(TinyImages):
    """TinyImages that asks for decoding ahead, and records which thread preprocessed each image."""

    decode_ahead = 2

    def __init__(self, fail_at: int | None = None):
        super().__init__()
        self.threads, self.fail_at = [], fail_at

    def preprocess(self, im):
        self.threads.append(threading.current_thread().name)
        if len(self.threads) == self.fail_at:
            raise RuntimeError("preprocess broke")
        return super().preprocess(im)


def _decoders() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "image-decoding"]


def _extract(split, enc, npy, **kw):
    return extract_images(split, enc, npy, progress=False, **kw), npy.read_bytes()


@pytest.mark.parametrize("batch", [1, 3, 4, 16])
def test_decoding_ahead_writes_the_serial_file_to_the_bit(small_root, tmp_path, batch):
    split = load_split(small_root, "val")
    serial_meta, serial = _extract(split, AheadImages(), tmp_path / "s" / "i.npy", batch_size=batch, prefetch=0)
    enc = AheadImages()
    meta, ahead = _extract(split, enc, tmp_path / "a" / "i.npy", batch_size=batch)  # the encoder's default: 2
    assert ahead == serial and meta["ids"] == serial_meta["ids"] == split.image_ids.tolist()
    assert set(enc.threads) == {"image-decoding"} and len(enc.threads) == len(split.image_ids)
    assert _decoders() == []  # the thread ended with the extraction


def test_without_decode_ahead_the_main_thread_decodes(small_root, tmp_path):
    enc = AheadImages()
    enc.decode_ahead = 0
    extract_images(load_split(small_root, "val"), enc, tmp_path / "i.npy", progress=False)
    assert set(enc.threads) == {threading.main_thread().name}


def test_onnxruntime_decodes_ahead_to_the_same_bits_on_generated_images(small_root, tmp_path):
    pytest.importorskip("onnxruntime")
    from crossmodal.image_encoders import EffNetLite0Regions

    split = load_split(small_root, "train")
    enc = EffNetLite0Regions(128, runtime="onnxruntime", cache_dir=tmp_path / "cache")
    assert enc.decode_ahead == 2 and EffNetLite0Regions(128, runtime="torch").decode_ahead == 0
    _, serial = _extract(split, enc, tmp_path / "s" / "i.npy", prefetch=0)
    _, ahead = _extract(split, enc, tmp_path / "a" / "i.npy")
    assert ahead == serial


def test_onnxruntime_decodes_ahead_to_the_same_bits_on_real_images(tmp_path):
    pytest.importorskip("onnxruntime")
    from crossmodal.coco import CaptionSplit
    from crossmodal.image_encoders import EffNetLite0Regions

    full = load_split(shared("coco-mini"), "train2017")
    split = CaptionSplit(full.name, full.image_dir, full.image_ids[:22], full.file_names[:22], full.caption_ids[:0],
                         full.caption_image_ids[:0], [], full.source)
    enc = EffNetLite0Regions(256, runtime="onnxruntime", cache_dir=tmp_path / "cache")
    _, serial = _extract(split, enc, tmp_path / "s" / "i.npy", prefetch=0)
    _, ahead = _extract(split, enc, tmp_path / "a" / "i.npy")
    assert ahead == serial
    rows = np.load(tmp_path / "a" / "i.npy")
    assert rows.shape == (22, 1280) and not np.allclose(rows[0], rows[1], atol=1e-3)


@pytest.fixture()
def bad_split(small_root, tmp_path):
    """val with an unreadable image in the middle (row 6 of 16: the second batch of 4)."""
    split = load_split(copy_root(small_root, tmp_path / "coco"), "val")
    split.image_path(6).write_bytes(b"not a jpeg")
    return split


def test_an_unreadable_image_ahead_is_one_line_and_nothing_is_published(bad_split, tmp_path):
    npy = tmp_path / "f" / "i.npy"
    with pytest.raises(DataError, match=rf"{bad_split.file_names[6]}.*--skip-bad"):
        extract_images(bad_split, AheadImages(), npy, batch_size=4, progress=False)
    assert not npy.exists() and _decoders() == []


def test_an_unreadable_image_ahead_is_a_counted_skip_with_skip_bad(bad_split, tmp_path):
    serial, _ = _extract(bad_split, AheadImages(), tmp_path / "s" / "i.npy", batch_size=4, skip_bad=True, prefetch=0)
    meta, ahead = _extract(bad_split, AheadImages(), tmp_path / "a" / "i.npy", batch_size=4, skip_bad=True)
    assert meta["skipped_ids"] == serial["skipped_ids"] == [int(bad_split.image_ids[6])]
    assert ahead == (tmp_path / "s" / "i.npy").read_bytes() and meta["ids"] == serial["ids"]


def test_another_error_in_the_decoding_thread_reaches_the_caller(small_root, tmp_path):
    with pytest.raises(RuntimeError, match="preprocess broke"):
        extract_images(load_split(small_root, "val"), AheadImages(fail_at=7), tmp_path / "i.npy", batch_size=4,
                       progress=False)
    assert _decoders() == []


def test_an_interrupted_run_with_decoding_ahead_resumes_to_the_same_bytes(bad_split, tmp_path, monkeypatch):
    from tests.test_integrity_resume import _every_kill

    _every_kill(tmp_path, monkeypatch, lambda p: extract_images(bad_split, AheadImages(), p, batch_size=4,
                                                                 skip_bad=True, progress=False), "i.npy")
    assert _decoders() == []


def test_large_shards_write_at_most_max_chunks_chunks_of_whole_batches():
    assert batches_per_chunk(16, 4) == batches_per_chunk(2000, 4) == 1  # small shards: one batch a chunk
    assert batches_per_chunk(2001, 4) == 2
    per = batches_per_chunk(123287, 4)  # full COCO's train+val images in one shard
    assert per > 1 and -(-123287 // (4 * per)) <= 500


@pytest.mark.parametrize(("batch", "max_chunks", "writes"), [(4, 2, [(8, [6]), (8, [])]),
                                                             (3, 2, [(9, [6]), (7, [])]),  # a short last batch
                                                             (2, 3, [(6, []), (6, [6]), (4, [])])])  # a short chunk
@pytest.mark.parametrize("prefetch", [0, None])
def test_chunks_of_several_batches_write_the_same_file_and_skips(bad_split, tmp_path, monkeypatch, prefetch, batch,
                                                                 max_chunks, writes):
    import crossmodal.extract as ex
    from crossmodal.store import ResumableWriter

    one, _ = _extract(bad_split, AheadImages(), tmp_path / "one" / "i.npy", batch_size=batch, skip_bad=True)
    seen = []
    real = ResumableWriter.write
    monkeypatch.setattr(ResumableWriter, "write", lambda self, start, rows, skipped_rows=(): (
        seen.append((len(rows), list(skipped_rows))), real(self, start, rows, skipped_rows)))
    monkeypatch.setattr(ex, "MAX_CHUNKS", max_chunks)
    meta, two = _extract(bad_split, AheadImages(), tmp_path / "two" / "i.npy", batch_size=batch, skip_bad=True,
                         prefetch=prefetch)
    assert seen == writes  # rows, skipped rows (row 6 is the unreadable image) of each chunk
    assert two == (tmp_path / "one" / "i.npy").read_bytes()
    assert meta["skipped_ids"] == one["skipped_ids"] == [int(bad_split.image_ids[6])] and meta["ids"] == one["ids"]


def test_an_interrupted_run_with_chunks_of_several_batches_resumes(bad_split, tmp_path, monkeypatch):
    import crossmodal.extract as ex
    from tests.test_integrity_resume import _every_kill

    monkeypatch.setattr(ex, "MAX_CHUNKS", 3)  # 8 batches of 2: chunks of 3, 3 and 2 batches
    _every_kill(tmp_path, monkeypatch, lambda p: extract_images(bad_split, AheadImages(), p, batch_size=2,
                                                                 skip_bad=True, progress=False), "i.npy")


def test_the_command_line_default_decodes_ahead_and_keeps_its_errors(bad_split, tmp_path):
    """make_database_img.py on the CPU default (ONNX Runtime, so decoding ahead): an unreadable
    image in the middle is one line and exit 2 without --skip-bad, a counted skip with it."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("onnxruntime")
    root = Path(__file__).resolve().parents[1]
    argv = [sys.executable, str(root / "make_database_img.py"), "--coco-root", str(tmp_path / "coco"), "--split",
            "val", "--input-size", "64", "--workers", "0", "--no-progress", "--device", "cpu", "--cache-dir",
            str(tmp_path / "cache"), "--features-dir", str(tmp_path / "f")]
    env = {**os.environ, "PYTHONPATH": str(root)}
    failed = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 2 and bad_split.file_names[6] in lines[-1] and "--skip-bad" in lines[-1], lines[-3:]
    assert "Traceback" not in failed.stderr
    assert [p.name for p in (tmp_path / "f").rglob("*.npy")] == ["val_img_effnet-lite0.partial.npy"]  # kept to resume
    done = subprocess.run([*argv, "--skip-bad"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    [sidecar] = (tmp_path / "f").rglob("val_img_effnet-lite0.json")
    meta = json.loads(sidecar.read_text())
    assert meta["runtime"]["name"] == "onnxruntime" and meta["skipped_ids"] == [int(bad_split.image_ids[6])]
    assert len(meta["ids"]) == 15
