"""glibc's heap tuned for a process that receives tensors: large freed blocks kept for the next
round's messages, and given back to the OS when a peer's connection ends (a no-op elsewhere)."""
from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def keep_large_buffers() -> None:
    """Make glibc keep freed large blocks for reuse instead of unmapping them.

    Every message of a tensor is a fresh multi-megabyte buffer (libzmq's receive buffer, the arrays
    made from it). By default glibc serves each with mmap and returns it with munmap on free, so every
    message pays a page fault per 4 KiB and the kernel's zeroing: on loopback that cost as much CPU as
    moving the bytes. With blocks up to 32 MiB (glibc's ceiling) served from the heap and the heap not
    trimmed below 1 GiB of free space, the buffers of one round are reused by the next. Once per process."""
    global _malloc_tuned
    if _malloc_tuned:
        return
    _malloc_tuned = True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is None or not hasattr(libc, "mallopt"):
            return  # not glibc: nothing to tune
        libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
    except OSError:
        return


def release_free_memory() -> None:
    """Return the heap's free memory to the OS (glibc ``malloc_trim``; a no-op elsewhere)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        return
