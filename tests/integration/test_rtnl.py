"""The exporter's own rtnetlink reader (testbed/rtnl.py) against pyroute2's full decoder, on
a live fabric: the same link and HTB class counters, in every namespace."""

from __future__ import annotations

from pyroute2 import IPRoute

from testbed.agentset import RunningCluster
from testbed.plan import BRIDGES
from testbed.rtnl import RtnlSocket
from testbed.state import FabricRecord
from tests.integration.conftest import topology


def pyroute2_counters(ipr: IPRoute) -> tuple[dict, dict]:
    links, classes = {}, {}
    for link in ipr.get_links():
        s = link.get_attr("IFLA_STATS64")
        links[link.get_attr("IFLA_IFNAME")] = ((s["rx_bytes"], s["rx_packets"]),
                                               (s["tx_bytes"], s["tx_packets"]))
        for cls in ipr.get_classes(index=link["index"]):
            stats = cls.get_attr("TCA_STATS2")
            basic, queue = stats.get_attr("TCA_STATS_BASIC"), stats.get_attr("TCA_STATS_QUEUE")
            classes[(link["index"], cls["handle"])] = dict(
                bytes=basic["bytes"], packets=basic["packets"], drops=queue["drops"],
                overlimits=queue["overlimits"], backlog=queue["backlog"])
    return links, classes


def rtnl_counters(sock: RtnlSocket) -> tuple[dict, dict]:
    classes = {(index, handle): stats for index in sock.indexes().values()
               for handle, stats in sock.class_counters(index).items()}
    return sock.link_counters(), classes


def read_rtnl(path: str | None) -> tuple[dict, dict]:
    sock = RtnlSocket(path)
    try:
        counters = rtnl_counters(sock)
    finally:
        sock.close()
    return counters if path else fabric_only(counters)


def read_pyroute2(path: str | None) -> tuple[dict, dict]:
    with IPRoute(netns=path, flags=0) if path else IPRoute() as ipr:
        counters = pyroute2_counters(ipr)
    return counters if path else fabric_only(counters)


def fabric_only(counters: tuple[dict, dict]) -> tuple[dict, dict]:
    """The counters of the fabric's own links (bridges and switch ports) only."""
    links, classes = counters
    with IPRoute() as ipr:
        index = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
    ours = tuple(BRIDGES.values())
    return ({name: value for name, value in links.items() if name.startswith(ours)},
            {key: value for key, value in classes.items()
             if index.get(key[0], "").startswith(ours)})


def test_rtnl_reads_what_pyroute2_reads_in_every_namespace():
    with RunningCluster(topology("1p1d", backend="netns"), agents=False) as fabric:
        fabric.node("n0g0").cmd("ping -c 3 -i 0.2 -Q 0xb8 198.18.1.1 > /dev/null")
        fabric.node("n0").cmd("ping -c 2 -i 0.2 198.19.1.1 > /dev/null")
        record = FabricRecord.read()
        namespaces = [None] + [f"/proc/{h.pid}/ns/net" for h in record.hosts]
        busy = set()
        for path in namespaces:
            # Compare within a quiet moment: pyroute2's reading the same before and after ours
            # (a late ARP probe may cross one of the snapshots).
            for _ in range(10):
                theirs = read_pyroute2(path)
                ours = read_rtnl(path)
                if theirs == read_pyroute2(path):
                    break
            assert ours == theirs, path
            if any(stats["packets"] for stats in ours[1].values()):
                busy.add(path)
        # The pings went through shaped classes on both ends: the comparison saw traffic.
        assert {None, f"/proc/{record.host('n0g0').pid}/ns/net"} <= busy
