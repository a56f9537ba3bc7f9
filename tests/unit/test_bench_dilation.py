"""The convergence bench's arithmetic: which runs it plans, its reference and tolerance, and
when the fidelity verdict agrees with convergence."""

from __future__ import annotations

import pytest

from testbed.bench.dilation import judge, plan_runs, repick


def test_the_reference_and_the_tdf_below_it_are_repeated_and_the_rest_run_once():
    assert plan_runs([16, 1, 4, 2, 8], 3) == [(1, 0), (2, 0), (4, 0), (8, 0), (8, 1), (8, 2),
                                               (16, 0), (16, 1), (16, 2)]


def rows(jcts: dict[float, list[float]], valid: dict[float, bool]) -> list[dict]:
    return [{"topology": "t", "policy": policy, "tdf": tdf, "jct": jct, "valid": valid[tdf]}
            for policy in ("basic", "dualpath", "oracle")
            for tdf, runs in jcts.items() for jct in runs]


def test_distance_is_from_the_mean_of_the_reference_repeats_within_twice_their_spread():
    judged = rows({1: [3.0], 8: [2.2, 2.3], 16: [1.9, 2.0, 2.1]},
                  {1: False, 8: True, 16: True})
    agreement = judge(judged)
    one = [r for r in judged if r["policy"] == "basic"]
    assert [round(r["distance"], 3) for r in one] == [0.5, 0.1, 0.15, 0.05, 0.0, 0.05]
    assert [r["tolerance"] for r in one] == pytest.approx([0.2] * 6)
    assert agreement == {"far_but_valid": 0, "within_but_invalid": 0, "agrees": True}


def test_a_tight_reference_leaves_the_floor_and_calls_a_valid_far_run_a_disagreement():
    judged = rows({2: [2.1], 8: [2.0], 16: [2.0, 2.0]}, {2: True, 8: True, 16: True})
    agreement = judge(judged)
    assert {r["tolerance"] for r in judged} == {0.03}
    assert agreement == {"far_but_valid": 3, "within_but_invalid": 0, "agrees": False}


def pilot(policy: str, tdf: float, valid: bool) -> dict:
    # a check whose figure --rejudge does not judge again: it keeps its stored outcome
    return {"policy": policy, "tdf": tdf,
            "checks": [{"name": "link pace", "value": 1.0, "passed": valid}]}


THRESHOLDS = (("kernels", 0.99), 0.10, 0.02, 0.95, float("inf"))


def test_repick_takes_the_stored_pilots_majority_and_marks_a_vote_they_do_not_settle():
    split_then_won = [pilot("basic", 2, False), pilot("basic", 2, False),
                      pilot("basic", 4, True), pilot("basic", 4, False), pilot("basic", 4, True),
                      pilot("dualpath", 4, True), pilot("dualpath", 4, True)]
    assert repick(split_then_won, *THRESHOLDS) == "4"
    # stored before pilots voted: one INVALID pilot, and auto went on to the next TDF
    unsettled = [pilot("basic", 2, False), pilot("basic", 4, True), pilot("basic", 4, True),
                 pilot("dualpath", 4, True), pilot("dualpath", 4, True)]
    assert repick(unsettled, *THRESHOLDS) == "2?"
    assert repick([pilot("basic", 2, False), pilot("basic", 2, False)], *THRESHOLDS) == "none"
