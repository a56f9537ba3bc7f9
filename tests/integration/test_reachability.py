"""Reachability on the 1P1D docker fabric: each network connects what it should, and only that."""

from __future__ import annotations

import itertools

import pytest

from testbed.plan import ROOT_MGMT_ADDRESS, build_plan
from tests.integration.conftest import topology

PLAN = build_plan(topology("1p1d", backend="docker"))
CNIC_ADDRESSES = [g.address("cnic") for g in PLAN.of_kind("gpu")]


def pings(node, address: str) -> bool:
    node.cmd(f"ping -c1 -W1 {address} >/dev/null 2>&1")
    return node.cmd("echo $?").strip() == "0"


def test_hosts_are_containers(docker_1p1d):
    for host in PLAN.hosts:
        node = docker_1p1d.node(host.name)
        assert node.container.status in ("created", "running")
        # The shell runs in the container's file system: Docker's /etc/hostname and the
        # image's virtualenv are there.
        assert node.cmd("cat /etc/hostname").strip() == host.name
        assert node.cmd("test -x /opt/venv/bin/python && echo image").strip() == "image"


def test_interfaces_have_planned_addresses(docker_1p1d):
    for host in PLAN.hosts:
        shown = docker_1p1d.node(host.name).cmd("ip -o -4 addr show")
        for intf in host.interfaces:
            assert f"{intf.name}    inet {intf.address}/{intf.prefixlen}" in shown, \
                (host.name, intf.name, shown)


@pytest.mark.parametrize("fabric,intf", [("compute", "cnic"), ("compute", "pcie"),
                                         ("storage", "snic"), ("storage", "stor")])
def test_fabric_connects_its_members(docker_1p1d, fabric, intf):
    members = [(h, i) for h in PLAN.hosts for i in h.interfaces if i.fabric == fabric]
    sources = [(h, i) for h, i in members if i.name == intf]
    for (src, _), (dst, dst_intf) in itertools.product(sources, members):
        if src.name != dst.name:
            assert pings(docker_1p1d.node(src.name), dst_intf.address), \
                f"{src.name} cannot reach {dst.name} {dst_intf.name} {dst_intf.address}"


def test_management_network_reaches_every_host_and_the_root_namespace(docker_1p1d):
    import subprocess
    sched = docker_1p1d.node("sched")
    for host in PLAN.hosts:
        address = host.address("mgmt")
        assert subprocess.run(["ping", "-c1", "-W1", address],
                              capture_output=True).returncode == 0, f"root -> {host.name}"
        if host.name != "sched":
            assert pings(sched, address), f"sched -> {host.name}"
    assert pings(docker_1p1d.node("n0g0"), ROOT_MGMT_ADDRESS)


def test_storage_cannot_reach_cnic_addresses(docker_1p1d):
    for storage in PLAN.of_kind("storage"):
        node = docker_1p1d.node(storage.name)
        for address in CNIC_ADDRESSES:
            assert not pings(node, address), f"{storage.name} reached CNIC {address}"


def test_nodes_do_not_forward_storage_into_the_compute_fabric(docker_1p1d):
    """Even with a route through a node's SNIC, a storage host cannot reach a CNIC."""
    node_snic = PLAN.host("n0").address("snic")
    st0 = docker_1p1d.node("st0")
    st0.cmd(f"ip route add 198.18.0.0/16 via {node_snic}")
    try:
        for address in CNIC_ADDRESSES:
            assert not pings(st0, address), f"st0 reached CNIC {address} through n0"
    finally:
        st0.cmd("ip route del 198.18.0.0/16")
    # the route itself worked: the node's SNIC answers
    assert pings(st0, node_snic)


def test_gpus_have_no_storage_fabric(docker_1p1d):
    gpu = docker_1p1d.node("n0g0")
    for storage in PLAN.of_kind("storage"):
        assert not pings(gpu, storage.address("stor"))
