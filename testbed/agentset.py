"""Starting and stopping the agents of a fabric: one process per host, inside the host.

storage hosts run agents.storage, nodes agents.node, GPU hosts agents.engine and the
scheduler host agents.scheduler. Each agent
gets the topology as JSON on its command line (containers do not see the host's files),
logs to LOG_DIR/<host>.log, and is ready once it answers `ping` on the management network.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from agents.clock import clock
from agents.control import call
from testbed.annotations import Annotator
from testbed.errors import TestbedError
from testbed.exporter import FabricExporter
from testbed.fabric import Fabric
from testbed.injector import FaultServer, Injector
from testbed.interrupts import deferred_signals
from testbed.plan import build_plan
from testbed.prometheus import remove_targets, write_targets
from testbed.topology import Topology
from testbed.state import STATE_DIR, FabricRecord

LOG_DIR = STATE_DIR / "logs"
REPO = Path(__file__).resolve().parent.parent
PROGRAMS = {"storage": "agents.storage", "node": "agents.node", "gpu": "agents.engine",
            "scheduler": "agents.scheduler"}
READY_SECONDS = 60
CLK_TCK = os.sysconf("SC_CLK_TCK")


class AgentSet:
    def __init__(self, fabric: Fabric):
        self.fabric = fabric
        self.processes: dict[str, subprocess.Popen] = {}
        # Arguments an agent is started with from now on: a restarted scheduler gets the
        # policy and thresholds it was configured with, before it takes any request.
        self.restart_args: dict[str, list[str]] = {}

    def _command(self, host: str, program: str) -> tuple[list[str], dict]:
        topology = self.fabric.plan.topology.model_dump_json()
        if self.fabric.backend == "docker":
            python, path = "/opt/venv/bin/python", "/opt/dualpath"
        else:
            python, path = sys.executable, str(REPO)
        cmd = [python, "-m", program, "--topology-json", topology, "--host", host]
        return cmd, {"PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "PATH": "/usr/bin:/bin"}

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for host in self.fabric.plan.hosts:
            if host.kind in PROGRAMS:
                self._spawn(host.name, "w")
        self._wait_ready(self.processes)

    def _spawn(self, name: str, mode: str, args: list[str] = ()) -> None:
        cmd, env = self._command(name, PROGRAMS[self.fabric.plan.host(name).kind])
        cmd += args
        with open(LOG_DIR / f"{name}.log", mode) as log:
            self.processes[name] = self.fabric.node(name).popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env)

    def kill(self, name: str) -> bool:
        """SIGKILL the host's agent, as a crash would; False if it was not running."""
        proc = self.processes[name]
        if proc.poll() is not None:
            return False
        proc.kill()
        proc.wait()
        return True

    def restart(self, name: str) -> None:
        """Start the host's agent again (killing it first if it runs), with its
        `restart_args`, and wait until it answers."""
        self.kill(name)
        self._spawn(name, "a", self.restart_args.get(name, []))   # "a": the log is kept
        self._wait_ready({name: self.processes[name]})

    def _wait_ready(self, processes: dict[str, subprocess.Popen]) -> None:
        deadline = time.monotonic() + READY_SECONDS
        waiting = dict(processes)
        while waiting and time.monotonic() < deadline:
            for name, proc in list(waiting.items()):
                if proc.poll() is not None:
                    raise TestbedError(f"agent on {name} exited with {proc.returncode}: "
                                       f"{self.log_tail(name)}")
                try:
                    call(self.fabric.plan.host(name).address("mgmt"), "ping", timeout=2)
                    del waiting[name]
                except OSError:
                    pass
            time.sleep(0.1)
        if waiting:
            raise TestbedError(f"agents not ready after {READY_SECONDS} s: "
                               f"{', '.join(sorted(waiting))}; see {LOG_DIR}")

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the agents have used so far."""
        ticks = 0
        for proc in self.processes.values():
            try:
                fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            ticks += int(fields[11]) + int(fields[12])   # utime + stime
        return ticks / CLK_TCK

    @staticmethod
    def log_tail(host: str) -> str:
        try:
            lines = (LOG_DIR / f"{host}.log").read_text().strip().splitlines()
        except OSError:
            return "(no log)"
        return lines[-1] if lines else "(empty log)"

    def stop(self, grace: float = 5.0) -> None:
        for proc in self.processes.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()


class RunningCluster:
    """A fabric and (unless told otherwise) its agents, up for a `with` block and torn down
    however the block ends. While it is up, its links and the client are exported to
    Prometheus (`exporter`) and the scrape targets name it, with the scenario and policy
    it runs."""

    def __init__(self, topology: Topology, agents: bool = True, topology_path: str = "",
                 scenario: str = "", policy: str = "", annotator: Annotator | None = None):
        clock.set_dilation(topology.dilation)   # the client's timeouts, the faults' times
        self.fabric = Fabric(build_plan(topology), topology_path)
        self.agents = AgentSet(self.fabric) if agents else None
        self.labels = {"scenario": scenario or topology.name, "policy": policy}
        self.exporter: FabricExporter | None = None
        self.injector = Injector(self.fabric, self.agents, annotator,
                                 tags=(f"policy:{policy}",) if policy else ())
        self.fault_server: FaultServer | None = None

    def __enter__(self) -> Fabric:
        self.fabric.up()
        try:
            if self.agents:
                self.agents.start()
            self.exporter = FabricExporter(FabricRecord.read(), self.fabric.plan)
            write_targets(self.fabric.plan, **self.labels)
            self.fault_server = FaultServer(self.injector)
        except BaseException:
            self.__exit__()
            raise
        return self.fabric

    def __exit__(self, *exc) -> None:
        with deferred_signals():
            remove_targets()
            if self.fault_server:
                self.fault_server.stop()
                self.fault_server = None
            self.injector.close()       # a live fault still under way ends first
            try:
                if self.exporter:
                    self.exporter.stop()
                    self.exporter = None
            finally:
                try:
                    if self.agents:
                        self.agents.stop()
                finally:
                    self.fabric.down()
