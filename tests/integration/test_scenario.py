"""One short scenario, end to end: workload, scheduler, engines, nodes, storage, report."""

from __future__ import annotations

import csv
import json

from testbed.runner import run_scenario
from testbed.scenario import load_scenario


def test_smoke_scenario_runs_every_policy_and_writes_its_report(tmp_path):
    scenario = load_scenario("smoke")
    out = run_scenario(scenario, results_root=tmp_path)
    results = json.loads((out / "results.json").read_text())
    summaries = {s["policy"]: s for s in results["summaries"]}
    assert set(summaries) == set(scenario.policies)
    expected_turns = len(results["results"][0]["records"])
    assert expected_turns == scenario.workload.agents * scenario.workload.max_turns
    for s in summaries.values():
        assert s["turns"] == expected_turns
        assert s["corrupt_bytes"] == 0 and s["verified_bytes"] > 0
        assert s["jct"] > 0 and s["ttft"] > 0 and s["tpot"] > 0
    # Both policies served the same workload: the same KV moved to the decode GPUs.
    assert len({s["verified_bytes"] for s in summaries.values()}) == 1
    with open(out / "requests.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == expected_turns * len(scenario.policies)
    assert {r["path"] for r in rows if r["policy"] == "basic"} == {"pe"}
    # Warm start: from the first replayed turn on, every turn reads stored KV.
    assert all(int(r["hit_tokens"]) > 0 for r in rows)
    assert (out / "summary.md").read_text().startswith(f"# {scenario.name}")
    for figure in ("jct.png", "snic.png", "ttft_cdf.png"):
        data = (out / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000, figure
    # The SNIC timeline saw reads: some sample of the prefill node is above zero.
    basic = next(r for r in results["results"] if r["policy"] == "basic")
    assert max(u for _, u in basic["snic_timeline"]["n0"]) > 0
