"""Prometheus metrics of every emulated link, read over netlink (pyroute2), no `tc` text.

Each link is a veth pair: the host's end (cnic, snic, pcie, stor) in the host's namespace
and its switch port on a bridge in the root namespace. Both ends carry an HTB tree: the
host's end shapes what the host sends (`direction="tx"`), the switch port what it receives
(`direction="rx"`). Byte and packet counts of both directions come from the switch ports'
counters (a switch port receives what its host sends), in one netlink dump of the root
namespace; the HTB classes come from each end.

Labels name the physical thing: host, node, gpu ("" for a node or storage host), nic, role,
fabric, direction and, for HTB classes, class: "link" (the whole link), "high" and "low"
(the two priority classes of a CNIC). Bytes and rates are the emulated ones; utilization is
`rate(dualpath_link_bytes_total[5s]) / dualpath_link_rate_bytes`, and
`dualpath_fabric_scale` turns emulated bytes into the real cluster's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from pyroute2 import IPRoute

from testbed.plan import ClusterPlan
from testbed.qos import HIGH_CLASS, LINK_CLASS, LOW_CLASS
from testbed.state import FabricRecord

CLASS_NAMES = {LINK_CLASS: "link", HIGH_CLASS: "high", LOW_CLASS: "low"}
LINK_LABELS = ("host", "node", "gpu", "nic", "role", "fabric", "direction")
CLASS_LABELS = LINK_LABELS + ("class",)


@dataclass(frozen=True, eq=False)
class EmulatedLink:
    labels: tuple[str, ...]                 # LINK_LABELS without the direction
    switch_port: str
    rate_bytes: int
    host_end: tuple[IPRoute, int | None]    # (namespace socket, interface index)
    switch_end: tuple[IPRoute, int | None]


class LinkCollector(Collector):
    """Collects on every scrape; keeps one netlink socket per namespace open meanwhile."""

    def __init__(self, record: FabricRecord, plan: ClusterPlan):
        self.scale = plan.topology.scale
        self.topology = record.topology
        self.root = IPRoute()
        self.namespaces: dict[str, IPRoute] = {}
        self.links: list[EmulatedLink] = []
        for host in record.hosts:
            shaped = [i for i in host.interfaces if i["rate"] is not None]   # not mgmt
            if not shaped:
                continue
            ipr = self.namespaces[host.name] = IPRoute(netns=f"/proc/{host.pid}/ns/net",
                                                       flags=0)
            planned = plan.host(host.name)
            for intf in shaped:
                labels = (host.name, planned.node or "", host.name if host.kind == "gpu" else "",
                          intf["name"], host.role, intf["fabric"])
                self.links.append(EmulatedLink(
                    labels, intf["switch_port"], intf["rate"] // 8,
                    (ipr, _index(ipr, intf["name"])),
                    (self.root, _index(self.root, intf["switch_port"]))))
        self.lock = threading.Lock()     # one scrape at a time on the shared sockets

    def close(self) -> None:
        with self.lock:
            for ipr in (self.root, *self.namespaces.values()):
                ipr.close()
            self.namespaces.clear()

    def collect(self) -> Iterator:
        link_bytes = CounterMetricFamily(
            "dualpath_link_bytes", "Bytes the host sent (tx) or received (rx) on the link",
            labels=LINK_LABELS)
        link_packets = CounterMetricFamily(
            "dualpath_link_packets", "Packets the host sent (tx) or received (rx) on the link",
            labels=LINK_LABELS)
        rate = GaugeMetricFamily(
            "dualpath_link_rate_bytes", "Configured (emulated) rate of the link, bytes/s",
            labels=LINK_LABELS)
        class_bytes = CounterMetricFamily(
            "dualpath_link_class_bytes", "Bytes an HTB class of the link sent", labels=CLASS_LABELS)
        class_packets = CounterMetricFamily(
            "dualpath_link_class_packets", "Packets an HTB class of the link sent",
            labels=CLASS_LABELS)
        drops = CounterMetricFamily(
            "dualpath_link_class_drops", "Packets an HTB class of the link dropped",
            labels=CLASS_LABELS)
        overlimits = CounterMetricFamily(
            "dualpath_link_class_overlimits", "Times an HTB class of the link was over its rate",
            labels=CLASS_LABELS)
        backlog = GaugeMetricFamily(
            "dualpath_link_class_backlog_bytes", "Bytes queued in an HTB class of the link",
            labels=CLASS_LABELS)
        scale = GaugeMetricFamily(
            "dualpath_fabric_scale", "Real-cluster bytes per emulated byte", labels=("topology",))
        scale.add_metric((self.topology,), self.scale)

        with self.lock:
            if not self.namespaces:      # closed
                return
            ports = _link_counters(self.root)
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
                    one = full + (cls,)
                    class_bytes.add_metric(one, stats["bytes"])
                    class_packets.add_metric(one, stats["packets"])
                    drops.add_metric(one, stats["drops"])
                    overlimits.add_metric(one, stats["overlimits"])
                    backlog.add_metric(one, stats["backlog"])
        yield from (link_bytes, link_packets, rate, class_bytes, class_packets, drops,
                    overlimits, backlog, scale)


def _link_counters(ipr: IPRoute) -> dict[str, tuple[tuple[int, int], tuple[int, int]]]:
    """Every interface of a namespace: ((rx bytes, rx packets), (tx bytes, tx packets))."""
    found = {}
    for link in ipr.get_links():
        stats = link.get_attr("IFLA_STATS64")
        found[link.get_attr("IFLA_IFNAME")] = ((stats["rx_bytes"], stats["rx_packets"]),
                                              (stats["tx_bytes"], stats["tx_packets"]))
    return found


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def _class_counters(ipr: IPRoute, index: int | None) -> dict[str, dict[str, int]]:
    """The HTB classes of one interface: bytes, packets, drops, overlimits, backlog."""
    if index is None:
        return {}
    found = {}
    for cls in ipr.get_classes(index=index):
        name = CLASS_NAMES.get(cls["handle"])
        stats2 = cls.get_attr("TCA_STATS2")
        if name is None or stats2 is None:
            continue
        basic, queue = stats2.get_attr("TCA_STATS_BASIC"), stats2.get_attr("TCA_STATS_QUEUE")
        found[name] = {"bytes": basic["bytes"], "packets": basic["packets"],
                       "drops": queue["drops"], "overlimits": queue["overlimits"],
                       "backlog": queue["backlog"]}
    return found
