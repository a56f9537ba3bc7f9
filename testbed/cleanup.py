"""Removing every trace of a fabric: ours by name, label or process marker, never guessed.

The same routine ends a normal run and recovers from a crashed or killed one:
  - the owner of a recorded fabric, if it still runs, is asked to stop and then killed;
  - containers labelled dualpath.testbed;
  - processes carrying HOST_MARKER in their environment (host shells and what they ran);
  - root-namespace links and bridges whose names start with our bridge names;
  - the storage agents' block files of netns hosts (docker hosts keep theirs inside the
    container, which goes with it);
  - a run's own Prometheus server once that run is gone (it carries SERVER_MARKER, whose
    value is the pid of the run), the scrape targets of the fabric and its fault socket.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from agents.storage import DATA_ROOT
from testbed.hosts import CONTAINER_LABEL, HOST_MARKER, remove_containers
from testbed.injector import SOCKET_PATH as FAULT_SOCKET
from testbed.plan import BRIDGES
from testbed.prometheus import SERVER_MARKER, remove_targets
from testbed.state import FabricRecord, fabric_running, pid_alive, remove_record

OWNER_STOP_SECONDS = 45


def our_link_names(ipr: IPRoute) -> list[str]:
    names = [link.get_attr("IFLA_IFNAME") for link in ipr.get_links()]
    return [n for n in names if n and n.startswith(tuple(BRIDGES.values()))]


def marked_processes(name: str = HOST_MARKER) -> dict[int, str]:
    """Pids whose environment carries the marker `name` (not this process), with its value."""
    marker = name.encode() + b"="
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue   # exited meanwhile, or a kernel thread
        for variable in environ.split(b"\0"):
            if variable.startswith(marker):
                found[int(entry.name)] = variable[len(marker):].decode(errors="replace")
    return found


def orphaned_servers() -> list[int]:
    """Our Prometheus servers whose run has ended without stopping them."""
    return [pid for pid, owner in marked_processes(SERVER_MARKER).items()
            if not (owner.isdigit() and pid_alive(int(owner)))]


def our_containers():
    """Containers with our label, or [] when Docker is not running (then none can exist)."""
    import docker
    import docker.errors
    try:
        client = docker.from_env(timeout=60)
        return client.containers.list(all=True, filters={"label": CONTAINER_LABEL})
    except docker.errors.DockerException:
        return []


def stop_owner(record: FabricRecord) -> None:
    # Only a live owner holds the fabric lock: without it, the pid may be someone else's now.
    if record.owner_pid == os.getpid() or not fabric_running():
        return
    os.kill(record.owner_pid, signal.SIGTERM)
    deadline = time.monotonic() + OWNER_STOP_SECONDS
    while pid_alive(record.owner_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if pid_alive(record.owner_pid):
        os.kill(record.owner_pid, signal.SIGKILL)


def remove_leftovers(containers=None) -> dict[str, int]:
    """Remove everything of ours; returns how many of each kind were found."""
    record = FabricRecord.read()
    if record:
        stop_owner(record)
    found = {"containers": 0, "processes": 0, "links": 0}

    containers = our_containers() if containers is None else containers
    found["containers"] = len(containers)
    remove_containers(containers)

    pids = [*marked_processes(), *orphaned_servers()]
    found["processes"] = len(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    with IPRoute() as ipr:
        names = our_link_names(ipr)
        found["links"] = len(names)
        # Ports first, bridges last; deleting one veth end removes its peer too.
        for name in sorted(names, key=lambda n: n in BRIDGES.values()):
            try:
                ipr.link("del", ifname=name)
            except NetlinkError:
                pass   # went with its peer
    if DATA_ROOT.exists():
        found["storage dirs"] = sum(1 for _ in DATA_ROOT.iterdir())
        shutil.rmtree(DATA_ROOT, ignore_errors=True)
    remove_targets()
    FAULT_SOCKET.unlink(missing_ok=True)   # an owner that died could not remove it
    remove_record()
    return found
