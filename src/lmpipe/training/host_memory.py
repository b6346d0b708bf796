"""Keep freed host memory in the process for the next step instead of handing it back to the OS (Linux, glibc).

Why: glibc serves every allocation above its mmap threshold (32 MB at most) with a fresh `mmap` and unmaps it on
`free`, so on a CPU every step's vocabulary-sized tensors (GPT-2's 50,304 x 384 weight gradient is 77 MB) arrive as
new pages: a page fault and zeroing per 4 KB, every step. It is PyTorch's CPU tuning advice (preload jemalloc or
tcmalloc) done with the C library already loaded, through glibc's documented `mallopt`. The cost: RSS no longer
shrinks after a peak, and the peak is higher where freed holes are not reused. Both, measured, are in
benchmarks/README.md ("Host memory reuse"). Ours because neither torch nor transformers sets it.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc <malloc.h>: -1 disables trimming the heap's free top
M_MMAP_MAX = -4  # glibc <malloc.h>: 0 serves large requests from the heap, never with mmap
NEVER_TRIM = -1


def keep_freed_host_memory() -> bool:
    """Large allocations come from the heap and freed memory stays there for reuse; True when the C library took
    both settings (glibc on Linux), False elsewhere (macOS, musl): then nothing changes."""
    if not sys.platform.startswith("linux"):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, NEVER_TRIM) == 1
