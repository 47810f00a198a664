"""Resource settings and measurements of a training task: the heap's return policy, peak RSS."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import resource

log = logging.getLogger(__name__)

# glibc's mallopt parameter number for M_MMAP_THRESHOLD (malloc.h).
M_MMAP_THRESHOLD = -3
# Blocks at least this big get their own mapping, returned to the kernel on free.
HEAP_MMAP_THRESHOLD_BYTES = 128 * 1024
_heap_policy: str | None = None


def limit_heap_retention(threshold_bytes: int = HEAP_MMAP_THRESHOLD_BYTES) -> str:
    """Fix glibc's mmap threshold so freed batch-sized buffers go back to the kernel.

    glibc raises its mmap threshold each time a mapped block is freed (up to 32 MiB), after
    which every batch tensor of ``model.fit`` comes from the heap arenas, which keep freed
    memory. A fixed 128 KiB threshold (glibc's own starting value) keeps the peak nearer what
    is live: a training task on 5,000 x 224 px peaked at 1,450 instead of 1,511 MiB (anonymous
    1,019 vs 1,099 MiB) in the same wall time (benchmarks/README.md, section 4).

    Idempotent per process. Leaves the heap alone off glibc and when the user set
    ``MALLOC_MMAP_THRESHOLD_`` (glibc has applied theirs). Returns the policy, also logged once.
    """
    global _heap_policy
    if _heap_policy is None:
        _heap_policy = _apply_mmap_threshold(threshold_bytes)
        log.info("heap: %s", _heap_policy)
    return _heap_policy


def _apply_mmap_threshold(threshold_bytes: int) -> str:
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return f"MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']} from the environment, left as set"
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "allocator without mallopt (not glibc): left unchanged"
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)) != 1:
        return f"mallopt(M_MMAP_THRESHOLD, {threshold_bytes}) refused: left unchanged"
    return f"glibc mmap threshold fixed at {threshold_bytes // 1024} KiB (freed buffers return to the kernel)"


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space (VmHWM), MiB.

    Not ru_maxrss: Linux carries it across execve, so a task started by a big parent (an Airflow
    worker) would report the parent's peak (seen: 1,933 MB reported for a 9 MB child).
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # the line reads "VmHWM:  123456 kB"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
