"""The fabric: a ClusterPlan made real with Mininet, Linux bridges, veth pairs and HTB.

Three bridges (compute, storage, management), no controller. Every host interface is one
veth pair from the host to its fabric's bridge. Shaped links are shaped at both ends: the
host end shapes what the host sends, the bridge end what it receives.
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mininet.log import setLogLevel
from mininet.net import Mininet
from mininet.nodelib import LinuxBridge
from pyroute2 import IPRoute

from testbed import cleanup, qos
from testbed.errors import TestbedError
from testbed.hosts import (HOST_MARKER, ContainerPool, DockerHost, NetnsHost, host_sysctls,
                           remove_containers)
from testbed.plan import BRIDGES, ROOT_MGMT_ADDRESS, NETWORKS, ClusterPlan, Host
from testbed.state import FabricLock, FabricRecord, HostRecord, fabric_running

BRIDGE_NETFILTER = Path("/proc/sys/net/bridge")
TCP_RTO_MIN_KNOB = Path("/proc/sys/net/ipv4/tcp_rto_min_us")


class FabricBridge(LinuxBridge):
    """A Linux bridge whose helper shell carries our process marker."""

    def _popen(self, cmd, **params):
        params["env"] = {**params.get("env", os.environ), HOST_MARKER: self.name}
        return super()._popen(cmd, **params)


def no_ipv6(ifname: str) -> None:
    """Our root-namespace ports and bridges stay IPv4-only: no IPv6 chatter on the fabric."""
    knob = Path(f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
    if knob.exists():
        knob.write_text("1")


def set_mtu(ipr: IPRoute, ifname: str, mtu: int) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)


def preflight(backend: str) -> None:
    if os.geteuid() != 0:
        raise TestbedError("the fabric needs root (namespaces, veth pairs, qdiscs): run as root")
    for tool, package in (("mnexec", "mininet"), ("brctl", "bridge-utils"),
                          ("ifconfig", "net-tools")):
        if shutil.which(tool) is None:
            raise TestbedError(f"{tool} not found (Debian package {package}): run `make setup`")
    if not TCP_RTO_MIN_KNOB.exists():
        raise TestbedError(f"this kernel ({platform.release()}) has no {TCP_RTO_MIN_KNOB}: the "
                           "fabric needs Linux 6.11 or later, whose network namespaces each set "
                           "the floor of TCP's retransmission timeout (stretched by the time "
                           "dilation, like every emulated timeout)")
    # Docker turns on bridge netfilter with a FORWARD policy of DROP, which would silently
    # drop every packet crossing our bridges. Bridged frames must bypass iptables.
    for table in ("iptables", "ip6tables", "arptables"):
        knob = BRIDGE_NETFILTER / f"bridge-nf-call-{table}"
        if knob.exists() and knob.read_text().strip() != "0":
            knob.write_text("0")


def refuse_if_running() -> None:
    if fabric_running():
        record = FabricRecord.read()
        owner = f" ({record.name}, owned by pid {record.owner_pid})" if record else ""
        raise TestbedError(f"a fabric{owner} is already up: `testbed fabric down` first")


class Fabric:
    def __init__(self, plan: ClusterPlan, topology_path: str = "",
                 progress: Callable[[str], None] | None = None):
        self.plan = plan
        self.progress = progress or (lambda message: None)
        self.lock = FabricLock()
        self.topology_path = topology_path
        self.net: Mininet | None = None
        self.nodes: dict[str, NetnsHost] = {}
        self.containers = []
        self.up_seconds: float | None = None
        self.down_seconds: float | None = None
        self.claimed = False    # set once this fabric owns the machine's fabric record

    @property
    def backend(self) -> str:
        return self.plan.topology.backend

    # -- bring up -------------------------------------------------------------------------
    def up(self) -> None:
        """Build everything; on any failure or interrupt, tear down what was built."""
        started = time.monotonic()
        preflight(self.backend)
        if not self.lock.acquire():
            refuse_if_running()
        self.claimed = True
        try:
            cleanup.remove_leftovers()          # stale pieces of a run that died
            self._record("starting").write()
            setLogLevel("warning")
            self.net = Mininet(topo=None, controller=None, switch=FabricBridge, build=False,
                               ipBase=str(NETWORKS["compute"]))
            bridges = {fabric: self.net.addSwitch(name, dpid=str(i + 1))
                       for i, (fabric, name) in enumerate(BRIDGES.items())}
            self._add_hosts()
            self._step(started, f"{len(self.nodes)} hosts ({self.backend})")
            for host in self.plan.hosts:
                for intf in host.interfaces:
                    self.net.addLink(self.nodes[host.name], bridges[intf.fabric],
                                     intfName1=intf.name, intfName2=intf.switch_port,
                                     params1={"ip": f"{intf.address}/{intf.prefixlen}"})
                    no_ipv6(intf.switch_port)
            for bridge in bridges.values():
                bridge.start([])       # (re)creates the bridge, so its knobs come after
                no_ipv6(bridge.name)
            self._step(started, f"{len(self.plan.interfaces)} links on 3 bridges")
            self._shape()
            self._step(started, "links shaped")
            with IPRoute() as ipr:   # the root namespace reaches the management network
                index = ipr.link_lookup(ifname=BRIDGES["mgmt"])[0]
                ipr.addr("add", index=index, address=ROOT_MGMT_ADDRESS,
                         prefixlen=NETWORKS["mgmt"].prefixlen)
            self.up_seconds = time.monotonic() - started
            self._record("up").write()
        except BaseException:
            self.down()
            raise

    def _step(self, started: float, what: str) -> None:
        self.progress(f"  {time.monotonic() - started:5.1f} s  {what}")

    def _add_hosts(self) -> None:
        sysctls = host_sysctls(self.plan.topology.dilation)
        if self.backend == "docker":
            from testbed.image import docker_client, require_agent_image
            client = docker_client()
            pool = ContainerPool(client, require_agent_image(client), sysctls)
            names = [h.name for h in self.plan.hosts]
            try:
                started = pool.start(names)
            finally:   # whatever started must be removable, even if some failed
                self.containers = client.containers.list(
                    all=True, filters={"label": "dualpath.testbed"})
            for name in names:
                self.nodes[name] = self.net.addHost(name, cls=DockerHost,
                                                    container=started[name])
        else:
            for host in self.plan.hosts:
                self.nodes[host.name] = self.net.addHost(host.name, cls=NetnsHost,
                                                         sysctls=sysctls)

    def _shape(self) -> None:
        """MTU and HTB on both ends of every fabric link (the management network is neither)."""
        shares, mtu = self.plan.topology.qos, self.plan.topology.mtu
        with IPRoute() as root:
            for intf in self.plan.interfaces:
                if intf.rate is not None:
                    set_mtu(root, intf.switch_port, mtu)
                    qos.shape(root, intf.switch_port, intf.rate,
                              shares if intf.prioritized else None)
        for host in self.plan.hosts:
            shaped = [i for i in host.interfaces if i.rate is not None]
            if not shaped:
                continue
            netns = f"/proc/{self.nodes[host.name].netns_pid}/ns/net"
            with IPRoute(netns=netns, flags=0) as ipr:
                for intf in shaped:
                    set_mtu(ipr, intf.name, mtu)
                    qos.shape(ipr, intf.name, intf.rate, shares if intf.prioritized else None)

    # -- tear down ------------------------------------------------------------------------
    def down(self) -> float | None:
        """Remove everything this fabric made; seconds taken, or None if it made nothing.
        Safe to call twice."""
        if not self.claimed:
            return None
        started = time.monotonic()
        # Bridges have helper shells too: terminate() reaps each shell, where leaving it to
        # remove_leftovers would kill it unreaped (three zombies per fabric in a long bench).
        for node in [*self.nodes.values(), *(self.net.switches if self.net else [])]:
            node.terminate()
        self.nodes.clear()
        remove_containers(self.containers)
        self.containers = []
        cleanup.remove_leftovers(containers=[])
        self.net = None
        self.claimed = False
        self.lock.release()
        self.down_seconds = time.monotonic() - started
        return self.down_seconds

    # -- inspection -----------------------------------------------------------------------
    def node(self, name: str) -> NetnsHost:
        return self.nodes[name]

    def _record(self, status: str) -> FabricRecord:
        return FabricRecord(
            topology=self.topology_path, name=self.plan.topology.name, backend=self.backend,
            owner_pid=os.getpid(), status=status, up_seconds=self.up_seconds,
            topology_json=self.plan.topology.model_dump_json(),
            hosts=[self._host_record(h) for h in self.plan.hosts if h.name in self.nodes])

    def _host_record(self, host: Host) -> HostRecord:
        node = self.nodes[host.name]
        container = getattr(node, "container", None)
        return HostRecord(
            name=host.name, kind=host.kind, role=host.role, pid=node.netns_pid,
            container=container.name if container else None,
            interfaces=[dict(name=i.name, fabric=i.fabric, address=i.address,
                             prefixlen=i.prefixlen, rate=i.rate, real_rate=i.real_rate,
                             prioritized=i.prioritized, switch_port=i.switch_port) for i in host.interfaces])
