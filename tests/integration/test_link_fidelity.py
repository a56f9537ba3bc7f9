"""Link fidelity: one saturating TCP flow gets 90-105% of each link type's shaped rate.

Each link type is measured with everything else on the path four times faster, so the
link under test is the only bottleneck: a broken shaper on it cannot hide behind another.
"""

from __future__ import annotations

import pytest

from testbed.iperf import measure
from testbed.qos import DSCP_CS1
from testbed.topology import probe_topology
from testbed.agentset import RunningCluster

RATES = {"100Mbit": 100_000_000, "1Gbit": 1_000_000_000}
LOW, HIGH = 0.90, 1.05


def check(rate: int, measured: float, what: str) -> None:
    share = measured / rate
    assert LOW <= share <= HIGH, f"{what}: {measured / 1e6:.1f} Mbit/s is {share:.1%} of " \
                                 f"{rate / 1e6:.0f} Mbit/s, expected {LOW:.0%}-{HIGH:.0%}"


@pytest.mark.parametrize("rate_name", RATES)
def test_cnic_and_snic_in_both_directions(rate_name):
    rate = RATES[rate_name]
    topo = probe_topology(rate, pcie=4 * rate, storage=4 * rate)
    with RunningCluster(topo, agents=False) as fabric:
        gpu, node, storage = fabric.node("n0g0"), fabric.node("n0"), fabric.node("st0")
        plan = fabric.plan
        cnic, pcie = plan.host("n0g0").address("cnic"), plan.host("n0").address("pcie")
        snic, stor = plan.host("n0").address("snic"), plan.host("st0").address("stor")
        check(rate, measure(gpu, node, pcie, dscp=DSCP_CS1), f"cnic tx at {rate_name}")
        check(rate, measure(node, gpu, cnic, dscp=DSCP_CS1), f"cnic rx at {rate_name}")
        check(rate, measure(node, storage, stor), f"snic tx at {rate_name}")
        check(rate, measure(storage, node, snic), f"snic rx at {rate_name}")


@pytest.mark.parametrize("rate_name", RATES)
def test_pcie_in_both_directions(rate_name):
    rate = RATES[rate_name]
    topo = probe_topology(rate, cnic=4 * rate, snic=4 * rate, storage=4 * rate)
    with RunningCluster(topo, agents=False) as fabric:
        gpu, node = fabric.node("n0g0"), fabric.node("n0")
        cnic, pcie = fabric.plan.host("n0g0").address("cnic"), fabric.plan.host("n0").address("pcie")
        check(rate, measure(node, gpu, cnic), f"pcie tx at {rate_name}")
        check(rate, measure(gpu, node, pcie), f"pcie rx at {rate_name}")

