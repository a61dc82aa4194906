"""CPU memory behaviour that matters for repeated large caches.

`run_with_cache` of every hook keeps hundreds of MB of activations alive per call. With glibc's
default malloc settings, much of that memory is handed back to the operating system when the
cache is dropped, and the next call page-faults it in again (~172,000 minor faults per call,
every page of ~700 MB, measured on vit_small, batch 8), which makes repeated full caches slower and their
timings scatter. `keep_freed_memory` tells glibc to keep freed memory in the process instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems (4 * 1024 * 1024 * sizeof(long))
MMAP_THRESHOLD_MAX = 32 * 1024 * 1024
_INT_MAX = 2**31 - 1


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None  # musl has no such symbol


def keep_freed_memory() -> bool:
    """Keep memory freed by dropped activations inside the process (glibc only).

    Sets glibc's ``M_MMAP_THRESHOLD`` to its maximum (32 MiB: smaller blocks come from the heap,
    not from fresh ``mmap`` pages) and ``M_TRIM_THRESHOLD`` to 2 GiB (the heap is not trimmed
    back to the OS). Equivalent to starting Python with
    ``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=...:glibc.malloc.trim_threshold=...``, but
    callable from a running notebook. It affects the whole process and cannot be undone; the
    price is that the process's resident memory does not shrink after a large cache is freed.

    Measured with ``python benchmarks/forward.py --keep-freed-memory`` (vit_small, batch 8,
    2 threads): ``run_with_cache`` of every hook went from 1.28-1.64x timm's forward (default
    settings) to 1.19-1.25x. See docs/performance.md.

    Returns:
        True if applied; False where the C library is not glibc (macOS, Windows, musl), where
        it does nothing.
    """
    libc = _glibc()
    if libc is None:
        return False
    ok_mmap = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    ok_trim = libc.mallopt(_M_TRIM_THRESHOLD, _INT_MAX)
    return bool(ok_mmap and ok_trim)


__all__ = ["keep_freed_memory"]
