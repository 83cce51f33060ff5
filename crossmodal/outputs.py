"""One owner for an output's life: every stage writes its results through this module.

An *output* is a main file (a feature array, an embedding, a checkpoint, a model, a metrics
file) with a JSON *sidecar* that records what it is and how it was made. The module:

- **locks** it for the whole job (:func:`locked`, ``fcntl.flock`` on ``<name>.lock``): a second
  writer gets one line naming the holder (pid, command, start time); readers may take the lock
  shared, so nothing is replaced under them. The kernel drops a lock with its process, so a
  killed job never leaves a stale lock behind;
- **publishes whole** (:func:`publish`): data files are written under temporary names, then
  renamed into place, and the sidecar is written last, with the digest of every file it
  vouches for. A reader that finds a file whose digest is not the sidecar's (a kill between
  two renames, a truncated copy) treats the output as absent, never as finished;
- **judges "up to date" from content** (:func:`check`): the sidecar's ``job`` (every setting and
  the digests of the inputs) must equal the new job, and each file must match its recorded
  digest. A finished output made with other settings is refused with one line naming the
  differing setting, unless ``--force`` or another name;
- maps a full disk to one line (:class:`DiskFullError`) instead of SIGBUS or a library's message.

Digests are sha256 (16 hex digits). Verifying one reads the file only when its size or
modification time differ from those recorded at publication (the "stat cache" of make and git).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
from pathlib import Path

from .errors import CrossmodalError
from .locks import OutputBusyError, lock_path, locked  # noqa: F401 (re-exported: one module for outputs)

log = logging.getLogger(__name__)


class OutputConflictError(CrossmodalError, RuntimeError):
    """A finished output made with other settings would be replaced."""


class DiskFullError(CrossmodalError, OSError):
    """No space left on the device while writing an output."""


# --- digests ---------------------------------------------------------------------------------


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, 16 hex digits."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def json_digest(obj) -> str:
    """sha256 of a JSON-able object in canonical form, 16 hex digits."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def ids_digest(*arrays) -> str:
    """Short digest of id arrays: identifies the rows a job covers without listing them."""
    import numpy as np

    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(np.asarray(a, dtype=np.int64)).tobytes())
    return h.hexdigest()[:16]


def rows_digest(meta: dict) -> str:
    """Digest of a sidecar's per-row id lists (``ids``, and ``image_ids`` for captions), in order."""
    return ids_digest(*(meta[k] for k in ("ids", "image_ids") if isinstance(meta.get(k), list)))


def id_lists_problem(meta: dict) -> str | None:
    """None when a sidecar's per-row id lists are the ones its rows were published with; else why
    not (one phrase). Readers refuse such a file (:func:`crossmodal.store.load_features`), so
    :func:`check` never calls it up to date."""
    for key in ("ids", "image_ids", "skipped_ids"):
        if key in meta and not (isinstance(meta[key], list) and all(type(i) is int and 0 <= i < 2**63
                                                                    for i in meta[key])):
            return f"lists {key} that are not integers from 0 to 2^63-1"
    job = meta.get("job") if isinstance(meta.get("job"), dict) else {}
    if "rows_sha256" in meta:  # recorded at publication
        bad = meta["rows_sha256"] != rows_digest(meta)
    else:  # older sidecars: the job's digest of the ids it covers
        bad = isinstance(job.get("ids"), str) and "rows" in job and not meta.get("skipped_ids") and \
            isinstance(meta.get("ids"), list) and job["ids"] != ids_digest(meta["ids"])
    return "holds id lists that are not the ones its rows were made with (edited or reordered)" if bad else None


def file_record(path: str | Path) -> dict:
    """What a sidecar records of a published file: digest, size and modification time."""
    st = os.stat(path)
    return {"sha256": file_digest(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def matches_record(path: str | Path, record: dict, full: bool = False) -> bool:
    """True when ``path`` holds the bytes ``record`` describes. Re-hashed only when its stat moved,
    unless ``full``: a file rewritten in place with its size and mtime kept passes the stat cache;
    feature arrays, which every later stage trusts, are always hashed in full (about 1 s per GB)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not isinstance(record, dict) or st.st_size != record.get("size"):
        return False
    if st.st_mtime_ns == record.get("mtime_ns") and not full:
        return True
    return file_digest(path) == record.get("sha256")


# --- writing ---------------------------------------------------------------------------------


def tmp_path(path: str | Path) -> Path:
    """The temporary name ``path`` is written under before :func:`publish` renames it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.tmp{path.suffix}")


def _needed_mb(nbytes: int | None, path: str | Path | None = None) -> str:
    """``, 12.3 MB needed, 0.4 MB free`` (what is known of them)."""
    from .cli import free_mb

    free = free_mb(path) if path else None
    return (f", {nbytes / 1e6:.1f} MB needed" if nbytes else "") + ("" if free is None else f", {free:.1f} MB free")


@contextlib.contextmanager
def disk_errors(path: str | Path, nbytes: int | None = None):
    """Turn ENOSPC/EDQUOT (and the messages libraries wrap them in) into one :class:`DiskFullError` line."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(f"no space left on device writing {path}{_needed_mb(nbytes, path)}") from None
        raise


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and flush it to disk; a full disk is one :class:`DiskFullError` line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with disk_errors(path, len(data)), open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def reserve(path: str | Path, nbytes: int) -> None:
    """Allocate ``nbytes`` for ``path`` up front, so a full disk is an error now, not a SIGBUS
    when a memory map later touches a page that has no block behind it."""
    with disk_errors(path, nbytes):
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, nbytes)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            # filesystems without fallocate: write the zeros ourselves
            size = os.fstat(fd).st_size
            os.lseek(fd, size, os.SEEK_SET)
            for start in range(size, nbytes, 1 << 24):
                os.write(fd, b"\0" * min(1 << 24, nbytes - start))
        finally:
            os.close(fd)


def save_npy(path: str | Path, array) -> None:
    """``np.save`` through :func:`write_bytes` (the array is serialised in memory first)."""
    import numpy as np

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    write_bytes(path, buf.getbuffer())


def save_torch(path: str | Path, obj) -> None:
    """``torch.save`` through :func:`write_bytes` (torch's own writer reports a full disk as an
    internal assertion)."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getbuffer())


def dump_json(obj) -> bytes:
    return (json.dumps(obj, indent=1) + "\n").encode()


def write_json(path: str | Path, obj) -> None:
    """A small JSON file, atomically (temporary name, then rename)."""
    path = Path(path)
    tmp = tmp_path(path)
    write_bytes(tmp, dump_json(obj))
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish(sidecar: str | Path, meta: dict, files: dict[str, Path]) -> dict:
    """Publish an output as one unit. ``files`` maps each final path to the temporary file that
    holds its bytes; each is renamed into place, then the sidecar is written with
    ``meta["files"]`` = {file name: digest record}. Returns the sidecar written."""
    sidecar = Path(sidecar)
    before = (read_sidecar(sidecar) or {}).get("files")
    records = {}
    for final, tmp in files.items():
        final, tmp = Path(final), Path(tmp)
        os.replace(tmp, final)
        records[final.name] = file_record(final)
    meta = dict(meta, files=records)
    write_json(sidecar, meta)
    _fsync_dir(sidecar.parent)
    if isinstance(before, dict):  # files of the replaced version that this one does not have
        remove(*(sidecar.parent / n for n in before if n not in records and "/" not in n and n != ".."))
    return meta


def append_jsonl(path: str | Path, row: dict) -> None:
    """Append one JSON line (the file is append-only). A torn last line left by a killed writer
    is closed off first, so it never swallows the new row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(row) + "\n"
    with disk_errors(path, len(line)), open(path, "ab+") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file; a torn or corrupt line (a killed writer) is skipped with a
    warning instead of failing every reader."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            log.warning("%s line %d is torn or corrupt (an interrupted write?): ignored", path, n)
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


# --- judging what is on disk -----------------------------------------------------------------


def read_sidecar(sidecar: str | Path) -> dict | None:
    """The sidecar's contents, or None when it is absent or not a JSON object."""
    try:
        meta = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def verify_files(sidecar: str | Path, meta: dict, full: bool = False) -> str | None:
    """None when every file the sidecar vouches for is intact; else why not (one phrase).
    ``full``: hash every file, never trusting its size and mtime (:func:`matches_record`)."""
    records = meta.get("files")
    if not isinstance(records, dict) or not records:
        return "its sidecar records no file digests (an older or foreign file)"
    for name, rec in records.items():
        p = Path(sidecar).parent / name
        if not p.is_file():
            return f"{p} is missing"
        if not matches_record(p, rec, full):
            return f"{p} does not match the digest in its sidecar (interrupted write, or changed since)"
    return None


def diff(old, new, prefix: str = "") -> list[str]:
    """Dotted keys where two jobs differ, with both values: ``['settings.input_size: 256 -> 224']``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += diff(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if old == new:
        return []
    short = lambda v: (s if len(s := json.dumps(v, default=str)) <= 40 else s[:37] + "...")  # noqa: E731
    return [f"{prefix[:-1] or 'job'}: {short(old)} -> {short(new)}"]


def check(sidecar: str | Path, job: dict, force: bool = False, what: str | None = None,
          rebuild_on: tuple[str, ...] = (), full: bool = False) -> bool:
    """Decide whether the output behind ``sidecar`` must be (re)made for ``job``.

    Returns True when it is finished, intact and made by exactly ``job`` (the caller skips the
    work), False when it is absent, incomplete or corrupt (logged), or ``force`` is given.
    Raises :class:`OutputConflictError` when a finished, intact output was made by another job,
    naming the differences, unless every difference lies under a key in ``rebuild_on`` (inputs
    that changed upstream: the output is stale and is rebuilt, logged). ``full``: verify the
    files by their whole digest (:func:`matches_record`).
    """
    what = what or str(sidecar)
    meta = read_sidecar(sidecar)
    if meta is None:
        return False
    rows = id_lists_problem(meta)  # a file its readers would refuse is not finished either
    problem = verify_files(sidecar, meta, full) or (f"its sidecar {rows}" if rows else None)
    if problem:
        log.warning("%s is not a finished output (%s): it will be made again", what, problem)
        return False
    if meta.get("job") == job:
        return not force
    if force:
        return False
    changes = diff(meta.get("job"), job)
    if rebuild_on and all(any(c.startswith(k + ".") or c.startswith(k + ":") for k in rebuild_on) for c in changes):
        log.info("%s is stale (%s): rebuilding", what, "; ".join(changes[:3]))
        return False
    raise OutputConflictError(
        f"{what} was made with other settings ({'; '.join(changes[:4])}{'; ...' if len(changes) > 4 else ''}); "
        "pass --force to replace it, or write to another name or folder")


def remove(*paths: str | Path) -> None:
    """Delete files or folders that belong to an output being redone (missing ones are fine)."""
    for p in paths:
        p = Path(p)
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)
