"""Resident memory of the running process, for the benchmarks that measure each row's peak in a process of its own.

Linux's /proc/self/status: `VmRSS` (now) and `VmHWM` (the peak, which writing "5" to /proc/self/clear_refs lowers to
the current size, so that the peaks of imports and set-up do not count). Elsewhere the peak is `getrusage`'s, which
cannot be reset.
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def status_mib(field: str) -> float:
    """A memory field (``VmRSS``, ``VmHWM``) of /proc/self/status in MiB; NaN where there is none."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return float("nan")
    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident_mib() -> float:
    """The resident set size now, MiB."""
    return status_mib("VmRSS")


def peak_resident_mib() -> float:
    """The peak resident set size (since the last `reset_peak_resident`), MiB."""
    peak = status_mib("VmHWM")
    if peak == peak:  # not NaN
        return peak
    scale = 1 / 1024 if sys.platform != "darwin" else 1 / 2**20  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def reset_peak_resident() -> bool:
    """Lower the peak mark to the current resident size (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
