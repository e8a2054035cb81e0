"""FreeCores counts the cores other processes leave free, from the kernel's counters; llama.cpp's runtime runs
on that many threads when no count is given."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from edgelm.export.gguf import export_gguf
from edgelm.runtimes import free_cores
from edgelm.runtimes.free_cores import INTERVAL_S, FreeCores, machine_cpu_seconds

TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
CORES = 8


class Machine:
    """A machine of `cores` cores whose /proc/stat and clocks the test advances."""

    def __init__(self, stat: Path, cores: int) -> None:
        self.stat, self.cores = stat, cores
        self.wall = self.busy = self.own = 0.0
        self.write()

    def write(self) -> None:
        busy = round(self.busy * TICKS)
        idle = round((self.wall * self.cores - self.busy) * TICKS) + 10**6
        # user nice system idle iowait irq softirq steal guest guest_nice: busy split over user and steal
        self.stat.write_text(f"cpu  {busy - busy // 4} 0 0 {idle} 0 0 0 {busy // 4} 0 0\ncpu0 1 2 3\n")

    def run(self, seconds: float, others: float, own: float) -> None:
        """`seconds` pass with other processes on `others` cores and this one on `own`."""
        self.wall += seconds
        self.busy += seconds * (others + own)
        self.own += seconds * own
        self.write()


@pytest.fixture
def machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Machine:
    fake = Machine(tmp_path / "stat", CORES)
    monkeypatch.setattr(free_cores, "_PROC_STAT", str(tmp_path / "stat"))
    monkeypatch.setattr(free_cores, "monotonic", lambda: fake.wall)
    monkeypatch.setattr(free_cores, "process_time", lambda: fake.own)
    return fake


@pytest.mark.parametrize(
    ("others", "own", "limit", "expected"),
    [
        (0.0, 0.0, 8, 8),  # an idle machine: every core
        (0.0, 8.0, 8, 8),  # this process's own work does not take cores from it
        (3.0, 5.0, 8, 5),  # three cores busy elsewhere
        (2.3, 0.0, 8, 5),  # a core taken by a quarter or more is not free
        (2.2, 0.0, 8, 6),  # ... and one taken by less is
        (0.0, 0.0, 4, 4),  # never more than asked
        (12.0, 0.0, 8, 1),  # an overloaded machine: still one
    ],
)
def test_free_cores_are_those_other_processes_leave(
    machine: Machine, others: float, own: float, limit: int, expected: int
) -> None:
    cores = FreeCores(limit, CORES)
    machine.run(1.0, others, own)
    assert cores.measure() == expected


def test_the_measure_is_renewed_only_after_its_interval(machine: Machine) -> None:
    cores = FreeCores(8, CORES)
    machine.run(1.0, others=4.0, own=0.0)
    assert cores.measure() == 4
    machine.run(INTERVAL_S / 2, others=0.0, own=0.0)
    assert cores.measure() == 4  # too soon: the last measure holds
    machine.run(INTERVAL_S, others=0.0, own=0.0)
    assert cores.measure() == 8  # over the 1.5 intervals since the last measure, nothing else ran


def test_without_the_kernels_counters_every_core_allowed(machine: Machine, tmp_path: Path) -> None:
    cores = FreeCores(6, CORES)
    (tmp_path / "stat").write_text("intr 1 2 3\n")
    machine.wall = 1.0
    assert machine_cpu_seconds() is None
    assert cores.measure() == 6


@pytest.mark.skipif(machine_cpu_seconds() is None, reason="the system has no /proc/stat")
def test_this_machines_counters_see_this_process_work() -> None:
    """The machine's busy seconds grow at least by what this process spent (idle time is not counted:
    on an idle machine a busy loop would otherwise show all cores busy, or none)."""
    import time

    machine, own, wall = machine_cpu_seconds(), time.process_time(), time.monotonic()
    while time.process_time() - own < 0.3:
        np.sort(np.random.default_rng(0).random(100_000))
    machine_spent = (machine_cpu_seconds() or 0.0) - (machine or 0.0)
    own_spent, wall_spent = time.process_time() - own, time.monotonic() - wall
    assert 0.8 * own_spent <= machine_spent <= (os.cpu_count() or 1) * wall_spent + 0.1


def test_llama_cpp_runs_on_the_free_cores(
    checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """threads=None follows FreeCores from one decode to the next; a fixed count does not; the logits are
    those of a fixed count."""
    import llama_cpp

    from edgelm.runtimes.llamacpp import LlamaCppRuntime

    gguf = export_gguf(checkpoint, tmp_path / "m.gguf", "f32")
    free = iter([1, 1, 2])
    monkeypatch.setattr(FreeCores, "measure", lambda self: next(free))
    ids = list(range(3, 20))
    fixed = LlamaCppRuntime(gguf, device="cpu", threads=2, context=64)
    adaptive = LlamaCppRuntime(gguf, device="cpu", context=64)
    try:
        expected = fixed.forward(ids, all_logits=True)
        assert adaptive.forward(ids[:10], all_logits=True) == pytest.approx(expected[:10], abs=1e-5)
        assert llama_cpp.llama_n_threads(adaptive._llama.ctx) == 1
        adaptive.forward(ids[10:12])
        assert llama_cpp.llama_n_threads(adaptive._llama.ctx) == 1
        assert adaptive.forward(ids[12:]) == pytest.approx(expected[-1:], abs=1e-5)
        assert llama_cpp.llama_n_threads(adaptive._llama.ctx) == 2
        assert llama_cpp.llama_n_threads(fixed._llama.ctx) == 2
        with pytest.raises(Exception, match="threads=0 must be a positive number"):
            LlamaCppRuntime(gguf, device="cpu", threads=0)
    finally:
        fixed.close()
        adaptive.close()
