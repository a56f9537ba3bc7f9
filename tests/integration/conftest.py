"""Integration tests: real namespaces, veth pairs, HTB qdiscs and Docker containers, as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.agentset import AgentSet
from testbed.fabric import Fabric
from testbed.plan import build_plan
from testbed.topology import Topology, load_topology
from tests.integration.leftovers import find_leftovers

REPO = Path(__file__).resolve().parents[2]
TOPOLOGIES = REPO / "topologies"


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        raise pytest.UsageError("the integration tests need root: run `make test` as root")


def topology(name: str, **overrides) -> Topology:
    return load_topology(TOPOLOGIES / f"{name}.yaml", **overrides)


class RunningFabric:
    """A fabric (and, if asked, its agents) for one test module, torn down whatever happens."""

    def __init__(self, topo: Topology, agents: bool = False):
        self.fabric = Fabric(build_plan(topo))
        self.agents = AgentSet(self.fabric) if agents else None

    def __enter__(self) -> Fabric:
        self.fabric.up()
        try:
            if self.agents:
                self.agents.start()
        except BaseException:
            self.fabric.down()
            raise
        return self.fabric

    def __exit__(self, *exc) -> None:
        if self.agents:
            self.agents.stop()
        self.fabric.down()


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the whole session: no namespace, link, bridge, container or process of ours."""
    yield
    assert find_leftovers() == {}, "the test session left emulation pieces behind"


@pytest.fixture(scope="module")
def docker_1p1d():
    with RunningFabric(topology("1p1d", backend="docker")) as fabric:
        yield fabric
