"""The shipped `chaos` scenario, whole: 10 minutes of online load on 1P1D while seeded
faults of every kind strike. About 11 minutes."""

from __future__ import annotations

import csv
import json

import pytest

from testbed.faults import FaultSpec
from testbed.runner import run_scenario
from testbed.scenario import load_scenario
from tests.integration.leftovers import find_leftovers

KINDS = set(FaultSpec.model_fields["kind"].annotation.__args__)


@pytest.mark.timeout(1500)
def test_chaos_accounts_for_every_turn_and_every_fault_and_leaves_nothing(tmp_path):
    scenario = load_scenario("chaos")
    assert scenario.workload.duration == 600 and scenario.workload.kind == "online"
    out = run_scenario(scenario, results_root=tmp_path)
    results = json.loads((out / "results.json").read_text())
    [summary], [result] = results["summaries"], results["results"]
    # Zero requests unaccounted for: each issued turn completed or failed with a reason.
    assert summary["issued"] > 1000
    assert summary["unaccounted"] == 0
    assert summary["turns"] + summary["failed"] == summary["issued"]
    assert all(f["reason"] for f in result["failures"])
    # Zero corrupt bytes accepted: every completed turn's prompt verified byte for byte.
    assert summary["unverified"] == 0 and summary["corrupt_bytes"] == 0
    assert all(r["prompt_bytes_verified"] == r["prompt_bytes_expected"]
               for r in result["records"])
    # Every fault carried out and visible in the report.
    events = result["faults"]
    assert {e["fault"].split()[0] for e in events} == KINDS
    assert all(e["error"] is None for e in events), [e for e in events if e["error"]]
    report = (out / "summary.md").read_text()
    assert f"Faults injected ({len(events)})" in report
    with open(out / "faults.csv") as f:
        logged = list(csv.DictReader(f))
    assert [row["action"] for row in logged] == [e["action"] for e in events]
    lines = report.splitlines()
    for e in events:
        assert any(f" {e['t']:.1f} s " in line and e["action"] in line for line in lines), e
    # Zero leftovers once it ended.
    assert find_leftovers() == {}
