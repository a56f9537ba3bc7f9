"""The scheduler agent: DualPath's request scheduler (paper §5), on the `sched` host.

Clients `submit` requests; engine groups pull work through their leaders (`fetch`), and the
policy decides, on each fetch, which engine takes which request and on which side its KV is
read. A request first gets a decode engine (the prefill engine must know where to send the
KV), then a prefill engine and a read path; its decode engine is handed the decode once the
prefill has completed (the prompt KV is then in the DE buffer). Engines report back with
`complete`.

The scheduler keeps seq_e, tok_e and each node's read queue itself, from what it assigned
and what engines reported: the numbers the engines would report on a fetch, without a
polling delay. A node's read queue is its disk-read queue (§5.4): the hit tokens placed to
be read on that node whose read has not ended (a prefill engine reports each node's `read`
of a request; the oracle reads nothing). A poll of the node agents would miss what this very
fetch assigned; counting reads until their prefill ends would count tokens already read that
wait for the GPU.

A request allocates decode HBM only once its prefill has ended and its prompt is in the DE
buffer (paper §3.3); an engine short of HBM makes it wait there. The placement filter's free
HBM therefore counts the engine's HBM plus its share of the DE buffer (`buffer_tokens`), less
what is placed on it and not yet decoded: placements run ahead of HBM by at most the buffer,
so waiting prompts never take the DRAM that the DE read path loads into. (Without that bound
placements ran ahead and stalled the DE read path; reserving HBM at placement instead makes
every second of prefill latency a second of HBM held idle.)

Faults (`agents.health` watches every engine and node): work is placed only on engines whose
agent, CNIC, node agent and PCIe link are up, and read only on nodes whose SNIC is up; a
dual-path policy reads on the other side when one side's SNIC is down. A request in flight
on an agent that went away is given up with the reason: its accounting is undone, its KV
dropped on the nodes that hold it, and the client told, which may submit it again. A
scheduler that starts tells every engine and node to abandon what an earlier one placed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agents.clock import clock
from agents.control import acall, error_text
from agents.health import ClusterHealth
from agents.kv import parse_blocks
from agents.metrics import gauge
from agents.policies import load_policy
from agents.runtime import Agent, run
from agents.scheduling import EngineState, Request, read_plan

GIVEN_UP_KEPT = 100_000    # given-up requests remembered, to drop the KV of a late finisher


@dataclass
class Pending:
    request: Request
    body: dict                     # what the client submitted
    submitted: float = field(default_factory=clock.time)
    pe: EngineState | None = None
    de: EngineState | None = None
    path: str | None = None
    reads: dict[str, int] = field(default_factory=dict)   # node -> hit tokens it reads
    unread: dict[str, int] = field(default_factory=dict)  # those still in the read queues
    results: dict = field(default_factory=dict)
    open: set[str] = field(default_factory=set)      # phases placed and not ended
    via: dict[str, str] = field(default_factory=dict)  # phase -> the engine handing it over
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SchedulerAgent(Agent):
    name = "scheduler"

    async def start(self) -> None:
        gpus = self.plan.of_kind("gpu")
        self.engines = {g.name: EngineState(g.name, g.node) for g in gpus}
        self.groups = {"prefill": {}, "decode": {}}
        for g in gpus:
            self.groups[g.role].setdefault(g.node, []).append(self.engines[g.name])
        self.read_q = {n.name: 0 for n in self.plan.of_kind("node")}   # tokens
        self.pending: dict[int, Pending] = {}
        self.decisions = {"prefill": 0, "decode": 0, "pe": 0, "de": 0, "split": 0}
        # request -> nodes that may hold its KV (the latest GIVEN_UP_KEPT)
        self.given_up: dict[int, set[str]] = {}
        self.configure_from(json.loads(self.args.configuration) if self.args.configuration
                            else {"policy": self.args.policy, "alpha": 0, "beta": 1 << 60,
                                  "hbm_tokens": 1 << 60, "buffer_tokens": 0})
        nodes = self.plan.of_kind("node")
        self.health = ClusterHealth({h.name: h.address("mgmt") for h in [*gpus, *nodes]},
                                    on_lost=self.lost)
        # Engines first: a prefill stopped after its node's reset could still push KV there.
        abandoned = sum(await asyncio.gather(*(self.reset(h.name) for h in gpus)))
        abandoned += sum(await asyncio.gather(*(self.reset(h.name) for h in nodes)))
        if abandoned:
            self.log.warning("abandoned what an earlier scheduler placed: %d request parts",
                             abandoned)
        self.watching = asyncio.create_task(self.health.watch())

    def control_handlers(self) -> dict:
        return {**super().control_handlers(), "configure": self.configure,
                "submit": self.submit, "fetch": self.fetch, "read": self.read,
                "complete": self.complete, "ready": self.groups_ready}

    async def reset(self, host: str) -> int:
        try:
            reply = await acall(self.address(host, "mgmt"), "reset", timeout=5)
        except (OSError, RuntimeError, asyncio.TimeoutError):
            return 0           # not running yet (a fresh cluster), or gone
        return reply.get("dropped", 0)

    async def stats(self, _message: dict) -> dict:
        return {"policy": self.policy.name, "pending": len(self.pending),
                "waiting_decode": len(self.global_de) + sum(map(len, self.private.values())),
                "waiting_prefill": len(self.pe_waiting), "decisions": dict(self.decisions),
                "read_q": dict(self.read_q), "reads_reported": self.reads_reported,
                "engines": {e.name: {"seq": e.seq, "tok": e.tok} for e in self.engines.values()}}

    def metrics(self):
        policy = self.policy.name
        placements = CounterMetricFamily(
            "dualpath_scheduler_placements", "Requests placed on an engine, per role",
            labels=["policy", "role"])
        paths = CounterMetricFamily(
            "dualpath_scheduler_read_paths", "Read paths chosen (pe, de or split)",
            labels=["policy", "path"])
        for role in ("prefill", "decode"):
            placements.add_metric([policy, role], self.decisions[role])
        for path in ("pe", "de", "split"):
            paths.add_metric([policy, path], self.decisions[path])
        categories = CounterMetricFamily(
            "dualpath_scheduler_categories",
            "Placements by the category they came from (PE: short or long read queue, alpha; "
            "DE: low or high against Z) and fetches that stopped (every PE over beta, no DE "
            "with the HBM)", labels=["policy", "category"])
        for category in ("pe_short", "pe_long", "pe_over_beta", "de_low", "de_high",
                         "de_no_hbm", "round_robin"):
            categories.add_metric([policy, category], self.policy.categories[category])
        read_q = GaugeMetricFamily("dualpath_scheduler_read_queue_tokens",
                                   "Hit tokens assigned to each node's reads and not done",
                                   labels=["read_node"])
        for node, tokens in list(self.read_q.items()):   # one atomic snapshot
            read_q.add_metric([node], tokens)
        yield from (placements, paths, categories, read_q)
        yield gauge("dualpath_scheduler_waiting_requests", "Requests not yet placed",
                    len(self.global_de) + sum(map(len, self.private.values()))
                    + len(self.pe_waiting))

    # -- configuration ----------------------------------------------------------------------
    async def configure(self, m: dict) -> dict:
        if self.pending:
            raise RuntimeError(f"{len(self.pending)} requests are still in flight")
        self.configure_from(m)
        return {"policy": self.policy.name}

    def configure_from(self, m: dict) -> None:
        """A policy and its thresholds (alpha, beta, a decode engine's HBM and its share of
        the DE buffer, all in tokens)."""
        self.policy = load_policy(m["policy"])
        self.alpha, self.beta = int(m["alpha"]), int(m["beta"])
        self.hbm_tokens = int(m["hbm_tokens"])
        room = self.hbm_tokens + int(m.get("buffer_tokens", 0))
        for e in self.engines.values():
            e.seq = e.tok = 0
        self.read_q = dict.fromkeys(self.read_q, 0)
        self.reads_reported = 0     # reads (a request's, on one node) that ended before its prefill
        self.decisions = dict.fromkeys(self.decisions, 0)
        for engines in self.groups["decode"].values():
            for e in engines:
                e.free_hbm = room
        self.global_de: deque[Request] = deque()
        self.ready = {g: [] for g in self.groups["decode"]}   # decodes whose prefill is done
        self.private = {g: deque() for g in self.groups["decode"]}
        self.pe_waiting: deque[Request] = deque()
        self.fetched: set[str] = set()      # groups whose leader fetched since this configure

    async def groups_ready(self, m: dict) -> dict:
        """Which engine groups cannot take work yet: a client starts its workload once none
        is left. A group waits until its leader has fetched since the last `configure` (a
        leader that found no scheduler while the cluster came up backs off for a second) and
        the health watch has seen every engine of it answer (one that was still starting at
        the first round counts as down until the next, a second later)."""
        return {"waiting": [g for role in ("prefill", "decode")
                            for g, engines in self.groups[role].items()
                            if g not in self.fetched or not all(map(self.usable, engines))]}

    # -- clients ----------------------------------------------------------------------------
    async def submit(self, m: dict) -> dict:
        """m: request, model, hit, miss (blocks), generate, generated_block_base. Answers
        when the request has completed, with where it ran and what the engines reported."""
        hit, miss = parse_blocks(m["hit"]), parse_blocks(m["miss"])
        r = Request(int(m["request"]), sum(t for _, t in hit), sum(t for _, t in miss),
                    int(m["generate"]))
        pending = self.pending[r.id] = Pending(r, m)
        self.global_de.append(r)
        try:
            await pending.done
        finally:
            self.pending.pop(r.id, None)
        return {"request": r.id, "submitted": pending.submitted, "pe": pending.pe.name,
                "de": pending.de.name, "path": pending.path, "oracle": self.policy.oracle,
                **pending.results}

    # -- engine groups ----------------------------------------------------------------------
    async def fetch(self, m: dict) -> dict:
        """A group leader (`engine`) pulls its group's new work."""
        group, role, via = m["group"], m["role"], m.get("engine", "")
        self.fetched.add(group)
        if role == "decode":
            groups = self.usable_groups("decode")
            if group not in groups:
                return {"assignments": []}
            assigned = self.policy.place_decode(self.global_de, groups, self.private, group)
            for r, de in assigned:
                p = self.pending[r.id]
                p.de = de
                p.open.add("decode")
                self.pe_waiting.append(r)    # now it may be prefilled: its KV has somewhere to go
            work, self.ready[group] = self.ready[group], []
            for item in work:
                self.pending[item["args"]["request"]].via["decode"] = via
        else:
            groups = self.usable_groups("prefill")
            if group not in groups:
                return {"assignments": []}
            assigned = self.policy.place_prefill(self.pe_waiting, groups, group,
                                                 dict(self.read_q), self.alpha, self.beta)
            work = [w for r, pe in assigned if (w := self.prefill_work(r, pe, via))]
        self.decisions[role] += len(assigned)
        return {"assignments": work}

    def usable(self, engine: EngineState) -> bool:
        """Its agent, its CNIC, its node's agent and PCIe link all up."""
        h = self.health
        return h[engine.name].link("cnic") and h[engine.node].link("pcie")

    def can_read(self, node: str) -> bool:
        return self.health[node].link("snic")

    def usable_groups(self, role: str) -> dict[str, list[EngineState]]:
        """Per group, its usable engines; a decode group with none gives its waiting
        requests back to the global queue, for the other groups."""
        groups = {}
        for group, engines in self.groups[role].items():
            if up := [e for e in engines if self.usable(e)]:
                groups[group] = up
            elif role == "decode" and self.private[group]:
                self.global_de.extendleft(reversed(self.private[group]))
                self.private[group].clear()
        return groups

    def decode_work(self, p: Pending) -> dict:
        r, b = p.request, p.body
        return {"engine": p.de.name, "op": "decode", "args": {
            "request": r.id, "model": b["model"], "prompt": b["hit"] + b["miss"],
            "generate": r.generate, "generated_block_base": b["generated_block_base"],
            "oracle": self.policy.oracle, "hbm_tokens": self.hbm_tokens}}

    def prefill_work(self, r: Request, pe: EngineState, via: str) -> dict | None:
        p = self.pending[r.id]
        p.pe, p.via["prefill"] = pe, via
        p.open.add("prefill")
        p.path = self.policy.read_path(pe, p.de, self.read_q)
        b = p.body
        share = (self.policy.pe_share(pe, p.de, self.read_q, r.context)
                 if p.path == "split" else None)
        if self.policy.dual_path and r.context:
            # DualPath's second path as failover: read where a SNIC is up.
            pe_ok, de_ok = self.can_read(pe.node), self.can_read(p.de.node)
            if not (pe_ok or de_ok):
                self.give_up(p, f"no node can read from storage: {pe.node} and {p.de.node} "
                                "have their SNIC down or their agent gone")
                return None
            if not pe_ok:
                p.path, share = "de", None
            elif not de_ok:
                p.path, share = "pe", None
        self.decisions[p.path] += 1
        reads = read_plan(p.path, parse_blocks(b["hit"]), pe.node, p.de.node, share)
        for node, blocks in reads:
            p.reads[node] = sum(t for _, t in blocks)
        if not self.policy.oracle:        # the oracle reads nothing
            p.unread = {node: tokens for node, tokens in p.reads.items() if tokens}
            for node, tokens in p.unread.items():
                self.read_q[node] += tokens
                self.policy.read_total[node] += tokens
        return {"engine": pe.name, "op": "prefill", "args": {
            "request": r.id, "model": b["model"], "hit": b["hit"], "miss": b["miss"],
            "path": p.path, "reads": reads, "decode_node": p.de.node,
            "oracle": self.policy.oracle, "layerwise": self.policy.layerwise}}

    async def read(self, m: dict) -> dict:
        """A prefill engine has read a request's hit KV on `node` into its DRAM."""
        p = self.pending.get(int(m["request"]))
        if p is not None and m["node"] in p.unread:
            self.read_q[m["node"]] -= p.unread.pop(m["node"])
            self.reads_reported += 1
        return {}

    async def complete(self, m: dict) -> dict:
        request = int(m["request"])
        p = self.pending.get(request)
        if p is None or p.done.done():
            # Given up while it ran (or placed by an earlier scheduler): whatever it left
            # in DRAM goes too.
            self.drop_kv(request, self.given_up.get(request, set(self.read_q)))
            return {"known": False}
        op = m["phase"]
        engine = p.pe if op == "prefill" else p.de
        self.close(p, op)
        if "error" in m:
            self.give_up(p, f"{op} on {engine.name}: {m['error'] or 'failed'}")
            return {"known": True}
        p.results[op] = m["result"]
        if op == "prefill":
            self.ready[p.de.node].append(self.decode_work(p))
        elif "prefill" in p.results:
            p.done.set_result(None)
        return {"known": True}

    # -- ends -------------------------------------------------------------------------------
    def close(self, p: Pending, phase: str) -> None:
        """A placed phase ended: its engine's and read queues' accounting is undone."""
        if phase not in p.open:
            return
        p.open.discard(phase)
        r = p.request
        if phase == "prefill":
            p.pe.seq -= 1
            p.pe.tok -= r.tokens
            for node, tokens in p.unread.items():
                self.read_q[node] -= tokens
            p.unread.clear()
        else:
            p.de.seq -= 1
            p.de.tok -= r.tokens
            p.de.free_hbm += r.hbm_need

    def give_up(self, p: Pending, reason: str) -> None:
        """Fail a request with `reason`, wherever it is: queued, placed or running."""
        if p.done.done():
            return
        r = p.request
        nodes = set(p.reads) | {e.node for e in (p.pe, p.de) if e}
        for phase in list(p.open):
            engine = p.pe if phase == "prefill" else p.de
            asyncio.create_task(self.call_quietly(engine.name, "cancel", requests=[r.id]))
            self.close(p, phase)
        for queue in (self.global_de, self.pe_waiting, *self.private.values()):
            if r in queue:
                queue.remove(r)
        for group, work in self.ready.items():
            self.ready[group] = [w for w in work if w["args"]["request"] != r.id]
        self.given_up[r.id] = nodes
        while len(self.given_up) > GIVEN_UP_KEPT:
            del self.given_up[next(iter(self.given_up))]
        self.drop_kv(r.id, nodes)
        self.log.warning("request %d failed: %s", r.id, reason)
        p.done.set_exception(RuntimeError(reason))

    def drop_kv(self, request: int, nodes: set[str]) -> None:
        for node in nodes:
            asyncio.create_task(self.call_quietly(node, "drop", requests=[request]))

    async def call_quietly(self, host: str, op: str, **fields) -> None:
        """A best-effort call: the agent may be the one that is gone."""
        try:
            await acall(self.address(host, "mgmt"), op, timeout=10, **fields)
        except Exception as exc:
            self.log.info("%s on %s: %s", op, host, error_text(exc))

    def lost(self, host: str, reason: str) -> None:
        """An engine or node went away: every request it had a part in fails."""
        for p in list(self.pending.values()):
            involved = set()
            if "prefill" in p.open:
                involved |= {p.pe.name, p.pe.node, p.de.node, p.via.get("prefill"), *p.reads}
            if "decode" in p.open:
                involved |= {p.de.name, p.de.node, p.via.get("decode")}
            if host in involved:
                self.give_up(p, f"lost {reason}")


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="dualpath")
    parser.add_argument("--configuration", help="JSON: what `configure` takes (a restarted "
                                                "scheduler starts as its predecessor was)")


if __name__ == "__main__":
    run(SchedulerAgent, _args)
