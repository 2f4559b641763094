"""Memory during training: glibc keeps the memory a training step frees for the next step instead of handing it
back to the kernel (measured in ``bench/train_speed.py``)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import platform
import threading
from collections.abc import Iterator

# glibc mallopt(3) parameters and defaults
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


_kept = [0]  # keep_freed_memory's nesting depth: only the outermost sets and restores
_kept_lock = threading.Lock()


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


@contextlib.contextmanager
def keep_freed_memory(enabled: bool = True) -> Iterator[bool]:
    """While active, glibc keeps freed memory for reuse instead of handing it back to the kernel; yields whether
    it could (glibc only). Nests: the outermost one restores the defaults.

    By default glibc serves every allocation above its mmap threshold (128 KiB to 32 MiB) with a fresh ``mmap``
    and unmaps it on free, so a training step that allocates and frees the same activations every step
    page-faults all of them in again: a 224 px Lite0 fine-tune spent 24 s of 63 s in the kernel, and ran in
    52.6 s with this (``bench/train_speed.py``). Allocations then come from the heap, which stays at the
    run's peak; on exit the defaults return and ``malloc_trim`` releases the free part.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield False
        return
    with _kept_lock:
        _kept[0] += 1
        if _kept[0] == 1:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    try:
        yield True
    finally:
        with _kept_lock:
            _kept[0] -= 1
            if _kept[0] == 0:
                libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
                libc.malloc_trim(0)
