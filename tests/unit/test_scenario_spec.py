"""Scenario files: the shipped ones load; bad ones give one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from testbed import errors
from testbed.scenario import SCENARIOS, load_scenario


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_scenarios_load(path):
    scenario = load_scenario(str(path))
    assert scenario.name == path.stem and scenario.policies


GOOD = """topologies: [topologies/1p1d.yaml]
model: ds-27b
workload: {dataset: 64k, agents: 2}
policies: [basic]
"""


@pytest.mark.parametrize("change,field,expected", [
    (("agents: 2", "agents: 0"), "workload.agents", "greater than or equal to 1"),
    (("[topologies/1p1d.yaml]", "[nowhere.yaml]"), "topologies", "expected a topology file"),
    (("[topologies/1p1d.yaml]", "[topologies/1p1d.yaml, topologies/1p1d.yaml]"), "topologies",
     "distinct file names"),
    (("policies: [basic]", "policies: [basic]\npaper: {speedup: {1p1d: 1.7}}"), "paper.source",
     "expected this field to be set"),
    (("policies: [basic]", "policies: []"), "policies", "at least 1"),
    (("model: ds-27b", "modle: ds-27b"), "modle", "no such field"),
])
def test_bad_scenarios_name_the_field(tmp_path: Path, change, field, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(GOOD.replace(*change))
    with pytest.raises(errors.TestbedError) as error:
        load_scenario(str(path))
    message = str(error.value)
    assert message.startswith(str(path)) and field in message and expected in message
    assert "\n" not in message


def test_unknown_scenario_lists_the_known_ones():
    with pytest.raises(errors.TestbedError, match="scenarios: .*smoke"):
        load_scenario("nope")
