"""Several trained runs scored as one model: an ensemble averages their similarities.

For M runs with L2-normalised embeddings ``img_m`` (N_img, d_m) and ``text_m`` (N_cap, d_m), the
ensemble's similarity of image i and caption j is ``(1/M) sum_m img_m[i] . text_m[j]``. That is
exactly the inner product of the members' embeddings concatenated and scaled by ``1/sqrt(M)`` on
each side::

    img  = [img_1 | ... | img_M] / sqrt(M)     (N_img, sum d_m), unit rows
    text = [text_1 | ... | text_M] / sqrt(M)   (N_cap, sum d_m), unit rows

so every metric, protocol and Faiss index of the project works on an ensemble unchanged, and
the ensemble is a model like any other. The members must embed the same split with the same
ids in the same row order (checked, naming the first member that differs).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError, FeatureError

#: What every member must share, with the words of the refusal.
_SAME = (("split", "split"), ("ids", "image ids"), ("caption_ids", "caption ids"), ("image_ids", "caption image ids"))


def _key(im: dict, tm: dict) -> dict:
    return {"split": im.get("split"), "ids": list(im["ids"]), "caption_ids": list(tm["ids"]),
            "image_ids": list(tm["image_ids"])}


def combine(members: list[tuple], names: list[str]) -> tuple:
    """One embedding set out of several runs' embeddings of one split.

    ``members``: per run, ``(img (N_img, d_m), text (N_cap, d_m), cap_img_rows (N_cap,), img_meta,
    text_meta)`` as :func:`crossmodal.embed.load_embeddings` returns it; ``names`` label them in
    errors and in the result. Returns the same 5-tuple for the ensemble: embeddings
    ``(N_img, D)``, ``(N_cap, D)`` with ``D = sum d_m``, float32, whose inner products are the
    members' averaged similarities; the sidecars of the first member with ``members`` (names,
    checkpoints, the digests of their embedding files) and ``dim`` set. A single member is returned unchanged."""
    if not members:
        raise FeatureError("an ensemble needs at least one run")
    if len(members) != len(names):
        raise ValueError(f"{len(members)} members, {len(names)} names")
    if len(members) == 1:
        return members[0]
    ref = _key(members[0][3], members[0][4])
    for (_, _, _, im, tm), name in zip(members[1:], names[1:], strict=True):
        key = _key(im, tm)
        for field, words in _SAME:
            if key[field] != ref[field]:
                raise FeatureError(f"ensemble member {name} has other {words} than {names[0]} for split "
                                   f"{ref['split']!r}: the runs of an ensemble must embed the same split "
                                   f"with the same ids (rerun get_features_captions.py on the same features)")
    scale = np.float32(1.0 / np.sqrt(len(members)))
    img = np.concatenate([np.asarray(m[0], dtype=np.float32) for m in members], axis=1) * scale
    text = np.concatenate([np.asarray(m[1], dtype=np.float32) for m in members], axis=1) * scale
    described = [{"run": name, "checkpoint": m[3].get("checkpoint"), "epoch": m[3].get("epoch"),
                  "features": m[4].get("features"),
                  "dim": int(np.asarray(m[0]).shape[1]),
                  "files": {n: r["sha256"] for meta in m[3:5] for n, r in meta.get("files", {}).items()}}
                 for m, name in zip(members, names, strict=True)]
    im = dict(members[0][3], run="+".join(names), members=described, dim=int(img.shape[1]))
    tm = dict(members[0][4], run="+".join(names), members=described, dim=int(text.shape[1]))
    return np.ascontiguousarray(img), np.ascontiguousarray(text), members[0][2], im, tm


def averaged_similarity(members: list[tuple]) -> np.ndarray:
    """The ensemble's image-caption similarity written out: ``(N_img, N_cap)`` float64, the mean
    of every member's ``img @ text.T``. A reference for tests and small galleries only: it is
    O(N_img x N_cap) in memory, which :func:`combine` never needs."""
    total = 0.0
    for m in members:
        total = total + np.asarray(m[0], np.float64) @ np.asarray(m[1], np.float64).T
    return total / len(members)


@dataclass
class Scored:
    """What a scoring script works on: one run, or an ensemble of runs.

    ``folder``: where its scores go (the run folder itself, or an ensemble folder beside the first
    run); ``label``: its name in tables; ``emb``: the 5-tuple of :func:`combine`."""

    folder: Path
    label: str
    run_dirs: list[Path]
    emb: tuple

    @property
    def is_ensemble(self) -> bool:
        return len(self.run_dirs) > 1


def ensemble_dir(run_dirs: list[Path]) -> Path:
    """``<first run's parent>/ensemble_<name1>+<name2>...`` (a digest of the names when too long)."""
    import hashlib

    names = "+".join(p.name for p in run_dirs)
    if len(names.encode()) > 200:
        names = f"{len(run_dirs)}runs_" + hashlib.sha256(names.encode()).hexdigest()[:16]
    return run_dirs[0].parent / f"ensemble_{names}"


@contextlib.contextmanager
def opened(run_dirs, split: str, out: str | Path | None = None):
    """Hold every run's shared lock (no retraining under the scores) and yield a :class:`Scored`
    for their embeddings of ``split``: one run as it is, several combined by :func:`combine`."""
    from .embed import load_embeddings
    from .outputs import locked

    run_dirs = [Path(r) for r in run_dirs]
    seen = [r.resolve() for r in run_dirs]
    dupes = sorted({str(r) for r in run_dirs if seen.count(r.resolve()) > 1})
    if dupes:
        raise DataError(f"--run {dupes[0]} is given twice: an ensemble's members are different runs")
    if out is not None and len(run_dirs) == 1:
        raise DataError(f"--out {out} names an ensemble's folder: give two or more --run (one run's scores "
                        "go into its own folder)")
    with contextlib.ExitStack() as stack:
        for r in run_dirs:
            stack.enter_context(locked(r / "run", shared=True, what=f"run {r}"))
        names = [r.name for r in run_dirs]
        emb = combine([load_embeddings(r, split) for r in run_dirs], names)
        folder = run_dirs[0] if len(run_dirs) == 1 else Path(out) if out else ensemble_dir(run_dirs)
        yield Scored(folder, "+".join(names), run_dirs, emb)
