"""glibc malloc kept from handing a step's tensor memory back to the kernel between steps (DMP_CPU_MALLOC_KEEP).

torch's CPU tensors come straight from malloc. With glibc's defaults a served CPU step's buffers (megabytes each) are
returned to the kernel when freed, by munmap or by trimming the heap, and fault back in, page by page, on the next
step: the runner thread of the demo server took 179-181 minor page faults per image-step (the engine alone, on its
process's main thread, 1-6), and the eager service ran at 0.81-0.85 of the engine alone (bench/README.md, session 21).
A fixed mmap threshold at glibc's largest (32 MiB) and a trim threshold of 1 GiB keep them in the process for
reuse; resident memory then stays near its peak instead of falling between steps. PyTorch's CPU tuning guide reaches
the same end by preloading jemalloc or tcmalloc, which this leaves to the environment: a process started with its
own allocator or malloc settings is not touched.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); above it, mmap as before
TRIM_THRESHOLD = 1024 * 1024 * 1024
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def keep_freed_memory() -> str:
    """Set the thresholds (process-wide, for every allocation from now on) -> what was done, for the log."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "not glibc: left as it is"
    preload = os.environ.get("LD_PRELOAD", "")
    if any(name in preload for name in ("jemalloc", "tcmalloc", "mimalloc")):
        return f"left to the preloaded allocator ({preload})"
    if any(os.environ.get(name) for name in ENVIRONMENT) or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "left to the malloc settings in the environment"
    mallopt = ctypes.CDLL(None).mallopt  # this process's libc
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "mallopt refused the thresholds: left as it is"
    return (f"freed memory kept for reuse (mmap threshold {MMAP_THRESHOLD >> 20} MiB, "
            f"trim threshold {TRIM_THRESHOLD >> 30} GiB)")
