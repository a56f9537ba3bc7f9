"""Emulated hosts: Mininet nodes in a bare network namespace, or inside a Docker container.

Both mark their shell and every process started through them with HOST_MARKER in the
environment, so `testbed clean` can find our processes even after the fabric's owner died.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import docker
import docker.errors
from docker.models.containers import Container
from mininet.node import Host

HOST_MARKER = "DUALPATH_TESTBED_HOST"
CONTAINER_LABEL = "dualpath.testbed"
CONTAINER_PREFIX = "dualpath-"
REPO = Path(__file__).resolve().parent.parent
# The kernel's floor on TCP's retransmission timeout (its default), an emulated duration.
TCP_RTO_MIN_SECONDS = 0.2


def host_sysctls(dilation: float) -> dict[str, str]:
    """Every host's kernel settings at time dilation `dilation`: no forwarding between fabrics
    inside a host, no IPv6 chatter on the emulated links, and TCP that resends only what was
    lost. The fabric's queues hold whatever the senders' windows allow, so next to nothing is
    lost unless a fault takes a link away, and a timer that fires first is spurious: a tail-loss
    probe (2 RTTs without an ACK) or a retransmission timeout after a burst queued behind
    another connection's. Each resends bytes that the paper's lossless RDMA fabric never
    would, and each came at random: basic on 2P2D at TDF 8 resent 8-19 segments a run, and
    took 2.77-2.80 s in three runs and 2.87 s in a fourth. Without the probes and with the
    RTO floor stretched like every emulated timeout, three runs resent none and took
    2.768-2.775 s."""
    return {
        "net.ipv4.ip_forward": "0",
        "net.ipv6.conf.all.disable_ipv6": "1",
        "net.ipv6.conf.default.disable_ipv6": "1",
        "net.ipv4.tcp_early_retrans": "0",
        "net.ipv4.tcp_rto_min_us": str(round(TCP_RTO_MIN_SECONDS * dilation * 1e6)),
    }


class NetnsHost(Host):
    """A host in its own network namespace, sharing the root file system (the fast backend)."""

    def _popen(self, cmd, **params):
        params["env"] = {**params.get("env", os.environ), HOST_MARKER: self.name}
        return super()._popen(cmd, **params)

    def startShell(self, mnopts=None):
        super().startShell(mnopts)
        self.cmd("ip link set lo up")
        self.set_sysctls()

    def set_sysctls(self):
        sysctls = self.params["sysctls"]
        self.cmd("sysctl -q -w " + " ".join(f"{k}={v}" for k, v in sysctls.items()))

    @property
    def netns_pid(self) -> int:
        """A process whose network namespace is this host's."""
        return self.pid


class DockerHost(NetnsHost):
    """A host that is a running container: Mininet attaches its shell to the container's
    network and mount namespaces (mnexec -a), the way Containernet does, and moves veth
    ends into it. The container itself is started and removed by `ContainerPool`."""

    def __init__(self, name: str, container: Container, **params):
        self.container = container
        self.container_pid = int(container.attrs["State"]["Pid"])
        # inNamespace=False: the namespace exists already; Mininet must not make one.
        super().__init__(name, inNamespace=False, **params)

    def _popen(self, cmd, **params):
        # mnexec -a enters the container's mount namespace, then changes to the caller's
        # working directory, which must exist there: the root always does.
        params.setdefault("cwd", "/")
        return super()._popen(cmd, **params)

    def startShell(self, mnopts=None):
        # getopt takes the pid attached to -a.
        super().startShell(mnopts=f"-cda{self.container_pid}")

    def set_sysctls(self):
        pass   # set by Docker when the container started (/proc/sys is read-only inside)

    @property
    def netns_pid(self) -> int:
        return self.container_pid


class ContainerPool:
    """Starts and removes the containers of one fabric, several at a time."""

    WORKERS = 6

    def __init__(self, client: docker.DockerClient, image: str, sysctls: dict[str, str]):
        self.client = client
        self.image = image
        self.sysctls = sysctls

    def start(self, names: list[str]) -> dict[str, Container]:
        with ThreadPoolExecutor(self.WORKERS) as pool:
            return dict(zip(names, pool.map(self._start_one, names)))

    def _start_one(self, name: str) -> Container:
        container = self.client.containers.run(
            self.image, name=CONTAINER_PREFIX + name, hostname=name, detach=True,
            init=True, network_mode="none", sysctls=self.sysctls,
            labels={CONTAINER_LABEL: "host", "dualpath.host": name},
            environment={HOST_MARKER: name},
            volumes={str(REPO): {"bind": "/opt/dualpath", "mode": "ro"}})
        container.reload()  # State.Pid is filled in once the container runs
        return container



def remove_containers(containers: list[Container]) -> None:
    def remove(container: Container) -> None:
        try:
            container.remove(force=True, v=True)
        except docker.errors.NotFound:
            pass
    with ThreadPoolExecutor(ContainerPool.WORKERS) as pool:
        list(pool.map(remove, containers))
