"""Faults on a live 1P1D cluster (2 GPUs per node, netns hosts), each kind with the outcome
it must have. Every run is also held to the accounting rule: each issued turn completed,
with its prompt bytes verified, or failed with a reason, exactly once."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from agents.control import call
from testbed.agentset import RunningCluster
from testbed.faults import FaultSpec
from testbed.injector import send_fault
from testbed.runner import run_policy
from testbed.scenario import REPO, Scenario
from tests.integration.conftest import topology

TOPOLOGY = "topologies/1p1d-g2.yaml"


def run(policy: str, faults: list[dict], topology_path: str = TOPOLOGY, agents: int = 8,
        turns: int = 3) -> dict:
    scenario = Scenario.model_validate({
        "name": "faults", "topologies": [topology_path], "model": "ds-27b",
        "workload": {"dataset": "64k", "agents": agents, "seed": 3, "start_turn": 10,
                     "max_turns": turns},
        "policies": [policy], "faults": faults})
    result = run_policy(scenario, topology_path, policy, None)
    accounted(result)
    return result


def accounted(result: dict) -> None:
    done = [(r["trajectory"], r["turn"]) for r in result["records"]]
    failed = [(f["trajectory"], f["turn"]) for f in result["failures"]]
    assert len(done) + len(failed) == result["issued"]
    assert len(set(done + failed)) == result["issued"], "a turn ended twice"
    assert all(f["reason"] for f in result["failures"])
    for r in result["records"]:
        assert r["prompt_bytes_verified"] == r["prompt_bytes_expected"] > 0
        assert r["corrupt_bytes"] == 0
    assert all(e["error"] is None for e in result["faults"]), result["faults"]


def replicated_topology(tmp_path, replicas: int) -> str:
    data = yaml.safe_load((REPO / TOPOLOGY).read_text())
    data["storage"]["replicas"] = replicas
    path = tmp_path / f"1p1d-g2-r{replicas}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_snic_down_under_dualpath_every_turn_completes_reading_on_the_de_path():
    result = run("dualpath", [{"kind": "link-down", "target": "n0:snic", "at": 0}])
    assert not result["failures"]
    assert {r["path"] for r in result["records"]} == {"de"}
    assert result["snic_read_bytes"]["n0"] == 0 < result["snic_read_bytes"]["n1"]


def test_snic_down_under_basic_every_turn_fails_with_the_reason():
    """The baseline has no second path: what DualPath's failover saves."""
    result = run("basic", [{"kind": "link-down", "target": "n0:snic", "at": 0}], agents=4)
    assert not result["records"]
    first = [f for f in result["failures"] if f["attempts"]]
    assert first and all("n0's SNIC is down" in f["reason"] for f in first)
    assert all("trajectory failed" in f["reason"] for f in result["failures"] if not f["attempts"])


def test_storage_host_down_reads_come_from_the_replicas(tmp_path):
    result = run("dualpath", [{"kind": "storage-down", "target": "st0", "at": 0}],
                 replicated_topology(tmp_path, 2))
    assert not result["failures"]
    assert [e["action"] for e in result["faults"]] == ["st0:stor down", "st0 agent killed"]


def test_blocks_written_while_a_replica_was_down_reach_it_once_it_is_back(tmp_path):
    """st1 is down while decodes persist blocks (they land on st0 alone, handed off), comes
    back (the handoff writes them to it), then st0 goes down: later turns, whose context
    holds those blocks, read them from st1."""
    result = run("dualpath", [{"kind": "storage-down", "target": "st1", "at": 0},
                              {"kind": "storage-up", "target": "st1", "after_turns": 8},
                              {"kind": "storage-down", "target": "st0", "after_turns": 16}],
                 replicated_topology(tmp_path, 2), agents=8, turns=4)
    assert not result["failures"], result["failures"][:2]
    st0_down = result["faults"][-1]["wall"] - result["wall"][0]
    assert any(r["submitted"] > st0_down for r in result["records"])


def test_storage_host_down_without_replicas_fails_turns_naming_the_host():
    result = run("dualpath", [{"kind": "storage-down", "target": "st0", "at": 0}], agents=4,
                 turns=2)
    first = [f for f in result["failures"] if f["attempts"]]
    assert first, "every turn completed with half its blocks unreachable"
    assert all("st0" in f["reason"] for f in first), first


def test_a_killed_engine_leaves_no_turn_behind_and_rejoins_once_restarted():
    """The prefill group's leader dies with work in flight: its requests are re-queued and
    complete on the other engine, which leads the group meanwhile; restarted, it takes
    work again."""
    result = run("dualpath", [{"kind": "kill", "target": "n0g0", "after_turns": 2},
                              {"kind": "restart", "target": "n0g0", "after_turns": 9}],
                 agents=8, turns=4)
    assert not result["failures"]
    killed, restarted = (e["wall"] - result["wall"][0] for e in result["faults"])
    while_dead = [r for r in result["records"]
                  if killed + 2 < r["submitted"] and r["submitted"] + r["ttft"] < restarted]
    assert while_dead and all(r["pe"] == "n0g1" for r in while_dead)
    assert any(r["pe"] == "n0g0" for r in result["records"] if r["submitted"] > restarted)


def test_a_killed_decode_node_has_its_requests_read_again():
    result = run("dualpath", [{"kind": "kill", "target": "n1", "after_turns": 3},
                              {"kind": "restart", "target": "n1", "after_turns": 3,
                               "every": 3, "times": 2}])
    assert not result["failures"]
    assert any(r["attempts"] > 1 for r in result["records"]), \
        "no request was in flight on the node: the test proved nothing"


def test_a_restarted_scheduler_loses_nothing_and_finishes_nothing_twice():
    result = run("dualpath", [{"kind": "restart", "target": "sched", "after_turns": 4}])
    assert not result["failures"]
    assert any(r["attempts"] > 1 for r in result["records"])


def test_flapping_and_slowed_links_cost_time_not_turns():
    result = run("dualpath", [
        {"kind": "link-flap", "target": "n1:snic", "at": 1, "duration": 2},
        {"kind": "link-rate", "target": "n0:snic", "at": 0, "factor": 0.3, "duration": 4},
        {"kind": "storage-slow", "target": "st1", "at": 0, "factor": 0.5, "duration": 3}])
    assert not result["failures"]
    assert [e["action"] for e in result["faults"]].count("n1:snic up") == 1


@pytest.fixture(scope="module")
def cluster():
    rc = RunningCluster(topology("1p1d-g2"))
    with rc as fabric:
        yield rc, fabric


def htb_rate(fabric, host: str, intf: str) -> int:
    """The rate of the link class of `intf` inside `host`, in bit/s."""
    from pyroute2 import IPRoute
    netns = f"/proc/{fabric.node(host).netns_pid}/ns/net"
    with IPRoute(netns=netns, flags=0) as ipr:
        index = ipr.link_lookup(ifname=intf)[0]
        for cls in ipr.get_classes(index):
            if cls["handle"] == 0x10001:
                return cls.get_nested("TCA_OPTIONS", "TCA_HTB_PARMS")["rate"] * 8
    raise AssertionError(f"no link class on {host}:{intf}")


def test_a_link_down_is_seen_by_the_host_and_up_again(cluster):
    rc, fabric = cluster
    node = fabric.plan.host("n0").address("mgmt")
    assert call(node, "ping")["links"] == {"snic": True, "pcie": True}
    rc.injector.apply(FaultSpec(kind="link-down", target="n0:snic", at=0))
    assert call(node, "ping")["links"] == {"snic": False, "pcie": True}
    rc.injector.apply(FaultSpec(kind="link-up", target="n0:snic", at=0))
    assert call(node, "ping")["links"] == {"snic": True, "pcie": True}


def test_a_rate_change_reshapes_both_ends_and_is_restored(cluster):
    rc, fabric = cluster
    rate = fabric.plan.host("n0g0").interface("cnic").rate
    assert htb_rate(fabric, "n0g0", "cnic") == pytest.approx(rate, rel=0.01)
    rc.injector.apply(FaultSpec(kind="link-rate", target="n0g0:cnic", at=0, factor=0.25,
                                duration=0))
    assert htb_rate(fabric, "n0g0", "cnic") == pytest.approx(rate / 4, rel=0.01)
    rc.injector.apply(FaultSpec(kind="link-rate", target="n0g0:cnic", at=0, factor=1,
                                duration=0))
    assert htb_rate(fabric, "n0g0", "cnic") == pytest.approx(rate, rel=0.01)


def test_live_faults_through_the_command_line_are_carried_out_and_logged(cluster):
    rc, fabric = cluster
    before = len(rc.injector.events)
    done = subprocess.run([sys.executable, "-m", "testbed", "fault", "kill", "st1"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "st1 agent killed: ok" in done.stdout, done.stderr
    with pytest.raises(OSError):
        call(fabric.plan.host("st1").address("mgmt"), "ping", timeout=2)
    [event] = send_fault({"kind": "restart", "target": "st1"})
    assert event["error"] is None and event["source"] == "live"
    assert call(fabric.plan.host("st1").address("mgmt"), "ping")["host"] == "st1"
    assert [e["action"] for e in rc.injector.events[before:]] == ["st1 agent killed",
                                                                  "st1 agent restarted"]
    bad = subprocess.run([sys.executable, "-m", "testbed", "fault", "kill", "n7g0"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "target: got 'n7g0'" in bad.stderr
