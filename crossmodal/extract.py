"""Feature extraction loops: images and captions of a split -> feature files, resumable and shardable.

Rows are written in fixed chunks (whole batches of images, at most ``MAX_CHUNKS`` per shard;
a block of captions) by :class:`~crossmodal.store.ResumableWriter`, so an interrupted run
continues after the last flushed chunk and ends byte-identical to an uninterrupted one (batches
keep their positions). A shard is the contiguous block of rows ``shard_range(n, I, N)``; shards are
written as ``X.shardIofN.npy`` and :func:`merge_shards` joins them, checking the ids.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .cli import code_version
from .coco import CaptionSplit, load_image
from .decode_ahead import Ahead
from .errors import DataError, FeatureError
from .outputs import check, locked
from .perf import keep_freed_memory
from .runtimes import runtime_identity
from .store import ResumableWriter, check_finite, ids_digest, load_features, read_meta, save_features, sidecar_path

log = logging.getLogger(__name__)

# The writer rewrites its progress record, which lists every chunk so far, after each chunk: with
# one chunk per batch of 4, full COCO's 30,822 chunks cost O(n^2), 80 ms a write at the end
# (about 20 min in all); at most 500 chunks cost under 5 ms each.
MAX_CHUNKS = 500


def shard_range(n: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Rows [start, stop) of shard ``shard`` of ``num_shards`` contiguous blocks of ``n`` rows."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"--shard {shard} out of range for --num-shards {num_shards}")
    return shard * n // num_shards, (shard + 1) * n // num_shards


def resolve_shard(shard: int | None, num_shards: int | None) -> tuple[int, int]:
    """Explicit ``--shard/--num-shards``, else torchrun's RANK/WORLD_SIZE, else (0, 1). Values
    from the environment that are not whole numbers, or a rank outside the world, are one line."""
    if shard is not None or num_shards is not None:
        return int(shard or 0), int(num_shards or 1)
    env = {}
    for name, default, lo in (("RANK", "0", 0), ("WORLD_SIZE", "1", 1)):
        text = os.environ.get(name, default).strip()
        if not (text.isascii() and text.isdigit()) or int(text) < lo:
            raise DataError(f"environment variable {name}={os.environ[name]!r} is not a whole number >= {lo} "
                            "(set by torchrun; or pass --shard I --num-shards N)")
        env[name] = int(text)
    if env["RANK"] >= env["WORLD_SIZE"]:
        raise DataError(f"environment variables RANK={env['RANK']} and WORLD_SIZE={env['WORLD_SIZE']}: the rank "
                        f"must be below the world size (0 to {env['WORLD_SIZE'] - 1})")
    return env["RANK"], env["WORLD_SIZE"]


def shard_path(npy: Path, shard: int, num_shards: int) -> Path:
    return npy if num_shards == 1 else npy.with_name(f"{npy.stem}.shard{shard}of{num_shards}.npy")


def data_digest(kind: str, split: CaptionSplit, start: int, stop: int) -> str:
    """Digest of what rows [start, stop) are made from: each image file's id, size, modification
    and status-change time (``img``, as git's stat cache: a rewrite that restores the mtime still
    moves the ctime; a missing file counts too), or each caption's id and text (``text``). Changed
    data changes the job, so features are never reused for other data."""
    h = hashlib.sha256()
    if kind == "img":
        for i in range(start, stop):
            try:
                st = os.stat(split.image_path(i))
                h.update(f"{split.image_ids[i]}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}\n".encode())
            except OSError:
                h.update(f"{split.image_ids[i]}:missing\n".encode())
    else:
        for cid, text in zip(split.caption_ids[start:stop].tolist(), split.captions[start:stop], strict=True):
            h.update(f"{cid}\0{text}\0".encode())
    return h.hexdigest()[:16]


def _job(kind: str, enc: dict, split: CaptionSplit, ids: np.ndarray, rows: tuple[int, int]) -> dict:
    return {"kind": kind, "encoder": enc["encoder"], "settings": enc["settings"], "weights": enc["weights"],
            "split": split.name, "rows": list(rows), "ids": ids_digest(ids), "data": data_digest(kind, split, *rows)}


def _rebuild_on(job: dict) -> tuple[str, ...]:
    """Job keys whose change means the inputs moved (rebuild, logged) rather than other settings
    (refused without --force): the data (images or captions changed, added or removed: the rows and
    ids a split's output file covers follow its data), and a fastText model this project trained."""
    data = ("data", "rows", "ids")
    return (*data, "weights") if job["weights"].get("source") == "trained" else data


class _Job:
    """One shard of one extraction: its rows, ids, output file and job identity. Used as a
    context manager it holds the output's lock; ``done`` is then the sidecar when the output is
    already up to date, else ``writer`` resumes or starts it."""

    def __init__(self, kind: str, encoder, split: CaptionSplit, all_ids: np.ndarray, npy: Path,
                 shard: tuple[int, int], force: bool, skip_bad: bool = False):
        self.start, self.stop = shard_range(len(all_ids), *shard)
        self.npy = shard_path(Path(npy), *shard)
        self.ids = all_ids[self.start : self.stop]
        self.job = _job(kind, encoder.describe(), split, self.ids, (self.start, self.stop))
        self.meta = _meta(self.job, split)
        if hasattr(encoder, "extra_meta"):
            self.meta.update(encoder.extra_meta(self.npy))
        self.dim, self.force, self.skip_bad = encoder.dim, force, skip_bad
        self.done, self.writer = None, None
        self._lock = locked(self.npy, what=f"feature file {self.npy}")

    def __enter__(self):
        self._lock.__enter__()
        try:
            if self._up_to_date():
                log.info("%s is up to date, skipped (--force redoes it)", self.npy)
                self.done = read_meta(self.npy)
                ResumableWriter.discard(self.npy)  # leftovers of a run killed after it published
                return self
            self.writer = ResumableWriter(self.npy, self.stop - self.start, self.dim, self.job, fresh=self.force)
            self._one_runtime()
        except BaseException:
            self._lock.__exit__(*sys.exc_info())
            raise
        if self.writer.done:
            log.info("resuming %s at row %d of %d", self.npy, self.writer.done, self.stop - self.start)
        return self

    def _one_runtime(self) -> None:
        """One runtime per output: rows an interrupted run encoded with another runtime (ONNX Runtime
        then PyTorch, another export) are not continued, whose vectors differ in their last bits; the
        work starts over (logged), so the sidecar's runtime is the one that made every row."""
        now = runtime_identity(self.meta.get("runtime"))
        was = self.writer.layout.get("runtime")
        if self.writer.done and was != now:
            log.warning("%s: rows 0-%d were encoded by %s, this run encodes with %s: starting over (one runtime per "
                        "output)", self.npy, self.writer.done - 1, _runtime_words(was), _runtime_words(now))
            del self.writer.array
            self.writer = ResumableWriter(self.npy, self.stop - self.start, self.dim, self.job, fresh=True)
        self.writer.layout = {k: v for k, v in self.writer.layout.items() if k != "runtime"}
        if now is not None:  # encoders without a runtime record (test stand-ins) record none
            self.writer.layout["runtime"] = now

    def _up_to_date(self) -> bool:
        what = f"feature file {self.npy}"
        if not check(sidecar_path(self.npy), self.job, self.force, what=what, rebuild_on=_rebuild_on(self.job),
                     full=True):
            return False
        skipped = read_meta(self.npy).get("skipped_ids")
        if skipped and not self.skip_bad:  # made with --skip-bad: the inputs are tried again (fixed ones join)
            log.info("%s skipped %d unreadable inputs (first id %s) and --skip-bad is not given: redoing it", what,
                     len(skipped), skipped[0])
            return False
        return True

    def __exit__(self, *exc):
        return self._lock.__exit__(*exc)

    def progress_bar(self, unit: str, desc: str, enabled: bool):
        return tqdm(total=self.stop - self.start, initial=self.writer.done, unit=unit, desc=desc,
                    disable=not enabled, mininterval=2, smoothing=0.1)


def _runtime_words(identity: dict | None) -> str:
    """``onnxruntime 1.20.1 (export 1a2b...)``, ``torch 2.5.1``, or ``an unrecorded runtime``."""
    if not isinstance(identity, dict):
        return "an unrecorded runtime"
    export = f" (export {identity['export_sha256_16']})" if identity.get("export_sha256_16") else ""
    return f"{identity.get('name')} {identity.get('version')}{export}"


def _meta(job: dict, split: CaptionSplit) -> dict:
    return {"kind": job["kind"], "encoder": job["encoder"], "settings": job["settings"],
            "weights": job["weights"], "split": split.name, "source": split.source, "code_version": code_version()}


class _ImageRows(Dataset):
    """Decoded, preprocessed images of some rows; errors come back as text, not exceptions,
    so the main process can name the file (or count the skip)."""

    def __init__(self, split: CaptionSplit, rows: np.ndarray, preprocess, draft: tuple[int, int] | None = None):
        self.split, self.rows, self.preprocess, self.draft = split, rows, preprocess, draft

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, k):
        i = int(self.rows[k])
        try:
            return self.preprocess(load_image(self.split.image_path(i), int(self.split.image_ids[i]), self.draft)), None
        except DataError as e:
            return None, str(e)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model's threads


def _collate(batch):
    return [b[0] for b in batch], [b[1] for b in batch]


def extract_images(
    split: CaptionSplit, encoder: torch.nn.Module, npy: Path, *, batch_size: int = 4, workers: int = 0,
    device: torch.device | None = None, shard: tuple[int, int] = (0, 1), skip_bad: bool = False,
    force: bool = False, progress: bool = True, prefetch: int | None = None,
) -> dict:
    """Encode the images of ``split`` (this shard's rows) into ``npy``; returns the sidecar.

    ``workers`` DataLoader processes decode the images; with none, a background thread of this
    process decodes up to ``prefetch`` batches ahead of the encoder (default: the encoder's
    ``decode_ahead``, else 0; 0: the main thread decodes each batch before encoding it). The
    same vectors either way: the same decoding and batches, in order."""
    if prefetch is None:
        prefetch = getattr(encoder, "decode_ahead", 0)
    with _Job("img", encoder, split, split.image_ids, npy, shard, force, skip_bad) as j:
        return j.done or _encode_images(j, split, encoder, batch_size, workers, device or torch.device("cpu"),
                                        skip_bad, progress, prefetch)


def batches_per_chunk(rows: int, batch_size: int) -> int:
    """Batches written as one resumable chunk, so that ``rows`` rows make at most MAX_CHUNKS chunks
    (1 up to MAX_CHUNKS batches). Depends on the shard's rows only, so a resumed run keeps it."""
    return max(1, -(-rows // (batch_size * MAX_CHUNKS)))


def _kept_batch_size(writer: ResumableWriter, batch_size: int) -> int:
    """The batch size to encode with: a resumed run keeps its interrupted run's (the encoders round
    a vector a little differently in another batch, so mixing them would not end in the bytes
    of an uninterrupted run); recorded in the progress for a later resume."""
    old = writer.layout.get("batch_size") if writer.done else None
    # unrecorded (progress written before the layout was) or not a positive int: the asked size
    if type(old) is int and old > 0 and old != batch_size:  # noqa: E721 (a bool is not a size)
        log.info("%s resumes with batch size %d, as the run it continues (not %d)", writer.npy, old, batch_size)
        batch_size = old
    writer.layout = {**writer.layout, "batch_size": batch_size}
    return batch_size


def _write(writer: ResumableWriter, chunk: list[np.ndarray], skipped: list[int]) -> None:
    """Write the batches of ``chunk`` (each (B, dim)) as one chunk (``skipped``: its skipped rows) and empty both."""
    writer.write(writer.done, np.concatenate(chunk), skipped_rows=list(skipped))
    chunk.clear()
    skipped.clear()


def _encode_images(j: _Job, split, encoder, batch_size, workers, device, skip_bad, progress, prefetch) -> dict:
    writer = j.writer
    batch_size = _kept_batch_size(writer, batch_size)
    keep_freed_memory()
    encoder = encoder.to(device).eval()
    data = _ImageRows(split, np.arange(j.start + writer.done, j.stop), encoder.preprocess,
                      getattr(encoder, "decode_size", None))  # reduced-size JPEG decoding, when the encoder asks
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers, collate_fn=_collate,
                        worker_init_fn=_one_thread, pin_memory=device.type == "cuda")
    n_skipped = len(writer.skipped)
    bar = j.progress_bar("img", f"{encoder.name} {split.name}", progress)
    batches = Ahead(loader, prefetch) if prefetch > 0 and workers == 0 else contextlib.nullcontext(loader)
    per_chunk, chunk, skipped = batches_per_chunk(j.stop - j.start, batch_size), [], []
    with torch.inference_mode(), batches as loaded:
        for images, errors in loaded:
            bad = [k for k, e in enumerate(errors) if e]
            if bad and not skip_bad:
                raise DataError(f"{errors[bad[0]]} (pass --skip-bad to skip and count unreadable images)")
            for k in bad:
                log.warning("skipped: %s", errors[k])
            good = [im.to(device, non_blocking=True) for im in images if im is not None]
            out = np.zeros((len(images), encoder.dim), dtype=np.float32)
            if good:
                with torch.autocast(device.type, enabled=device.type == "cuda"):
                    feats = encoder(good)
                out[[k for k in range(len(images)) if k not in bad]] = feats.float().cpu().numpy()
            at = writer.done + sum(len(c) for c in chunk)
            skipped += [at + k for k in bad]
            chunk.append(out)
            if len(chunk) == per_chunk:
                _write(writer, chunk, skipped)
            n_skipped += len(bad)
            bar.update(len(images))
        if chunk:
            _write(writer, chunk, skipped)
    bar.close()
    if n_skipped:
        log.warning("%d unreadable images skipped in %s (ids in the sidecar's skipped_ids)", n_skipped, split.name)
    return writer.finish(j.meta, j.ids)


def extract_texts(
    split: CaptionSplit, encoder, npy: Path, *, batch_size: int = 128, chunk: int = 4096,
    shard: tuple[int, int] = (0, 1), force: bool = False, progress: bool = True,
) -> dict:
    """Encode the captions of ``split`` (this shard's rows) into ``npy``; returns the sidecar."""
    with _Job("text", encoder, split, split.caption_ids, npy, shard, force) as j:
        if j.done:
            return j.done
        writer, start, stop = j.writer, j.start, j.stop
        batch_size = _kept_batch_size(writer, batch_size)
        keep_freed_memory()
        bar = j.progress_bar("cap", f"{encoder.name} {split.name}", progress)
        kw = {"batch_size": batch_size} if encoder.name == "bert" else {}
        while writer.done < stop - start:
            lo = start + writer.done
            hi = min(lo + chunk, stop)
            writer.write(writer.done, encoder.encode(split.captions[lo:hi], **kw))
            bar.update(hi - lo)
        bar.close()
        return writer.finish(j.meta, j.ids, image_ids=split.caption_image_ids[start:stop])


def merge_shards(npy: Path, num_shards: int, split: CaptionSplit, kind: str, force: bool = False) -> dict:
    """Join ``X.shardIofN.npy`` (I = 0..N-1) into ``X.npy``; checks that the shards come from one
    job, cover contiguous rows, were made from the split's data as it is now, and that their ids
    are the split's (images for ``kind`` "img", else captions), in order, less the skipped ones.
    The result equals (and is recorded as) the unsharded run's file."""
    npy = Path(npy)
    expected_ids = split.image_ids if kind == "img" else split.caption_ids
    parts = [shard_path(npy, i, num_shards) for i in range(num_shards)]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise FeatureError(f"cannot merge: shard files missing: {', '.join(missing)}")
    with contextlib.ExitStack() as stack:
        for p in parts:  # no shard may change while it is read
            stack.enter_context(locked(p, shared=True, what=f"shard {p}"))
        stack.enter_context(locked(npy, what=f"feature file {npy}"))
        arrays, metas = zip(*(load_features(p) for p in parts), strict=True)
        base = {k: v for k, v in metas[0]["job"].items() if k not in ("rows", "ids", "data")}
        for p, m in zip(parts, metas, strict=True):
            if {k: v for k, v in m["job"].items() if k not in ("rows", "ids", "data")} != base:
                raise FeatureError(f"cannot merge: {p} was made by a different encoder, settings or split than "
                                   f"{parts[0]}")
        runtimes = [runtime_identity(m.get("runtime")) for m in metas]
        if any(r != runtimes[0] for r in runtimes):
            k = next(i for i, r in enumerate(runtimes) if r != runtimes[0])
            raise FeatureError(f"cannot merge: {parts[0]} was encoded by {_runtime_words(runtimes[0])}, {parts[k]} by "
                               f"{_runtime_words(runtimes[k])} (one runtime per output: their vectors differ in the "
                               "last bits); run the shards again with one --runtime and --force")
        rows = [m["job"]["rows"] for m in metas]
        if rows[0][0] != 0 or any(a[1] != b[0] for a, b in zip(rows, rows[1:], strict=False)):
            raise FeatureError(f"cannot merge: shard rows {rows} are not contiguous from 0")
        ids = np.concatenate([np.asarray(m["ids"], dtype=np.int64) for m in metas])
        all_ids = np.concatenate([np.asarray(m["ids"] + m.get("skipped_ids", []), dtype=np.int64) for m in metas])
        if len(np.unique(all_ids)) != len(all_ids):
            raise FeatureError("cannot merge: an id appears in two shards")
        expected = np.asarray(expected_ids, dtype=np.int64)
        skipped = {i for m in metas for i in m.get("skipped_ids", [])}
        if rows[-1][1] != len(expected) or not np.array_equal(ids, expected[[i not in skipped
                                                                             for i in expected.tolist()]]):
            raise FeatureError("cannot merge: the shards' ids do not match the split's ids in order")
        for p, m in zip(parts, metas, strict=True):
            if m["job"].get("data") != data_digest(kind, split, *m["job"]["rows"]):
                raise FeatureError(f"cannot merge: {p} was made from other data than the split holds now (images or "
                                   "captions changed since): run that shard again")
        job = dict(metas[0]["job"], rows=[0, len(expected)], ids=ids_digest(expected),
                   data=data_digest(kind, split, 0, len(expected)))
        if check(sidecar_path(npy), job, force, what=f"feature file {npy}", rebuild_on=_rebuild_on(job), full=True):
            log.info("%s is up to date, skipped (--force redoes it)", npy)
            return read_meta(npy)
        meta = {k: v for k, v in metas[0].items() if k not in ("count", "dim", "created", "files")}
        meta["ids"] = ids.tolist()
        meta["skipped_ids"] = [i for m in metas for i in m.get("skipped_ids", [])]
        if "image_ids" in metas[0]:
            meta["image_ids"] = [i for m in metas for i in m["image_ids"]]
        meta["job"] = job
        meta["merged_from"] = num_shards
        merged = np.concatenate(arrays)
        check_finite(merged, meta["ids"], f"feature file {npy}")
        return save_features(npy, merged, meta)
