"""`auto`'s choice of a topology's TDF (testbed/dilation.py), from the verdicts of its pilots.

The pilots here are the verdicts a run would return, given as a table: what is under test is
the choice (the smallest TDF at which every policy that moves KV is VALID, one TDF for all
of a topology's policies), not the runs, which the integration suites and the bench make.
"""

from __future__ import annotations

from testbed.dilation import pick, resolve
from testbed.scenario import REPO

TOPOLOGY = REPO / "topologies" / "1p2d-g2.yaml"
POLICIES = ["basic", "dualpath", "oracle"]


def pilots_from(valid_at: dict[str, float], lucky: dict[str, float] | None = None,
                unlucky: dict[str, float] | None = None):
    """A pilot whose run is VALID from the given TDF on, per policy; at the `lucky` TDF its
    first try alone is VALID, and at the `unlucky` TDF its first try alone is INVALID.
    Records each call."""
    calls: list[tuple[str, float]] = []

    def pilot(policy: str, tdf: float) -> dict:
        first = (policy, tdf) not in calls
        calls.append((policy, tdf))
        valid = tdf >= valid_at[policy]
        if first and (lucky or {}).get(policy) == tdf:
            valid = True
        if first and (unlucky or {}).get(policy) == tdf:
            valid = False
        summary = "VALID" if valid else f"INVALID: kernel lateness at TDF {tdf:g}"
        return {"fidelity": {"valid": valid, "summary": summary}}
    return pilot, calls


def test_auto_picks_the_smallest_tdf_at_which_every_kv_moving_policy_is_valid():
    pilot, calls = pilots_from({"basic": 2, "dualpath": 4, "oracle": 16})
    tdf, why = pick(TOPOLOGY, POLICIES, pilot)
    assert tdf == 4
    # oracle moves no KV and is never piloted beside policies that do; two pilots that agree
    # settle a policy's vote, and a TDF stops at the first policy that votes INVALID
    assert calls == [("basic", 1), ("basic", 1), ("basic", 2), ("basic", 2),
                     ("dualpath", 2), ("dualpath", 2),
                     ("basic", 4), ("basic", 4), ("dualpath", 4), ("dualpath", 4)]
    assert why.startswith("auto: TDF 4 for 1p2d-g2 (")
    assert "TDF 1 basic INVALID: kernel lateness at TDF 1 (INVALID in 2 of 2 pilots" in why
    assert "TDF 2 dualpath INVALID" in why
    assert why.endswith("TDF 4 VALID: basic in 2 of 2, dualpath in 2 of 2)")


def test_a_tdf_that_passes_one_pilot_by_luck_loses_the_vote_and_is_not_picked():
    pilot, calls = pilots_from({"basic": 2, "dualpath": 8}, lucky={"dualpath": 4})
    tdf, why = pick(TOPOLOGY, POLICIES, pilot)
    assert tdf == 8
    assert calls.count(("dualpath", 4)) == 3
    assert "TDF 4 dualpath INVALID: kernel lateness at TDF 4 (INVALID in 2 of 3 pilots" in why


def test_a_tdf_whose_one_pilot_a_hiccup_fails_wins_the_vote_and_is_picked():
    pilot, calls = pilots_from({"basic": 4, "dualpath": 2}, unlucky={"basic": 4})
    tdf, why = pick(TOPOLOGY, POLICIES, pilot)
    assert tdf == 4
    assert calls.count(("basic", 4)) == 3
    assert why.endswith("TDF 4 VALID: basic in 2 of 3, dualpath in 2 of 2)")


def test_oracle_alone_is_piloted():
    pilot, calls = pilots_from({"oracle": 2})
    assert pick(TOPOLOGY, ["oracle"], pilot)[0] == 2
    assert calls == [("oracle", 1), ("oracle", 1), ("oracle", 2), ("oracle", 2)]


def test_with_no_valid_pilot_auto_takes_the_largest_tdf_and_says_so():
    pilot, _ = pilots_from({"basic": 1000, "dualpath": 1})
    tdf, why = pick(TOPOLOGY, POLICIES, pilot)
    assert tdf == 16
    assert "the largest its rates allow, though no pilot was VALID" in why


def test_a_number_is_taken_as_given_without_pilots_and_the_command_line_wins():
    pilot, calls = pilots_from({"basic": 1, "dualpath": 1})
    assert resolve(TOPOLOGY, 8.0, 2.0, POLICIES, pilot) == (8.0, "TDF 8 (from --time-dilation)")
    assert resolve(TOPOLOGY, None, 2.0, POLICIES, pilot) == (2.0, "TDF 2 (from the scenario)")
    assert resolve(TOPOLOGY, None, None, POLICIES, pilot) == (1.0, "TDF 1 (from the topology)")
    assert calls == []
    assert resolve(TOPOLOGY, "auto", 2.0, POLICIES, pilot)[0] == 1
