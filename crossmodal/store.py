"""Feature store: float32 ``.npy`` arrays with JSON sidecars, atomic writes, resumable fills.

A feature file ``X.npy`` (N, D) float32 C-contiguous has a sidecar ``X.json`` with at least
``dim``, ``count`` and ``ids`` (COCO ids in row order; caption files also ``image_ids``), plus
``job`` (what produced it: encoder, settings, weights, split) used to decide whether a
stage's output is up to date. Loading checks the array against the sidecar.

:class:`ResumableWriter` fills the rows of a future feature file in order, chunk by chunk,
into ``X.partial.npy`` (a memmap) and records progress in ``X.progress.json`` after each
chunk is flushed; a rerun with the same job resumes after the last recorded chunk, and the
finished array is renamed into place. Nothing finished is lost on interruption.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import numpy as np

from .errors import FeatureError


def safe_split_name(split: str) -> str:
    """A file-safe, unambiguous form of a split name: ``train2017[:70]`` -> ``train2017_0-70``,
    ``train2017[70:]`` -> ``train2017_70-end`` (two slices never share a file)."""
    from .coco import parse_split

    base, sl = parse_split(split)
    safe = re.sub(r"[^A-Za-z0-9_.+-]+", "_", base).strip("_")
    if sl != slice(None):
        safe += f"_{sl.start or 0}-{'end' if sl.stop is None else sl.stop}"
    return safe


def feature_path(features_dir: str | Path, split: str, kind: str, encoder: str) -> Path:
    """``features/<split>_<kind>_<encoder>.npy``; the split name is made file-safe."""
    return Path(features_dir) / f"{safe_split_name(split)}_{kind}_{encoder}.npy"


def check_split(meta: dict, split: str, path: str | Path) -> None:
    """Refuse a feature file made from another split than the one asked for."""
    if meta.get("split") != split:
        raise FeatureError(f"{path} holds features of split {meta.get('split')!r}, not {split!r}")


def sidecar_path(npy: str | Path) -> Path:
    return Path(npy).with_suffix(".json")


def ids_digest(*arrays) -> str:
    """Short digest of id arrays: identifies the rows a job covers without listing them."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: str | Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(obj, indent=1))


def save_features(npy: str | Path, array: np.ndarray, meta: dict) -> None:
    """Write ``array`` (N, D) as float32 and its sidecar, both atomically."""
    npy = Path(npy)
    npy.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.float32)
    meta = _complete_meta(meta, array.shape)
    _save_array(npy, array)
    write_json(sidecar_path(npy), meta)


def _save_array(npy: Path, array: np.ndarray) -> None:
    tmp = npy.with_name(npy.stem + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, npy)


def _complete_meta(meta: dict, shape) -> dict:
    meta = dict(meta)
    meta["count"], meta["dim"] = int(shape[0]), int(shape[1])
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if len(meta.get("ids", [])) != shape[0]:
        raise FeatureError(f"sidecar lists {len(meta.get('ids', []))} ids for {shape[0]} rows")
    return meta


def read_meta(npy: str | Path) -> dict:
    side = sidecar_path(npy)
    if not side.is_file():
        raise FeatureError(f"sidecar {side} of {npy} does not exist")
    try:
        return json.loads(side.read_text())
    except json.JSONDecodeError as e:
        raise FeatureError(f"sidecar {side} is not valid json: {e}") from e


def load_features(npy: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """Open a feature file (memory-mapped by default) and check it against its sidecar.

    Returns ``(array (N, D) float32, meta)``. Raises :class:`FeatureError` naming the file on
    a missing file, a shape, dtype or id-count mismatch.
    """
    npy = Path(npy)
    if not npy.is_file():
        raise FeatureError(f"feature file {npy} does not exist (run the stage that makes it first)")
    meta = read_meta(npy)
    try:
        arr = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as e:
        raise FeatureError(f"feature file {npy} is not a readable .npy array: {e}") from e
    expect = (meta.get("count"), meta.get("dim"))
    if arr.ndim != 2 or arr.shape != expect:
        raise FeatureError(
            f"feature file {npy} has shape {arr.shape} but its sidecar {sidecar_path(npy)} says "
            f"(count, dim) = {expect}; the two do not belong together, re-run the stage with --force"
        )
    if arr.dtype != np.float32:
        raise FeatureError(f"feature file {npy} has dtype {arr.dtype}, expected float32")
    for key in ("ids", "image_ids"):
        if key in meta and len(meta[key]) != arr.shape[0]:
            raise FeatureError(f"sidecar {sidecar_path(npy)} lists {len(meta[key])} {key} for {arr.shape[0]} rows")
    return arr, meta


def is_up_to_date(npy: str | Path, job: dict) -> bool:
    """True when ``npy`` exists, loads cleanly and was made by exactly ``job``."""
    try:
        _, meta = load_features(npy)
    except FeatureError:
        return False
    return meta.get("job") == job


class ResumableWriter:
    """Fill rows [0, n_rows) of a (n_rows, dim) float32 array in chunks, resumably.

    ``job`` identifies the work (encoder, settings, ids digest); progress from a different
    job is discarded. Rows may be marked skipped (unreadable inputs); :meth:`finish` drops
    them and writes the final file with its sidecar.
    """

    def __init__(self, npy: str | Path, n_rows: int, dim: int, job: dict):
        self.npy = Path(npy)
        self.npy.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.npy.with_name(self.npy.stem + ".partial.npy")
        self.progress = self.npy.with_name(self.npy.stem + ".progress.json")
        self.n_rows, self.dim, self.job = n_rows, dim, job
        self.done, self.skipped = 0, []
        state = None
        if self.progress.is_file() and self.partial.is_file():
            try:
                state = json.loads(self.progress.read_text())
            except json.JSONDecodeError:
                state = None
        if state and state.get("job") == job and state.get("shape") == [n_rows, dim]:
            self.array = np.load(self.partial, mmap_mode="r+")
            self.done, self.skipped = int(state["done"]), list(state["skipped"])
        else:
            self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=(n_rows, dim))
            self._save_progress()

    def _save_progress(self) -> None:
        state = {"job": self.job, "shape": [self.n_rows, self.dim], "done": self.done, "skipped": self.skipped}
        _atomic_write_text(self.progress, json.dumps(state))

    def write(self, start: int, rows: np.ndarray, skipped_rows=()) -> None:
        """Store ``rows`` (B, dim) at ``start``; must continue exactly where the last chunk ended."""
        if start != self.done:
            raise RuntimeError(f"chunk starts at row {start}, expected {self.done}")
        self.array[start : start + len(rows)] = rows
        self.array.flush()
        self.done = start + len(rows)
        self.skipped += [int(r) for r in skipped_rows]
        self._save_progress()

    def finish(self, meta: dict, ids: np.ndarray, image_ids: np.ndarray | None = None) -> dict:
        """Write the final file. ``ids`` (n_rows,) (and ``image_ids``) are per row, before skips."""
        if self.done != self.n_rows:
            raise RuntimeError(f"finish() after {self.done} of {self.n_rows} rows")
        keep = np.ones(self.n_rows, bool)
        keep[self.skipped] = False
        meta = dict(meta, job=self.job, ids=np.asarray(ids)[keep].tolist())
        if image_ids is not None:
            meta["image_ids"] = np.asarray(image_ids)[keep].tolist()
        meta["skipped_ids"] = np.asarray(ids)[~keep].tolist()
        if keep.all():
            meta = _complete_meta(meta, self.array.shape)
            del self.array
            os.replace(self.partial, self.npy)
        else:
            kept = np.ascontiguousarray(self.array[keep])
            meta = _complete_meta(meta, kept.shape)
            del self.array
            _save_array(self.npy, kept)
            self.partial.unlink()
        write_json(sidecar_path(self.npy), meta)
        self.progress.unlink()
        return meta
