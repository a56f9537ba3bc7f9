"""Isolation where it matters: decode steps (TPOT) while KV-class traffic floods the
decode GPU's CNIC.

The flood is two saturating TCP streams marked CS1 (the KV class), made with iperf3, into
the decode GPU: one from its own node (the H2D path) and one from a prefill GPU. With the
priority classes on, TPOT stays within 20% of TPOT without the flood; with them off (one
FIFO per CNIC) the all-to-all of every decode step queues behind the KV and TPOT inflates
past 1.35x. The band is 20%, wider than the paper's "virtually unaffected" (its DualPath
TPOT is 1.10x basic's on DS 27B at 0.25 APS, Figure 10): the two iperf3 streams take a
share of this 2-core host themselves, and runs here measured 0.93x to 1.10x with the
classes on. A step's all-to-all overlaps its compute (agents/engine.py), so the FIFO's
queueing shows only where it outlasts the step's compute: runs here measured 1.59x.
"""

from __future__ import annotations

import pytest

from agents.protocol import DSCP_CS1
from testbed.iperf import Flow
from testbed.profile import load_profile
from testbed.request import RequestSpec, run_request
from testbed.state import FabricRecord
from testbed.agentset import RunningCluster
from tests.integration.conftest import topology

SPEC = RequestSpec("ds-27b", 2048, 64, 120, "pe", "n0g0", "n1g0")


def tpot_alone_and_flooded(fabric) -> tuple[float, float]:
    record, plan = FabricRecord.read(), fabric.plan
    alone = run_request(record, plan, SPEC)["decode"]["tpot"]
    target = plan.host("n1g0").address("cnic")
    floods = [Flow(fabric.node(src), fabric.node("n1g0"), target, seconds=8, dscp=DSCP_CS1,
                   port=port) for src, port in (("n1", 5401), ("n0g1", 5402))]
    try:
        import time
        time.sleep(1.0)                     # let the flood fill the queues
        flooded = run_request(record, plan, SPEC)["decode"]["tpot"]
    finally:
        rates = [f.wait().bits_per_second for f in floods]
    link = plan.host("n1g0").interface("cnic").rate
    assert sum(rates) > 0.8 * link, f"the flood did not saturate the CNIC: {rates}"
    return alone, flooded


@pytest.mark.parametrize("classes", [True, False], ids=["priority-classes", "single-fifo"])
def test_decode_tpot_under_kv_flood(classes, record_property):
    topo = topology("1p1d", backend="netns")
    topo = topo.model_copy(update={"qos": topo.qos.model_copy(update={"priority_classes": classes})})
    with RunningCluster(topo) as fabric:
        alone, flooded = tpot_alone_and_flooded(fabric)
    inflation = flooded / alone
    record_property("tpot_alone_ms", round(alone * 1e3, 2))
    record_property("tpot_flooded_ms", round(flooded * 1e3, 2))
    print(f"priority classes {'on' if classes else 'off'}: TPOT {alone * 1e3:.2f} ms alone, "
          f"{flooded * 1e3:.2f} ms under the KV flood ({inflation:.2f}x)")
    if classes:
        # Alone, a step takes the profile's time: its all-to-all runs beside the compute,
        # not after it (in series it added 1-2 ms a step, 12-20% here).
        step = load_profile(SPEC.model).decode_step_seconds(SPEC.context + SPEC.append
                                                            + SPEC.generate / 2)
        assert alone <= 1.10 * step, f"TPOT alone {alone * 1e3:.2f} ms, profile step " \
            f"{step * 1e3:.2f} ms: the all-to-all is not overlapped with the compute"
        assert inflation <= 1.20, f"TPOT inflated {inflation:.2f}x with priority classes on"
    else:
        assert inflation > 1.35, f"a single FIFO should hurt TPOT; it inflated {inflation:.2f}x"
