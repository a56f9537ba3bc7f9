"""Carrying faults out on a running cluster, each logged with its time.

The process that owns the fabric (a scenario run, or `testbed fabric up`) holds the one
`Injector`: it alone can restart an agent inside a host. Faults come from the scenario's
schedule (`FaultSchedule`) or, live, from `testbed fault`, which reaches the owner through
a Unix socket (`FaultServer`, `send_fault`). Every action lands in `events`, which the
report lists, and, when Grafana is configured, in an annotation tagged "fault".

Links are taken down at their switch port, so the host sees its carrier go as it would
when a cable or a switch port fails. A kill is SIGKILL of the host's agent (the process
inside its container on the docker backend); its links stay up.
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError
from pyroute2 import IPRoute

from agents.clock import clock
from testbed import qos
from testbed.annotations import Annotator
from testbed.errors import TestbedError
from testbed.faults import FaultSpec, check_target
from testbed.state import STATE_DIR
from testbed.topology import validation_message

if TYPE_CHECKING:      # the agent set and the fabric own the injector, not the reverse
    from testbed.agentset import AgentSet
    from testbed.fabric import Fabric

SOCKET_PATH = STATE_DIR / "faults.sock"


class Injector:
    def __init__(self, fabric: "Fabric", agents: "AgentSet | None",
                 annotator: Annotator | None = None, tags: tuple[str, ...] = ()):
        self.fabric, self.agents = fabric, agents
        self.annotator, self.tags = annotator, tags
        self.events: list[dict] = []
        self.started = clock.time()      # emulated: event times are run times
        self.lock = threading.Lock()      # one action at a time, from whichever thread
        self.closed = False               # the fabric is being torn down: no more actions
        # What the faults made of the links, for the fidelity verdict's link pace: rates
        # changed and links taken down, by (host, interface).
        self.rates: dict[tuple[str, str], int] = {}
        self.down: set[tuple[str, str]] = set()
        # Hosts whose agent a fault killed or restarted: their fidelity measures are lost.
        self.stopped: set[str] = set()

    def intended_rate(self, host: str, intf: str) -> int | None:
        """A link's rate as the testbed means it now (bits/s), or None while it is down."""
        if (host, intf) in self.down:
            return None
        return self.rates.get((host, intf), self.fabric.plan.host(host).interface(intf).rate)

    def close(self) -> None:
        """Refuse actions from now on; returns once the one under way (if any) is done."""
        with self.lock:
            self.closed = True

    # -- faults -----------------------------------------------------------------------------
    def apply(self, fault: FaultSpec, source: str = "scenario") -> list[dict]:
        """Carry `fault` out (blocking: a flap holds its link down for its duration); the
        events it logged."""
        check_target(fault, self.fabric.plan)
        first = len(self.events)
        host, _, intf = fault.target.partition(":")
        kind = fault.kind
        if kind in ("link-down", "link-up"):
            self._action(fault, source, f"{fault.target} {kind[5:]}",
                         self._link, host, intf, kind == "link-up")
        elif kind == "link-flap":
            self._action(fault, source, f"{fault.target} down", self._link, host, intf, False)
            clock.pause(fault.duration)
            self._action(fault, source, f"{fault.target} up", self._link, host, intf, True)
        elif kind in ("link-rate", "storage-slow"):
            if kind == "storage-slow":
                intf = "stor"
            self._slow(fault, source, host, intf)
        elif kind in ("kill", "restart"):
            self._action(fault, source, f"{host} agent {kind}ed", self._agent, host, kind)
        elif kind == "storage-down":
            self._action(fault, source, f"{host}:stor down", self._link, host, "stor", False)
            self._action(fault, source, f"{host} agent killed", self._agent, host, "kill")
        elif kind == "storage-up":
            self._action(fault, source, f"{host}:stor up", self._link, host, "stor", True)
            self._action(fault, source, f"{host} agent restarted", self._agent, host, "restart")
        return self.events[first:]

    def _slow(self, fault: FaultSpec, source: str, host: str, intf: str) -> None:
        rate = self.fabric.plan.host(host).interface(intf).rate
        self._action(fault, source, f"{host}:{intf} at {fault.factor:g}x rate",
                     self._rate, host, intf, int(rate * fault.factor))
        if fault.duration:
            clock.pause(fault.duration)
            self._action(fault, source, f"{host}:{intf} rate restored",
                         self._rate, host, intf, rate)

    def _action(self, fault: FaultSpec, source: str, what: str, do, *args) -> None:
        with self.lock:
            error = None
            try:
                if self.closed:
                    raise TestbedError("the fabric is being torn down")
                do(*args)
            except Exception as exc:      # a fault not carried out is logged as such, and
                error = str(exc) or type(exc).__name__   # the run's other faults go on
            now = time.time()
            event = {"t": round(clock.time() - self.started, 2), "wall": now,
                     "fault": fault.describe(), "action": what, "source": source, "error": error}
            self.events.append(event)
        print(f"  fault at {event['t']:7.1f} s: {what}" + (f" FAILED: {error}" if error else ""),
              flush=True)
        if self.annotator:
            self.annotator.post(f"fault: {what}", "fault", *self.tags, start=now)

    # -- primitives -------------------------------------------------------------------------
    def _link(self, host: str, intf: str, up: bool) -> None:
        port = self.fabric.plan.host(host).interface(intf).switch_port
        with IPRoute() as ipr:
            try:
                index = ipr.link_lookup(ifname=port)[0]
            except IndexError:
                raise TestbedError(f"no switch port {port} for {host}:{intf}") from None
            # Counted down before the port goes down, up after it is: the link pace never
            # judges a link that is down as one that is slow.
            if not up:
                self.down.add((host, intf))
            ipr.link("set", index=index, state="up" if up else "down")
            if up:
                self.down.discard((host, intf))

    def _rate(self, host: str, intf: str, rate: int) -> None:
        interface = self.fabric.plan.host(host).interface(intf)
        shares = self.fabric.plan.topology.qos if interface.prioritized else None
        # While the two ends change, the link is judged against the slower rate.
        before = self.intended_rate(host, intf) or rate
        self.rates[(host, intf)] = min(rate, before)
        try:
            with IPRoute() as root:
                qos.set_rate(root, interface.switch_port, rate, shares)
            netns = f"/proc/{self.fabric.node(host).netns_pid}/ns/net"
            with IPRoute(netns=netns, flags=0) as ipr:
                qos.set_rate(ipr, intf, rate, shares)
        except BaseException:
            self.rates[(host, intf)] = before
            raise
        self.rates[(host, intf)] = rate

    def _agent(self, host: str, kind: str) -> None:
        if self.agents is None:
            raise TestbedError("this fabric runs no agents (started with --no-agents)")
        self.stopped.add(host)
        if kind == "kill":
            if not self.agents.kill(host):
                raise TestbedError(f"the agent on {host} was not running")
        else:
            self.agents.restart(host)


class FaultServer:
    """Takes faults from `testbed fault` while the fabric is up: one JSON line in (a
    FaultSpec without its trigger), the events or an error out."""

    def __init__(self, injector: Injector, path: Path = SOCKET_PATH):
        self.injector, self.path = injector, path
        injector_ = injector

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    fields = json.loads(self.rfile.readline())
                    fault = FaultSpec.model_validate({**fields, "at": 0})
                    reply = {"ok": True, "events": injector_.apply(fault, source="live")}
                except ValidationError as exc:
                    reply = {"ok": False, "error": validation_message(exc, FaultSpec)}
                except (TestbedError, ValueError) as exc:
                    reply = {"ok": False, "error": str(exc)}
                self.wfile.write(json.dumps(reply).encode() + b"\n")

        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.server = socketserver.ThreadingUnixStreamServer(str(path), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="faults",
                                       daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.path.unlink(missing_ok=True)


def send_fault(fields: dict, path: Path = SOCKET_PATH, timeout: float = 600) -> list[dict]:
    """Ask the fabric's owner to carry a fault out; its events."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise TestbedError("no running fabric takes faults: start one with `make "
                               "fabric-up` or `make scenario NAME=...`") from None
        sock.sendall(json.dumps(fields).encode() + b"\n")
        reply = json.loads(sock.makefile().readline() or '{"ok": false, "error": "no reply"}')
    if not reply["ok"]:
        raise TestbedError(reply["error"])
    return reply["events"]
