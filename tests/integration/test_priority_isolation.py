"""Priority isolation on a CNIC, in both directions (docker 1P1D fabric).

A KV flow (DSCP CS1) runs for 9 s; a model-execution flow (DSCP EF) on the same CNIC runs
from second 3 to about second 6. The CS1 flow must fill the link alone, shrink to its 1%
guarantee under EF, and refill the link within a second of EF stopping; EF must keep at
least 95% of what it gets alone.
"""

from __future__ import annotations

import time

import pytest

from testbed.iperf import Flow, measure
from testbed.qos import DSCP_CS1, DSCP_EF

RATE = 100_000_000   # 1p1d: 400 Gbit/s CNICs at scale 4000


def mean_rate(intervals, start: float, end: float) -> float:
    inside = [r for s, r in intervals if start <= s and s + 0.1 <= end + 1e-6]
    assert inside, f"no interval within [{start:.1f}, {end:.1f}] s"
    return sum(inside) / len(inside)


@pytest.mark.parametrize("direction", ["tx", "rx"])
def test_ef_preempts_cs1_on_a_cnic(docker_1p1d, direction):
    plan, node = docker_1p1d.plan, docker_1p1d.node
    g0, g1, n0 = (plan.host(h) for h in ("n0g0", "n0g1", "n0"))
    if direction == "tx":     # both flows leave n0g0 through its CNIC
        ef_path = (node("n0g0"), node("n0g1"), g1.address("cnic"))
        cs1_path = (node("n0g0"), node("n0"), n0.address("pcie"))
    else:                     # both flows enter n0g0 through its CNIC
        ef_path = (node("n0g1"), node("n0g0"), g0.address("cnic"))
        cs1_path = (node("n0"), node("n0g0"), g0.address("cnic"))

    ef_alone = measure(*ef_path, seconds=3, dscp=DSCP_EF, port=5301)

    cs1 = Flow(*cs1_path, seconds=9, dscp=DSCP_CS1, port=5302)
    time.sleep(3)
    ef = Flow(*ef_path, seconds=3, dscp=DSCP_EF, port=5303, omit=0.5)
    ef_shared = ef.wait().bits_per_second
    ef_stop = ef.ended - cs1.started          # seconds on the CS1 flow's clock
    ef_start = ef.started - cs1.started
    intervals = cs1.wait().intervals

    cs1_alone = mean_rate(intervals, 1.0, ef_start)
    cs1_under_ef = mean_rate(intervals, ef_start + 0.5, ef_stop - 0.2)
    assert cs1_alone >= 0.90 * RATE, f"CS1 alone got {cs1_alone / 1e6:.1f} Mbit/s"
    assert ef_shared >= 0.95 * ef_alone, \
        f"EF kept {ef_shared / ef_alone:.1%} of its {ef_alone / 1e6:.1f} Mbit/s"
    assert cs1_under_ef <= 0.03 * RATE, f"CS1 under EF got {cs1_under_ef / 1e6:.2f} Mbit/s"
    recovered = [s for s, r in intervals if s >= ef_stop - 0.1 and r >= 0.90 * RATE]
    assert recovered, "CS1 never recovered after EF stopped"
    assert recovered[0] + 0.1 <= ef_stop + 1.0, \
        f"CS1 back to 90% only {recovered[0] + 0.1 - ef_stop:.2f} s after EF stopped"
