"""The emulated GPU keeps the profile's time when the host wakes it late."""

from __future__ import annotations

import asyncio
import time

from agents.gpu import MAX_MADE_UP_SECONDS, Gpu


async def kernels_with_a_stalled_host(count: int, seconds: float, stall: float) -> float:
    """`count` kernels back to back while the event loop is blocked for `stall` seconds
    during the first; returns the wall time they took."""
    gpu = Gpu()

    async def stall_host() -> None:
        await asyncio.sleep(seconds / 2)
        time.sleep(stall)          # the host busy elsewhere: the timer fires late

    started = time.monotonic()
    blocker = asyncio.create_task(stall_host())
    for _ in range(count):
        await gpu.run(seconds)
    await blocker
    assert abs(gpu.busy - count * seconds) < 1e-9
    return time.monotonic() - started


def test_a_late_wakeup_is_made_up_by_the_following_kernels():
    elapsed = asyncio.run(kernels_with_a_stalled_host(10, 0.03, 0.08))
    # Without the make-up the run would take at least 0.3 + 0.08 - 0.015 s.
    assert 0.3 - 0.005 <= elapsed < 0.345, elapsed


def test_lateness_beyond_the_cap_is_not_made_up():
    elapsed = asyncio.run(kernels_with_a_stalled_host(20, 0.03, 0.5))
    # 0.6 s of kernels plus the stall less what ran during it (0.015 s) and at most the cap.
    assert elapsed >= 0.6 + 0.5 - 0.015 - MAX_MADE_UP_SECONDS - 0.005, elapsed


async def kernels_launched_late(count: int, seconds: float, launch: float,
                                back_to_back: bool) -> tuple[float, Gpu]:
    """`count` kernels, the host spending `launch` seconds of its own between each kernel's
    inputs being ready and its launch; returns the wall time they took and the GPU."""
    gpu = Gpu()
    started = time.monotonic()
    ready = None
    for _ in range(count):
        time.sleep(launch)                   # the host's bookkeeping before the launch
        await gpu.run(seconds, ready if back_to_back else None)
        ready = time.monotonic()             # the next kernel's inputs are ready now
    return time.monotonic() - started, gpu


def test_the_hosts_launch_gap_between_back_to_back_kernels_is_made_up():
    elapsed, gpu = asyncio.run(kernels_launched_late(10, 0.03, 0.004, back_to_back=True))
    # Ten launches of 4 ms would add 40 ms; all but the first are made up.
    assert 0.3 - 0.005 <= elapsed < 0.3 + 0.004 + 0.012, elapsed
    # The launch gap is the event loop's delay, judged as loop lag, not kernel lateness:
    # counted, the 4 ms gaps alone would put every kernel 13% late.
    assert gpu.lateness.kernels.quantile(0.99) < 0.1, gpu.lateness.kernels.quantile(0.99)


def test_a_kernel_after_idle_time_makes_nothing_up():
    elapsed, _ = asyncio.run(kernels_launched_late(10, 0.03, 0.004, back_to_back=False))
    assert elapsed >= 0.3 + 10 * 0.004 - 0.005, elapsed
