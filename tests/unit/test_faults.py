"""Fault specs, their targets, seeded chaos and the report's accounting, without a fabric."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from testbed import errors
from testbed.faultreport import accounting_text, failures_text, faults_text, reason_kind
from testbed.faults import ChaosSpec, FaultSpec, chaos_faults, check_target
from testbed.plan import build_plan
from testbed.scenario import REPO, load_scenario
from testbed.topology import load_topology

TOPOLOGIES = REPO / "topologies"

PLAN = build_plan(load_topology(TOPOLOGIES / "1p1d-g2.yaml"))
KINDS = FaultSpec.model_fields["kind"].annotation.__args__


@pytest.mark.parametrize("fields, message", [
    ({"kind": "kill", "target": "n0g0"}, "exactly one of 'at'"),
    ({"kind": "kill", "target": "n0g0", "at": 1, "after_turns": 2}, "exactly one of 'at'"),
    ({"kind": "kill", "target": "n0g0", "at": 1, "times": 3}, "needs 'every'"),
    ({"kind": "explode", "target": "n0g0", "at": 1}, "kind"),
    ({"kind": "link-rate", "target": "n0:snic", "at": 1, "factor": 0}, "factor"),
])
def test_a_fault_spec_must_say_when_and_how(fields, message):
    with pytest.raises(ValidationError, match=message):
        FaultSpec.model_validate(fields)


@pytest.mark.parametrize("kind, target, expected", [
    ("link-down", "n0:mgmt", "expected a fabric link as host:interface"),
    ("link-flap", "n0", "expected a fabric link"),
    ("link-down", "n9:snic", "expected a fabric link"),
    ("kill", "n0:snic", "expected a host with an agent"),
    ("restart", "client", "expected a host with an agent"),
    ("storage-down", "n0", "expected a host with a storage agent, one of st0, st1"),
])
def test_a_target_not_in_the_cluster_is_named_with_what_would_do(kind, target, expected):
    with pytest.raises(errors.TestbedError, match=expected) as info:
        check_target(FaultSpec(kind=kind, target=target, at=0), PLAN)
    assert repr(target) in str(info.value)


@pytest.mark.parametrize("kind, target", [("link-down", "n0:snic"), ("link-rate", "st1:stor"),
                                          ("link-flap", "n1g1:cnic"), ("kill", "sched"),
                                          ("restart", "n1"), ("storage-slow", "st0")])
def test_targets_of_each_kind_are_accepted(kind, target):
    check_target(FaultSpec(kind=kind, target=target, at=0), PLAN)


def test_a_scenario_with_a_fault_on_a_missing_host_fails_to_load(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("topologies: [topologies/1p1d-g2.yaml]\nmodel: ds-27b\n"
                    "workload: {agents: 2}\npolicies: [dualpath]\n"
                    "faults: [{kind: kill, target: n5g0, at: 3}]\n")
    with pytest.raises(errors.TestbedError, match=r"faults\[0\].target: got 'n5g0'.*1p1d-g2"):
        load_scenario(str(path))


def test_chaos_is_repeatable_covers_every_kind_and_repairs_what_it_breaks():
    chaos = ChaosSpec(seed=7, every=10, repair=5)
    faults = chaos_faults(chaos, PLAN, 600)
    assert faults == chaos_faults(chaos, PLAN, 600)              # same seed, same faults
    assert faults != chaos_faults(ChaosSpec(seed=8, every=10, repair=5), PLAN, 600)
    assert set(KINDS) == {f.kind for f in faults}
    killed = {PLAN.host(f.target).kind for f in faults if f.kind == "kill"}
    assert killed == {"gpu", "node", "storage", "scheduler"}
    for f in faults:
        check_target(f, PLAN)
        assert f.at + chaos.repair <= 600
    # Every breaking fault is followed by its repair, on the same target.
    repairs = {"link-down": "link-up", "kill": "restart", "storage-down": "storage-up"}
    for f in faults:
        if f.kind in repairs:
            assert any(g.kind == repairs[f.kind] and g.target == f.target
                       and g.at == round(f.at + chaos.repair, 1) for g in faults), f


def test_reasons_count_together_whatever_their_request_ids_and_addresses():
    a = "198.19.128.2 submit: prefill on n0g0: request 123456789 failed after 12.5 s"
    b = "198.19.128.3 submit: prefill on n0g0: request 987654321 failed after 3.25 s"
    assert reason_kind(a) == reason_kind(b)
    assert "n0g0" in reason_kind(a)
    assert reason_kind(a) != reason_kind(a.replace("n0g0", "n0g1"))


def test_the_report_accounts_for_every_turn_and_lists_faults():
    summary = {"topology": "1p1d-g2", "policy": "dualpath", "aps": None, "issued": 10,
               "turns": 7, "failed": 3, "unaccounted": 0, "unverified": 0}
    text = accounting_text([summary])
    assert "ISSUED" in text and "UNACCOUNTED" in text
    assert text.splitlines()[-1].split() == ["1p1d-g2", "dualpath", "-", "10", "7", "3", "0",
                                             "0"]
    result = {"topology": "1p1d-g2", "policy": "dualpath",
              "failures": [{"reason": "lost n0g1 restarted (request 123456)"},
                           {"reason": "lost n0g1 restarted (request 654321)"}],
              "faults": [{"t": 3.0, "action": "n0g1 agent killed", "source": "scenario",
                          "error": None},
                         {"t": 9.5, "action": "n0g1 agent restarted", "source": "live",
                          "error": "agents not ready"}]}
    failures = failures_text([result])
    assert failures.splitlines()[-1].split() == ["1p1d-g2", "dualpath", "2", "lost", "n0g1",
                                                 "restarted", "(request", "#)"]
    faults = faults_text([result])
    assert "Faults injected (2)" in faults and "n0g1 agent killed" in faults
    assert "FAILED: agents not ready" in faults
    assert failures_text([{**result, "failures": []}]) == ""
