"""Prometheus metrics of every emulated link, read over rtnetlink (`testbed.rtnl`), no `tc` text.

Each link is a veth pair: the host's end (cnic, snic, pcie, stor) in the host's namespace
and its switch port on a bridge in the root namespace. Both ends carry an HTB tree: the
host's end shapes what the host sends (`direction="tx"`), the switch port what it receives
(`direction="rx"`). Byte and packet counts of both directions come from the switch ports'
counters (a switch port receives what its host sends), in one netlink dump of the root
namespace; the HTB classes come from each end.

Labels name the physical thing: host, node, gpu ("" for a node or storage host), nic, role,
fabric, direction and, for HTB classes, class: "link" (the whole link), "high" and "low"
(the two priority classes of a CNIC). Bytes are the emulated ones; rates are per wall second,
as Prometheus scrapes: `dualpath_link_rate_bytes` is the rate the link is shaped to, the real
rate / scale / time dilation (`testbed.plan`). Utilization is
`rate(dualpath_link_bytes_total[5s]) / dualpath_link_rate_bytes`, a ratio of two wall rates,
so it needs neither factor. An absolute rate in the emulated cluster's time is the wall rate
x `dualpath_time_dilation` (wall seconds per emulated second, `agents.clock`), and
x `dualpath_fabric_scale` too for the real cluster's bytes.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from testbed.plan import ClusterPlan
from testbed.qos import HIGH_CLASS, LINK_CLASS, LOW_CLASS
from testbed.rtnl import RtnlSocket
from testbed.state import FabricRecord

CLASS_NAMES = {LINK_CLASS: "link", HIGH_CLASS: "high", LOW_CLASS: "low"}
LINK_LABELS = ("host", "node", "gpu", "nic", "role", "fabric", "direction")
CLASS_LABELS = LINK_LABELS + ("class",)
# Each counter of an HTB class (testbed.rtnl): its metric family, name and help.
CLASS_FAMILIES = {
    "bytes": (CounterMetricFamily, "dualpath_link_class_bytes",
              "Bytes an HTB class of the link sent"),
    "packets": (CounterMetricFamily, "dualpath_link_class_packets",
                "Packets an HTB class of the link sent"),
    "drops": (CounterMetricFamily, "dualpath_link_class_drops",
              "Packets an HTB class of the link dropped"),
    "overlimits": (CounterMetricFamily, "dualpath_link_class_overlimits",
                   "Times an HTB class of the link was over its rate"),
    "backlog": (GaugeMetricFamily, "dualpath_link_class_backlog_bytes",
                "Bytes queued in an HTB class of the link"),
}


@dataclass(frozen=True, eq=False)
class EmulatedLink:
    labels: tuple[str, ...]                 # LINK_LABELS without the direction
    switch_port: str
    rate_bytes: int
    host_end: tuple[RtnlSocket, int | None]    # (namespace socket, interface index)
    switch_end: tuple[RtnlSocket, int | None]


class LinkCollector(Collector):
    """Collects on every scrape; keeps one netlink socket per namespace open meanwhile."""

    def __init__(self, record: FabricRecord, plan: ClusterPlan):
        self.scale = plan.topology.scale
        self.dilation = plan.topology.dilation
        self.topology = record.topology
        self.root = RtnlSocket()
        self.namespaces: dict[str, RtnlSocket] = {}
        self.links: list[EmulatedLink] = []
        ports = self.root.indexes()
        for host in record.hosts:
            shaped = [i for i in host.interfaces if i["rate"] is not None]   # not mgmt
            if not shaped:
                continue
            ns = self.namespaces[host.name] = RtnlSocket(f"/proc/{host.pid}/ns/net")
            ends = ns.indexes()
            planned = plan.host(host.name)
            for intf in shaped:
                labels = (host.name, planned.node or "", host.name if host.kind == "gpu" else "",
                          intf["name"], host.role, intf["fabric"])
                self.links.append(EmulatedLink(
                    labels, intf["switch_port"], intf["rate"] // 8,
                    (ns, ends.get(intf["name"])), (self.root, ports.get(intf["switch_port"]))))
        self.lock = threading.Lock()     # one scrape at a time on the shared sockets

    def close(self) -> None:
        with self.lock:
            for sock in (self.root, *self.namespaces.values()):
                sock.close()
            self.namespaces.clear()

    def collect(self) -> Iterator:
        link_bytes = CounterMetricFamily(
            "dualpath_link_bytes", "Bytes the host sent (tx) or received (rx) on the link",
            labels=LINK_LABELS)
        link_packets = CounterMetricFamily(
            "dualpath_link_packets", "Packets the host sent (tx) or received (rx) on the link",
            labels=LINK_LABELS)
        rate = GaugeMetricFamily(
            "dualpath_link_rate_bytes",
            "Configured rate of the link as shaped: emulated bytes per wall second",
            labels=LINK_LABELS)
        per_class = {stat: kind(name, documentation, labels=CLASS_LABELS)
                     for stat, (kind, name, documentation) in CLASS_FAMILIES.items()}
        scale = GaugeMetricFamily(
            "dualpath_fabric_scale", "Real-cluster bytes per emulated byte", labels=("topology",))
        scale.add_metric((self.topology,), self.scale)
        dilation = GaugeMetricFamily(
            "dualpath_time_dilation",
            "Time-dilation factor of the fabric: wall seconds per emulated second",
            labels=("topology",))
        dilation.add_metric((self.topology,), self.dilation)

        with self.lock:
            if not self.namespaces:      # closed
                return
            ports = self.root.link_counters()
            classes = {(link, direction): _class_counters(*end)
                       for link in self.links
                       for direction, end in (("tx", link.host_end), ("rx", link.switch_end))}

        for link in self.links:
            # The switch port receives what the host sends, and sends what it receives.
            port_rx, port_tx = ports.get(link.switch_port, ((0, 0), (0, 0)))
            for direction, (sent_bytes, sent_packets) in (("tx", port_rx), ("rx", port_tx)):
                full = link.labels + (direction,)
                link_bytes.add_metric(full, sent_bytes)
                link_packets.add_metric(full, sent_packets)
                rate.add_metric(full, link.rate_bytes)
                for cls, stats in classes[(link, direction)].items():
                    for stat, family in per_class.items():
                        family.add_metric(full + (cls,), stats[stat])
        yield from (link_bytes, link_packets, rate, *per_class.values(), scale, dilation)


def _class_counters(sock: RtnlSocket, index: int | None) -> dict[str, dict[str, int]]:
    """The HTB classes of one interface that we name (link, high, low)."""
    if index is None:
        return {}
    return {CLASS_NAMES[handle]: stats for handle, stats in sock.class_counters(index).items()
            if handle in CLASS_NAMES}
