"""Feature store: float32 ``.npy`` arrays with JSON sidecars, published whole, resumable fills.

A feature file ``X.npy`` (N, D) float32 C-contiguous has a sidecar ``X.json`` with at least
``dim``, ``count`` and ``ids`` (COCO ids in row order; caption files also ``image_ids``), plus
``job`` (what produced it: encoder, settings, weights, split, ids digest) and ``files`` (the
array's digest). Writes go through :mod:`crossmodal.outputs`: the array is renamed into place,
then the sidecar written; loading checks the array against the sidecar (digest, shape, ids).

:class:`ResumableWriter` fills the rows of a future feature file in order, chunk by chunk,
into ``X.partial.npy`` (a memory map whose blocks are allocated up front, so a full disk is an
error, not a SIGBUS) and records progress in ``X.progress.json`` after each chunk is flushed, with
the digest of the chunk's rows; a rerun of the same job re-verifies the kept chunks and resumes
after the last one that still matches. Rows are checked finite once, when published. A partial file that is corrupt or
was made by another job is discarded with a logged line. The caller holds the output's lock.
"""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path

import numpy as np

from .errors import FeatureError
from .outputs import (
    disk_errors,
    file_digest,  # noqa: F401 (re-exported: the digest used across stages)
    id_lists_problem,
    ids_digest,  # noqa: F401 (re-exported: its old home)
    publish,
    read_sidecar,
    remove,
    reserve,
    rows_digest,
    save_npy,
    tmp_path,
    verify_files,
    write_json,
)

log = logging.getLogger(__name__)


def safe_split_name(split: str) -> str:
    """A file-safe, unambiguous form of a split name: ``train2017[:70]`` -> ``train2017_0-70``,
    ``train2017[70:]`` -> ``train2017_70-end`` (two slices never share a file)."""
    from .splits import parse_split

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


def save_features(npy: str | Path, array: np.ndarray, meta: dict) -> dict:
    """Publish ``array`` (N, D) as float32 with its sidecar; returns the sidecar. The caller
    holds the output's lock (:func:`crossmodal.outputs.locked`)."""
    npy = Path(npy)
    npy.parent.mkdir(parents=True, exist_ok=True)
    array = np.ascontiguousarray(array, dtype=np.float32)
    meta = _complete_meta(meta, array.shape)
    tmp = tmp_path(npy)
    save_npy(tmp, array)
    return publish(sidecar_path(npy), meta, {npy: tmp})


def _complete_meta(meta: dict, shape) -> dict:
    meta = dict(meta)
    meta["count"], meta["dim"] = int(shape[0]), int(shape[1])
    meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    if len(meta.get("ids", [])) != shape[0]:
        raise FeatureError(f"sidecar lists {len(meta.get('ids', []))} ids for {shape[0]} rows")
    meta["rows_sha256"] = rows_digest(meta)
    return meta


def _check_rows(npy: Path, meta: dict) -> None:
    """Refuse id lists that are not the ones the array was published with (reordered, edited)."""
    problem = id_lists_problem(meta)
    if problem and problem.startswith("holds"):
        raise FeatureError(f"the id lists in the sidecar of {npy} are not the ones its rows were made with (edited or "
                           "reordered): rows and ids would be mismatched; re-run the stage that makes it (it redoes "
                           "the file)")
    if problem:
        raise FeatureError(f"the sidecar of {npy} {problem}; re-run its stage")


def check_finite(array: np.ndarray, ids, what) -> None:
    """Refuse rows holding NaN or infinity before they are published; names the first row's id."""
    for lo in range(0, len(array), 65536):
        bad = ~np.isfinite(array[lo : lo + 65536]).all(axis=1)
        if bad.any():
            r = lo + int(np.argmax(bad))
            raise FeatureError(f"{what}: row {r} (id {ids[r]}) holds NaN or infinite values; not published")


def read_meta(npy: str | Path) -> dict:
    side = sidecar_path(npy)
    if not side.is_file():
        raise FeatureError(f"sidecar {side} of {npy} does not exist")
    try:
        meta = json.loads(side.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FeatureError(f"sidecar {side} is not valid json: {e}") from e
    if not isinstance(meta, dict):
        raise FeatureError(f"sidecar {side} is not a JSON object")
    return meta


def load_features(npy: str | Path, mmap: bool = True) -> tuple[np.ndarray, dict]:
    """Open a feature file (memory-mapped by default) and check it against its sidecar.

    Returns ``(array (N, D) float32, meta)``. Raises :class:`FeatureError` naming the file on
    a missing file, a digest, shape, dtype or id-count mismatch.
    """
    npy = Path(npy)
    if not npy.is_file():
        raise FeatureError(f"feature file {npy} does not exist (run the stage that makes it first)")
    meta = read_meta(npy)
    problem = verify_files(sidecar_path(npy), meta, full=True)  # a feature file is always hashed whole
    if problem:
        raise FeatureError(f"feature file {npy} cannot be trusted: {problem}; re-run the stage that makes it")
    try:
        arr = np.load(npy, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise FeatureError(f"feature file {npy} is not a readable .npy array: {e}") from e
    expect = (meta.get("count"), meta.get("dim"))
    if arr.ndim != 2 or arr.shape != expect:
        raise FeatureError(
            f"feature file {npy} has shape {arr.shape} but its sidecar {sidecar_path(npy)} says "
            f"(count, dim) = {expect}; the two do not belong together, re-run the stage with --force"
        )
    if arr.dtype != np.float32:
        raise FeatureError(f"feature file {npy} has dtype {arr.dtype}, expected float32")
    required = ("ids", "image_ids") if meta.get("kind") == "text" else ("ids",)  # captions: their images too
    missing = [k for k in required if not isinstance(meta.get(k), list)]
    if missing:
        raise FeatureError(f"the sidecar of {npy} lacks the id list {', '.join(missing)}: it was not written by "
                           "this project, or was edited; re-run the stage that makes it with --force")
    for key in ("ids", "image_ids"):
        if key in meta and len(meta[key]) != arr.shape[0]:
            raise FeatureError(f"sidecar {sidecar_path(npy)} lists {len(meta[key])} {key} for {arr.shape[0]} rows")
    _check_rows(npy, meta)
    return arr, meta


def _rows_sha(rows: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.ascontiguousarray(rows).tobytes()).hexdigest()[:16]


def _spans(chunks: list, done: int) -> list:
    """The [start, stop) pairs that chunks written in order from row 0 to ``done`` must have."""
    spans, at = [], 0
    for c in chunks:
        if int(c[1]) <= at:
            return None
        spans.append([at, int(c[1])])
        at = int(c[1])
    return spans if at == done else None


class ResumableWriter:
    """Fill rows [0, n_rows) of a (n_rows, dim) float32 array in chunks, resumably.

    ``job`` identifies the work (encoder, settings, ids digest); progress from a different
    job, a corrupt partial file, or ``fresh=True`` (``--force``) starts over. Rows may be
    marked skipped (unreadable inputs); :meth:`finish` drops them and publishes the file.
    ``layout`` (a dict, e.g. the batch size) is kept in the progress record for a resumed run to
    read: how the rows were computed, where that changes their bytes but not the job.
    """

    def __init__(self, npy: str | Path, n_rows: int, dim: int, job: dict, fresh: bool = False):
        self.npy = Path(npy)
        self.npy.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.npy.with_name(self.npy.stem + ".partial.npy")
        self.progress = self.npy.with_name(self.npy.stem + ".progress.json")
        self.n_rows, self.dim, self.job = n_rows, dim, job
        self.done, self.skipped, self.chunks, self.layout = 0, [], [], {}
        self.array = None if fresh else self._reopen()
        if self.array is None:
            self.done, self.skipped, self.chunks = 0, [], []
            remove(self.partial, self.progress)
            with disk_errors(self.partial, 4 * n_rows * dim):  # the header's write: a full disk names the file
                self.array = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.float32, shape=(n_rows, dim))
            try:
                reserve(self.partial, self.array.offset + self.array.nbytes)
            except OSError:
                del self.array
                remove(self.partial)  # an unbacked map would die with SIGBUS later: never keep it
                raise
            self._save_progress()

    @staticmethod
    def discard(npy: str | Path) -> None:
        """Remove the partial file and progress record of ``npy`` (left by a run killed after publishing)."""
        npy = Path(npy)
        remove(npy.with_name(npy.stem + ".partial.npy"), npy.with_name(npy.stem + ".progress.json"))

    def _reopen(self):
        """The partial array of an interrupted run of this job, or None (reason logged)."""
        if not self.progress.exists() and not self.partial.exists():
            return None
        state = read_sidecar(self.progress)
        why = None
        if state is None:
            why = "its progress record is missing or unreadable"
        elif state.get("job") != self.job or state.get("shape") != [self.n_rows, self.dim]:
            why = "it was made by another job (other settings or rows)"
        else:
            try:
                arr = np.load(self.partial, mmap_mode="r+", allow_pickle=False)
                if arr.shape != (self.n_rows, self.dim) or arr.dtype != np.float32:
                    why = f"it holds a {arr.dtype} array of shape {arr.shape}"
                elif not 0 <= int(state["done"]) <= self.n_rows:
                    why = f"its progress record says {state['done']} rows done"
                elif [c[:2] for c in state["chunks"]] != _spans(state["chunks"], int(state["done"])):
                    why = "its progress record does not list the digests of its chunks"
                elif not all(isinstance(r, int) and 0 <= r < int(state["done"]) for r in state["skipped"]):
                    why = "its progress record lists skipped rows outside the rows done"
                else:
                    self.array, self.layout = arr, dict(state.get("layout") or {})
                    self._keep_verified(state)
                    return arr
            except (OSError, ValueError, EOFError, KeyError, TypeError, IndexError) as e:
                why = f"it cannot be read ({type(e).__name__}: {e})"
        log.warning("discarding the partial output %s of an earlier run: %s", self.partial, why)
        return None

    def _keep_verified(self, state: dict) -> None:
        """Keep the chunks whose rows still match their recorded digests, up to the first that does
        not (rows changed on disk after a kill): the work resumes from there."""
        self.chunks, self.skipped = [], [int(r) for r in state["skipped"]]
        for start, stop, digest in state["chunks"]:
            if _rows_sha(self.array[start:stop]) != digest:
                log.warning("rows %d-%d of the partial output %s do not match their digest (changed on disk "
                            "after an interruption?): redoing them and everything after", start, stop, self.partial)
                break
            self.chunks.append([start, stop, digest])
        self.done = self.chunks[-1][1] if self.chunks else 0
        self.skipped = [r for r in self.skipped if r < self.done]

    def _save_progress(self) -> None:
        state = {"job": self.job, "shape": [self.n_rows, self.dim], "done": self.done, "skipped": self.skipped,
                 "chunks": self.chunks, "layout": self.layout}
        write_json(self.progress, state)

    def write(self, start: int, rows: np.ndarray, skipped_rows=()) -> None:
        """Store ``rows`` (B, dim) at ``start``; must continue exactly where the last chunk ended."""
        if start != self.done:
            raise RuntimeError(f"chunk starts at row {start}, expected {self.done}")
        self.array[start : start + len(rows)] = rows
        self.array.flush()
        self.chunks.append([start, start + len(rows), _rows_sha(self.array[start : start + len(rows)])])
        self.done = start + len(rows)
        self.skipped += [int(r) for r in skipped_rows]
        self._save_progress()

    def finish(self, meta: dict, ids: np.ndarray, image_ids: np.ndarray | None = None) -> dict:
        """Publish the final file. ``ids`` (n_rows,) (and ``image_ids``) are per row, before skips."""
        if self.done != self.n_rows:
            raise RuntimeError(f"finish() after {self.done} of {self.n_rows} rows")
        check_finite(self.array, np.asarray(ids), f"feature file {self.npy}")  # once, at publication
        keep = np.ones(self.n_rows, bool)
        keep[self.skipped] = False
        meta = dict(meta, job=self.job, ids=np.asarray(ids)[keep].tolist())
        if image_ids is not None:
            meta["image_ids"] = np.asarray(image_ids)[keep].tolist()
        meta["skipped_ids"] = np.asarray(ids)[~keep].tolist()
        if keep.all():
            meta = _complete_meta(meta, self.array.shape)
            del self.array
            meta = publish(sidecar_path(self.npy), meta, {self.npy: self.partial})
        else:
            meta = save_features(self.npy, self.array[keep], meta)
            del self.array
            self.partial.unlink()
        self.progress.unlink()
        return meta
