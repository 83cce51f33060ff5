"""Every state a kill can leave a training run in resumes to the files of an uninterrupted run.

A training writes, in order: ``args.json``; per epoch a ``results.jsonl`` row, ``best.pt`` (when
the epoch is better) and ``last.pt``; at the end ``figures/training.png`` and ``done.json``. Each
write is atomic (temporary name, then rename), so a kill leaves the folder as it was after one
of these steps. :func:`_kill_before` stops a training just before step ``k`` (for every ``k``),
then a plain rerun must end in the same epoch rows, checkpoints, ``done.json`` and plot."""

import json
import shutil

import pytest
import torch

import crossmodal.run_state as run_state
import crossmodal.train as train_mod
from crossmodal.errors import ModelError
from crossmodal.outputs import OutputConflictError
from tests.test_runs_common import assert_same_run, epoch_rows, features_for, train


@pytest.fixture(scope="module")
def run_feats(small_root, tmp_path_factory):
    return features_for(small_root, tmp_path_factory)

WRITES = [(train_mod, "append_jsonl"), (train_mod, "save_checkpoint"), (train_mod, "write_json"),
          (run_state, "plot_results"), (run_state, "write_json")]


class Killed(BaseException):
    """A kill: not an Exception, so no handler of the code under test can swallow it."""


def _record_writes(monkeypatch, kill_at: int | None = None) -> list[str]:
    """Count the run's writes in order; raise :class:`Killed` instead of the ``kill_at``-th (0-based)."""
    seen = []
    for mod, name in WRITES:
        orig = getattr(mod, name)

        def wrapper(*args, _orig=orig, _name=name, **kw):
            if len(seen) == kill_at:
                raise Killed(_name)
            seen.append(f"{_name}({getattr(args[-1], 'name', '') or getattr(args[0], 'name', '')})")
            return _orig(*args, **kw)

        monkeypatch.setattr(mod, name, wrapper)
    return seen


@pytest.fixture(scope="module")
def reference(run_feats, tmp_path_factory):
    """An uninterrupted 3-epoch run, and the list of its writes in order."""
    mp = pytest.MonkeyPatch()
    seen = _record_writes(mp)
    runs = tmp_path_factory.mktemp("ref")
    train(run_feats, runs)
    mp.undo()
    return runs / "img2text_fasttext", list(seen)


def test_the_writes_are_the_ones_enumerated(reference):
    _, seen = reference
    assert seen[0] == "write_json(args.json)" and seen[-2:] == ["plot_results(training.png)", "write_json(done.json)"]
    assert sum(s.startswith("append_jsonl") for s in seen) == 3 and "save_checkpoint(best.pt)" in seen


@pytest.mark.slow
def test_a_kill_before_any_write_resumes_to_the_uninterrupted_result(run_feats, reference, tmp_path, monkeypatch):
    ref, seen = reference
    for k in range(len(seen)):  # killed just before write k: the state after writes 0..k-1
        runs = tmp_path / f"k{k}"
        _record_writes(monkeypatch, kill_at=k)
        with pytest.raises(Killed):
            train(run_feats, runs)
        monkeypatch.undo()
        train(run_feats, runs)
        assert_same_run(runs / "img2text_fasttext", ref)


def test_killed_after_the_last_epoch_reruns_and_resume_says_finished(run_feats, reference, tmp_path, monkeypatch,
                                                                     caplog):
    """The window of the reported UnboundLocalError: last.pt of the last epoch written, no done.json."""
    ref, seen = reference
    for k in (seen.index("plot_results(training.png)"), len(seen) - 1):
        runs = tmp_path / f"k{k}"
        _record_writes(monkeypatch, kill_at=k)
        with pytest.raises(Killed):
            train(run_feats, runs)
        monkeypatch.undo()
        assert not (runs / "img2text_fasttext" / "done.json").exists()
        summary = train(run_feats, runs, "--resume")  # --resume of a run with no epoch left
        assert summary["epochs_run"] == 3
        assert_same_run(runs / "img2text_fasttext", ref)
    caplog.set_level("INFO")
    again = train(run_feats, runs, "--resume")  # --resume of a finished run: says so, returns its result
    assert "is finished (3 epochs" in caplog.text and "nothing to resume" in caplog.text
    assert again == json.loads((runs / "img2text_fasttext" / "done.json").read_text())


def test_early_stopped_run_killed_before_done_does_not_train_on(run_feats, tmp_path, monkeypatch):
    ref = train(run_feats, tmp_path / "ref", "--patience", "1", "--lr", "0.05", epochs=8)
    assert ref["epochs_run"] < 8  # stopped early (the check below needs it)
    seen = _record_writes(monkeypatch)
    train(run_feats, tmp_path / "probe", "--patience", "1", "--lr", "0.05", epochs=8)
    monkeypatch.undo()
    _record_writes(monkeypatch, kill_at=seen.index("plot_results(training.png)"))
    with pytest.raises(Killed):
        train(run_feats, tmp_path / "run", "--patience", "1", "--lr", "0.05", epochs=8)
    monkeypatch.undo()
    got = train(run_feats, tmp_path / "run", "--patience", "1", "--lr", "0.05", epochs=8)
    assert got["epochs_run"] == ref["epochs_run"] and got["best"] == ref["best"]
    assert epoch_rows(tmp_path / "run" / "img2text_fasttext") == epoch_rows(tmp_path / "ref" / "img2text_fasttext")


def _finished_copy(ref, tmp_path):
    run = tmp_path / "runs" / "img2text_fasttext"
    shutil.copytree(ref, run, ignore=shutil.ignore_patterns("*.lock"))
    return run


def _append(path, text):
    with open(path, "ab") as f:
        f.write(text.encode())


def _nan_weights(path):
    ck = torch.load(path, weights_only=True)
    ck["img_head"]["net.0.weight"][:] = float("nan")
    torch.save(ck, path)


DAMAGE = {  # what a kill, a full disk or a stray edit can do to a finished run's files
    "done.json garbage": lambda r: (r / "done.json").write_bytes(b"\x80garbage{"),
    "done.json deleted": lambda r: (r / "done.json").unlink(),
    "done.json of other best.pt": lambda r: _append(r / "best.pt", "x"),
    "training.png deleted": lambda r: (r / "figures" / "training.png").unlink(),
    "args.json garbage": lambda r: (r / "args.json").write_text("{not json"),
    "args.json deleted, done.json deleted": lambda r: [(r / n).unlink() for n in ("args.json", "done.json")],
    "last.pt garbage, done.json deleted": lambda r: [(r / "last.pt").write_bytes(b"\x80garbage"),
                                                     (r / "done.json").unlink()],
    "best.pt zero bytes": lambda r: (r / "best.pt").write_bytes(b""),
    "last.pt NaN weights, done.json deleted": lambda r: [_nan_weights(r / "last.pt"), (r / "done.json").unlink()],
    "results.jsonl rows damaged": lambda r: _append(r / "results.jsonl", '{"type": "epoch", "epoch": "2", '
                                                                         '"loss": null}\n[1, 2]\n{"type": "epo'),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_finished_run_ends_as_the_uninterrupted_one(run_feats, reference, tmp_path, damage):
    ref, _ = reference
    run = _finished_copy(ref, tmp_path)
    DAMAGE[damage](run)
    train(run_feats, tmp_path / "runs")
    assert_same_run(run, ref)


def test_a_checkpoint_of_another_run_is_not_resumed(run_feats, reference, tmp_path):
    ref, _ = reference
    train(run_feats, tmp_path / "other", "--lr", "0.01", epochs=2)
    run = _finished_copy(ref, tmp_path)
    (run / "done.json").unlink()
    shutil.copy(tmp_path / "other" / "img2text_fasttext" / "last.pt", run / "last.pt")
    with pytest.raises(ModelError, match=r"last.pt is not this run's checkpoint \(it differs in .*lr: 0.001 -> 0.01"):
        train(run_feats, tmp_path / "runs")
    with pytest.raises(OutputConflictError, match=r"other arguments or features \(epochs: 3 -> 2; lr"):
        train(run_feats, tmp_path / "runs", "--lr", "0.01", epochs=2)  # args.json says what the run is


def test_lost_args_json_still_guards_a_finished_run(run_feats, reference, tmp_path):
    """args.json damaged: the checkpoints say what the run is, so other arguments are still refused."""
    ref, _ = reference
    run = _finished_copy(ref, tmp_path)
    (run / "args.json").write_text("{not json")
    with pytest.raises(OutputConflictError, match=r"other arguments or features \(lr: 0.001 -> 0.01\)"):
        train(run_feats, tmp_path / "runs", "--lr", "0.01")
    assert_same_run(run, ref)
