"""Faults: what a scenario (or `testbed fault`) does to a running cluster, and when.

A fault names a kind and a target:
  link-down, link-up, link-flap   a fabric link, as host:interface (n0:snic, n0g1:cnic,
  link-rate                       n1:pcie, st0:stor); link-rate sets it to `factor` of its
                                  configured rate (for `duration` seconds, or until changed)
  kill, restart                   a host's agent: an engine (n0g0), node (n0), storage host
                                  (st0) or the scheduler (sched); kill is SIGKILL, a crash
  storage-down, storage-up        a storage host powered off (link down, agent killed) or on
  storage-slow                    a storage host's link at `factor` of its rate
It fires `at` seconds into a policy's run, or once `after_turns` turns have completed, and
again every `every` seconds, `times` times in all. A `chaos` block instead draws faults of
every kind at random, each followed by its repair, from a fixed seed: the same seed gives
the same faults at the same times.
"""

from __future__ import annotations

import random
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from testbed.errors import TestbedError
from testbed.plan import ClusterPlan

LINK_KINDS = ("link-down", "link-up", "link-flap", "link-rate")
STORAGE_KINDS = ("storage-down", "storage-up", "storage-slow")
FaultKind = Literal[LINK_KINDS + ("kill", "restart") + STORAGE_KINDS]   # the kinds, once
# Agents a fault may kill: every kind but the client, which is the testbed process itself.
AGENT_HOST_KINDS = ("gpu", "node", "storage", "scheduler")


class FaultSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: FaultKind
    target: str = Field(min_length=1, description="host:interface for link faults, else a host")
    at: float | None = Field(default=None, ge=0, description="seconds into the run")
    after_turns: int | None = Field(default=None, ge=0,
                                    description="or: once this many turns have completed")
    every: float | None = Field(default=None, gt=0, description="repeat period, seconds")
    times: int = Field(default=1, ge=1, le=10_000)
    duration: float = Field(default=3.0, ge=0,
                            description="link-flap: seconds down; link-rate, storage-slow: "
                                        "seconds before the rate is restored (0: never)")
    factor: float = Field(default=0.1, gt=0, le=100,
                          description="link-rate, storage-slow: the share of the rate")

    @model_validator(mode="after")
    def _one_trigger(self) -> "FaultSpec":
        if (self.at is None) == (self.after_turns is None):
            raise ValueError("give exactly one of 'at' (seconds) and 'after_turns'")
        if self.times > 1 and self.every is None:
            raise ValueError(f"times: got {self.times}, which needs 'every' (seconds)")
        return self

    def describe(self) -> str:
        extra = ""
        if self.kind == "link-flap":
            extra = f" for {self.duration:g} s"
        elif self.kind in ("link-rate", "storage-slow"):
            extra = f" to {self.factor:g}x" + (f" for {self.duration:g} s" if self.duration else "")
        return f"{self.kind} {self.target}{extra}"


class ChaosSpec(BaseModel):
    """Random faults of every kind for a whole run, each repaired after `repair` seconds."""
    model_config = ConfigDict(extra="forbid")
    seed: int = 1
    every: float = Field(default=20.0, gt=0, description="mean seconds between faults")
    repair: float = Field(default=8.0, gt=0, description="seconds until a fault is repaired")
    start: float = Field(default=10.0, ge=0, description="seconds of calm before the first")


def check_target(fault: FaultSpec, plan: ClusterPlan, field: str = "target") -> None:
    """The target must exist in this cluster and suit the kind: a clear error if not."""
    names = {h.name: h for h in plan.hosts}
    if fault.kind in LINK_KINDS:
        host, _, intf = fault.target.partition(":")
        links = [f"{h.name}:{i.name}" for h in plan.hosts for i in h.interfaces
                 if i.rate is not None]
        if host not in names or intf not in [i.name for i in names[host].interfaces
                                             if i.rate is not None]:
            raise TestbedError(f"{field}: got {fault.target!r}, expected a fabric link as "
                               f"host:interface, one of {', '.join(links[:6])}, ...")
        return
    wanted = ("storage",) if fault.kind in STORAGE_KINDS else AGENT_HOST_KINDS
    if fault.target not in names or names[fault.target].kind not in wanted:
        hosts = [h.name for h in plan.hosts if h.kind in wanted]
        raise TestbedError(f"{field}: got {fault.target!r}, expected a host with "
                           f"{'a storage' if wanted == ('storage',) else 'an'} agent, one of "
                           f"{', '.join(hosts[:8])}{', ...' if len(hosts) > 8 else ''}")


def chaos_faults(chaos: ChaosSpec, plan: ClusterPlan, duration: float) -> list[FaultSpec]:
    """Faults of every kind, in turn, at random times and on random targets (an agent fault
    on each role in turn), each with its repair: a link down comes up, a killed agent restarts, a storage host comes back, a
    slowed link gets its rate back. Nothing is left broken at `duration`."""
    rng = random.Random(chaos.seed)
    links = [f"{h.name}:{i.name}" for h in plan.hosts for i in h.interfaces if i.rate is not None]
    storage = [h.name for h in plan.of_kind("storage")]
    # Each kind of agent fault takes the roles in turn (engine, node, storage, scheduler), a
    # random host of the role each time.
    roles = [[h.name for h in plan.of_kind(kind)] for kind in AGENT_HOST_KINDS]
    agent_faults: dict[str, int] = {}
    # kind, its repair (or None: it repairs itself), the targets it draws from (None: agents)
    kinds = [("link-down", "link-up", links), ("link-flap", None, links),
             ("link-rate", None, links), ("kill", "restart", None),
             ("restart", None, None), ("storage-down", "storage-up", storage),
             ("storage-slow", None, storage)]
    faults, at, turn = [], chaos.start, 0
    while at + chaos.repair < duration:
        kind, repair, targets = kinds[turn % len(kinds)]
        if targets is None:
            agent_faults[kind] = agent_faults.get(kind, -1) + 1
            targets = roles[agent_faults[kind] % len(roles)]
        target = rng.choice(targets)
        faults.append(FaultSpec(kind=kind, target=target, at=round(at, 1),
                                duration=chaos.repair, factor=0.1))
        if repair:
            faults.append(FaultSpec(kind=repair, target=target, at=round(at + chaos.repair, 1)))
        at += chaos.repair + rng.expovariate(1 / chaos.every)
        turn += 1
    return faults
