"""testbed.plan.build_plan: the hosts, interfaces, addresses and rates a topology becomes."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from testbed.plan import BRIDGES, NETWORKS, ROOT_MGMT_ADDRESS, ClusterPlan, build_plan
from testbed.topology import (MAX_GPUS_PER_NODE, MAX_NODES, MAX_STORAGE_HOSTS, Topology,
                              load_topology)

REPO = Path(__file__).parents[2]
TESTNET = ipaddress.ip_network("198.18.0.0/15")     # RFC 2544 benchmarking range
NIC_NAMES = {"node": {"snic", "pcie", "mgmt"}, "gpu": {"cnic", "mgmt"},
             "storage": {"stor", "mgmt"}, "scheduler": {"mgmt"}}


def plan_of(name: str) -> ClusterPlan:
    return build_plan(load_topology(REPO / "topologies" / f"{name}.yaml"))


def largest_topology() -> Topology:
    """The biggest cluster validation allows: 120 nodes of 16 GPUs, 64 storage hosts."""
    return Topology.model_validate({
        "name": "largest",
        "prefill_nodes": MAX_NODES // 2,
        "decode_nodes": MAX_NODES - MAX_NODES // 2,
        "gpus_per_node": MAX_GPUS_PER_NODE,
        "links": {"cnic": "400Gbit", "snic": "400Gbit", "pcie": "6400Gbit"},
        "storage": {"hosts": MAX_STORAGE_HOSTS, "link": "400Gbit"},
        "scale": 4000,
    })


@pytest.fixture(scope="module")
def largest() -> ClusterPlan:
    return build_plan(largest_topology())


def all_plans(largest: ClusterPlan) -> list[ClusterPlan]:
    return [plan_of("1p1d"), plan_of("2p4d"), plan_of("mini"), largest]


# ------------------------------------------------------------------------- hosts

def test_1p1d_hosts() -> None:
    plan = plan_of("1p1d")
    assert [h.name for h in plan.of_kind("node")] == ["n0", "n1"]
    assert [h.name for h in plan.of_kind("gpu")] == [f"n{i}g{j}" for i in range(2)
                                                     for j in range(4)]
    assert [h.name for h in plan.of_kind("storage")] == ["st0", "st1"]
    assert [h.name for h in plan.of_kind("scheduler")] == ["sched"]
    assert len(plan.hosts) == 1 + 2 + 2 + 2 * 4


def test_2p4d_hosts() -> None:
    plan = plan_of("2p4d")
    assert [h.name for h in plan.of_kind("node")] == [f"n{i}" for i in range(6)]
    gpus = [h.name for h in plan.of_kind("gpu")]
    assert gpus == [f"n{i}g{j}" for i in range(6) for j in range(8)]
    assert gpus[0] == "n0g0" and gpus[-1] == "n5g7"
    assert [h.name for h in plan.of_kind("storage")] == ["st0", "st1", "st2", "st3"]
    assert [h.name for h in plan.of_kind("scheduler")] == ["sched"]
    assert len(plan.hosts) == 1 + 4 + 6 + 6 * 8 == 59


def test_host_names_are_unique(largest: ClusterPlan) -> None:
    for plan in all_plans(largest):
        names = [h.name for h in plan.hosts]
        assert len(names) == len(set(names))


@pytest.mark.parametrize("name, prefill, decode", [("1p1d", 1, 1), ("2p4d", 2, 4),
                                                   ("1p2d", 1, 2), ("2p1d", 2, 1)])
def test_prefill_nodes_first_then_decode(name: str, prefill: int, decode: int) -> None:
    plan = plan_of(name)
    assert [h.role for h in plan.of_kind("node")] == ["prefill"] * prefill + ["decode"] * decode
    for gpu in plan.of_kind("gpu"):
        node = plan.host(gpu.node)
        assert node.kind == "node"
        assert gpu.role == node.role
        assert gpu.name.startswith(f"{node.name}g")
    for node in plan.of_kind("node"):
        assert node.node == node.name
    assert {h.role for h in plan.of_kind("storage")} == {"storage"}
    assert plan.host("sched").role == "scheduler"


def test_each_node_has_its_gpus() -> None:
    plan = plan_of("2p4d")
    for node in plan.of_kind("node"):
        mine = [g.name for g in plan.of_kind("gpu") if g.node == node.name]
        assert mine == [f"{node.name}g{j}" for j in range(8)]


def test_lookups_refuse_unknown_names() -> None:
    plan = plan_of("mini")
    with pytest.raises(KeyError):
        plan.host("n9")
    with pytest.raises(KeyError):
        plan.host("n0g0").interface("snic")


# ----------------------------------------------------------------- interfaces

def test_interface_names_are_the_nic_names(largest: ClusterPlan) -> None:
    for plan in all_plans(largest):
        for host in plan.hosts:
            names = [intf.name for intf in host.interfaces]
            assert sorted(names) == sorted(NIC_NAMES[host.kind]), host.name
            assert all(intf.host == host.name for intf in host.interfaces)


def test_interface_fabrics() -> None:
    plan = plan_of("1p1d")
    fabric = {intf.name: intf.fabric for intf in plan.interfaces}
    assert fabric == {"cnic": "compute", "pcie": "compute", "snic": "storage",
                      "stor": "storage", "mgmt": "mgmt"}
    for intf in plan.interfaces:
        assert intf.prefixlen == NETWORKS[intf.fabric].prefixlen
    assert {intf.prefixlen for intf in plan.interfaces} == {16, 18, 17}


def test_storage_hosts_are_not_on_the_compute_fabric(largest: ClusterPlan) -> None:
    for plan in all_plans(largest):
        for host in plan.of_kind("storage"):
            assert {intf.fabric for intf in host.interfaces} == {"storage", "mgmt"}
        # and only nodes and storage hosts are on the storage fabric
        on_storage = {intf.host for intf in plan.interfaces if intf.fabric == "storage"}
        assert on_storage == {h.name for h in plan.hosts if h.kind in ("node", "storage")}


def test_only_cnics_are_prioritized() -> None:
    plan = plan_of("2p4d")
    cnics = [intf for intf in plan.interfaces if intf.name == "cnic"]
    assert len(cnics) == 48
    assert all(intf.prioritized for intf in cnics)
    others = [intf for intf in plan.interfaces if intf.name != "cnic"]
    assert others and not any(intf.prioritized for intf in others)


def test_mgmt_is_unshaped_and_everything_else_shaped() -> None:
    plan = plan_of("2p4d")
    for intf in plan.interfaces:
        if intf.name == "mgmt":
            assert intf.rate is None and intf.real_rate is None, intf
        else:
            assert isinstance(intf.rate, int) and intf.rate > 0, intf
            assert isinstance(intf.real_rate, int) and intf.real_rate > 0, intf


@pytest.mark.parametrize("name", ["1p1d", "2p4d", "mini"])
def test_scaled_rate_is_real_rate_over_scale(name: str) -> None:
    plan = plan_of(name)
    t = plan.topology
    real = {"cnic": t.links.cnic, "snic": t.links.snic, "pcie": t.links.pcie,
            "stor": t.storage.link}
    for intf in plan.interfaces:
        if intf.name == "mgmt":
            continue
        assert intf.real_rate == real[intf.name]
        assert intf.rate == int(real[intf.name] / t.scale)


def test_scaled_rates_come_from_their_own_link() -> None:
    """Four different rates and a scale that does not divide them evenly."""
    plan = build_plan(Topology.model_validate({
        "name": "distinct", "prefill_nodes": 1, "decode_nodes": 2, "gpus_per_node": 2,
        "links": {"cnic": "200Gbit", "snic": "300Gbit", "pcie": "900Gbit"},
        "storage": {"hosts": 1, "link": "1.2Tbit"}, "scale": 3000}))
    expected = {"cnic": (200 * 10**9, 66_666_666), "snic": (300 * 10**9, 100_000_000),
                "pcie": (900 * 10**9, 300_000_000), "stor": (1_200 * 10**9, 400_000_000)}
    for intf in plan.interfaces:
        if intf.name != "mgmt":
            assert (intf.real_rate, intf.rate) == expected[intf.name], intf


def test_scaled_rates_of_1p1d() -> None:
    plan = plan_of("1p1d")
    assert plan.host("n0g0").interface("cnic").rate == 100 * 10**6      # 400 Gbit / 4000
    assert plan.host("n0").interface("snic").rate == 100 * 10**6
    assert plan.host("n0").interface("pcie").rate == 400 * 10**6        # 1600 Gbit / 4000
    assert plan.host("st1").interface("stor").rate == 100 * 10**6


# ------------------------------------------------------------------- addresses

def test_every_address_is_in_the_benchmarking_range(largest: ClusterPlan) -> None:
    for plan in all_plans(largest):
        for intf in plan.interfaces:
            address = ipaddress.ip_address(intf.address)
            assert address in TESTNET, intf
            network = NETWORKS[intf.fabric]
            assert address in network, intf
            assert address not in (network.network_address, network.broadcast_address), intf


def test_fabric_networks_are_disjoint_and_in_range() -> None:
    networks = list(NETWORKS.values())
    for net in networks:
        assert net.subnet_of(TESTNET)
    for i, a in enumerate(networks):
        for b in networks[i + 1:]:
            assert not a.overlaps(b)


def test_addresses_are_unique(largest: ClusterPlan) -> None:
    for plan in all_plans(largest):
        addresses = [intf.address for intf in plan.interfaces]
        assert len(addresses) == len(set(addresses))
        assert ROOT_MGMT_ADDRESS not in addresses      # the root namespace's own address


def test_address_plan_matches_the_documented_scheme() -> None:
    plan = plan_of("2p4d")
    assert plan.host("n1g2").address("cnic") == "198.18.1.3"
    assert plan.host("n5g7").address("cnic") == "198.18.5.8"
    assert plan.host("n1").address("pcie") == "198.18.1.254"
    assert plan.host("n0").address("snic") == "198.19.0.1"
    assert plan.host("n5").address("snic") == "198.19.0.6"
    assert plan.host("st0").address("stor") == "198.19.1.1"
    assert plan.host("st3").address("stor") == "198.19.1.4"
    assert plan.host("sched").address("mgmt") == "198.19.128.2"
    assert plan.host("st1").address("mgmt") == "198.19.129.2"
    assert plan.host("n2").address("mgmt") == "198.19.130.3"
    assert plan.host("n1g0").address("mgmt") == "198.19.132.1"


def test_gpus_and_their_node_share_a_compute_subnet() -> None:
    """A node's GPUs and its pcie side sit in 198.18.{i}.0/24: one /24 per node."""
    plan = plan_of("2p4d")
    for node in plan.of_kind("node"):
        subnet = ipaddress.ip_network(f"{node.address('pcie')}/24", strict=False)
        for gpu in plan.of_kind("gpu"):
            inside = ipaddress.ip_address(gpu.address("cnic")) in subnet
            assert inside == (gpu.node == node.name)


# ------------------------------------------------------------------ switch ports

def test_largest_topology_is_valid(largest: ClusterPlan) -> None:
    t = largest.topology
    assert t.nodes == MAX_NODES and t.gpus_per_node == MAX_GPUS_PER_NODE
    assert len(largest.of_kind("gpu")) == MAX_NODES * MAX_GPUS_PER_NODE
    assert len(largest.of_kind("storage")) == MAX_STORAGE_HOSTS


def test_switch_port_names_fit_the_kernel_limit(largest: ClusterPlan) -> None:
    ports = [intf.switch_port for intf in largest.interfaces]
    longest = max(ports, key=len)
    assert len(longest) <= 15, longest               # IFNAMSIZ - 1
    assert "dpcomp-n119g15" in ports


def test_switch_ports_are_unique_and_ours(largest: ClusterPlan) -> None:
    for plan in all_plans(largest):
        ports = [intf.switch_port for intf in plan.interfaces]
        assert len(ports) == len(set(ports))
        for intf in plan.interfaces:
            assert intf.switch_port == f"{BRIDGES[intf.fabric]}-{intf.host}"
            # `testbed clean` recognises our root-namespace links by these prefixes
            assert intf.switch_port.startswith(tuple(BRIDGES.values()))
