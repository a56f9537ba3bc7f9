"""Each agent's Prometheus endpoint, on its management address (METRICS_PORT).

Scrapes are answered from the agent's own event loop, so a scrape sees the agent between
two steps of its work, never halfway through one, and no lock is needed. An agent names its
metrics in `metrics()` (read from its state at scrape time) and may register histograms
on `agent.registry`; the process collector adds its CPU and memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

METRICS_PORT = 9400
MAX_REQUEST_BYTES = 8192


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


async def serve_metrics(agent, address: str, port: int = METRICS_PORT) -> asyncio.Server:
    agent.registry.register(AgentCollector(agent))

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path = (head.split(b" ") + [b"", b""])[:2]
            if method != b"GET" or path.split(b"?")[0] not in (b"/metrics", b"/"):
                status, body, kind = b"404 Not Found", b"metrics are at /metrics\n", b"text/plain"
            else:
                status, body = b"200 OK", generate_latest(agent.registry)
                kind = CONTENT_TYPE_LATEST.encode()
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind +
                         b"\r\nContent-Length: " + str(len(body)).encode() +
                         b"\r\nConnection: close\r\n\r\n" + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass            # a scraper that went away or sent no request: nothing to answer
        finally:
            writer.close()

    return await asyncio.start_server(answer, address, port, limit=MAX_REQUEST_BYTES)
