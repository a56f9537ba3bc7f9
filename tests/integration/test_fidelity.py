"""The fidelity verdict on live clusters: an overloaded host and a link slowed behind the
shaper's back each make a run INVALID, naming the invariant that failed; and virtual time
keeps emulated figures while the wall time stretches."""

from __future__ import annotations

import threading
import time

import pytest
from pyroute2 import IPRoute

from testbed import qos
from testbed.plan import build_plan
from testbed.rtnl import RtnlSocket
from testbed.runner import run_policy
from testbed.scenario import Scenario
from testbed.state import FabricRecord
from tests.integration.conftest import topology

TOPOLOGY = "topologies/1p1d-g2.yaml"


def scenario(agents: int, turns: int, policy: str = "basic") -> Scenario:
    return Scenario.model_validate({
        "name": "fidelity", "topologies": [TOPOLOGY], "model": "ds-27b",
        "workload": {"dataset": "64k", "agents": agents, "seed": 5, "start_turn": 30,
                     "max_turns": turns},
        "policies": [policy]})


def checks(result: dict) -> dict[str, dict]:
    return {c["name"]: c for c in result["fidelity"]["checks"]}


def test_an_overloaded_host_makes_the_run_invalid():
    """Far more agents than two cores can drive at TDF 1: the verdict says so, naming a
    host-side invariant with its figure, and the summary line carries it."""
    result = run_policy(scenario(agents=320, turns=1), TOPOLOGY, "dualpath", None)
    verdict = result["fidelity"]
    assert not verdict["valid"]
    failed = {name for name, c in checks(result).items() if not c["passed"]}
    assert failed & {"host CPU headroom", "event-loop lag", "kernel lateness", "agent CPU"}, verdict
    assert verdict["summary"].startswith("INVALID: ")
    for name in failed:
        assert name in verdict["summary"]


class Throttler(threading.Thread):
    """Once n0's SNIC has carried the workload's reads for a while, cuts the HTB rate of its
    switch port to a half by hand, where neither the plan nor the fault injector knows."""

    def __init__(self, after_bytes: int, delay: float):
        super().__init__(daemon=True)
        self.after_bytes, self.delay = after_bytes, delay
        self.done = threading.Event()
        self.stop = threading.Event()

    def run(self) -> None:
        plan = build_plan(topology("1p1d-g2"))
        snic = plan.host("n0").interface("snic")
        while not self.stop.is_set():
            record = FabricRecord.read()
            if record:
                root = RtnlSocket()
                try:
                    index = root.indexes().get(snic.switch_port)
                    sent = root.root_qdiscs(qos.ROOT).get(index, (0, 0))[0] if index else 0
                finally:
                    root.close()
                if sent >= self.after_bytes:
                    time.sleep(self.delay)
                    with IPRoute() as ipr:
                        qos.set_rate(ipr, snic.switch_port, snic.rate // 2, None)
                    self.done.set()
                    return
            time.sleep(0.1)


def test_a_link_slowed_behind_the_shapers_back_fails_the_link_pace():
    throttler = Throttler(after_bytes=2 << 20, delay=4.0)
    throttler.start()
    try:
        result = run_policy(scenario(agents=96, turns=2), TOPOLOGY, "basic", None)
    finally:
        throttler.stop.set()
        throttler.join()
    assert throttler.done.is_set(), "the workload never loaded n0's SNIC"
    pace = checks(result)["link pace"]
    assert not pace["passed"] and not result["fidelity"]["valid"], pace
    assert "worst: n0:snic rx at" in pace["figure"]
    # Half the rate it was meant to have, or more in a window that straddles the cut (part
    # at the full rate) when the backlog ends before a whole window follows it.
    assert 0.4 <= pace["value"] <= 0.8, pace
    # The windows before the cut kept pace: the check judges, it does not always fail.
    slow, judged = (int(n) for n in pace["figure"].split(" backlogged")[0].split(" of "))
    assert slow < judged, pace


def test_virtual_time_keeps_emulated_figures_while_the_wall_time_stretches():
    """The same small workload at TDF 1 and 2: the emulated JCT and TPOT agree within a
    noisy host's tolerance, the wall time doubles, and the links ran at half their rate."""
    work = scenario(agents=8, turns=2, policy="dualpath")
    results = {tdf: run_policy(work, TOPOLOGY, "dualpath", None, dilation=tdf)
               for tdf in (1.0, 2.0)}
    one, two = results[1.0], results[2.0]
    assert two["time_dilation"] == 2.0
    assert 0.75 <= two["jct"] / one["jct"] <= 1.33, (one["jct"], two["jct"])
    tpot = [sum(r["tpot"] for r in res["records"]) / len(res["records"]) for res in (one, two)]
    assert 0.75 <= tpot[1] / tpot[0] <= 1.33, tpot
    wall = [res["wall"][1] - res["wall"][0] for res in (one, two)]
    assert 1.5 <= wall[1] / wall[0] <= 2.6, wall
    # the same KV bytes, verified; on the wire the same within headers and retransmits
    verified = [sum(r["prompt_bytes_verified"] for r in res["records"]) for res in (one, two)]
    assert verified[0] == verified[1] > 0
    wire = [sum(res["snic_read_bytes"].values()) for res in (one, two)]
    assert wire[1] == pytest.approx(wire[0], rel=0.01)
    # nothing was lost on the fabric, so no host's TCP resent anything (testbed/hosts.py)
    assert [res["tcp_resent_segments"] for res in (one, two)] == [0, 0]
