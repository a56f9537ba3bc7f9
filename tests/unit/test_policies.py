"""Policies: the ablation switches, round robin without the scheduler, loading by name."""

from __future__ import annotations

from collections import deque

import pytest

from agents.policies import POLICIES, Policy, load_policy
from agents.scheduling import EngineState, Request


def test_builtin_policies_and_their_switches():
    switches = {name: (p.layerwise, p.dual_path, p.scheduled, p.oracle)
                for name, p in POLICIES.items()}
    # the ablation adds layerwise prefill, then dual-path loading, then the scheduler
    assert switches == {"basic": (False, False, False, False),
                        "layerwise": (True, False, False, False),
                        "dualpath": (True, True, True, False),
                        "dualpath-rr": (True, True, False, False),
                        "split": (True, True, True, False),
                        "oracle": (True, True, True, True)}


def test_basic_reads_on_the_prefill_side_only():
    policy = load_policy("basic")
    pe, de = EngineState("p", "P"), EngineState("d", "D")
    assert {policy.read_path(pe, de, {"P": 10**9, "D": 0}) for _ in range(4)} == {"pe"}


def test_round_robin_alternates_paths_and_engines():
    policy = load_policy("dualpath-rr")
    pe, de = EngineState("p", "P"), EngineState("d", "D")
    assert [policy.read_path(pe, de, {"P": 0, "D": 10**9}) for _ in range(4)] == \
        ["pe", "de", "pe", "de"]
    group = [EngineState(f"p{i}", "P", tok=100 * i) for i in range(3)]
    assigned = policy.place_prefill(deque(Request(i, 10, 1) for i in range(6)), {"P": group},
                                    "P", {"P": 0}, alpha=0, beta=0)
    assert [e.name for _, e in assigned] == ["p0", "p1", "p2", "p0", "p1", "p2"]


def test_round_robin_decode_leaves_other_groups_requests_queued():
    policy = load_policy("dualpath-rr")
    groups = {"a": [EngineState("a0", "A", free_hbm=10**6)],
              "b": [EngineState("b0", "B", free_hbm=10**6)]}
    queue = deque(Request(i, 10, 1) for i in range(4))
    assigned = policy.place_decode(queue, groups, {"a": deque(), "b": deque()}, "a")
    assert [r.id for r, _ in assigned] == [0, 2]
    assert [r.id for r in queue] == [1, 3]


@pytest.mark.parametrize("role", ["prefill", "decode"])
def test_round_robin_turns_do_not_depend_on_which_group_fetches_first(role):
    """Each request keeps the engine it was given: however the groups' fetches interleave
    with arrivals, the engines of both groups take turns."""
    policy = load_policy("basic")
    groups = {g: [EngineState(f"{g}{i}", g.upper(), free_hbm=10**6) for i in range(2)]
              for g in ("a", "b")}

    def fetch(queue, group):
        if role == "decode":
            return policy.place_decode(queue, groups, {"a": deque(), "b": deque()}, group)
        return policy.place_prefill(queue, groups, group, {"A": 0, "B": 0}, alpha=0, beta=0)
    queue, taken = deque(), {}
    for first in range(0, 12, 3):              # three arrive, then "a" fetches, then "b"
        queue.extend(Request(i, 10, 1) for i in range(first, first + 3))
        for group in ("a", "a", "b"):
            taken.update((r.id, e.name) for r, e in fetch(queue, group))
    assert not queue
    assert [taken[i] for i in range(12)] == ["a0", "a1", "b0", "b1"] * 3


def test_round_robin_decode_waits_for_its_engines_hbm():
    policy = load_policy("basic")
    groups = {"a": [EngineState("a0", "A", free_hbm=25)]}
    queue = deque(Request(i, 10, 1) for i in range(3))
    assigned = policy.place_decode(queue, groups, {"a": deque()}, "a")
    assert [r.id for r, _ in assigned] == [0, 1] and [r.id for r in queue] == [2]
    groups["a"][0].free_hbm = 11
    assert [r.id for r, _ in policy.place_decode(queue, groups, {"a": deque()}, "a")] == [2]


class Custom(Policy):
    name = "custom"
    dual_path = False


def test_a_users_policy_loads_by_module_and_class():
    # pytest imported this file under another module name: compare by what it is.
    policy = load_policy("tests.unit.test_policies:Custom")
    assert isinstance(policy, Policy) and policy.name == "custom" and not policy.dual_path


@pytest.mark.parametrize("name,message", [
    ("nope", "expected one of"),
    ("tests.unit.test_policies:Missing", "cannot load it"),
    ("no.such.module:Thing", "cannot load it"),
    ("tests.unit.test_policies:pytest", "expected a subclass"),
])
def test_bad_policy_names_say_what_was_expected(name, message):
    with pytest.raises(ValueError, match=message):
        load_policy(name)


def test_split_levels_the_two_read_queues():
    policy = load_policy("split")
    pe, de = EngineState("n0g0", "n0"), EngineState("n1g0", "n1")
    assert policy.read_path(pe, de, {"n0": 0, "n1": 0}) == "split"
    assert policy.pe_share(pe, de, {"n0": 0, "n1": 0}, 1000) == 0.5
    # the PE side is 400 tokens behind: it takes 300 of 1000, both end at 700
    assert policy.pe_share(pe, de, {"n0": 400, "n1": 0}, 1000) == pytest.approx(0.3)
    # far behind: everything on the DE side
    assert policy.pe_share(pe, de, {"n0": 5000, "n1": 0}, 1000) == 0.0
