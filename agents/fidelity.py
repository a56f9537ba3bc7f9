"""What an agent measures of its own timeliness, for the run's fidelity verdict
(`testbed.fidelity`): how late its event loop wakes, and how late its emulated GPU kernels end.

Both are kept as log-bucket histograms, cheap to add to and to merge across agents, which
the runner collects (and resets) through the agent's `fidelity` control op.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time

from agents.clock import clock

# Buckets grow by 5% from 1 µs (a value below lands in bucket 0): a quantile is read as its
# bucket's geometric middle, within 2.5% of the true value either way.
BUCKET_GROWTH = 1.05
SMALLEST = 1e-6
LOOP_LAG_PERIOD = 0.1      # wall seconds between event-loop probes: 10 Hz
KERNEL_WINDOW = 1.0        # wall seconds of kernels judged together
CPU_WINDOW = 1.0           # wall seconds over which an agent's CPU share is taken


def freeze_heap() -> None:
    """Leave every object the process holds now out of the collector's later passes. A full
    pass walks the whole heap with the event loop standing still: 25-80 ms in the runner on
    this 2-core host, which its client read as 47-52 ms of emulated loop lag at TDF 2.
    Frozen, a pass walks only what was allocated since: the workload's own objects. Called
    as each workload starts; what an earlier one froze is thawed and collected first, so
    that a process running many (a bench) keeps no run's garbage past the next."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Quantiles:
    """A histogram of non-negative values in log buckets, each value with a weight (1, or
    the time it stands for)."""

    def __init__(self, counts: dict[int, float] | None = None):
        self.counts: dict[int, float] = dict(counts or {})

    def add(self, value: float, weight: float = 1.0) -> None:
        bucket = self.bucket(value)
        self.counts[bucket] = self.counts.get(bucket, 0) + weight

    @staticmethod
    def bucket(value: float) -> int:
        return 0 if value <= SMALLEST else 1 + int(math.log(value / SMALLEST, BUCKET_GROWTH))

    def merge(self, other: "Quantiles") -> "Quantiles":
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        return self

    @property
    def count(self) -> float:
        """The weight of every value added."""
        return sum(self.counts.values())

    def quantile(self, q: float) -> float:
        """The middle of the bucket holding the q-quantile (0 with no values)."""
        if not self.counts:
            return 0.0
        rank, seen = q * self.count, 0.0
        buckets = sorted(self.counts)
        for bucket in buckets:
            seen += self.counts[bucket]
            if seen >= rank:
                break
        return self.middle(bucket)

    def mean(self) -> float:
        """The weighted mean, each value read as its bucket's middle (0 with no values)."""
        total = self.count
        return sum(self.middle(b) * w for b, w in self.counts.items()) / total if total else 0.0

    @staticmethod
    def middle(bucket: int) -> float:
        return 0.0 if bucket == 0 else SMALLEST * BUCKET_GROWTH ** (bucket - 0.5)

    def to_json(self) -> dict[str, float]:
        return {str(bucket): count for bucket, count in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict) -> "Quantiles":
        return cls({int(bucket): float(count) for bucket, count in data.items()})


class LatenessPairs:
    """Each kernel's (lateness, time), both emulated seconds, in the log buckets of
    `Quantiles`, weighted by the GPU time it covers, lateness included. The verdict reads
    `KernelLateness.kernels`; these keep enough to judge the same kernels again against
    another timer granularity, or by absolute lateness (make bench-dilation --rejudge)."""

    def __init__(self, counts: dict[tuple[int, int], float] | None = None):
        self.counts: dict[tuple[int, int], float] = dict(counts or {})

    def add(self, late: float, seconds: float) -> None:
        key = (Quantiles.bucket(late), Quantiles.bucket(seconds))
        self.counts[key] = self.counts.get(key, 0) + seconds + late

    def merge(self, other: "LatenessPairs") -> "LatenessPairs":
        for key, weight in other.counts.items():
            self.counts[key] = self.counts.get(key, 0) + weight
        return self

    def shares(self, beyond: float = 0.0) -> Quantiles:
        """Each kernel's lateness past `beyond` more emulated seconds, as a share of its time:
        `KernelLateness.kernels` when `beyond` is 0, give or take a bucket."""
        shares = Quantiles()
        for (late, seconds), weight in self.counts.items():
            shares.add(max(0.0, Quantiles.middle(late) - beyond)
                       / max(Quantiles.middle(seconds), SMALLEST), weight)
        return shares

    def to_json(self) -> dict[str, float]:
        return {f"{late},{seconds}": weight for (late, seconds), weight in self.counts.items()}

    @classmethod
    def from_json(cls, data: dict) -> "LatenessPairs":
        return cls({tuple(map(int, key.split(","))): float(weight)
                    for key, weight in data.items()})


class KernelLateness:
    """How late an engine's emulated kernels end, before any make-up (agents/gpu.py), as a
    share of their profile time: per kernel, and per KERNEL_WINDOW of the host's time, each
    weighted by the GPU time it covers (lateness included).

    The verdict judges single kernels. This host is a virtual machine whose vCPUs stop for
    a few ms now and then even when it is idle (an asyncio sleep's p99 is 3-4 ms late on an
    idle host, where a busy loop sees gaps of up to 8 ms); one such gap makes a 1 ms kernel
    several times late, so a tail of single kernels is noisy. Over a window a gap is a small
    share, but so is the short lateness of a host only just too slow: make bench-dilation
    found the windows no better a judge, and keeps both for --rejudge."""

    def __init__(self):
        self.kernels = Quantiles()
        self.windows = Quantiles()
        self.pairs = LatenessPairs()
        self._window_started: float | None = None
        self._window_seconds = 0.0      # profile time of the window's kernels
        self._window_late = 0.0

    def add(self, seconds: float, late: float) -> None:
        """One kernel of `seconds` that ended `late` (both emulated)."""
        self.kernels.add(late / seconds, weight=seconds + late)
        self.pairs.add(late, seconds)
        now = time.monotonic()
        if self._window_started is None:
            self._window_started = now
        self._window_seconds += seconds
        self._window_late += late
        if now - self._window_started >= KERNEL_WINDOW:
            self.close_window()

    def close_window(self) -> None:
        if self._window_seconds > 0:
            self.windows.add(self._window_late / self._window_seconds,
                             weight=self._window_seconds + self._window_late)
        self._window_started, self._window_seconds, self._window_late = None, 0.0, 0.0

    def report(self, reset: bool) -> dict:
        self.close_window()     # the last window, however short: its kernels count too
        reply = {"windows": self.windows.to_json(), "kernels": self.kernels.to_json(),
                 "pairs": self.pairs.to_json()}
        if reset:
            self.windows, self.kernels, self.pairs = Quantiles(), Quantiles(), LatenessPairs()
        return reply


class Timeliness:
    """An agent's measures, each weighted by the time it covers, so that one long stall
    counts for all of its duration rather than as one sample among many: event-loop lag
    (emulated seconds, each probe weighted by the time it slept), kernel lateness
    (`KernelLateness`) and the agent's own CPU use: the share of each CPU_WINDOW of wall
    time its process spent on a CPU, weighted by the window's length.

    The CPU share sees what lag does not: an agent busy most of the time on many short
    callbacks (a node or engine taking in KV at a high dilated rate) wakes its probe on
    time, yet every frame it handles waits behind the ones before it, and that queueing
    stretches the emulated pipeline with the host CPU still idle enough."""

    def __init__(self):
        self.loop_lag = Quantiles()
        self.cpu = Quantiles()
        self.kernel_lateness = KernelLateness()
        self.watching: asyncio.Task | None = None
        self.since = time.monotonic()       # the last reset
        self.start_cpu_window()

    def start(self) -> None:
        """Probe the running event loop from now on."""
        self.watching = asyncio.create_task(self.watch_loop())

    def stop(self) -> None:
        if self.watching:
            self.watching.cancel()

    async def watch_loop(self) -> None:
        """Sleep LOOP_LAG_PERIOD at a time; how much later than asked the loop woke is its
        lag: the time every other callback of this agent waited too. Every CPU_WINDOW, the
        share of it the process spent on a CPU."""
        self.start_cpu_window()
        while True:
            started = time.monotonic()
            await asyncio.sleep(LOOP_LAG_PERIOD)
            now = time.monotonic()
            slept = now - started
            if started >= self.since:     # a probe under way at a reset measured before it
                late = clock.emulated(max(0.0, slept - LOOP_LAG_PERIOD))
                self.loop_lag.add(late, weight=clock.emulated(slept))
            window_wall, window_cpu = self.cpu_window
            if now - window_wall >= CPU_WINDOW:
                self.cpu.add((time.process_time() - window_cpu) / (now - window_wall),
                             weight=now - window_wall)
                self.start_cpu_window()

    def start_cpu_window(self) -> None:
        self.cpu_window = (time.monotonic(), time.process_time())     # (wall, CPU) at its start

    def report(self, reset: bool) -> dict:
        reply = {"loop_lag": self.loop_lag.to_json(), "cpu": self.cpu.to_json(),
                 "kernel_lateness": self.kernel_lateness.report(reset)}
        if reset:
            # A new window too: the one under way may hold work from before the reset (a
            # storage agent seeding the workload's KV to disk).
            self.loop_lag, self.cpu = Quantiles(), Quantiles()
            self.since = time.monotonic()
            self.start_cpu_window()
        return reply
