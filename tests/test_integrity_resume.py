"""A resume verifies what it keeps, and every interrupted state of the feature stages resumes
(issue 14): rows corrupted in a partial file after a kill are redone, never published; a kill
before every file-system step, and half-way through every file write (issue 23), of each stage
(images, images with a skip, captions, the fastText model, the shard merge) leaves nothing a
reader takes for finished, and a rerun ends in the same bytes as an uninterrupted run, with no
partial or temporary file left."""

import json

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.errors import FeatureError
from crossmodal.extract import extract_images, extract_texts, merge_shards
from crossmodal.store import load_features
from tests.test_integrity_helpers import TinyImages, TinyTexts, copy_root, leftovers, run_killed_at


def _same_output(npy, ref):
    assert npy.read_bytes() == ref.read_bytes()
    a, b = json.loads(npy.with_suffix(".json").read_text()), json.loads(ref.with_suffix(".json").read_text())
    for key in ("ids", "image_ids", "skipped_ids", "job", "count", "dim", "rows_sha256"):
        assert a.get(key) == b.get(key), key
    assert [r["sha256"] for r in a["files"].values()] == [r["sha256"] for r in b["files"].values()]


def _reader_sees_nothing_wrong(npy, ref):
    """Between a kill and the rerun, a reader gets the finished output exactly, or a refusal."""
    try:
        arr, meta = load_features(npy)
    except FeatureError:
        return
    np.testing.assert_array_equal(arr, load_features(ref)[0])
    assert meta["ids"] == load_features(ref)[1]["ids"]


def _resumable(folder) -> dict:
    """{output file name: (rows, rows done)} of the partial outputs a kill left in ``folder`` that a
    rerun can continue (a progress record beside its partial array)."""
    out = {}
    for prog in folder.glob("*.progress.json"):
        partial = prog.with_name(prog.name.replace(".progress.json", ".partial.npy"))
        try:
            state = json.loads(prog.read_text())
        except ValueError:
            continue
        if partial.is_file():
            out[prog.name.replace(".progress.json", ".npy")] = (state["shape"][0], state["done"])
    return out


def _rows_written(make, npy, monkeypatch) -> dict:
    """Run ``make(npy)``; {output file name: rows its resumable writer wrote}: the rows encoded."""
    from crossmodal.store import ResumableWriter

    written, real = {}, ResumableWriter.write

    def counted(self, start, rows, *a, **kw):
        written[self.npy.name] = written.get(self.npy.name, 0) + len(rows)
        return real(self, start, rows, *a, **kw)

    with monkeypatch.context() as m:
        m.setattr(ResumableWriter, "write", counted)
        make(npy)
    return written


def _every_kill(tmp_path, monkeypatch, make, name):
    """Kill ``make`` before each of its file-system steps, rerun it: the same bytes as an
    uninterrupted run, nothing left behind, and the rerun encodes only the rows the killed run had
    not finished (a writer that never resumes, recomputing everything, fails)."""
    ref = tmp_path / "ref" / name
    total, killed = run_killed_at(lambda: make(ref), 0, monkeypatch, mid_write=True)
    assert not killed and total > 3
    resumed = 0
    for k in range(1, total + 1):
        npy = tmp_path / f"k{k}" / name
        _, killed = run_killed_at(lambda npy=npy: make(npy), k, monkeypatch, mid_write=True)
        assert killed, k
        _reader_sees_nothing_wrong(npy, ref)
        kept = _resumable(npy.parent)
        written = _rows_written(make, npy, monkeypatch)
        for out, (rows, done) in kept.items():
            assert written.get(out, 0) == rows - done, (k, out, written, kept)
        resumed += any(done > 0 for _, done in kept.values())
        _same_output(npy, ref)
        assert leftovers(npy.parent) == [], k
    assert resumed >= 2  # the sweep did resume finished rows
    return total


def test_every_kill_of_image_extraction_resumes_to_the_same_bytes(small_root, tmp_path, monkeypatch):
    split = load_split(small_root, "val")
    n = _every_kill(tmp_path, monkeypatch, lambda p: extract_images(split, TinyImages(), p, batch_size=4,
                                                                     progress=False), "i.npy")
    assert n >= 10  # 4 chunks + their progress records + publication


def test_every_kill_of_image_extraction_with_a_skip_resumes(small_root, tmp_path, monkeypatch):
    root = copy_root(small_root, tmp_path / "coco")
    split = load_split(root, "val")
    split.image_path(5).write_bytes(b"garbage")
    _every_kill(tmp_path, monkeypatch, lambda p: extract_images(split, TinyImages(), p, batch_size=4, skip_bad=True,
                                                                 progress=False), "i.npy")


def test_every_kill_of_caption_extraction_resumes(small_root, tmp_path, monkeypatch):
    split = load_split(small_root, "val")
    _every_kill(tmp_path, monkeypatch, lambda p: extract_texts(split, TinyTexts(), p, chunk=25, progress=False),
                "t.npy")


def test_every_kill_of_a_shard_merge_resumes(small_root, tmp_path, monkeypatch):
    split = load_split(small_root, "val")

    def make(npy):
        for i in range(3):
            extract_images(split, TinyImages(), npy, shard=(i, 3), progress=False)
        merge_shards(npy, 3, split, "img")

    _every_kill(tmp_path, monkeypatch, make, "i.npy")


@pytest.mark.slow
def test_every_kill_of_fasttext_training_resumes(small_root, tmp_path, monkeypatch):
    from crossmodal.text_encoders import train_fasttext

    split = load_split(small_root, "val")
    make = lambda d: train_fasttext(split, d, dim=8, epoch=1, bucket=300)  # noqa: E731
    total, _ = run_killed_at(lambda: make(tmp_path / "ref"), 0, monkeypatch, mid_write=True)
    ref = tmp_path / "ref" / "val_model_fasttext.bin"
    for k in range(1, total + 1):
        d = tmp_path / f"k{k}"
        assert run_killed_at(lambda d=d: make(d), k, monkeypatch, mid_write=True)[1]
        path = make(d)
        assert path.read_bytes() == ref.read_bytes(), k
        assert json.loads(path.with_suffix(".json").read_text())["job"] == json.loads(
            ref.with_suffix(".json").read_text())["job"]
        assert leftovers(d) == [], k


def _killed_after_chunks(split, npy, monkeypatch, n_chunks):
    from crossmodal.store import ResumableWriter

    orig, calls = ResumableWriter.write, {"n": 0}

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > n_chunks:
            raise KeyboardInterrupt
        return orig(self, *a, **kw)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(ResumableWriter, "write", dying)
        extract_images(split, TinyImages(), npy, batch_size=4, progress=False)



def _killed_after_two_of_three_chunks(small_root, tmp_path, monkeypatch):
    """val's images in ``tmp_path/ref`` whole, and in ``tmp_path/run`` killed after 2 of 3 chunks: (split, the
    output .npy, its progress record, the record's content)."""
    split = load_split(small_root, "val")
    extract_images(split, TinyImages(), tmp_path / "ref" / "i.npy", batch_size=4, progress=False)
    npy = tmp_path / "run" / "i.npy"
    _killed_after_chunks(split, npy, monkeypatch, 2)
    prog = tmp_path / "run" / "i.progress.json"
    return split, npy, prog, json.loads(prog.read_text())

def test_rows_corrupted_in_a_partial_after_a_kill_are_redone(small_root, tmp_path, monkeypatch, caplog):
    split = load_split(small_root, "val")
    extract_images(split, TinyImages(), tmp_path / "ref" / "i.npy", batch_size=4, progress=False)
    npy = tmp_path / "run" / "i.npy"
    _killed_after_chunks(split, npy, monkeypatch, 3)
    part = np.load(tmp_path / "run" / "i.partial.npy", mmap_mode="r+")
    part[5] = 3.4e38  # chunk 2 of 3 kept, damaged on disk
    part.flush()
    del part
    caplog.set_level("INFO")
    extract_images(split, TinyImages(), npy, batch_size=4, progress=False)
    assert "rows 4-8 of the partial output" in caplog.text and "resuming" in caplog.text
    _same_output(npy, tmp_path / "ref" / "i.npy")
    assert np.abs(load_features(npy)[0]).max() < 1e30


def test_progress_record_without_chunk_digests_is_discarded(small_root, tmp_path, monkeypatch, caplog):
    split, npy, prog, state = _killed_after_two_of_three_chunks(small_root, tmp_path, monkeypatch)
    for bad in ({"chunks": []}, {"chunks": [[0, 4, "x"], [4, 2, "y"]]}, {"done": 12}):
        prog.write_text(json.dumps({**state, **bad}))
        caplog.clear()
        _killed_after_chunks(split, npy, monkeypatch, 1)
        assert "discarding the partial output" in caplog.text
        assert json.loads(prog.read_text())["done"] == 4
    extract_images(split, TinyImages(), npy, batch_size=4, progress=False)
    _same_output(npy, tmp_path / "ref" / "i.npy")


def test_non_finite_rows_are_never_published(small_root, tmp_path, monkeypatch):
    split = load_split(small_root, "val")
    npy = tmp_path / "i.npy"
    orig = TinyImages.forward
    monkeypatch.setattr(TinyImages, "forward", lambda self, ims: orig(self, ims) * float("nan"))
    with pytest.raises(FeatureError, match=r"i.npy: row 0 \(id \d+\) holds NaN or infinite values"):
        extract_images(split, TinyImages(), npy, progress=False)
    assert not npy.exists() and not npy.with_suffix(".json").exists()


def test_progress_record_with_skipped_rows_out_of_range_is_discarded(small_root, tmp_path, monkeypatch, caplog):
    from crossmodal.store import ResumableWriter

    split, npy, prog, state = _killed_after_two_of_three_chunks(small_root, tmp_path, monkeypatch)
    for skipped in ([-1], [999], ["3"], [8]):  # -1 would silently drop the last image; row 8 is not done yet
        prog.write_text(json.dumps({**state, "skipped": skipped}))
        caplog.clear()
        with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
            m.setattr(ResumableWriter, "write", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
            extract_images(split, TinyImages(), npy, batch_size=4, progress=False)
        assert "discarding the partial output" in caplog.text, skipped
    extract_images(split, TinyImages(), npy, batch_size=4, progress=False)
    _same_output(npy, tmp_path / "ref" / "i.npy")
