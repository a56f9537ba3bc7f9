"""What the scheduler knows of the cluster's health: which engine and node agents answer,
which run of each (a restarted agent has a new instance), and which of their links are up.

Each agent is pinged on the management network every HEALTH_SECONDS. A refused or reset
connection means the agent is gone; a ping that times out counts as a miss, and only
MISSED_PINGS in a row count as gone, since a saturated host answers late. `on_lost` is called
once per loss (the agent went away, or came back as a new instance); an agent that answers
again counts as up (a restarted engine registers this way).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from agents.clock import clock
from agents.control import acall, error_text

HEALTH_SECONDS = 1.0
PING_TIMEOUT = 2.0
MISSED_PINGS = 3

log = logging.getLogger("health")


@dataclass
class AgentHealth:
    host: str
    address: str
    alive: bool = True          # assumed until a ping says otherwise
    instance: str | None = None
    links: dict[str, bool] = field(default_factory=dict)
    missed: int = 0
    seen: bool = False          # answered at least once

    def link(self, name: str) -> bool:
        return self.alive and self.links.get(name, True)


class ClusterHealth:
    def __init__(self, addresses: dict[str, str], on_lost: Callable[[str, str], None]):
        self.agents = {host: AgentHealth(host, address) for host, address in addresses.items()}
        self.on_lost = on_lost

    def __getitem__(self, host: str) -> AgentHealth:
        return self.agents[host]

    async def watch(self) -> None:
        while True:
            results = await asyncio.gather(*map(self.check, self.agents.values()),
                                           return_exceptions=True)
            for error in (r for r in results if isinstance(r, Exception)):
                log.error("health check failed: %s", error_text(error))   # a bug: keep watching
            await clock.sleep(HEALTH_SECONDS)

    async def check(self, agent: AgentHealth) -> None:
        try:
            reply = await acall(agent.address, "ping", timeout=PING_TIMEOUT)
        except (TimeoutError, asyncio.TimeoutError):   # late, not yet gone
            agent.missed += 1
            if agent.missed >= MISSED_PINGS:
                self.lost(agent, f"{agent.host} did not answer {agent.missed} pings")
            return
        except (OSError, RuntimeError, ValueError) as exc:
            self.lost(agent, f"{agent.host} unreachable ({error_text(exc)})")
            return
        agent.missed = 0
        seen_before, agent.seen = agent.seen, True
        if agent.instance is not None and reply["instance"] != agent.instance:
            self.lost(agent, f"{agent.host} restarted")
        links = reply.get("links", {})
        for name, up in links.items():
            if seen_before and up != agent.links.get(name, True):
                log.warning("%s: link %s %s", agent.host, name, "up" if up else "down")
        agent.instance, agent.links = reply["instance"], links
        if not agent.alive:
            log.log(logging.WARNING if seen_before else logging.INFO,
                    "%s answers %s(instance %s)", agent.host,
                    "again " if seen_before else "", agent.instance[:8])
            agent.alive = True

    def lost(self, agent: AgentHealth, reason: str) -> None:
        if not agent.seen:                             # never answered: still starting
            log.info("%s not up yet", agent.host)
            agent.alive, agent.missed = False, 0
        elif agent.alive or agent.instance is not None:
            log.warning("lost %s", reason)
            agent.alive, agent.missed = False, 0
            agent.instance = None      # whatever answers next is a new run
            self.on_lost(agent.host, reason)
