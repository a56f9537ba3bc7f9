"""Watching the host CPU during a run: when it is saturated, the machine, not the emulated
links, set the pace, and the run's figures say less about the cluster than they seem to."""

from __future__ import annotations

import os
import threading
from typing import NamedTuple

BUSY_LIMIT = 0.90      # above this share of all cores, a sample counts as CPU-bound


class CpuTimes(NamedTuple):
    """Jiffies of all cores since boot. Steal (time a hypervisor gave this machine's virtual
    CPUs to someone else) counts as busy: the host could not use it either."""
    busy: int
    total: int
    steal: int


def cpu_times() -> CpuTimes:
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]          # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    return CpuTimes(sum(fields) - idle, sum(fields), steal)


class CpuWatch:
    """Samples the host's CPU use in a background thread while a `with` block runs."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.samples: list[float] = []    # busy share of all cores, per interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "CpuWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        busy, total, _ = cpu_times()
        while not self._stop.wait(self.interval):
            b, t, _ = cpu_times()
            if t > total:
                self.samples.append((b - busy) / (t - total))
            busy, total = b, t

    @property
    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def saturated_share(self) -> float:
        """The share of the run during which the CPU was saturated."""
        if not self.samples:
            return 0.0
        return sum(s >= BUSY_LIMIT for s in self.samples) / len(self.samples)

    def warning(self) -> str | None:
        if self.saturated_share < 0.25:
            return None
        return (f"warning: the host CPU was saturated for {self.saturated_share:.0%} of the run "
                f"(mean {self.mean:.0%} of {os.cpu_count()} cores): the machine, not the "
                f"emulated links, may have limited it; a larger scale factor lightens the load")
