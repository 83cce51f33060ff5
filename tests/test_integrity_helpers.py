"""Fast stand-in encoders for the integrity tests (tests/test_integrity*.py): the guarantees under
test are the feature store's, not an encoder's, so a few pixel statistics and character counts do."""

import shutil

import numpy as np
import torch


class TinyImages(torch.nn.Module):
    """Image encoder with the project's contract: ``preprocess(PIL) -> (3, 16, 16)``, ``forward(list) -> (B, 12)``."""

    name, dim = "tiny", 12

    def preprocess(self, im):
        return torch.from_numpy(np.asarray(im.resize((16, 16)), dtype=np.float32).copy()).permute(2, 0, 1) / 255

    def describe(self):
        return {"encoder": "tiny", "settings": {"size": 16}, "weights": {"file": "none"}}

    def forward(self, images):
        return torch.stack([torch.cat([x.mean((1, 2)), x.std((1, 2)), x.amax((1, 2)), x.amin((1, 2))])
                            for x in images])


class TinyTexts:
    """Caption encoder: ``encode(list of N str) -> (N, 4)`` from character statistics."""

    name, dim = "tinytext", 4

    def describe(self):
        return {"encoder": "tinytext", "settings": {}, "weights": {"file": "none"}}

    def encode(self, texts, **_):
        return np.array([[len(t), sum(map(ord, t)) % 997, t.count(" "), ord(t[0])] for t in texts], np.float32)


def copy_root(src, dst):
    """A private copy of a generated COCO root, without lock files."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.lock"))
    return dst


class Killed(BaseException):
    """Stands for a kill -9 at a chosen step: not an Exception, so no handler of the code under test stops it."""


def _half(data):
    """The first half of what one ``write`` call was given (str, bytes or any buffer)."""
    if isinstance(data, str):
        return data[: len(data) // 2]
    view = memoryview(data).cast("B")
    return view[: len(view) // 2]


class _TornFile:
    """A file opened for writing whose ``write`` at the chosen step puts the first half of its bytes in
    the file, flushes them to the kernel (which keeps what a killed process wrote) and dies."""

    def __init__(self, f, due, die):
        self._f, self._due, self._die = f, due, die

    def write(self, data):
        if self._due():
            self._f.write(_half(data))
            self._f.flush()
            self._die()
        return self._f.write(data)

    def writelines(self, lines):
        for line in lines:
            self.write(line)

    def __enter__(self):
        self._f.__enter__()
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


def _install_steps(setattr, due, die, extra=(), mid_write=False):
    """Count the file-system steps of the code under test with ``due()`` and call ``die()`` at the chosen
    one: before os.replace, os.unlink, os.fsync, a resumable chunk write and ``extra`` (owner, name); with
    ``mid_write``, also half-way through every write to a file opened by path for writing (open, io.open,
    pathlib, numpy, PIL, matplotlib all open that way; lock files, opened from a descriptor, are markers,
    not outputs), every os.write, and a resumable chunk (half its rows written)."""
    import builtins
    import io
    import os

    from crossmodal.store import ResumableWriter

    def before(orig):
        def step(*a, **kw):
            if due():
                die()
            return orig(*a, **kw)

        return step

    steps = [(os, "replace"), (os, "unlink"), (os, "fsync"), *extra]
    if not mid_write:
        steps.append((ResumableWriter, "write"))
    for owner, name in steps:
        setattr(owner, name, before(getattr(owner, name)))
    if not mid_write:
        return
    real_open, real_write, real_chunk = io.open, os.write, ResumableWriter.write

    def opened(file, mode="r", *a, **kw):
        f = real_open(file, mode, *a, **kw)
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        return _TornFile(f, due, die) if writing and not isinstance(file, int) else f

    def os_write(fd, data):
        if due():
            real_write(fd, _half(data))
            die()
        return real_write(fd, data)

    def torn_chunk(self, start, rows, skipped_rows=()):
        if due():
            half = len(rows) // 2
            self.array[start : start + half] = rows[:half]
            self.array.flush()
            die()
        return real_chunk(self, start, rows, skipped_rows)

    setattr(builtins, "open", opened)
    setattr(io, "open", opened)
    setattr(os, "write", os_write)
    setattr(ResumableWriter, "write", torn_chunk)


def _counter(k: int):
    seen = {"n": 0}

    def due() -> bool:
        seen["n"] += 1
        return seen["n"] == k

    return seen, due


def run_killed_at(fn, k: int, monkeypatch, extra=(), mid_write=False):
    """Run ``fn()`` with a kill before its ``k``-th file-system step (os.replace, os.unlink, os.fsync,
    a resumable chunk write, and ``extra`` (owner, name) pairs); with ``mid_write`` also half-way
    through each file write (see :func:`_install_steps`); k = 0 never kills.
    Returns (number of steps seen, killed?)."""
    seen, due = _counter(k)

    def die():
        raise Killed

    with monkeypatch.context() as m:
        _install_steps(m.setattr, due, die, extra, mid_write)
        try:
            fn()
        except Killed:
            return seen["n"], True
    return seen["n"], False


def run_kill9_at(fn, k: int, extra=(), mid_write=True, timeout_s: int = 60):
    """Run ``fn()`` in a forked child that gets a real SIGKILL at its ``k``-th step, counted as
    :func:`run_killed_at` counts them (by default half-way through a write): no ``finally``, no
    ``with`` exit and no exception handler runs. k = 0 never kills. Returns (steps seen, killed?).
    ``fn`` must not use torch's thread pools (a fork copies no threads); the child dies by alarm
    after ``timeout_s``."""
    import os
    import signal
    import traceback

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(r)
            signal.alarm(timeout_s)
            seen, due = _counter(k)
            write = os.write
            _install_steps(setattr, due, lambda: os.kill(os.getpid(), signal.SIGKILL), extra, mid_write)
            fn()
            write(w, str(seen["n"]).encode())
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL, f"child died of signal {os.WTERMSIG(status)}"
        return k, True
    assert os.WEXITSTATUS(status) == 0, "the child failed (its traceback is above)"
    return int(out), False


def train_interrupted_at(fn, epoch: int, monkeypatch) -> None:
    """Run ``fn()`` (a training) with a Ctrl-C (KeyboardInterrupt) as epoch ``epoch`` starts; it must
    be interrupted. The training loop is whole again afterwards."""
    import pytest

    from crossmodal.train import Trainer

    orig = Trainer.train_epoch

    def dying(self, e):
        if e == epoch:
            raise KeyboardInterrupt
        return orig(self, e)

    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):
        m.setattr(Trainer, "train_epoch", dying)
        fn()


def leftovers(folder):
    """Files a finished stage must not leave behind: partial arrays, progress records, temporaries."""
    return sorted(p.name for p in folder.rglob("*") if p.is_file() and any(
        t in p.name for t in (".partial.", ".progress.", ".tmp.", ".tmp")))
