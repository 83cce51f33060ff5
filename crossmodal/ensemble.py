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

New queries (typed sentences, uploaded images) go through every member's encoder and head the
same way: :class:`StackedEncoder` concatenates the members' features, :class:`StackedHead`
projects each member's part with its head and concatenates the results scaled by ``1/sqrt(M)``,
so a query's inner products with ``combine``'s rows are its averaged similarities. Runs are
opened (and checked) by :mod:`crossmodal.runs`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import FeatureError

#: What every member must share, with the words of the refusal.
_SAME = (("split", "split"), ("ids", "image ids"), ("caption_ids", "caption ids"), ("image_ids", "caption image ids"))


def _key(im: dict, tm: dict) -> dict:
    return {"split": im.get("split"), "ids": list(im["ids"]), "caption_ids": list(tm["ids"]),
            "image_ids": list(tm["image_ids"])}


def combine(members: list[tuple], names: list[str]) -> tuple:
    """One embedding set out of several runs' embeddings of one split.

    ``members``: per run, ``(img (N_img, d_m), text (N_cap, d_m), cap_img_rows (N_cap,), img_meta,
    text_meta)`` as :meth:`crossmodal.runs.Run.embeddings` returns it; ``names`` label them in
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


def ensemble_dir(run_dirs: list[Path]) -> Path:
    """``<first run's parent>/ensemble_<name1>+<name2>...`` (a digest of the names when too long)."""
    import hashlib

    names = "+".join(p.name for p in run_dirs)
    if len(names.encode()) > 200:
        names = f"{len(run_dirs)}runs_" + hashlib.sha256(names.encode()).hexdigest()[:16]
    return run_dirs[0].parent / f"ensemble_{names}"


class StackedEncoder:
    """Several members' encoders as one; ``parts[m]`` is member m's (one object may serve several
    members: it runs once per call). Text: :meth:`encode` -> ``(N, sum f_m)`` float32, the members'
    features side by side. Images: :meth:`preprocess` -> one input per distinct encoder, and
    ``self(inputs)`` -> ``(N, sum f_m)`` tensor. :class:`StackedHead` splits them again."""

    def __init__(self, parts: list):
        self.unique: list = []
        for p in parts:
            if not any(p is u for u in self.unique):
                self.unique.append(p)
        self.slot = [next(k for k, u in enumerate(self.unique) if u is p) for p in parts]

    def encode(self, texts: list[str]) -> np.ndarray:
        outs = [u.encode(texts) for u in self.unique]
        return np.ascontiguousarray(np.concatenate([outs[s] for s in self.slot], axis=1), dtype=np.float32)

    def preprocess(self, image) -> tuple:
        return tuple(u.preprocess(image) for u in self.unique)

    def __call__(self, inputs: list[tuple]):
        import torch

        outs = [u([x[k] for x in inputs]) for k, u in enumerate(self.unique)]
        return torch.cat([outs[s] for s in self.slot], dim=1)

    def eval(self):
        for u in self.unique:
            u.eval()
        return self


class StackedHead:
    """Members' heads as one: ``(N, sum f_m)`` features -> ``(N, sum d_m)`` embeddings, member m's
    head applied to its ``f_m`` columns, all scaled by ``1/sqrt(M)`` as :func:`combine` scales."""

    def __init__(self, heads: list):
        self.heads = heads
        self.widths = [h.config["d_in"] for h in heads]

    def __call__(self, x):
        import torch

        parts = torch.split(x, self.widths, dim=1)
        out = torch.cat([h(p) for h, p in zip(self.heads, parts, strict=True)], dim=1)
        return out * float(np.float32(1.0 / np.sqrt(len(self.heads))))
