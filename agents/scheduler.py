"""The scheduler agent: DualPath's request scheduler (paper §5), on the `sched` host.

Clients `submit` requests; engine groups pull work through their leaders (`fetch`), and the
policy decides, on each fetch, which engine takes which request and on which side its KV is
read. A request first gets a decode engine (the prefill engine must know where to send the
KV), then a prefill engine and a read path; its decode engine is handed the decode once the
prefill has completed (the prompt KV is then in the DE buffer). Engines report back with
`complete`.

The scheduler keeps seq_e, tok_e and each node's read queue itself, from what it assigned
and what completed: the numbers the engines would report on a fetch, without a polling
delay. A node's read queue is the hit tokens of the prefills reading on that node that have
not completed yet (a poll of the node agents would miss what this very fetch assigned).

A request allocates decode HBM only once its prefill has ended and its prompt is in the DE
buffer (paper §3.3); an engine short of HBM makes it wait there. The placement filter's free
HBM therefore counts the engine's HBM plus its share of the DE buffer (`buffer_tokens`), less
what is placed on it and not yet decoded: placements run ahead of HBM by at most the buffer,
so waiting prompts never take the DRAM that the DE read path loads into. (Without that bound
placements ran ahead and stalled the DE read path; reserving HBM at placement instead makes
every second of prefill latency a second of HBM held idle.)
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from agents.kv import parse_blocks
from agents.metrics import gauge
from agents.policies import load_policy
from agents.runtime import Agent, run
from agents.scheduling import EngineState, Request, read_plan


@dataclass
class Pending:
    request: Request
    body: dict                     # what the client submitted
    submitted: float = field(default_factory=time.time)
    pe: EngineState | None = None
    de: EngineState | None = None
    path: str | None = None
    reads: dict[str, int] = field(default_factory=dict)   # node -> hit tokens it reads
    results: dict = field(default_factory=dict)
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
        self.configure_from({"policy": self.args.policy, "alpha": 0, "beta": 1 << 60,
                             "hbm_tokens": 1 << 60, "buffer_tokens": 0})

    def control_handlers(self) -> dict:
        return {**super().control_handlers(), "configure": self.configure,
                "submit": self.submit, "fetch": self.fetch, "complete": self.complete}

    async def stats(self, _message: dict) -> dict:
        return {"policy": self.policy.name, "pending": len(self.pending),
                "waiting_decode": len(self.global_de) + sum(map(len, self.private.values())),
                "waiting_prefill": len(self.pe_waiting), "decisions": dict(self.decisions),
                "read_q": dict(self.read_q),
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
        self.decisions = dict.fromkeys(self.decisions, 0)
        for engines in self.groups["decode"].values():
            for e in engines:
                e.free_hbm = room
        self.global_de: deque[Request] = deque()
        self.ready = {g: [] for g in self.groups["decode"]}   # decodes whose prefill is done
        self.private = {g: deque() for g in self.groups["decode"]}
        self.pe_waiting: deque[Request] = deque()

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
                "de": pending.de.name, "path": pending.path, **pending.results}

    # -- engine groups ----------------------------------------------------------------------
    async def fetch(self, m: dict) -> dict:
        """A group leader pulls its group's new work."""
        group, role = m["group"], m["role"]
        if role == "decode":
            assigned = self.policy.place_decode(self.global_de, self.groups["decode"],
                                                self.private, group)
            for r, de in assigned:
                self.pending[r.id].de = de
                self.pe_waiting.append(r)    # now it may be prefilled: its KV has somewhere to go
            work, self.ready[group] = self.ready[group], []
        else:
            assigned = self.policy.place_prefill(self.pe_waiting, self.groups["prefill"][group],
                                                 dict(self.read_q), self.alpha, self.beta)
            work = [self.prefill_work(r, pe) for r, pe in assigned]
        self.decisions[role] += len(assigned)
        return {"assignments": work}

    def decode_work(self, p: Pending) -> dict:
        r, b = p.request, p.body
        return {"engine": p.de.name, "op": "decode", "args": {
            "request": r.id, "model": b["model"], "prompt": b["hit"] + b["miss"],
            "generate": r.generate, "generated_block_base": b["generated_block_base"],
            "oracle": self.policy.oracle, "hbm_tokens": self.hbm_tokens}}

    def prefill_work(self, r: Request, pe: EngineState) -> dict:
        p = self.pending[r.id]
        p.pe = pe
        p.path = self.policy.read_path(pe, p.de, self.read_q)
        self.decisions[p.path] += 1
        b = p.body
        share = (self.policy.pe_share(pe, p.de, self.read_q, r.context)
                 if p.path == "split" else None)
        reads = read_plan(p.path, parse_blocks(b["hit"]), pe.node, p.de.node, share)
        for node, blocks in reads:
            p.reads[node] = sum(t for _, t in blocks)
            self.read_q[node] += p.reads[node]
        return {"engine": pe.name, "op": "prefill", "args": {
            "request": r.id, "model": b["model"], "hit": b["hit"], "miss": b["miss"],
            "path": p.path, "reads": reads, "decode_node": p.de.node,
            "oracle": self.policy.oracle, "layerwise": self.policy.layerwise}}

    async def complete(self, m: dict) -> dict:
        p = self.pending.get(int(m["request"]))
        if p is None:
            return {"known": False}
        r, op = p.request, m["phase"]
        engine = p.pe if op == "prefill" else p.de
        engine.seq -= 1
        engine.tok -= r.tokens
        if op == "prefill":
            for node, tokens in p.reads.items():
                self.read_q[node] -= tokens
            if not m.get("error"):
                self.ready[p.de.node].append(self.decode_work(p))
            else:   # its decode will never run: give back what its placement reserved
                p.de.seq -= 1
                p.de.tok -= r.tokens
                p.de.free_hbm += r.hbm_need
        else:
            engine.free_hbm += r.hbm_need
        if m.get("error"):
            if not p.done.done():
                p.done.set_exception(RuntimeError(f"{op} on {engine.name}: {m['error']}"))
        else:
            p.results[op] = m["result"]
            if {"prefill", "decode"} <= p.results.keys() and not p.done.done():
                p.done.set_result(None)
        return {"known": True}


def _args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--policy", default="dualpath")


if __name__ == "__main__":
    run(SchedulerAgent, _args)
