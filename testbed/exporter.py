"""The testbed process's Prometheus endpoint: the emulated links (`testbed.linkmetrics`) and
the client's view of requests, served on the root namespace's management address, where the
scrape targets of a run point (`testbed.prometheus`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from testbed.linkmetrics import LinkCollector
from testbed.plan import ROOT_MGMT_ADDRESS, ClusterPlan
from testbed.state import FabricRecord

EXPORTER_PORT = 9450
# Seconds; the SLO bounds (TTFT 4 s, TPOT 50 ms) are bucket edges, so the SLO share is exact.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 6, 8, 12, 20, 30, 60, 120)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.2, 0.5)
JCT_BUCKETS = (5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600)


class ClientMetrics:
    """What the workload client sees, per policy."""

    def __init__(self, registry: CollectorRegistry):
        self.ttft = Histogram("dualpath_client_ttft_seconds", "Time to first token",
                              ["policy"], buckets=LATENCY_BUCKETS, registry=registry)
        self.ttst = Histogram("dualpath_client_ttst_seconds", "Time to second token",
                              ["policy"], buckets=LATENCY_BUCKETS, registry=registry)
        self.tpot = Histogram("dualpath_client_tpot_seconds", "Mean time per output token of a turn",
                              ["policy"], buckets=TPOT_BUCKETS, registry=registry)
        self.jct = Histogram("dualpath_client_jct_seconds",
                             "Time from an agent's arrival to the end of its last turn",
                             ["policy"], buckets=JCT_BUCKETS, registry=registry)
        self.turns = Counter("dualpath_client_turns", "Turns that completed or failed",
                             ["policy", "outcome"], registry=registry)
        self.verified = Counter("dualpath_client_verified_bytes",
                                "Prompt KV bytes the decode GPUs verified (real-cluster bytes)",
                                ["policy"], registry=registry)
        self.corrupt = Counter("dualpath_client_corrupt_bytes",
                               "Prompt KV bytes that failed verification (real-cluster bytes)",
                               ["policy"], registry=registry)


class FabricExporter:
    """Serves for as long as the fabric is up; `stop()` closes the socket and the netlink
    sockets."""

    def __init__(self, record: FabricRecord, plan: ClusterPlan,
                 address: str = ROOT_MGMT_ADDRESS, port: int = EXPORTER_PORT):
        self.registry = CollectorRegistry()
        self.links = LinkCollector(record, plan)
        self.registry.register(self.links)
        self.client = ClientMetrics(self.registry)
        try:
            self.server, self.thread = start_http_server(port, addr=address,
                                                         registry=self.registry)
        except BaseException:
            self.links.close()
            raise

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        self.links.close()
