"""This process's memory: its resident set size now (`edgelm info --load`), its proportional set size
(`edgelm serve --slots`) and its high-water mark (the check's peak RSS)."""

from __future__ import annotations

import os
import sys


def resident_memory() -> int | None:
    """This process's resident set size in bytes: psutil where installed, else /proc/self/statm (Linux),
    else None."""
    try:
        import psutil
    except ImportError:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError, AttributeError):
            return None
    return int(psutil.Process().memory_info().rss)


def proportional_memory() -> int | None:
    """This process's memory with pages it maps twice counted once (Linux's PSS, as a second mapping of
    the same file shares its pages), in bytes; the resident set size where the OS does not say."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resident_memory()


def reset_peak_rss() -> None:
    """Reset this process's resident-memory high-water mark where the OS allows it (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_bytes() -> int | None:
    """This process's resident-memory high-water mark in bytes (None where it cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
