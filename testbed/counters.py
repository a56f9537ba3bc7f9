"""Interface and HTB class byte counters of a running fabric, read over netlink.

Names a counter by the physical thing: (host, nic, direction) for a host's interface, from
the host's point of view, and (host, nic, "rx", class) for the bridge end that shapes what
the host receives. No `tc` text is parsed.
"""

from __future__ import annotations

from pyroute2 import IPRoute

from testbed.qos import HIGH_CLASS, LOW_CLASS
from testbed.state import FabricRecord

CLASS_NAMES = {HIGH_CLASS: "high", LOW_CLASS: "low"}


def _link_bytes(ipr: IPRoute) -> dict[str, tuple[int, int]]:
    found = {}
    for link in ipr.get_links():
        stats = link.get_attr("IFLA_STATS64")
        found[link.get_attr("IFLA_IFNAME")] = (stats["rx_bytes"], stats["tx_bytes"])
    return found


def _class_bytes(ipr: IPRoute, ifname: str) -> dict[str, int]:
    index = ipr.link_lookup(ifname=ifname)
    if not index:
        return {}
    found = {}
    for cls in ipr.get_classes(index=index[0]):
        name = CLASS_NAMES.get(cls["handle"])
        if name:
            found[name] = cls.get_attr("TCA_STATS2").get_attr("TCA_STATS_BASIC")["bytes"]
    return found


def snapshot(record: FabricRecord) -> dict[tuple, int]:
    """Every interface's rx/tx bytes, and per-class bytes each host received on its CNIC."""
    counters: dict[tuple, int] = {}
    for host in record.hosts:
        with IPRoute(netns=f"/proc/{host.pid}/ns/net", flags=0) as ipr:
            links = _link_bytes(ipr)
            for intf in host.interfaces:
                rx, tx = links.get(intf["name"], (0, 0))
                counters[(host.name, intf["name"], "rx")] = rx
                counters[(host.name, intf["name"], "tx")] = tx
                if intf["prioritized"]:
                    for cls, value in _class_bytes(ipr, intf["name"]).items():
                        counters[(host.name, intf["name"], "tx", cls)] = value
    with IPRoute() as ipr:
        for host in record.hosts:
            for intf in host.interfaces:
                if intf["prioritized"]:
                    for cls, value in _class_bytes(ipr, intf["switch_port"]).items():
                        counters[(host.name, intf["name"], "rx", cls)] = value
    return counters


def delta(before: dict[tuple, int], after: dict[tuple, int]) -> dict[tuple, int]:
    return {key: after[key] - before.get(key, 0) for key in after}
