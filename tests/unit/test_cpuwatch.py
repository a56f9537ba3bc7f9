"""The CPU watch sees real load on this machine, and stays quiet when there is none."""

from __future__ import annotations

import multiprocessing
import os
import time

from testbed.cpuwatch import CpuWatch, cpu_times


def spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_cpu_times_grow():
    busy, total, steal = cpu_times()
    spin(0.2)
    busy2, total2, steal2 = cpu_times()
    assert total2 > total and busy2 > busy
    assert 0 <= steal <= steal2 <= busy2      # steal is part of busy


def test_saturation_is_reported_and_idleness_is_not():
    with CpuWatch(interval=0.2) as idle:
        time.sleep(1.0)
    assert idle.samples and idle.warning() is None

    workers = [multiprocessing.Process(target=spin, args=(1.5,)) for _ in range(os.cpu_count())]
    with CpuWatch(interval=0.2) as busy:
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert busy.mean > 0.8, busy.samples
    assert busy.warning() and "saturated" in busy.warning()
