"""The cluster plan: which hosts, interfaces, addresses and shaped rates a topology becomes.

Pure data, derived from a Topology; the fabric builder turns it into namespaces and links.

Naming: node hosts n0, n1, ... (prefill nodes first), their GPU hosts n0g0 ... n0g7, storage
hosts st0, st1, ..., and the scheduler host sched. Every host's interfaces are named after
the NIC they emulate: cnic, snic, pcie, stor (a storage host's link) and mgmt.

Addresses (all inside 198.18.0.0/15, RFC 2544):
  compute fabric     198.18.0.0/16    GPU n{i}g{j} cnic 198.18.{i}.{j+1}, node n{i} pcie 198.18.{i}.254
  storage fabric     198.19.0.0/18    node n{i} snic 198.19.0.{i+1}, storage st{k} 198.19.1.{k+1}
  management network 198.19.128.0/17  root namespace .128.1, sched .128.2, st{k} .129.{k+1},
                                      node n{i} .130.{i+1}, GPU n{i}g{j} 198.19.{131+i}.{j+1}
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from testbed.topology import Topology

Fabric = Literal["compute", "storage", "mgmt"]
Role = Literal["prefill", "decode", "storage", "scheduler"]
Kind = Literal["node", "gpu", "storage", "scheduler"]

NETWORKS: dict[Fabric, ipaddress.IPv4Network] = {
    "compute": ipaddress.ip_network("198.18.0.0/16"),
    "storage": ipaddress.ip_network("198.19.0.0/18"),
    "mgmt": ipaddress.ip_network("198.19.128.0/17"),
}
# One Linux bridge per fabric. Every interface we leave in the root namespace starts with
# one of these names, which is how `testbed clean` recognises ours.
BRIDGES: dict[Fabric, str] = {"compute": "dpcomp", "storage": "dpstor", "mgmt": "dpmgmt"}
ROOT_MGMT_ADDRESS = "198.19.128.1"


@dataclass(frozen=True)
class Interface:
    host: str
    name: str                 # inside the host: cnic, snic, pcie, stor, mgmt
    fabric: Fabric
    address: str              # without prefix length
    rate: int | None          # shaped bits/s (real / scale / time dilation); None: unshaped
    real_rate: int | None     # the same link in real-cluster bits/s
    prioritized: bool = False  # two DSCP classes (CNICs) rather than one

    @property
    def prefixlen(self) -> int:
        return NETWORKS[self.fabric].prefixlen

    @property
    def switch_port(self) -> str:
        """The bridge-side end of this link, in the root namespace (at most 15 characters)."""
        return f"{BRIDGES[self.fabric]}-{self.host}"


@dataclass(frozen=True)
class Host:
    name: str
    kind: Kind
    role: Role
    node: str | None = None           # the node a GPU host belongs to (and a node itself)
    interfaces: tuple[Interface, ...] = field(default=())

    def interface(self, name: str) -> Interface:
        for intf in self.interfaces:
            if intf.name == name:
                return intf
        raise KeyError(f"{self.name} has no interface {name!r}")

    def address(self, name: str) -> str:
        return self.interface(name).address


@dataclass(frozen=True)
class ClusterPlan:
    topology: Topology
    hosts: tuple[Host, ...]

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        raise KeyError(name)

    def of_kind(self, kind: Kind) -> list[Host]:
        return [h for h in self.hosts if h.kind == kind]

    @property
    def interfaces(self) -> list[Interface]:
        return [intf for host in self.hosts for intf in host.interfaces]


def _addr(network: Fabric, third: int, fourth: int) -> str:
    base = NETWORKS[network].network_address.packed
    return str(ipaddress.IPv4Address(bytes([base[0], base[1], base[2] + third, fourth])))


def build_plan(topology: Topology) -> ClusterPlan:
    """Every rate here is divided by the scale and the time dilation (Topology.scaled), so
    every link, present or future, runs in the cluster's emulated time."""
    t = topology
    cnic = dict(rate=t.scaled(t.links.cnic), real_rate=t.links.cnic)
    snic = dict(rate=t.scaled(t.links.snic), real_rate=t.links.snic)
    pcie = dict(rate=t.scaled(t.links.pcie), real_rate=t.links.pcie)
    stor = dict(rate=t.scaled(t.storage.link), real_rate=t.storage.link)
    unshaped = dict(rate=None, real_rate=None)

    hosts: list[Host] = [Host("sched", "scheduler", "scheduler", interfaces=(
        Interface("sched", "mgmt", "mgmt", _addr("mgmt", 0, 2), **unshaped),))]
    for k in range(t.storage.hosts):
        name = f"st{k}"
        hosts.append(Host(name, "storage", "storage", interfaces=(
            Interface(name, "stor", "storage", _addr("storage", 1, k + 1), **stor),
            Interface(name, "mgmt", "mgmt", _addr("mgmt", 1, k + 1), **unshaped))))
    for i in range(t.nodes):
        node = f"n{i}"
        role: Role = "prefill" if i < t.prefill_nodes else "decode"
        hosts.append(Host(node, "node", role, node=node, interfaces=(
            Interface(node, "snic", "storage", _addr("storage", 0, i + 1), **snic),
            Interface(node, "pcie", "compute", _addr("compute", i, 254), **pcie),
            Interface(node, "mgmt", "mgmt", _addr("mgmt", 2, i + 1), **unshaped))))
        for j in range(t.gpus_per_node):
            gpu = f"{node}g{j}"
            hosts.append(Host(gpu, "gpu", role, node=node, interfaces=(
                Interface(gpu, "cnic", "compute", _addr("compute", i, j + 1),
                          prioritized=t.qos.priority_classes, **cnic),
                Interface(gpu, "mgmt", "mgmt", _addr("mgmt", 3 + i, j + 1), **unshaped))))
    return ClusterPlan(topology, tuple(hosts))
