"""Teardown: a fabric stopped by Ctrl-C, SIGTERM or `fabric down` leaves nothing behind, and
`testbed clean` removes what a SIGKILLed owner could not."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.agentset import RunningCluster
from testbed.state import FabricRecord
from tests.integration.conftest import REPO, TOPOLOGIES, topology
from tests.integration.leftovers import find_leftovers, unreaped_children

UP_TIMEOUT = 180


def run_testbed(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "testbed", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=UP_TIMEOUT, **kwargs)


def start_foreground(topology: str, backend: str, *extra: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "fabric", "up", str(TOPOLOGIES / topology),
         "--backend", backend, *extra], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    deadline = time.monotonic() + UP_TIMEOUT
    while time.monotonic() < deadline:
        record = FabricRecord.read()
        if record and record.owner_pid == proc.pid and record.status == "ready":
            return proc
        assert proc.poll() is None, f"fabric up exited early: {proc.stdout.read()}"
        time.sleep(0.2)
    proc.kill()
    pytest.fail("the fabric did not come up")


@pytest.mark.parametrize("sig,backend", [(signal.SIGINT, "docker"), (signal.SIGINT, "netns"),
                                         (signal.SIGTERM, "docker")])
def test_signal_to_fabric_up_tears_everything_down(sig, backend):
    proc = start_foreground("1p1d.yaml", backend)
    assert find_leftovers() != {}, "a running fabric should be visible"
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "torn down" in out
    assert find_leftovers() == {}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_startup_tears_down_what_was_built(sig):
    proc = subprocess.Popen(
        [sys.executable, "-m", "testbed", "fabric", "up", str(TOPOLOGIES / "2p4d.yaml")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Wait until containers are being made, then interrupt.
    deadline = time.monotonic() + 60
    while not find_leftovers().get("containers") and time.monotonic() < deadline:
        time.sleep(0.1)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=120)
    assert "torn down" in out, out
    assert find_leftovers() == {}


def kill_then_clean(proc: subprocess.Popen, *expected: str) -> None:
    """SIGKILL `proc`: what it leaves includes `expected`; `testbed clean` removes it all."""
    proc.kill()
    proc.wait(timeout=10)
    left = find_leftovers()
    assert all(left.get(kind) for kind in expected), left
    result = run_testbed("clean")
    assert result.returncode == 0, result.stderr
    assert "removed" in result.stdout
    assert find_leftovers() == {}
    assert "nothing to clean" in run_testbed("clean").stdout


def test_sigkill_then_clean_removes_leftovers():
    kill_then_clean(start_foreground("1p1d.yaml", "docker"), "containers", "links")


def test_detached_fabric_status_exec_and_down():
    up = run_testbed("fabric", "up", str(TOPOLOGIES / "mini.yaml"), "--detach")
    assert up.returncode == 0, up.stderr
    assert "n0g0" in up.stdout and "cnic" in up.stdout
    try:
        status = run_testbed("fabric", "status")
        assert status.returncode == 0 and "mini: ready" in status.stdout
        gpu = run_testbed("fabric", "exec", "n0g0", "--", "ip", "-o", "-4", "addr", "show", "cnic")
        assert gpu.returncode == 0 and "198.18.0.1/16" in gpu.stdout
        assert run_testbed("fabric", "exec", "n0g0", "--", "false").returncode == 1
        missing = run_testbed("fabric", "exec", "nohost", "--", "true")
        assert missing.returncode == 2 and "no host 'nohost'" in missing.stderr
        req = run_testbed("request", "--context", "1024", "--append", "64", "--generate", "64")
        assert req.returncode == 0, req.stderr
        assert "read back identical" in req.stdout and "0 corrupt bytes" in req.stdout
        wrong = run_testbed("request", "--prefill-gpu", "n1g0")
        assert wrong.returncode == 2
        assert wrong.stderr.strip() == ("testbed: prefill_gpu: got 'n1g0' (decode gpu), "
                                        "expected a prefill GPU")
        again = run_testbed("fabric", "up", str(TOPOLOGIES / "mini.yaml"), "--detach")
        assert again.returncode == 2 and "already up" in again.stderr
    finally:
        down = run_testbed("fabric", "down")
    assert down.returncode == 0, down.stderr
    assert find_leftovers() == {}
    assert run_testbed("fabric", "status").returncode == 2


SCENARIO = """topologies: [topologies/1p1d-g2.yaml]
model: ds-27b
workload: {kind: online, dataset: 64k, aps: [2], duration: 60, start_turn: 10, max_turns: 3}
policies: [dualpath]
faults: [{kind: link-flap, target: "n0:snic", at: 1, duration: 30}]
"""


def start_logged(args: list[str], cwd: Path, log: Path, wait_for: str) -> subprocess.Popen:
    """`python -m <args>` in the background, once its output (in `log`) shows `wait_for`."""
    with open(log, "w") as out:
        # As from a terminal: a shell starts background jobs with SIGINT ignored, and a
        # child that inherits that would never see the Ctrl-C these tests send.
        proc = subprocess.Popen([sys.executable, "-m", *args], cwd=cwd, stdout=out,
                                stderr=subprocess.STDOUT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + UP_TIMEOUT
    while wait_for not in log.read_text():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.2)
    return proc


def start_scenario(tmp_path, wait_for: str) -> tuple[subprocess.Popen, Path]:
    """A scenario run in the background, once its output shows `wait_for`."""
    scenario = tmp_path / "long.yaml"
    scenario.write_text(SCENARIO)
    log = tmp_path / "run.log"
    proc = start_logged(["testbed", "scenario", "run", str(scenario)], tmp_path, log, wait_for)
    return proc, log


@pytest.mark.parametrize("phase, sig", [(" agents, ", signal.SIGTERM),
                                        ("fault at", signal.SIGINT),
                                        ("fault at", signal.SIGTERM)],
                         ids=["startup-SIGTERM", "run-SIGINT", "run-SIGTERM"])
def test_signal_during_a_scenario_run_tears_everything_down(tmp_path, phase, sig):
    """While its cluster comes up, or mid-run with a link held down by a fault: the run
    stops, and nothing stays behind (no namespace, process, Prometheus server or fault
    socket)."""
    proc, log = start_scenario(tmp_path, phase)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert "scenario interrupted; its cluster was torn down" in log.read_text()
    assert find_leftovers() == {}


def test_a_second_signal_during_teardown_does_not_cut_it_short(tmp_path):
    proc, log = start_scenario(tmp_path, "fault at")
    proc.send_signal(signal.SIGINT)
    for _ in range(10):              # Ctrl-C, again and again, while it tears down
        time.sleep(0.1)
        if proc.poll() is not None:
            break
        proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert find_leftovers() == {}


def test_signal_to_fabric_up_during_its_teardown_is_ignored():
    proc = start_foreground("1p1d.yaml", "netns")
    proc.send_signal(signal.SIGINT)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "torn down" in out, out
    assert find_leftovers() == {}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_a_bench_tears_its_cluster_down(tmp_path, sig):
    """A bench (here bench-dilation's first run, cut short) brings clusters up as scenarios
    do, and goes the same way: Ctrl-C or SIGTERM, and nothing stays behind."""
    log = tmp_path / "bench.log"
    proc = start_logged(["testbed.bench.dilation", "--topologies", "topologies/1p1d-g2.yaml",
                         "--tdfs", "1", "--repeats", "2", "--skip-auto", "--agents", "8"],
                        REPO, log, " agents, ")
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 130, log.read_text()
    assert "bench interrupted; its cluster was torn down" in log.read_text()
    assert find_leftovers() == {}


def test_sigkill_of_a_scenario_run_then_clean_removes_leftovers(tmp_path):
    proc, _ = start_scenario(tmp_path, "fault at")
    kill_then_clean(proc, "links", "processes", "prometheus servers", "fault socket")


def test_a_fabric_brought_down_leaves_no_unreaped_process():
    """Every helper shell, the bridges' included, is waited for: a long bench brings up
    dozens of fabrics in one process."""
    with RunningCluster(topology("1p1d"), agents=False):
        pass
    assert unreaped_children() == []
