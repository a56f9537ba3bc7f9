"""Integration tests: real namespaces, veth pairs, HTB qdiscs and Docker containers, as root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from testbed.agentset import RunningCluster
from testbed.topology import Topology, load_topology
from tests.integration.leftovers import find_leftovers

REPO = Path(__file__).resolve().parents[2]
TOPOLOGIES = REPO / "topologies"


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        raise pytest.UsageError("the integration tests need root: run `make test` as root")


def topology(name: str, **overrides) -> Topology:
    return load_topology(TOPOLOGIES / f"{name}.yaml", **overrides)


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    """After the whole session: no namespace, link, bridge, container or process of ours."""
    yield
    assert find_leftovers() == {}, "the test session left emulation pieces behind"


@pytest.fixture(scope="module")
def docker_1p1d():
    with RunningCluster(topology("1p1d", backend="docker"), agents=False) as fabric:
        yield fabric
