"""Locks tell the truth (issue 14): the "in use by" line names only live holders, as the kernel
lists them (a dead writer's line, or a pid reused by another process, is never named); readers on
storage they cannot write proceed without a lock file and say so at debug level."""

import errno
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from crossmodal import locks as outputs
from crossmodal.outputs import OutputBusyError, lock_path, locked
from crossmodal.store import load_features, save_features

HOLD = """
import sys, time
sys.path.insert(0, {root!r})
from crossmodal.outputs import locked
with locked({path!r}, shared={shared}):
    print("held", flush=True)
    time.sleep(60)
"""


def _holder(path, shared=False):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(root=root, path=str(path), shared=shared)],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _busy_line(path) -> str:
    with pytest.raises(OutputBusyError) as e, locked(path):
        pass
    return str(e.value)


def test_a_dead_writers_line_is_not_named_while_a_reader_holds(tmp_path):
    out = tmp_path / "x.npy"
    lock_path(out).write_text("pid 999999 (make_database_img.py --split train) since 2026-01-01 10:00:00\nstart 1\n")
    reader = _holder(out, shared=True)
    try:
        line = _busy_line(out)
    finally:
        reader.kill()
        reader.wait()
    assert "999999" not in line and f"pid {reader.pid} " in line and "-c" in line


def test_a_reused_pid_is_not_taken_for_the_recorded_writer(tmp_path):
    out = tmp_path / "x.npy"
    holder = _holder(out)
    try:  # the lock file now says another command ran under that pid, started at another time
        lock_path(out).write_text(f"pid {holder.pid} (train.py --name old) since 2026-01-01 10:00:00\nstart 5\n")
        line = _busy_line(out)
    finally:
        holder.kill()
        holder.wait()
    assert f"pid {holder.pid} " in line and "train.py" not in line


def test_a_live_writer_is_named_with_its_own_line(tmp_path):
    out = tmp_path / "x.npy"
    holder = _holder(out)
    try:
        line = _busy_line(out)
    finally:
        holder.kill()
        holder.wait()
    assert f"is in use by pid {holder.pid} (-c" in line and " since " in line
    with locked(out):  # the kernel dropped it with the process
        pass


def test_no_holder_known_says_another_process(tmp_path, monkeypatch):
    out = tmp_path / "x.npy"
    lock_path(out).write_text("pid 999999 (old) since 2026-01-01 10:00:00\nstart 1\n")
    monkeypatch.setattr(outputs, "_kernel_holders", lambda f: [])
    with locked(out, shared=True):
        line = _busy_line(out)
    assert "in use by another process" in line and "999999" not in line


def _read_only_open(monkeypatch, code):
    """As on a read-only mount (EROFS) or another user's folder (EACCES): a lock file cannot be
    created or opened for writing; an existing one can still be opened to read."""
    real = os.open

    def fake(path, flags, *a, **kw):
        if str(path).endswith(".lock") and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", fake)


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_readers_on_read_only_storage_need_no_lock_file(tmp_path, monkeypatch, caplog, code):
    npy = tmp_path / "x.npy"
    save_features(npy, np.ones((2, 3)), {"ids": [1, 2]})
    _read_only_open(monkeypatch, code)
    caplog.set_level("DEBUG", logger="crossmodal.locks")
    with locked(npy, shared=True):
        arr, _ = load_features(npy)
    assert arr.shape == (2, 3) and not lock_path(npy).exists()
    assert "cannot write" in caplog.text and "read without a lock file" in caplog.text
    with pytest.raises(OSError) as e, locked(npy):  # a writer is refused by the OS, one line in scripts
        pass
    assert e.value.errno == code


def test_a_reader_on_read_only_storage_with_a_lock_file_still_locks_it(tmp_path, monkeypatch):
    npy = tmp_path / "x.npy"
    lock_path(npy).write_text("")
    _read_only_open(monkeypatch, errno.EROFS)
    with locked(npy, shared=True):
        monkeypatch.undo()
        with pytest.raises(OutputBusyError, match=f"pid {os.getpid()} "), locked(npy):  # the reader holds it
            pass


def test_lock_holder_line_records_the_process_start(tmp_path):
    out = tmp_path / "x.npy"
    with locked(out):
        first, second = lock_path(out).read_text().splitlines()
    assert first.startswith(f"pid {os.getpid()} ") and second == f"start {outputs._proc_start(os.getpid())}"
    assert outputs._proc_start(999999) is None and time.time()


def test_a_lock_file_planted_as_a_symlink_is_refused_not_followed(tmp_path):
    from crossmodal.errors import CrossmodalError

    victim = tmp_path / "precious.txt"
    victim.write_text("keep me\n")
    out = tmp_path / "x.npy"
    lock_path(out).symlink_to(victim)
    for shared in (False, True):
        with pytest.raises(CrossmodalError, match=r"x.npy.lock is a symbolic link"), locked(out, shared=shared):
            pass
    assert victim.read_text() == "keep me\n"


def test_a_lock_file_of_binary_garbage_still_gives_one_line(tmp_path):
    out = tmp_path / "x.npy"
    lock_path(out).write_bytes(b"\xff\xfe\x00garbage\x80")
    with locked(out, shared=True):
        line = _busy_line(out)
    assert f"pid {os.getpid()} " in line
