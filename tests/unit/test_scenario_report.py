"""The scenario report's arithmetic: bounds, reductions, capacities, SNIC balance and the
hits of trace requests, on hand-built results."""

from __future__ import annotations

import pytest
import yaml

from testbed import errors
from testbed.runner import (TRACE_BLOCKS, Agent, capacities, comparisons, reductions,
                            report_text, snic_balance, trace_blocks)
from testbed.scenario import PaperFigures, Scenario, Workload, load_scenario
from testbed.workload import Turn


def scenario(**workload) -> Scenario:
    return Scenario(name="t", topologies=["topologies/1p1d.yaml"], model="ds-27b",
                    workload=Workload(**workload), policies=["basic", "dualpath", "oracle"],
                    paper=PaperFigures(source="Figure 8", speedup={"1p1d": 1.77},
                                       reduction={"dualpath": 0.45}, capacity_ratio=1.67))


def summary(policy, jct, aps=None, ttft=1.0, tpot=0.02, topology="1p1d", failed=0,
            valid=True):
    return {"topology": topology, "policy": policy, "jct": jct, "aps": aps, "ttft": ttft,
            "tpot": tpot, "failed": failed, "valid": valid}


def test_a_topology_whose_runs_failed_turns_gets_no_speedup():
    """A run cut short by failures has no JCT worth comparing."""
    s = scenario(agents=4)
    results = [{"topology": "1p1d", "prefill_nodes": 1, "decode_nodes": 1}]
    summaries = [summary("basic", 3.0, failed=5), summary("dualpath", 6.0)]
    assert comparisons(s, summaries, results) == []
    assert len(comparisons(s, [summary("basic", 3.0), summary("dualpath", 6.0)], results)) == 1


def test_the_limit_is_the_smaller_of_the_snic_and_the_compute_bound():
    s = scenario(agents=4)
    results = [{"topology": "1p1d", "prefill_nodes": 1, "decode_nodes": 1}]
    [row] = comparisons(s, [summary("basic", 100), summary("dualpath", 60),
                            summary("oracle", 40)], results)
    assert row["speedup"] == pytest.approx(100 / 60)
    assert row["snic_bound"] == 2 and row["compute_bound"] == pytest.approx(2.5)
    assert row["limit"] == 2 and row["share_of_limit"] == pytest.approx(100 / 60 / 2)
    assert row["paper_speedup"] == 1.77
    # compute-bound: oracle barely faster than basic
    [row] = comparisons(s, [summary("basic", 100), summary("dualpath", 90),
                            summary("oracle", 80)], results)
    assert row["limit"] == pytest.approx(1.25)


def test_no_oracle_no_limit_and_reductions_against_basic():
    s = scenario(agents=4)
    results = [{"topology": "1p1d", "prefill_nodes": 2, "decode_nodes": 1}]
    [row] = comparisons(s, [summary("basic", 100), summary("dualpath", 80)], results)
    assert row["snic_bound"] == 1.5 and row["limit"] is None
    [r] = reductions(s, [summary("basic", 100), summary("dualpath", 55)])
    assert r["reduction"] == pytest.approx(0.45) and r["paper_reduction"] == 0.45


def test_capacity_is_the_last_rate_meeting_the_slo_from_the_lowest_up():
    s = scenario(kind="online", aps=[1, 2, 3])
    rows = [summary("basic", 0, 1), summary("basic", 0, 2, ttft=5.0),
            summary("dualpath", 0, 1), summary("dualpath", 0, 2),
            summary("dualpath", 0, 3, tpot=0.06),
            summary("oracle", 0, 1, ttft=9.0)]
    [c] = capacities(s, rows)
    assert c["capacity"] == {"basic": 1, "dualpath": 2, "oracle": 0.0}
    assert c["ratio"] == 2 and c["paper_ratio"] == 1.67
    assert c["at_least"] == {"basic": False, "dualpath": False, "oracle": False}


def test_a_policy_inside_the_slo_at_the_top_rate_has_at_least_that_capacity():
    s = scenario(kind="online", aps=[1, 2])
    rows = [summary("basic", 0, 1), summary("basic", 0, 2, ttft=5.0),
            summary("dualpath", 0, 1), summary("dualpath", 0, 2)]
    [c] = capacities(s, rows)
    assert c["capacity"]["dualpath"] == 2 and c["at_least"]["dualpath"]
    assert c["ratio"] == 2 and c["ratio_at_least"]
    text = report_text(s, [], [], [], [c])
    assert ">= 2 APS" in text and ">= 2.00" in text


def test_snic_balance_averages_busy_samples_only():
    timeline = {"n0": [(1, 1.0), (2, 0.9), (3, 0.05)], "n1": [(1, 1.0), (2, 0.3), (3, 0.0)]}
    # sample 3 is idle (mean 0.025): left out; samples 1 and 2 give 1.0 and 1.5
    assert snic_balance(timeline) == pytest.approx(1.25)
    assert snic_balance({"n0": [(1, 0.0)]}) == 0.0


def test_trace_hits_are_the_stored_prefix_of_full_blocks():
    agent = Agent("r", (Turn(0, 512 * 3 + 100, 10),), hash_ids=(7, 8, 9, 10))
    cache = {TRACE_BLOCKS + 7, TRACE_BLOCKS + 9}
    hit, miss = trace_blocks(agent, agent.turns[0], cache, base=1 << 16)
    assert hit == [(TRACE_BLOCKS + 7, 512)]
    # block 9 is stored but follows a miss: prefix caching recomputes it
    assert miss[:2] == [(TRACE_BLOCKS + 8, 512), (TRACE_BLOCKS + 9, 512)]
    # the partial last block is the request's own, never a shared id
    assert miss[2:] == [((1 << 16) + 0x4000, 100)]


@pytest.mark.parametrize("fields, expected", [
    ({}, "workload.agents: missing"),
    ({"kind": "online", "aps": [2, 1]}, "workload.aps: got [2.0, 1.0], expected increasing"),
    ({"kind": "online", "aps": [1], "agents": 3}, "expected no agents field"),
    ({"kind": "trace", "trace": "nowhere.jsonl"}, "workload.trace: got 'nowhere.jsonl'"),
    ({"agents": 2, "trace": "traces/mooncake_synthetic_trace.jsonl"}, "expected kind: trace"),
    ({"agents": 2, "aps": [1]}, "workload.aps: not read by offline workloads, expected it "
                                "only with kind: online"),
    ({"kind": "online", "aps": [1], "skip": 3}, "workload.skip: not read by online workloads"),
])
def test_bad_workloads_name_the_field(tmp_path, fields, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"topologies": ["topologies/1p1d.yaml"], "model": "ds-27b",
                                    "workload": {"dataset": "64k", **fields},
                                    "policies": ["basic"]}))
    with pytest.raises(errors.TestbedError) as error:
        load_scenario(str(path))
    assert expected in str(error.value), str(error.value)
