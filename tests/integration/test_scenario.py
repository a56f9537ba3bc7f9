"""One short scenario, end to end: workload, scheduler, engines, nodes, storage, report."""

from __future__ import annotations

import csv
import json

from testbed import cli
from testbed.runner import run_scenario
from testbed.scenario import load_scenario


def test_smoke_scenario_runs_every_policy_and_writes_its_report(tmp_path):
    """Through the command line, which exits 0 (it once exited 1 after every good run)."""
    scenario = load_scenario("smoke")
    assert cli.main(["scenario", "run", "smoke", "--results", str(tmp_path)]) == 0
    [out] = (tmp_path / "smoke").iterdir()
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
    summary_md = (out / "summary.md").read_text()
    assert summary_md.startswith(f"# {scenario.name}")
    # Every run states its fidelity verdict, with the invariants behind it, and its TDF.
    for s in summaries.values():
        assert s["time_dilation"] == 1.0 and isinstance(s["valid"], bool)
        assert s["verdict"] == "VALID" if s["valid"] else s["verdict"].startswith("INVALID: ")
    for r in results["results"]:
        assert {c["name"] for c in r["fidelity"]["checks"]} == {
            "host CPU headroom", "link pace", "kernel lateness", "event-loop lag", "agent CPU"}
    assert "Fidelity: " in summary_md and "TDF 1 (from the topology)" in summary_md
    for figure in ("jct.png", "snic.png", "ttft_cdf.png"):
        data = (out / figure).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 5_000, figure
    # The SNIC timeline saw reads: some sample of the prefill node is above zero.
    basic = next(r for r in results["results"] if r["policy"] == "basic")
    assert max(u for _, u in basic["snic_timeline"]["n0"]) > 0


def write(tmp_path, text: str):
    path = tmp_path / "scenario.yaml"
    path.write_text(text)
    return load_scenario(str(path))


def test_an_online_sweep_reports_capacity_under_the_slo(tmp_path):
    """Two arrival rates, a few seconds each: every run accounted for, the sweep stops at
    the first rate over the SLO, and the capacity table is filled from the same runs."""
    scenario = write(tmp_path, """topologies: [topologies/1p1d-netns.yaml]
model: ds-27b
workload: {kind: online, dataset: 64k, aps: [1, 2], duration: 3, start_turn: 10,
           max_turns: 1, slo_ttft: 30}
policies: [basic, dualpath]
paper: {source: "Figure 10", capacity_ratio: 1.67}
""")
    out = run_scenario(scenario, results_root=tmp_path)
    results = json.loads((out / "results.json").read_text())
    runs = [(s["policy"], s["aps"]) for s in results["summaries"]]
    assert runs == [("basic", 1), ("basic", 2), ("dualpath", 1), ("dualpath", 2)]
    for r in results["results"]:
        arrivals = [rec["arrival"] for rec in r["records"]]
        assert len(arrivals) == scenario.workload.agents_at(r["aps"])
        assert max(arrivals) > 0.5          # Poisson arrivals, not all at once
        assert all(rec["corrupt_bytes"] == 0 for rec in r["records"])
    [capacity] = results["capacities"]
    assert capacity["capacity"] == {"basic": 2, "dualpath": 2}   # a 30 s TTFT SLO: both meet it
    assert capacity["ratio"] == 1 and capacity["paper_ratio"] == 1.67
    assert (out / "capacity.png").read_bytes().startswith(b"\x89PNG")
    assert "Capacity under the SLO" in (out / "summary.md").read_text()


def test_a_trace_replay_hits_the_blocks_stored_before_it(tmp_path):
    """The Mooncake excerpt: the first 45 requests' blocks stored beforehand, the next 16
    replayed at 4x speed. Request 49 hits the 57 blocks it shares with request 42; every
    byte verifies."""
    scenario = write(tmp_path, """topologies: [topologies/1p1d-netns.yaml]
model: ds-27b
workload: {kind: trace, trace: tests/data/mooncake_excerpt.jsonl, skip: 45, limit: 16,
           speed: 4}
policies: [dualpath]
""")
    out = run_scenario(scenario, results_root=tmp_path)
    [result] = json.loads((out / "results.json").read_text())["results"]
    records = result["records"]
    assert len(records) == 16
    assert max(r["hit_tokens"] for r in records) >= 57 * 512
    assert all(r["corrupt_bytes"] == 0 for r in records)
    assert sum(r["prompt_bytes_verified"] for r in records) > 0
