"""The emulation clock: virtual time by a time-dilation factor (TDF).

A 2-core host cannot keep up with a cluster's worth of agents at full speed. Dilating time
(time-warped emulation, NSDI'06; DieCast, NSDI'08) slows the emulated cluster down as a
whole: every link rate is divided by the TDF (where the plan's interface rates are built,
`testbed.plan`) and every emulated duration is multiplied by it (here), so that the host has
TDF times the wall time for the same emulated work. Bytes and tokens are unchanged.

One emulated second is `dilation` wall seconds. Every agent and the client read the TDF
from the topology they are given; a process serves one cluster at a time, so the clock is
one object per process (`clock`), set once the topology is known.

Emulated time is what a user reads; wall time is kept only where the outside world needs
it (Prometheus queries, Grafana annotations, the kernel's own timers and rates).
"""

from __future__ import annotations

import asyncio
import time

MIN_DILATION = 1.0


class Clock:
    def __init__(self, dilation: float = 1.0):
        self.dilation = dilation

    def set_dilation(self, dilation: float) -> None:
        if not MIN_DILATION <= dilation < float("inf"):       # also refuses NaN
            raise ValueError(f"time_dilation: got {dilation!r}, expected a number >= 1")
        self.dilation = float(dilation)

    def now(self) -> float:
        """Emulated seconds on a monotonic clock: for durations within one process."""
        return time.monotonic() / self.dilation

    def time(self) -> float:
        """Emulated seconds since the epoch: for instants compared across hosts, which
        share the TDF and the wall clock."""
        return time.time() / self.dilation

    def wall(self, emulated_seconds: float) -> float:
        """Wall seconds of an emulated duration: what timers and socket timeouts take."""
        return emulated_seconds * self.dilation

    def emulated(self, wall_seconds: float) -> float:
        """Emulated seconds of a wall duration."""
        return wall_seconds / self.dilation

    async def sleep(self, emulated_seconds: float) -> None:
        await asyncio.sleep(max(0.0, emulated_seconds) * self.dilation)

    def pause(self, emulated_seconds: float) -> None:
        """`sleep` for a thread (a fault held for its duration)."""
        time.sleep(max(0.0, emulated_seconds) * self.dilation)


clock = Clock()
