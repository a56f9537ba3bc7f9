"""Scheduling policies: how a scheduler places requests on engines and picks read paths.

Each policy is a small class behind one interface. Three switches make the paper's
ablation: layerwise prefill, dual-path loading, and the scheduler of §5 (off: round robin).
A user adds a policy by subclassing `Policy` in a module and naming it in a scenario as
`package.module:ClassName`; the built-in ones are named in POLICIES.
"""

from __future__ import annotations

import importlib
import itertools
from collections import Counter, deque

from agents.scheduling import (EngineState, Request, choose_read_path, de_group_schedule,
                               de_schedule, pe_schedule)


class RoundRobin:
    """Placement without the scheduler: requests, in arrival order, to the engines of all
    groups in turn. Each request is given its engine once, when first seen, and waits for
    that engine's group to fetch (and, for a decode, for the engine's free HBM): which group
    happens to fetch first does not change where requests go. A request whose engine is no
    longer usable is given the next one in turn."""

    def __init__(self) -> None:
        self._turn = itertools.count()
        self._given: dict[int, str] = {}      # request id -> engine, for requests still queued

    def place(self, queue: deque[Request], groups: dict[str, list[EngineState]], group: str,
              decode: bool) -> list[tuple[Request, EngineState]]:
        engines = {e.name: e for g in sorted(groups) for e in groups[g]}
        names = list(engines)
        fetching = {e.name for e in groups[group]}
        assigned, keep = [], deque()
        while queue:
            r = queue.popleft()
            name = self._given.get(r.id)
            if name not in engines:
                name = self._given[r.id] = names[next(self._turn) % len(names)]
            e = engines[name]
            if name in fetching and (not decode or e.free_hbm >= r.hbm_need):
                e.seq, e.tok = e.seq + 1, e.tok + r.tokens
                if decode:
                    e.free_hbm -= r.hbm_need
                assigned.append((r, e))
            else:
                keep.append(r)
        queue.extend(keep)
        self._given = {r.id: self._given[r.id] for r in keep}
        return assigned


class Policy:
    name = "policy"
    layerwise = True      # prefill streams KV layer by layer, overlapped with compute
    dual_path = True      # KV may be read on the decode side and forwarded (DE read path)
    scheduled = True      # the paper's §5 rules; off: round robin
    oracle = False        # skip all KV I/O

    def __init__(self) -> None:
        self._prefill_turns = RoundRobin()
        self._decode_turns = RoundRobin()
        self._next_path = itertools.count()
        self.categories: Counter = Counter()   # where its placements came from (§5 rules)
        # Hit tokens each node was given to read (the scheduler counts them): a read-path tie
        # goes to the node that has read less.
        self.read_total: Counter = Counter()

    # -- placement ------------------------------------------------------------------------
    def place_decode(self, global_queue: deque[Request], groups: dict[str, list[EngineState]],
                     private: dict[str, deque[Request]], group: str,
                     ) -> list[tuple[Request, EngineState]]:
        if self.scheduled:
            de_group_schedule(global_queue, groups, private)
            return de_schedule(private[group], groups[group], categories=self.categories)
        return self._decode_turns.place(global_queue, groups, group, decode=True)

    def place_prefill(self, waiting: deque[Request], groups: dict[str, list[EngineState]],
                      group: str, read_q: dict[str, int], alpha: int, beta: int,
                      ) -> list[tuple[Request, EngineState]]:
        """`groups`: every usable prefill group's engines; `group`: the one fetching."""
        if self.scheduled:
            return pe_schedule(waiting, groups[group], read_q, alpha, beta, self.categories)
        assigned = self._prefill_turns.place(waiting, groups, group, decode=False)
        self.categories["round_robin"] += len(assigned)
        return assigned

    # -- read path ------------------------------------------------------------------------
    def pe_share(self, pe: EngineState, de: EngineState, read_q: dict[str, int],
                 tokens: int) -> float:
        """For a 'split' read path: the share of the hit tokens read on the PE side."""
        return 1.0

    def read_path(self, pe: EngineState, de: EngineState, read_q: dict[str, int]) -> str:
        """`read_q`: each node's hit tokens placed and not yet read."""
        if not self.dual_path:
            return "pe"
        if self.scheduled:
            return choose_read_path(pe, de, read_q, self.read_total)
        return ("pe", "de")[next(self._next_path) % 2]


class Basic(Policy):
    """The unmodified baseline: PE read path only, no layerwise prefill, no scheduler."""
    name, layerwise, dual_path, scheduled = "basic", False, False, False


class Layerwise(Policy):
    """Basic plus layerwise prefill: the ablation's first step."""
    name, dual_path, scheduled = "layerwise", False, False


class DualPath(Policy):
    """The full system."""
    name = "dualpath"


class DualPathRoundRobin(Policy):
    """Dual-path loading and layerwise prefill without the scheduler: round robin."""
    name, scheduled = "dualpath-rr", False


class Split(Policy):
    """Beyond the paper (its future work): one request's read split across both sides, so
    that the two read queues end level: DualPath's scheduler otherwise."""
    name = "split"

    def read_path(self, pe: EngineState, de: EngineState, read_q: dict[str, int]) -> str:
        return "split"

    def pe_share(self, pe: EngineState, de: EngineState, read_q: dict[str, int],
                 tokens: int) -> float:
        if tokens <= 0:
            return 1.0
        # x tokens on the PE side: read_q[pe] + x = read_q[de] + tokens - x
        x = (read_q[de.node] - read_q[pe.node] + tokens) / 2
        return min(1.0, max(0.0, x / tokens))


class Oracle(Policy):
    """DualPath's placement with every KV transfer skipped: the compute bound."""
    name, oracle = "oracle", True


POLICIES = {p.name: p for p in (Basic, Layerwise, DualPath, DualPathRoundRobin, Split, Oracle)}


def load_policy(name: str) -> Policy:
    """A built-in policy by name, or `package.module:ClassName` for one of the user's."""
    if name in POLICIES:
        return POLICIES[name]()
    module, _, cls = name.partition(":")
    if not cls:
        raise ValueError(f"policy: got {name!r}, expected one of {sorted(POLICIES)} or "
                         "'package.module:ClassName'")
    try:
        policy = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"policy: got {name!r}, cannot load it ({exc})") from None
    if not (isinstance(policy, type) and issubclass(policy, Policy)):
        raise ValueError(f"policy: got {name!r}, expected a subclass of agents.policies.Policy")
    return policy()
