"""Locks of outputs (re-exported by :mod:`crossmodal.outputs`): ``fcntl.flock`` on ``<name>.lock``.

A writer holds the lock exclusive for its whole job, a reader shared; nothing waits (unless a caller
gives ``wait``: the ONNX export, which concurrent shards need alike, waits for its maker). A refused
process gets one line naming the live processes that hold the lock, from the kernel's lock table
(``/proc/locks``), so a writer that died (its line is left in the file) or a pid since reused by
another process is never named. The kernel drops a lock with its process: a killed job never
leaves a stale lock. A reader on storage it cannot write proceeds without creating a lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sys
import time
from pathlib import Path

from .errors import CrossmodalError

log = logging.getLogger(__name__)


class OutputBusyError(CrossmodalError, RuntimeError):
    """Another process holds the output's lock."""


def lock_path(path: str | Path) -> Path:
    """``X.npy`` -> ``X.npy.lock``: the file whose kernel lock guards ``X.npy``."""
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (/proc), or None when it is gone:
    with the pid it identifies one process, so a reused pid is never taken for the holder."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _holder_line() -> str:
    cmd = " ".join(Path(sys.argv[0]).name if i == 0 else a for i, a in enumerate(sys.argv))[:200]
    return f"pid {os.getpid()} ({cmd}) since {time.strftime('%Y-%m-%d %H:%M:%S')}\nstart {_proc_start(os.getpid())}"


def _kernel_holders(f) -> list[int]:
    """Pids the kernel lists (/proc/locks) as holding a lock on the open file ``f``; [] if unknown."""
    st = os.fstat(f.fileno())
    dev_ino, ino = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}", f":{st.st_ino}"
    exact, by_inode = [], []
    with contextlib.suppress(OSError):
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if "->" in parts or "FLOCK" not in parts:  # "->": a waiter, not a holder
                continue
            k = parts.index("FLOCK")
            if len(parts) > k + 4 and parts[k + 3].isdigit():
                pid, where = int(parts[k + 3]), parts[k + 4]
                (exact if where == dev_ino else by_inode if where.endswith(ino) else []).append(pid)
    return sorted(set(exact or by_inode))


def _describe(pid: int, recorded: str) -> str | None:
    """``pid N (command) since T`` for a live process; the writer's recorded line when it is that process."""
    start = _proc_start(pid)
    if start is None:
        return None
    lines = recorded.splitlines()
    if len(lines) >= 2 and lines[0].startswith(f"pid {pid} ") and lines[1] == f"start {start}":
        return lines[0]
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmd = "?"
    return f"pid {pid} ({cmd[:200]})"


def _holder(f) -> str:
    """Who holds the lock on ``f`` now: only live processes are named, never a dead or reused pid."""
    f.seek(0)
    recorded = f.read(4096)  # a lock file is a one-line marker; never read a planted huge one whole
    pids = _kernel_holders(f)
    if not pids:  # no kernel listing: trust the recorded writer only if it is still that process
        m = recorded.split(" ", 2)
        pids = [int(m[1])] if len(m) > 2 and m[0] == "pid" and m[1].isdigit() else []
    named = [d for d in (_describe(p, recorded) for p in pids) if d]
    if not named:
        return "another process"
    return ", ".join(named[:3]) + (f" and {len(named) - 3} more" if len(named) > 3 else "")


_READ_ONLY = (errno.EROFS, errno.EACCES, errno.EPERM)


def _open_lock(lp: Path, flags: int):
    """The lock file, never through a symbolic link (a planted link would have a writer truncate
    the file it points to): a link is refused with one line."""
    try:
        fd = os.open(lp, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CrossmodalError(f"lock file {lp} is a symbolic link: remove it (lock files are plain, empty "
                                  "markers)") from None
        raise
    return os.fdopen(fd, "r+" if flags & os.O_RDWR else "r", encoding="utf-8", errors="replace")


def _flock(f, shared: bool, wait: float, what) -> None:
    """flock ``f`` without blocking, retrying for ``wait`` seconds; BlockingIOError when still held."""
    deadline, said = time.monotonic() + wait, False
    while True:
        try:
            fcntl.flock(f, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            if not said:
                log.info("%s is in use by %s: waiting for it (at most %.0f s)", what, _holder(f), wait)
                said = True
            time.sleep(0.1)


@contextlib.contextmanager
def locked(path: str | Path, shared: bool = False, what: str | None = None, wait: float = 0.0):
    """Hold ``path``'s lock (exclusive for a writer, shared for a reader) for the ``with`` block.

    Waits at most ``wait`` seconds (default: never; a wait is logged once, naming the holder):
    when another process still holds it in a conflicting mode, raises
    :class:`OutputBusyError` naming the output and the live processes that hold it (from the
    kernel's lock table; a writer's own line when it is still that process). A reader on storage
    it cannot write (read-only mount, another user's folder) locks an existing lock file through
    a read-only handle, or proceeds without one when there is none (logged at debug level).
    """
    lp = lock_path(path)
    try:
        lp.parent.mkdir(parents=True, exist_ok=True)
        f = _open_lock(lp, os.O_RDWR | os.O_CREAT)
    except OSError as e:
        if not shared or e.errno not in _READ_ONLY:
            raise
        try:
            f = _open_lock(lp, os.O_RDONLY)
        except OSError:
            log.debug("%s is on storage this process cannot write (%s): read without a lock file", path,
                      os.strerror(e.errno))
            yield
            return
    try:
        try:
            _flock(f, shared, wait, what or path)
        except BlockingIOError:
            verb = "read" if shared else "written"
            raise OutputBusyError(
                f"{what or path} is in use by {_holder(f)}; it cannot be {verb} now (wait for that job, or stop "
                "it: its finished work is kept and a rerun resumes)") from None
        if not shared:
            f.seek(0)
            f.truncate()
            f.write(_holder_line() + "\n")
            f.flush()
        yield
    finally:
        f.close()  # releases the lock


