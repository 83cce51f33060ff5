"""CPU performance settings shared by the encoding loops."""

from __future__ import annotations

import ctypes
import functools
import logging
import sys

log = logging.getLogger(__name__)


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the heap instead of handing it back to the kernel.

    A CNN forward pass allocates and frees activation blocks of tens of MB; by default glibc
    serves each with a fresh ``mmap`` and returns it on free, so every pass pays page faults
    to zero new pages again (seen here as system time exceeding user time). With mmap off and
    a high trim threshold, EfficientNet-Lite0 at 800 px ran 2.8x faster on this CPU
    (BENCHMARKS.md). Peak memory is unchanged: the same blocks are reused. No-op off glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4
        ok = libc.mallopt(m_mmap_max, 0) == 1 and libc.mallopt(m_trim_threshold, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    log.debug("glibc malloc: mmap off, trim threshold 1 GiB (%s)", ok)
    return ok
