"""`make bench-fabric`: how faithfully and how fast this machine emulates the fabric.

1. Per link type and scaled rate: the configured rate, what iperf3 gets through the
   emulated link, and their ratio (the rest of the path runs four times faster).
2. Priority isolation shares on a CNIC, both directions.
3. Seconds to bring 1P1D x 4 and 2P4D x 8 up and down, on the docker and netns backends.

Prints tables and writes results/bench-fabric/<timestamp>.json.
"""

from __future__ import annotations

import time

from testbed.agentset import RunningCluster
from testbed.bench import REPO, save
from testbed.fabric import Fabric
from testbed.interrupts import run_interruptible
from testbed.iperf import measure
from testbed.isolation import measure_isolation
from testbed.plan import build_plan
from testbed.qos import DSCP_CS1
from testbed.rates import format_rate
from testbed.report import table
from testbed.topology import load_topology, probe_topology

RATES = [100_000_000, 1_000_000_000, 2_000_000_000]
SECONDS = 5


def _measure_link(nic: str, rate: int) -> float:
    # Everything but the link under test runs 4x faster; the storage link is the SNIC's peer.
    faster = {other: 4 * rate for other in ("cnic", "snic", "pcie", "storage") if other != nic}
    with RunningCluster(probe_topology(rate, **faster), agents=False) as fabric:
        plan, node = fabric.plan, fabric.node
        if nic == "cnic":     # GPU sends through its CNIC to the node's faster pcie
            return measure(node("n0g0"), node("n0"), plan.host("n0").address("pcie"),
                           seconds=SECONDS, dscp=DSCP_CS1)
        if nic == "pcie":     # node sends through its pcie to the GPU's faster CNIC
            return measure(node("n0"), node("n0g0"), plan.host("n0g0").address("cnic"),
                           seconds=SECONDS)
        return measure(node("n0"), node("st0"), plan.host("st0").address("stor"),
                       seconds=SECONDS)


def bench_links() -> list[dict]:
    rows = []
    for nic in ("cnic", "snic", "pcie"):
        for rate in RATES:
            got = _measure_link(nic, rate)
            rows.append(dict(link=nic, configured=rate, iperf3=got, ratio=got / rate))
            print(f"  {nic} at {format_rate(rate)}: {format_rate(got)} ({got / rate:.1%})",
                  flush=True)
    return rows


def bench_isolation() -> list[dict]:
    topology = load_topology(REPO / "topologies/1p1d.yaml", backend="docker")
    with RunningCluster(topology, agents=False) as fabric:
        return [measure_isolation(fabric, d).as_dict() for d in ("tx", "rx")]


def bench_lifecycle() -> list[dict]:
    rows = []
    for name in ("1p1d", "2p4d"):
        for backend in ("docker", "netns"):
            topology = load_topology(REPO / f"topologies/{name}.yaml", backend=backend)
            fabric = Fabric(build_plan(topology))
            fabric.up()
            down = fabric.down()
            rows.append(dict(topology=f"{name} x {topology.gpus_per_node}", backend=backend,
                             hosts=len(fabric.plan.hosts), up_seconds=fabric.up_seconds,
                             down_seconds=down))
            print(f"  {name} {backend}: up {fabric.up_seconds:.1f} s, down {down:.1f} s",
                  flush=True)
    return rows


def main() -> None:
    started = time.strftime("%Y%m%d-%H%M%S")
    print("link rates (iperf3, one TCP flow, through the emulated link):", flush=True)
    links = bench_links()
    print("priority isolation on a 1P1D CNIC (docker):", flush=True)
    isolation = bench_isolation()
    print("startup and teardown:", flush=True)
    lifecycle = bench_lifecycle()

    print()
    print(table(["LINK", "CONFIGURED", "IPERF3", "RATIO"],
                [[r["link"], format_rate(r["configured"]), format_rate(r["iperf3"]),
                  f"{r['ratio']:.3f}"] for r in links]))
    print()
    print(table(["DIRECTION", "CS1 ALONE", "CS1 UNDER EF", "EF SHARED / ALONE", "RECOVERY"],
                [[r["direction"], f"{r['cs1_alone'] / r['link_rate']:.1%}",
                  f"{r['cs1_under_ef'] / r['link_rate']:.2%}",
                  f"{r['ef_shared'] / r['ef_alone']:.1%}",
                  "never" if r["recovery_seconds"] is None else f"{r['recovery_seconds']:.2f} s"]
                 for r in isolation]))
    print()
    print(table(["TOPOLOGY", "BACKEND", "HOSTS", "UP", "DOWN"],
                [[r["topology"], r["backend"], str(r["hosts"]), f"{r['up_seconds']:.1f} s",
                  f"{r['down_seconds']:.1f} s"] for r in lifecycle]))

    save("fabric", started, dict(links=links, isolation=isolation, lifecycle=lifecycle))


if __name__ == "__main__":
    raise SystemExit(run_interruptible("bench", main))
