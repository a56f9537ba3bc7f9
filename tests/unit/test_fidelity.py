"""The fidelity verdict's arithmetic, on hand-built samples: 1 s windows, each invariant
passing and failing, the percentiles the agents report, and the verdict's one line."""

from __future__ import annotations

import asyncio
import gc
import json
import random
import time

import pytest

from agents.fidelity import (KERNEL_WINDOW, KernelLateness, LatenessPairs, Quantiles,
                             Timeliness, freeze_heap)
from agents.gpu import Gpu
from testbed.bench.dilation import kernel_figure, passes
from testbed.fidelity import (AGENT_CPU_MAX, KERNEL_LATENESS_MAX, LOOP_LAG_MAX, Verdict,
                              agent_cpu_check, cpu_check, kernel_check, link_check, loop_check,
                              pace_window, windows)

RATE = 80_000_000         # bits/s: 10 MB/s, fast enough for 1 s windows


def cpu_samples(idle_shares: list[float], hz: int = 10) -> list[tuple[float, int, int]]:
    """(time, busy, total) jiffies with the given idle share in each second."""
    samples, busy, total, t = [(0.0, 0, 0)], 0, 0, 0.0
    for idle in idle_shares:
        for _ in range(hz):
            t, total, busy = t + 1 / hz, total + 100, busy + round(100 * (1 - idle))
            samples.append((t, busy, total))
    return samples


def link_samples(seconds: float, pace: float, queued: int = 5000, rate: int | None = RATE,
                 hz: int = 10) -> list[tuple]:
    """(time, bytes sent, bytes queued, intended rate) of a link sending at `pace` x RATE."""
    step = 1 / hz
    return [(i * step, round(i * step * pace * RATE / 8), queued, rate)
            for i in range(round(seconds * hz) + 1)]


def test_windows_span_a_second_each_and_share_their_edges():
    found = windows([(i / 10,) for i in range(31)])
    assert len(found) == 3
    assert all(w[-1][0] - w[0][0] == pytest.approx(1.0) for w in found)
    assert found[1][0] == found[0][-1]


def test_cpu_headroom_holds_with_one_busy_window_in_twenty_and_fails_with_two():
    assert cpu_check(cpu_samples([0.5] * 19 + [0.05])).passed
    check = cpu_check(cpu_samples([0.5] * 18 + [0.05] * 2))
    assert not check.passed and check.value == pytest.approx(0.9)
    assert "idle >= 20% in 90.0% of 20 1 s windows (needs 95%)" == check.figure


def test_a_backlogged_link_at_its_rate_keeps_pace_and_one_at_half_does_not():
    assert link_check({"n0:snic rx": link_samples(10, 1.0)}).passed
    check = link_check({"n0:snic rx": link_samples(10, 1.0),
                        "st0:stor tx": link_samples(10, 0.5)})
    assert not check.passed
    assert check.figure.startswith("5 of 10 backlogged windows below 95%")
    assert "worst: st0:stor tx at 50%, 5 of its 5)" in check.figure


def test_a_link_with_an_empty_queue_a_fault_or_a_rate_change_is_not_judged():
    idle = link_samples(10, 0.1, queued=0)                 # slow because nothing to send
    down = link_samples(10, 0.0, rate=None)                # taken down by a fault
    changing = link_samples(10, 0.5)
    changing = [s if s[0] < 0.55 else s[:3] + (RATE // 2,) for s in changing]
    check = link_check({"a": idle, "b": down, "c": changing})
    # c's half second before the change is too short to judge; after it, c keeps its new rate
    assert check.passed and "all 4 backlogged" in check.figure


def test_a_link_busy_in_bursts_is_not_taken_for_backlogged_by_ten_samples_in_a_row():
    """A link busy 70% of the time shows a backlog at ten samples running now and then
    (2.8% of the time): a window spans twenty, so it is judged only if backlogged at all."""
    bursty = link_samples(2, 0.7)
    # backlogged at the first eleven samples, empty at every fifth one after
    bursty = [s if i <= 10 or i % 5 else s[:2] + (0,) + s[3:] for i, s in enumerate(bursty)]
    assert link_check({"n0g0:cnic tx": bursty}).figure == \
        "no link was backlogged for a whole window"
    assert not link_check({"n0g0:cnic tx": link_samples(2, 0.7)}).passed


def test_a_link_slowed_by_a_fault_is_judged_at_its_new_rate_over_windows_sized_for_it():
    """After a rate fault to 1% (800 kbit/s), a link sending half of that is slow. In 1 s
    windows the one segment of slack would hide it; windows sized for the rate in force
    (13 s) do not."""
    fast = link_samples(2, 1.0)
    slowed = [(2 + t, fast[-1][1] + round(t * 0.005 * RATE / 8), 5000, RATE // 100)
              for t in (i / 10 for i in range(1, 301))]
    check = link_check({"n0:snic rx": fast + slowed})
    assert not check.passed and "at 50%" in check.figure


def test_at_a_slow_rate_windows_lengthen_and_one_segment_in_flight_is_not_slowness():
    """At 3 Mbit/s a second holds six 64 KiB segments: a window of whole segments may end
    just before one leaves. Windows then span 20 segments, and one segment short passes."""
    rate = 3_000_000
    window = 20 * 65536 * 8 / rate
    assert pace_window(rate) == pytest.approx(window) and pace_window(RATE * 100) == 2.0
    samples = [(t / 10, (int(t / 10 * rate / 8) // 65536) * 65536, 65536, rate)
               for t in range(0, 301)]                # sent in whole segments, at the rate
    check = link_check({"n0:snic rx": samples})
    assert check.passed and "all 8 backlogged" in check.figure      # 30 s of 3.5 s windows
    slow = [(t, int(sent * 0.85), q, r) for t, sent, q, r in samples]
    assert not link_check({"n0:snic rx": slow}).passed


def test_quantiles_are_within_the_bucket_growth_of_the_truth_and_merge():
    rng = random.Random(1)
    values = [rng.expovariate(100) for _ in range(20_000)]
    half = Quantiles()
    for v in values[:10_000]:
        half.add(v)
    other = Quantiles.from_json(half.to_json())
    for v in values[10_000:]:
        other.add(v)
    merged = Quantiles().merge(half).merge(other)
    assert merged.count == 30_000
    truth = sorted(values[:10_000] * 2 + values[10_000:])[int(0.99 * 30_000)]
    assert truth / 1.03 <= merged.quantile(0.99) <= truth * 1.03
    assert Quantiles().quantile(0.99) == 0.0


def test_the_weighted_mean_is_within_the_bucket_growth_of_the_truth():
    lateness = Quantiles()
    for value, weight in ((0.01, 3.0), (0.1, 1.0), (0.0, 6.0)):
        lateness.add(value, weight=weight)
    truth = (0.01 * 3 + 0.1) / 10
    assert truth / 1.03 <= lateness.mean() <= truth * 1.03
    assert Quantiles().mean() == 0.0


def test_kernel_lateness_and_loop_lag_fail_above_their_thresholds():
    prompt, late = Quantiles(), Quantiles()
    for _ in range(990):
        prompt.add(KERNEL_LATENESS_MAX / 5)
        late.add(KERNEL_LATENESS_MAX / 5)
    for _ in range(10):
        prompt.add(KERNEL_LATENESS_MAX / 2)
        late.add(KERNEL_LATENESS_MAX * 10)
    assert kernel_check(prompt).passed
    assert kernel_check(Quantiles()).passed             # no kernel: nothing late
    failed = Quantiles().merge(late)
    for _ in range(10):
        failed.add(KERNEL_LATENESS_MAX * 10)             # 2% of kernels far too late
    assert not kernel_check(failed).passed
    quick, slow = Quantiles(), Quantiles()
    for _ in range(100):
        quick.add(LOOP_LAG_MAX / 10)
        slow.add(LOOP_LAG_MAX * 2)
    assert loop_check({"n0": quick}, []).passed
    check = loop_check({"n0": quick, "n0g1": slow}, [])
    assert not check.passed and "(n0g1)" in check.figure and "1 of 2 agents over" in check.figure
    assert not loop_check({}, []).passed                # no agent answered: no evidence


def test_an_agent_that_does_not_report_fails_the_loop_check_by_name():
    """The most overloaded agent may be the one that cannot answer in time."""
    quick = Quantiles()
    quick.add(LOOP_LAG_MAX / 10)
    check = loop_check({"n0": quick}, ["n1g0"])
    assert not check.passed and check.figure == "no report from 1 agent(s): n1g0"


def test_a_stall_counts_for_its_whole_length_in_the_loop_lag():
    """One 0.6 s stall among 0.1 s probes is one late probe in a dozen, but half the time:
    weighted by the time each probe slept, the p99 is the stall."""
    async def stalled() -> Timeliness:
        timeliness = Timeliness()
        timeliness.start()
        await asyncio.sleep(0.35)
        time.sleep(0.6)                      # the loop blocked, as by a CPU-starved agent
        await asyncio.sleep(0.35)
        timeliness.stop()
        return timeliness
    lag = asyncio.run(stalled()).loop_lag
    assert lag.quantile(0.99) > 0.3
    assert not loop_check({"n0": lag}, []).passed


def test_a_stall_before_a_reset_does_not_count_after_it():
    """The stall an agent takes as the workload starts (its heap collected and frozen on the
    reset) holds up the probe asleep across it; that probe measured time before the reset."""
    async def reset_after_stall() -> Timeliness:
        timeliness = Timeliness()
        timeliness.start()
        await asyncio.sleep(0.15)
        time.sleep(0.3)                      # the loop blocked just before the reset
        timeliness.report(reset=True)
        await asyncio.sleep(0.35)
        timeliness.stop()
        return timeliness
    lag = asyncio.run(reset_after_stall()).loop_lag
    assert lag.count > 0                     # the probes after the reset were kept
    assert lag.quantile(0.99) < 0.1
    assert loop_check({"n0": lag}, []).passed


def frozen(obj) -> bool:
    """Whether the collector leaves `obj` out: frozen objects are in no generation."""
    return gc.is_tracked(obj) and not any(o is obj for o in gc.get_objects())


def test_freezing_the_heap_leaves_earlier_objects_out_and_thaws_them_next_time():
    try:
        earlier = [[i] for i in range(10)]
        freeze_heap()
        assert gc.get_freeze_count() > 0 and frozen(earlier)
        kept = [[i] for i in range(10)]      # allocated after: still collected as usual
        assert not frozen(kept)
        freeze_heap()                        # the next workload: thawed, collected, frozen
        assert frozen(kept) and frozen(earlier)
    finally:
        gc.unfreeze()
    assert not frozen(kept)


def test_a_late_kernel_weighs_the_time_it_took():
    """A hundred 2 ms kernels on time and one 2 ms kernel 0.3 s late: by count it is 1%, by
    GPU time most of it, and the p99 is its lateness; its window is late as a whole."""
    async def kernels() -> KernelLateness:
        gpu = Gpu()
        for _ in range(100):
            await gpu.run(0.002)
        # call_soon: the stall runs once the kernel waits, even a kernel that makes up the
        # lateness of the ones before it (a busy host) and waits for no time at all.
        asyncio.get_running_loop().call_soon(time.sleep, 0.3)
        await gpu.run(0.002)
        return gpu.lateness
    lateness = asyncio.run(kernels())
    assert lateness.kernels.quantile(0.99) > 50          # 0.3 s late on a 2 ms kernel: 150 times
    lateness.close_window()
    assert lateness.windows.quantile(0.99) > 1           # 0.3 s late over 0.2 s of kernels
    assert not kernel_check(lateness.kernels, lateness.windows).passed


def test_a_gap_in_a_window_of_kernels_is_its_share_of_the_window():
    """A vCPU that stops for 8 ms makes a 1 ms kernel 8 times late, yet over a second of
    kernels it is under 1%; a host that keeps every kernel 20% late shows 20% either way."""
    gap, steady = KernelLateness(), KernelLateness()
    kernels = int(3 * KERNEL_WINDOW / 0.001)
    for i in range(kernels):
        gap.add(0.001, 0.008 if i % 1000 == 500 else 0.0)
        steady.add(0.001, 0.0002)
    started = time.monotonic()
    while time.monotonic() - started < KERNEL_WINDOW:    # the window closes in wall time
        time.sleep(0.05)
    gap.add(0.001, 0.0)
    steady.add(0.001, 0.0002)
    assert gap.kernels.quantile(0.999) > 5
    assert gap.windows.quantile(0.99) < 0.01
    assert 0.19 < steady.windows.quantile(0.99) < 0.21
    assert not kernel_check(steady.kernels, steady.windows).passed
    reply = gap.report(reset=True)
    assert Quantiles.from_json(reply["windows"]).count > 0 and not gap.windows.count


def test_the_verdict_names_each_failed_invariant_with_its_figure():
    good = cpu_check(cpu_samples([0.5] * 20))
    bad = link_check({"n0:snic rx": link_samples(3, 0.5)})
    assert Verdict([good]).summary() == "VALID"
    verdict = Verdict([good, bad])
    assert not verdict.valid
    assert verdict.summary() == f"INVALID: link pace: {bad.figure}"
    assert verdict.to_json()["checks"][1]["passed"] is False


def test_a_check_keeps_the_histograms_its_figure_was_read_from():
    """So a stored run can be judged again at another quantile or threshold."""
    lateness, lag = Quantiles(), Quantiles()
    for i in range(1, 1001):
        lateness.add(i / 1000, weight=0.5)
        lag.add(i / 100_000)
    check = kernel_check(lateness, Quantiles().merge(lateness))
    kept = Quantiles.from_json(check.histograms["kernels"])
    assert kept.quantile(0.99) == check.value
    assert kept.quantile(0.9) == lateness.quantile(0.9) < kept.quantile(0.99)
    assert Quantiles.from_json(check.histograms["windows"]).quantile(0.99) == check.value
    check = loop_check({"n0": lag}, [])
    assert Quantiles.from_json(check.histograms["n0"]).quantile(0.99) == check.value


def test_lateness_pairs_judge_the_same_kernels_again_past_another_granularity():
    """Kept beside the verdict's shares: each kernel's (lateness, time). Read back with no
    more granularity they give the verdict's p99; 2 ms more, and a kernel 3 ms late on 10 ms is
    1 ms late; and they survive results.json and merging."""
    lateness = KernelLateness()
    for _ in range(99):
        lateness.add(0.010, 0.0)
    lateness.add(0.010, 0.003)       # 1.3% of the GPU time: the p99
    report = json.loads(json.dumps(lateness.report(reset=False)))
    pairs = LatenessPairs.from_json(report["pairs"])
    assert lateness.kernels.quantile(0.99) == pytest.approx(0.3, rel=0.03)
    assert pairs.shares().quantile(0.99) == pytest.approx(0.3, rel=0.06)
    assert pairs.shares(beyond=0.002).quantile(0.99) == pytest.approx(0.1, rel=0.12)
    assert pairs.shares(beyond=0.005).quantile(0.99) == 0.0
    assert LatenessPairs().merge(pairs).merge(pairs).shares().count == pytest.approx(
        2 * pairs.shares().count)


def test_an_agent_busy_on_short_callbacks_shows_in_its_cpu_share_not_its_loop_lag():
    """Callbacks of 4 ms back to back keep the process on the CPU most of the time, yet the
    10 Hz probe wakes at most a callback late: the CPU share fails, the lag passes."""
    async def busy() -> Timeliness:
        timeliness = Timeliness()
        timeliness.start()
        until = time.monotonic() + 2.5
        while time.monotonic() < until:
            spin = time.process_time() + 0.004
            while time.process_time() < spin:
                pass
            await asyncio.sleep(0.001)
        timeliness.stop()
        return timeliness
    timeliness = asyncio.run(busy())
    assert timeliness.cpu.count >= 2                       # two whole 1 s windows
    assert timeliness.cpu.quantile(0.5) > 0.5
    assert loop_check({"n0": timeliness.loop_lag}, []).passed
    check = agent_cpu_check({"n0": timeliness.cpu})
    assert not check.passed and "(n0)" in check.figure


def test_agent_cpu_fails_above_its_threshold_by_name_and_with_no_report():
    idle, busy = Quantiles(), Quantiles()
    for _ in range(100):
        idle.add(AGENT_CPU_MAX / 4)
        busy.add(AGENT_CPU_MAX / 4)
    for _ in range(5):
        busy.add(min(1.0, AGENT_CPU_MAX * 1.5))            # 5% of its windows too busy
    assert agent_cpu_check({"n0": idle, "client": idle}).passed
    check = agent_cpu_check({"n0": idle, "n1g0": busy})
    assert not check.passed and "(n1g0)" in check.figure and "1 of 2 agents over" in check.figure
    assert not agent_cpu_check({}).passed                  # no agent answered: no evidence


def test_rejudge_judges_agent_cpu_only_where_a_run_kept_it():
    kept = [{"name": "agent CPU", "passed": True, "value": 0.45}]
    assert passes(kept, 8, ("kernels", 0.99), 0.1, 0.02, 0.95, 0.5)
    assert not passes(kept, 8, ("kernels", 0.99), 0.1, 0.02, 0.95, 0.4)
    assert passes([], 8, ("kernels", 0.99), 0.1, 0.02, 0.95, 0.4)   # stored before it


def test_rejudge_reads_kernels_past_a_coarser_timer_granularity_in_wall_time():
    """A kernel of 10 ms emulated, 3 ms late: past 1 ms more of wall time it is 2 ms late
    at TDF 1, and 3 - 1/8 ms late at TDF 8; a run stored without pairs has no such figure."""
    lateness = KernelLateness()
    lateness.add(0.010, 0.003)
    check = {"histograms": lateness.report(reset=False), "value": 0.3}
    assert kernel_figure(check, ("kernels+1ms", 0.99), tdf=1) == pytest.approx(0.2, rel=0.1)
    assert kernel_figure(check, ("kernels+1ms", 0.99), tdf=8) == pytest.approx(0.2875, rel=0.1)
    assert kernel_figure(check, ("kernels", 0.99), tdf=8) == pytest.approx(0.3, rel=0.05)
    del check["histograms"]["pairs"]
    assert kernel_figure(check, ("kernels+1ms", 0.99), tdf=8) is None
