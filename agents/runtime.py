"""What every agent shares: its place in the cluster plan, logging, and a clean stop."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import uuid
from collections.abc import Iterator

from agents.clock import clock
from agents.fidelity import Timeliness, freeze_heap
from agents.links import link_up
from agents.metrics import agent_registry, serve_metrics
from testbed.plan import ClusterPlan, Host, build_plan
from testbed.topology import Topology

STOP_SECONDS = 2.0


class Agent:
    """Base of the storage, node and engine agents: `start()` opens the servers."""

    name = "agent"

    def __init__(self, plan: ClusterPlan, host: Host, args: argparse.Namespace):
        self.plan = plan
        self.host = host
        self.args = args
        self.log = logging.getLogger(f"{self.name}:{host.name}")
        self.registry = agent_registry()     # histograms an agent keeps register here
        self.instance = uuid.uuid4().hex      # a restarted agent answers with a new one
        self.timeliness = Timeliness()        # loop lag and kernel lateness, for the verdict

    async def start(self) -> None:
        raise NotImplementedError

    async def stats(self, _message: dict) -> dict:
        return {}

    def metrics(self) -> Iterator:
        """Prometheus metric families, read from the agent's state at each scrape."""
        return iter(())

    def control_handlers(self) -> dict:
        return {"ping": self.ping, "stats": self.stats, "fidelity": self.fidelity}

    async def fidelity(self, message: dict) -> dict:
        """This agent's timeliness since the last reset (`reset: true` starts anew, and is
        sent as the workload starts: what the agent holds by then is frozen)."""
        reset = bool(message.get("reset"))
        if reset:
            freeze_heap()
        return self.timeliness.report(reset)

    async def ping(self, _message: dict) -> dict:
        """Who answers, which run of it, and whether each of its fabric links is up."""
        return {"agent": self.name, "host": self.host.name, "instance": self.instance,
                "links": self.link_states()}

    def link_states(self) -> dict[str, bool]:
        return {i.name: link_up(i.name) for i in self.host.interfaces if i.fabric != "mgmt"}

    def address(self, host: str, intf: str) -> str:
        return self.plan.host(host).address(intf)


def run(agent_class: type[Agent], extra_args=None) -> None:
    parser = argparse.ArgumentParser(prog=f"agents.{agent_class.name}")
    parser.add_argument("--topology-json", required=True, help="the fabric's topology, as JSON")
    parser.add_argument("--host", required=True, help="this host's name in the plan")
    parser.add_argument("--verbose", action="store_true")
    if extra_args:
        extra_args(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {args.host} %(name)s %(levelname)s %(message)s")
    plan = build_plan(Topology.model_validate_json(args.topology_json))
    clock.set_dilation(plan.topology.dilation)
    agent = agent_class(plan, plan.host(args.host), args)

    async def main() -> None:
        from agents.control import serve_control
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        agent.timeliness.start()
        await agent.start()
        await serve_control(agent.host.address("mgmt"), agent.control_handlers())
        serve_metrics(agent, agent.host.address("mgmt"))
        agent.log.info("ready")
        await stop.wait()
        agent.log.info("stopping")
        # Python 3.11's wait_for can swallow a cancellation, leaving a task that never
        # ends: give the tasks a moment to finish, then leave regardless.
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        _, stuck = await asyncio.wait(tasks, timeout=STOP_SECONDS) if tasks else ((), ())
        if stuck:
            agent.log.warning("%d tasks did not stop within %s s; exiting anyway",
                              len(stuck), STOP_SECONDS)
            logging.shutdown()
            os._exit(0)

    asyncio.run(main())
