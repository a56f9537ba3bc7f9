"""Each agent's Prometheus endpoint, on its management address (METRICS_PORT).

An agent names its metrics in `metrics()` (read from its state at scrape time) and may
register histograms on `agent.registry`; the process collector adds its CPU and memory.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

METRICS_PORT = 9400


class AgentCollector(Collector):
    def __init__(self, agent):
        self.agent = agent

    def collect(self) -> Iterator:
        yield from self.agent.metrics()


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def labelled(kind, name: str, documentation: str, label: str, values: dict):
    family = kind(name, documentation, labels=[label])
    for key, value in values.items():
        family.add_metric([key], value)
    return family


def verifier_metrics(verifier, scale: int) -> Iterator:
    """What an agent's verifier saw, in real-cluster bytes."""
    yield counter("dualpath_kv_verified_bytes", "KV bytes this agent verified (real-cluster bytes)",
                  verifier.verified_bytes * scale)
    yield counter("dualpath_kv_corrupt_bytes",
                  "KV bytes that failed verification and were refused (real-cluster bytes)",
                  verifier.corrupt_bytes * scale)


def agent_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(namespace="dualpath_agent", registry=registry)
    return registry


def serve_metrics(agent, address: str, port: int = METRICS_PORT) -> None:
    """Serve `agent.registry` from a thread of its own, so that a scrape is answered even
    while the agent's event loop is busy (on a loaded host a loop can be held for more than
    the 1 s scrape timeout). Collectors read the agent's state without a lock: single reads,
    len() and sum() of a dict's values are atomic under the GIL."""
    agent.registry.register(AgentCollector(agent))
    start_http_server(port, addr=address, registry=agent.registry)
