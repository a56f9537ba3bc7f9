"""Virtual time: the emulation clock's conversions, link rates divided by the time dilation,
and a one-line error for every bad time_dilation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import yaml

from agents.clock import Clock
from testbed import cli
from testbed import errors
from testbed.plan import build_plan
from testbed.qos import HtbParams
from testbed.scenario import REPO, load_scenario
from testbed.topology import load_topology

TOPOLOGY = REPO / "topologies" / "1p1d-g2.yaml"


def test_durations_stretch_and_instants_shrink_by_the_dilation():
    clock = Clock()
    clock.set_dilation(4)
    assert clock.wall(2.5) == 10.0 and clock.emulated(10.0) == 2.5
    assert clock.now() == pytest.approx(time.monotonic() / 4, abs=1e-3)
    assert clock.time() == pytest.approx(time.time() / 4, abs=1e-3)


def test_an_emulated_sleep_takes_dilation_times_the_wall_time():
    clock = Clock(dilation=3)
    started = time.monotonic()
    asyncio.run(clock.sleep(0.05))
    assert 0.15 <= time.monotonic() - started < 0.3
    started = time.monotonic()
    clock.pause(0.02)
    assert 0.06 <= time.monotonic() - started < 0.15


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan")])
def test_the_clock_refuses_a_dilation_below_one(bad):
    with pytest.raises(ValueError, match="expected a number >= 1"):
        Clock().set_dilation(bad)


def test_every_link_rate_is_divided_by_the_dilation_and_bytes_are_not():
    plain = build_plan(load_topology(TOPOLOGY))
    dilated = build_plan(load_topology(TOPOLOGY, time_dilation=4))
    for a, b in zip(plain.interfaces, dilated.interfaces):
        assert (a.host, a.name) == (b.host, b.name)
        if a.rate is None:
            assert b.rate is None
        else:
            assert b.rate == pytest.approx(a.rate / 4, abs=1)
            assert b.real_rate == a.real_rate          # what the report speaks of
    assert dilated.topology.scale == plain.topology.scale     # bytes are not scaled further


def test_htb_bursts_are_sized_for_the_dilated_rate():
    """At 2 ms of the rate (or two 64 KiB segments), so a slower link gets a smaller bucket."""
    fast, slow = HtbParams(4 * 10**9), HtbParams(10**9)
    assert fast.burst == 4 * slow.burst == 4 * 10**9 // 8 // 500


@pytest.mark.parametrize("bad, shown", [(0, "0"), (-1, "-1"), (0.5, "0.5"), ("fast", "'fast'"),
                                         (True, "True"), ([2], "[2]")])
def test_a_bad_time_dilation_in_a_topology_is_one_line(tmp_path, bad, shown):
    data = yaml.safe_load(TOPOLOGY.read_text())
    data["time_dilation"] = bad
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(errors.TestbedError) as error:
        load_topology(path)
    message = str(error.value)
    assert "\n" not in message
    assert f"time_dilation: got {shown}, expected a number >= 1 (1: real time) or 'auto'" \
        in message


def test_a_dilation_that_takes_a_link_below_what_htb_shapes_is_refused():
    with pytest.raises(errors.TestbedError, match=r"links\.snic: scaled rate .* / time_dilation 64\) "
                                           r"is out of range"):
        load_topology(TOPOLOGY, time_dilation=64)


def test_an_integer_beyond_any_float_is_one_line_too(tmp_path):
    data = yaml.safe_load(TOPOLOGY.read_text())
    data["time_dilation"] = 10**400
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(errors.TestbedError) as error:
        load_topology(path)
    assert "\n" not in str(error.value)
    assert "time_dilation: got 1000" in str(error.value)
    assert str(error.value).endswith("expected a number >= 1 (1: real time) or 'auto'")


def test_auto_accepts_a_topology_whose_rates_fit_only_at_a_larger_tdf(tmp_path):
    """At scale 20 the 800 Gbit/s PCIe link is 40 Gbit/s, beyond what a veth keeps up with:
    refused at TDF 1, but `auto` may run it from TDF 4 on, and its plan is checked there."""
    data = yaml.safe_load(TOPOLOGY.read_text())
    data.update(scale=20, time_dilation="auto")
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(data))
    topology = load_topology(path)
    assert topology.fitting_dilations() == [4.0, 8.0, 16.0]
    assert topology.buildable().dilation == 4
    with pytest.raises(errors.TestbedError, match=r"links\.cnic: scaled rate .* out of range"):
        load_topology(path, time_dilation=1)
    data.update(scale=1)                          # too fast at every TDF auto tries
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(errors.TestbedError,
                       match=r"time_dilation auto: no TDF of 1, 2, 4, 8, 16 fits"):
        load_topology(path)


def test_an_auto_topology_cannot_be_built_until_resolved():
    topology = load_topology(TOPOLOGY, time_dilation="auto")
    with pytest.raises(errors.TestbedError, match="time_dilation is 'auto', expected it resolved"):
        build_plan(topology)
    assert build_plan(topology.dilated(2)).topology.dilation == 2


@pytest.mark.parametrize("bad", [0, -3, 0.9, "slow"])
def test_a_bad_time_dilation_in_a_scenario_is_one_line(tmp_path, bad):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "topologies": ["topologies/1p1d-g2.yaml"], "model": "ds-27b",
        "workload": {"agents": 2}, "policies": ["basic"], "time_dilation": bad}))
    with pytest.raises(errors.TestbedError) as error:
        load_scenario(str(path))
    assert "\n" not in str(error.value)
    assert f"time_dilation: got {bad!r}, expected a number >= 1" in str(error.value)


def test_a_scenario_dilation_must_fit_every_topology(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "topologies": ["topologies/1p1d-g2.yaml"], "model": "ds-27b",
        "workload": {"agents": 2}, "policies": ["basic"], "time_dilation": 100}))
    with pytest.raises(errors.TestbedError, match="time_dilation: 100 does not fit"):
        load_scenario(str(path))


@pytest.mark.parametrize("bad", ["0", "-1", "0.5", "fast", "", "nan", "inf"])
def test_a_bad_time_dilation_on_the_command_line_is_one_line(capsys, bad):
    assert cli.main(["scenario", "run", "smoke", "--time-dilation", bad]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"testbed: --time-dilation: got {bad!r}, expected a number >= 1 "
                   "(1: real time) or 'auto'")


def test_a_fabric_by_hand_takes_a_number_not_auto(capsys):
    assert cli.main(["fabric", "up", str(TOPOLOGY), "--time-dilation", "auto"]) == 2
    assert "expected a number >= 1 for a fabric brought up by hand" in capsys.readouterr().err


def _scenario_with(tmp_path, dilation) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({
        "topologies": ["topologies/1p1d-g2.yaml", "topologies/2p1d-g2.yaml"],
        "model": "ds-27b", "workload": {"agents": 2}, "policies": ["basic"],
        "time_dilation": dilation}))
    return path


def test_a_scenario_gives_each_topology_its_own_dilation(tmp_path):
    scenario = load_scenario(str(_scenario_with(tmp_path, {"2p1d-g2": 16, "1p1d-g2": "auto"})))
    assert scenario.dilation_of("topologies/2p1d-g2.yaml") == 16.0
    assert scenario.dilation_of("topologies/1p1d-g2.yaml") == "auto"
    scenario = load_scenario(str(_scenario_with(tmp_path, {"2p1d-g2": 16})))
    assert scenario.dilation_of("topologies/1p1d-g2.yaml") is None    # the topology's own


@pytest.mark.parametrize("dilation, shown", [
    ({"2p1d-g2": 0.5}, "time_dilation: 2p1d-g2: got 0.5, expected a number >= 1"),
    ({"2p1d-g2": "fast"}, "time_dilation: 2p1d-g2: got 'fast', expected a number >= 1"),
    ({"3p1d-g2": 4}, "time_dilation: got '3p1d-g2', expected one of this scenario's topology "
                     "names: 1p1d-g2, 2p1d-g2"),
    ({"2p1d-g2": 100}, "time_dilation: 100 does not fit topologies/2p1d-g2.yaml")])
def test_a_bad_dilation_by_topology_is_one_line(tmp_path, dilation, shown):
    with pytest.raises(errors.TestbedError) as error:
        load_scenario(str(_scenario_with(tmp_path, dilation)))
    assert "\n" not in str(error.value)
    assert shown in str(error.value)
