"""DSCP audit: a packet capture on every fabric port during requests on both read paths.

Every packet of a KV stream (storage and node ports, acknowledgements included) must be
CS1, every all-to-all packet EF, and no IPv4 packet on the compute or storage fabric may be
unmarked. Captured with scapy on the bridge ends of the links, in the root namespace.
"""

from __future__ import annotations

from collections import Counter

import pytest
from scapy.layers.inet import IP, TCP
from scapy.sendrecv import AsyncSniffer

from agents.engine import ALL_TO_ALL_PORT
from agents.node import NODE_PORT
from agents.protocol import DSCP_CS1, DSCP_EF
from agents.storage import STORAGE_PORT
from testbed.request import RequestSpec, run_request
from testbed.state import FabricRecord
from testbed.agentset import RunningCluster
from tests.integration.conftest import topology

KV_PORTS = {STORAGE_PORT, NODE_PORT}


@pytest.fixture(scope="module")
def cluster():
    with RunningCluster(topology("1p1d", backend="netns")) as fabric:
        yield fabric


def classify(packet) -> str:
    ports = {packet[TCP].sport, packet[TCP].dport} if TCP in packet else set()
    if ports & KV_PORTS:
        return "kv"
    if ALL_TO_ALL_PORT in ports:
        return "all-to-all"
    return "other"


def test_every_fabric_packet_is_marked_by_its_class(cluster):
    ports = [i.switch_port for i in cluster.plan.interfaces if i.fabric != "mgmt"]
    sniffer = AsyncSniffer(iface=ports, lfilter=lambda p: IP in p, store=True)
    sniffer.start()
    try:
        for path in ("pe", "de"):
            run_request(FabricRecord.read(), cluster.plan,
                        RequestSpec("ds-27b", 8192, 429, 70, path, "n0g0", "n1g0"))
    finally:
        packets = sniffer.stop()
    seen = Counter()
    wrong = []
    for packet in packets:
        if IP not in packet:
            continue
        kind, dscp = classify(packet), packet[IP].tos >> 2
        seen[(kind, dscp)] += 1
        expected = {"kv": {DSCP_CS1}, "all-to-all": {DSCP_EF}}.get(kind, {DSCP_CS1, DSCP_EF})
        if dscp not in expected:
            wrong.append(f"{kind} {packet.summary()} dscp={dscp}")
    print(f"packets by (kind, dscp): {dict(seen)}")
    assert seen[("kv", DSCP_CS1)] > 100, seen
    assert seen[("all-to-all", DSCP_EF)] > 100, seen
    assert not wrong, f"{len(wrong)} packets marked wrongly, e.g. {wrong[:5]}"
    assert seen.get(("other", 0), 0) == 0
