"""Resource measurements recorded in train_summary.json."""

from __future__ import annotations

import resource


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
