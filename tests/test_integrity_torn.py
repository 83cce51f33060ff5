"""A kill half-way through a write never leaves a torn output (issue 23). At every step of
republishing, half-way through each file write included, both as an in-process exception and as
a real SIGKILL of a forked child (no ``finally`` runs): a JSON file holds the old whole bytes or
the new whole bytes; a feature array and its sidecar each hold the old or the new whole bytes and
a reader gets the old output, the new one or a one-line refusal; a results line torn by a kill is
skipped and never swallows the next row. The harness itself is checked to really tear writes.
"""

import json

import numpy as np
import pytest

from crossmodal.coco import load_split
from crossmodal.errors import FeatureError
from crossmodal.extract import extract_images
from crossmodal.outputs import append_jsonl, dump_json, read_jsonl, write_json
from crossmodal.store import load_features, save_features, sidecar_path
from tests.test_integrity_helpers import TinyImages, leftovers, run_kill9_at, run_killed_at

KILLS = ["exception", "sigkill"]
OLD = {"name": "old", "rows": list(range(40))}
NEW = {"name": "new", "rows": list(range(100, 400)), "text": "a long value " * 40}


def _runner(kill: str, monkeypatch):
    """(fn, k) -> (steps seen, killed?), killing half-way through writes too."""
    if kill == "exception":
        return lambda fn, k: run_killed_at(fn, k, monkeypatch, mid_write=True)
    return lambda fn, k: run_kill9_at(fn, k)


def _torn_files(folder, whole: set[bytes]) -> list[str]:
    """Files in ``folder`` that hold neither a whole old nor a whole new version."""
    return sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.endswith(".lock")
                  and p.read_bytes() not in whole)


@pytest.mark.parametrize("kill", KILLS)
def test_write_json_leaves_the_old_or_the_new_whole_file_at_every_kill(tmp_path, monkeypatch, kill):
    run = _runner(kill, monkeypatch)
    old, new = dump_json(OLD), dump_json(NEW)
    count = tmp_path / "count" / "x.json"
    write_json(count, OLD)
    total, killed = run(lambda: write_json(count, NEW), 0)
    assert not killed and count.read_bytes() == new and total >= 2
    torn_somewhere = False
    for k in range(1, total + 1):
        path = tmp_path / f"k{k}" / "x.json"
        write_json(path, OLD)
        assert run(lambda path=path: write_json(path, NEW), k)[1], k
        assert path.read_bytes() in (old, new), f"kill at step {k} of {total} left {path.name} torn"
        # the harness really tore a write: some kill left half the new bytes in a temporary
        torn_somewhere |= bool(_torn_files(path.parent, {old, new}))
        write_json(path, NEW)  # the rerun
        assert path.read_bytes() == new and leftovers(path.parent) == [], k
    assert torn_somewhere, "no kill fell half-way through a write"


def _json(data: bytes) -> dict:
    try:
        return json.loads(data)
    except ValueError:
        return {}


def _features(n: int, seed: int) -> tuple[np.ndarray, dict]:
    arr = np.random.default_rng(seed).standard_normal((n, 4)).astype(np.float32)
    return arr, {"encoder": f"e{seed}", "split": "val", "kind": "img", "ids": list(range(seed, seed + n)),
                 "created": "2026-01-01T00:00:00"}


@pytest.mark.parametrize("kill", KILLS)
def test_a_republished_feature_file_is_old_or_new_whole_at_every_kill(tmp_path, monkeypatch, kill):
    run = _runner(kill, monkeypatch)
    (old_arr, old_meta), (new_arr, new_meta) = _features(6, 1), _features(9, 2)
    count = tmp_path / "count" / "f.npy"
    save_features(count, old_arr, old_meta)
    total, _ = run(lambda: save_features(count, new_arr, new_meta), 0)
    new_npy, new_rows = count.read_bytes(), load_features(count)[1]["rows_sha256"]
    assert total >= 4
    for k in range(1, total + 1):
        npy = tmp_path / f"k{k}" / "f.npy"
        save_features(npy, old_arr, old_meta)
        old_npy, old_side = npy.read_bytes(), sidecar_path(npy).read_bytes()
        assert run(lambda npy=npy: save_features(npy, new_arr, new_meta), k)[1], k
        assert npy.read_bytes() in (old_npy, new_npy), f"kill at step {k} of {total}: the array is torn"
        side = sidecar_path(npy).read_bytes()
        assert side == old_side or _json(side).get("rows_sha256") == new_rows, f"kill at step {k}: the sidecar is torn"
        try:
            arr, meta = load_features(npy)
        except FeatureError as e:  # the new array under the old sidecar: refused, in one line
            assert "\n" not in str(e)
        else:
            want_arr, want_meta = (old_arr, old_meta) if meta["encoder"] == "e1" else (new_arr, new_meta)
            np.testing.assert_array_equal(arr, want_arr)
            assert meta["ids"] == want_meta["ids"], k
        save_features(npy, new_arr, new_meta)  # the rerun
        assert npy.read_bytes() == new_npy and leftovers(npy.parent) == [], k


@pytest.mark.parametrize("kill", KILLS)
def test_a_feature_stage_rerun_with_force_serves_old_new_or_a_refusal_at_every_kill(small_root, tmp_path,
                                                                                    monkeypatch, kill):
    """``make_database_img.py --force`` over a finished output, killed at any step: a reader gets the
    old features whole, the new ones whole, or a refusal; a rerun ends in the uninterrupted bytes."""
    run = _runner(kill, monkeypatch)
    split = load_split(small_root, "val")

    class Other(TinyImages):  # other settings, other rows
        def describe(self):
            return {"encoder": "tiny", "settings": {"size": 16, "scale": 2}, "weights": {"file": "none"}}

        def forward(self, images):
            return super().forward(images) * 2

    def old(p):
        return extract_images(split, TinyImages(), p, batch_size=4, progress=False)

    def new(p):
        return extract_images(split, Other(), p, batch_size=4, force=True, progress=False)

    ref_old, ref_new = tmp_path / "old" / "i.npy", tmp_path / "new" / "i.npy"
    old(ref_old)
    old(ref_new)
    total, _ = run(lambda: new(ref_new), 0)
    want = [(a.copy(), m["settings"]) for a, m in (load_features(ref_old), load_features(ref_new))]
    assert not np.array_equal(want[0][0], want[1][0]) and want[0][1] != want[1][1] and total >= 8
    for k in range(1, total + 1):
        npy = tmp_path / f"k{k}" / "i.npy"
        old(npy)
        assert run(lambda npy=npy: new(npy), k)[1], k
        try:
            arr, meta = load_features(npy)
        except FeatureError:
            pass
        else:  # rows and the settings vouched for belong together: the old output whole, or the new
            assert any(np.array_equal(arr, a) and meta["settings"] == s for a, s in want), f"kill at step {k}"
        new(npy)
        assert npy.read_bytes() == ref_new.read_bytes() and leftovers(npy.parent) == [], k


@pytest.mark.parametrize("kill", KILLS)
def test_a_results_line_torn_by_a_kill_is_skipped_and_the_next_row_kept(tmp_path, monkeypatch, kill):
    run = _runner(kill, monkeypatch)
    path = tmp_path / "results.jsonl"
    append_jsonl(path, {"epoch": 1, "loss": 0.5})
    assert run(lambda: append_jsonl(path, {"epoch": 2, "loss": 0.25, "note": "x" * 200}), 1)[1]
    assert path.read_bytes().startswith(b'{"epoch": 1') and not path.read_bytes().endswith(b"\n")  # really torn
    append_jsonl(path, {"epoch": 3, "loss": 0.125})
    assert read_jsonl(path) == [{"epoch": 1, "loss": 0.5}, {"epoch": 3, "loss": 0.125}]
