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


def run_killed_at(fn, k: int, monkeypatch, extra=()):
    """Run ``fn()`` with a kill before its ``k``-th file-system step (os.replace, os.unlink, os.fsync,
    a resumable chunk write, and ``extra`` (owner, name) pairs); k = 0 never kills.
    Returns (number of steps seen, killed?)."""
    import os

    from crossmodal.store import ResumableWriter

    seen = {"n": 0}

    def wrap(orig):
        def step(*a, **kw):
            seen["n"] += 1
            if seen["n"] == k:
                raise Killed
            return orig(*a, **kw)

        return step

    with monkeypatch.context() as m:
        for owner, name in ((os, "replace"), (os, "unlink"), (os, "fsync"), (ResumableWriter, "write"), *extra):
            m.setattr(owner, name, wrap(getattr(owner, name)))
        try:
            fn()
        except Killed:
            return seen["n"], True
    return seen["n"], False


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
