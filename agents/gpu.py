"""One emulated GPU: kernels run one at a time, each for the time the model profile gives it.

The emulator waits for a kernel with a timer, and a busy host wakes it late. Left alone, that
lateness would stretch every step of a busy engine: decode steps of an engine that is also
fetching prompts would take longer than the same steps of an idle one, a cost of the host,
not of the emulated cluster. So each kernel's lateness is made up from the kernels after it:
over a run the GPU is busy for the profile's time, as long as the host keeps up at all.

The make-up hides lateness from the figures, so each kernel's own lateness, before any
make-up, goes to `lateness` for the run's fidelity verdict (agents/fidelity.py): a host
that keeps kernels late is not emulating the cluster, however well the make-up catches up.
Only what the host adds beyond the timer's own granularity counts.

A kernel that follows others back to back (the next decode step, the next layer of a
prefill) is also late by the host's own time to launch it: the Python between its inputs
being ready and its timer starting (the step's bookkeeping, task hops through the event
loop). That time is wall time, not dilated, about 0.2 ms a decode step here: 2% of TPOT at
TDF 1 and nothing at 16. The caller says when the kernel's inputs were ready, and the launch
gap is made up like a late timer. It does not count as kernel lateness: it is the event
loop's own delay, which the verdict judges as loop lag.
Times are emulated seconds (agents/clock.py), `ready` times wall seconds (time.monotonic).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable

from agents.clock import clock
from agents.fidelity import KernelLateness

# The most lateness carried forward. A host so loaded that it falls further behind is limiting
# the run (the fidelity verdict reports that), and catching up more would bunch kernels.
MAX_MADE_UP_SECONDS = 0.1
# How late a timer fires on this idle host, in wall seconds: asyncio waits on epoll with a
# timeout rounded up to whole milliseconds (up to 1 ms), and the VM wakes it up to about 1 ms
# later still (a sleep of a fractional number of ms: p50 1.1 ms late, p99 2.0 ms). The
# fidelity verdict judges what the host adds beyond it; the make-up absorbs the rest.
TIMER_GRANULARITY = 0.002
# A kernel ends on a timer in the engine's event loop. On a shared host, an engine woken by
# its timer waited for whichever agent held the CPU, and each of its sends woke a peer that
# took the CPU from it: on 1P2D at TDF 2 that put DualPath's kernel lateness p99 at 2-12%
# over ten runs, with the host 60% idle. A GPU does not wait for the host's other
# processes, so the engine runs at a real-time priority above every other agent: 0.0-0.5%
# in twelve runs. The kernel's RT throttling still leaves the rest of the host 5% of each
# second, and the verdict still judges the engine's own CPU and the other agents' loops.
ENGINE_RT_PRIORITY = 1


def run_before_other_agents(log: logging.Logger) -> None:
    """This process (and the threads it starts from now on) at ENGINE_RT_PRIORITY; where the
    host does not allow it, the engine runs as before and says so."""
    try:
        os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(ENGINE_RT_PRIORITY))
    except OSError as exc:
        log.warning("no real-time priority for the emulated GPU (%s): on a busy host its "
                    "kernels may end late, which the verdict's kernel lateness will show", exc)


class Gpu:
    def __init__(self, lateness: KernelLateness | None = None):
        self.lock = asyncio.Lock()
        self.late = 0.0          # seconds the kernels so far ran over their profile time
        self.busy = 0.0          # profile seconds of every kernel run
        self.ended = 0.0         # wall time the last kernel completed
        self.lateness = lateness if lateness is not None else KernelLateness()

    async def run(self, seconds: float, ready: float | None = None) -> None:
        """One kernel of `seconds` (profile time); returns when it has completed. `ready`:
        the wall time its inputs were ready, for a kernel that follows others back to back
        (None: the GPU was idle, nothing to make up)."""
        async with self.lock:
            started = time.monotonic()
            if ready is not None:     # launched late by the host: made up like a late timer
                launch_gap = max(0.0, started - max(ready, self.ended))
                self.late = min(MAX_MADE_UP_SECONDS, self.late + clock.emulated(launch_gap))
            made_up = min(self.late, seconds)
            await clock.sleep(seconds - made_up)
            overshoot = clock.emulated(time.monotonic() - started) - (seconds - made_up)
            if seconds > 0:
                beyond_timer = max(0.0, overshoot - clock.emulated(TIMER_GRANULARITY))
                self.lateness.add(seconds, beyond_timer)
            self.late = min(MAX_MADE_UP_SECONDS, self.late - made_up + max(0.0, overshoot))
            self.busy += seconds
            self.ended = time.monotonic()


async def ready_after(work: Awaitable) -> float:
    """Awaits `work`; the wall time it finished, which a kernel waiting on it passes to
    `Gpu.run` as `ready`."""
    await work
    return time.monotonic()
