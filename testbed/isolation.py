"""Measuring priority isolation on one CNIC: a KV flow (CS1) against model traffic (EF).

The CS1 flow runs for 10 s; an EF flow on the same CNIC runs from second 3 for 4 s. EF is
measured the same way alone and shared: its first second (slow start) left out. The
result holds what isolation is judged by: CS1 alone, CS1 under EF, EF alone and shared,
and how long CS1 took to refill the link after EF stopped.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from testbed.fabric import Fabric
from testbed.iperf import Flow, measure
from testbed.qos import DSCP_CS1, DSCP_EF


@dataclass
class IsolationResult:
    direction: str
    link_rate: float
    cs1_alone: float
    cs1_under_ef: float
    ef_alone: float
    ef_shared: float
    recovery_seconds: float | None   # None: CS1 never got back to 90% of the link

    def as_dict(self) -> dict:
        return asdict(self)


def _mean(intervals, start: float, end: float) -> float:
    inside = [r for s, r in intervals if start <= s and s + 0.1 <= end + 1e-6]
    return sum(inside) / len(inside) if inside else 0.0


def measure_isolation(fabric: Fabric, direction: str, gpu: str = "n0g0",
                      peer_gpu: str = "n0g1") -> IsolationResult:
    """`direction` "tx": both flows leave `gpu` through its CNIC; "rx": both enter it."""
    plan, node = fabric.plan, fabric.node
    host = plan.host(gpu)
    link_rate = host.interface("cnic").rate
    node_name = host.node
    if direction == "tx":
        ef_path = (node(gpu), node(peer_gpu), plan.host(peer_gpu).address("cnic"))
        cs1_path = (node(gpu), node(node_name), plan.host(node_name).address("pcie"))
    elif direction == "rx":
        ef_path = (node(peer_gpu), node(gpu), host.address("cnic"))
        cs1_path = (node(node_name), node(gpu), host.address("cnic"))
    else:
        raise ValueError(f"direction: got {direction!r}, expected 'tx' or 'rx'")

    ef_alone = measure(*ef_path, seconds=3, dscp=DSCP_EF, port=5301, omit=1.0)
    cs1 = Flow(*cs1_path, seconds=10, dscp=DSCP_CS1, port=5302)
    time.sleep(3)
    ef = Flow(*ef_path, seconds=4, dscp=DSCP_EF, port=5303, omit=1.0)
    ef_shared = ef.wait().bits_per_second
    ef_start, ef_stop = ef.started - cs1.started, ef.ended - cs1.started
    intervals = cs1.wait().intervals

    back = [s for s, r in intervals if s >= ef_stop - 0.1 and r >= 0.90 * link_rate]
    return IsolationResult(
        direction=direction, link_rate=link_rate,
        cs1_alone=_mean(intervals, 1.0, ef_start),
        cs1_under_ef=_mean(intervals, ef_start + 0.5, ef_stop - 0.2),
        ef_alone=ef_alone, ef_shared=ef_shared,
        recovery_seconds=max(0.0, back[0] + 0.1 - ef_stop) if back else None)
