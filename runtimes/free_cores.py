"""How many of this machine's cores other processes leave free.

llama.cpp's CPU threads meet at a barrier after every operation of the graph (hundreds per token), so one of
them waiting for a core stalls all of them: on a machine whose cores other work also wants, as a desktop
app's always are, all-core decoding runs slower than one thread, with seconds-long stalls (the figures are in
the README's section on threads). `FreeCores` measures, from the kernel's counters, how much CPU the other
processes took over the last fraction of a second, so that the runtime can run on the cores they leave.
"""

from __future__ import annotations

import math
import os
from time import monotonic, process_time

INTERVAL_S = 0.25  # how often the measure is renewed: a few dozen tokens of a small model
FREE_SHARE = 0.75  # a core counts as free when other processes take at most a quarter of it
_PROC_STAT = "/proc/stat"


def machine_cpu_seconds() -> float | None:
    """CPU seconds every process of this machine has run since boot (Linux's /proc/stat: user, nice,
    system, irq, softirq and steal), or None where the system does not say."""
    try:
        with open(_PROC_STAT, "rb") as f:
            fields = f.readline().split()
        if fields[0] != b"cpu":
            return None
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    except (OSError, ValueError, IndexError):
        return None
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class FreeCores:
    """The cores, between 1 and `limit`, that other processes left free of the machine's `cores` (default
    os.cpu_count()) over the last `INTERVAL_S`; `limit` where the system does not say (outside Linux).
    This process's own CPU time is not counted as others' work: using the cores does not make them taken."""

    def __init__(self, limit: int, cores: int | None = None) -> None:
        self.limit = limit
        self.cores = cores or os.cpu_count() or 1
        self.count = limit
        self._last = self._sample()

    @staticmethod
    def _sample() -> tuple[float, float | None, float]:
        return monotonic(), machine_cpu_seconds(), process_time()

    def measure(self) -> int:
        """The free cores now, measured again when the last measure is older than `INTERVAL_S`."""
        wall, machine, own = sample = self._sample()
        last_wall, last_machine, last_own = self._last
        if machine is None or last_machine is None:
            return self.limit
        if wall - last_wall < INTERVAL_S:
            return self.count
        others = max(0.0, (machine - last_machine) - (own - last_own)) / (wall - last_wall)
        free = math.floor(self.cores - others + (1 - FREE_SHARE))
        self.count = max(1, min(self.limit, free))
        self._last = sample
        return self.count
