"""CPU performance and memory settings: glibc's allocator for the encoding loops and the server."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)


@functools.cache
def _glibc():
    """glibc through ctypes, or None (not Linux, or another C library)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the heap instead of handing it back to the kernel.

    A CNN forward pass allocates and frees activation blocks of tens of MB; by default glibc
    serves each with a fresh ``mmap`` and returns it on free, so every pass pays page faults
    to zero new pages again (seen here as system time exceeding user time). With mmap off and
    a high trim threshold, EfficientNet-Lite0 at 800 px ran 2.8x faster on this CPU
    (BENCHMARKS.md). Peak memory is unchanged: the same blocks are reused. No-op off glibc.
    For a long-lived process that must give memory back, see :func:`return_freed_memory`.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    log.debug("glibc malloc: mmap off, trim threshold 1 GiB (%s)", ok)
    return ok


def return_freed_memory() -> bool:
    """Hand the free pages of every malloc arena back to the kernel (glibc ``malloc_trim(0)``).

    Freed blocks of a few MB stay in the heap of the thread that used them (glibc raises its
    mmap threshold after the first large free, and each thread has its own arena), so after a
    burst of large image decodes a server would keep its peak RSS: 50 concurrent 40 MP uploads
    left 3.7 GB of a 12 GB peak behind. The search server calls this when the last upload
    decode of a burst ends (a few ms). Returns whether memory was released; no-op off glibc.
    """
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))
