"""Prometheus for a run: the scrape targets of the live fabric, and a local server.

`dashboards/prometheus.yml` is the one scrape configuration: a 1 s interval over the targets
listed in TARGETS_FILE (file-based discovery). A run writes that file from its fabric (the
link exporter in the root namespace, every agent's endpoint on the management network, each
labelled with its host, node, gpu, role and the scenario) and removes it at the end. The
Prometheus of `docker-compose.yml` mounts the same folder, so it follows every run; without
it, a run starts its own server on LISTEN unless PROMETHEUS_URL names one already running.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from agents.metrics import METRICS_PORT
from testbed.exporter import EXPORTER_PORT
from testbed.errors import TestbedError
from testbed.plan import ROOT_MGMT_ADDRESS, ClusterPlan
from testbed.state import STATE_DIR

REPO = Path(__file__).resolve().parent.parent
CONFIG_FILE = REPO / "dashboards" / "prometheus.yml"
TARGETS_DIR = STATE_DIR / "prometheus"
TARGETS_FILE = TARGETS_DIR / "targets.json"
LISTEN = os.environ.get("DUALPATH_PROMETHEUS_LISTEN", "127.0.0.1:9090")
SERVER_MARKER = "DUALPATH_TESTBED_SERVER"   # in a server's environment: the run's pid
READY_SECONDS = 30
QUERY_TIMEOUT = 10


def scrape_targets(plan: ClusterPlan, scenario: str, policy: str = "") -> list[dict]:
    """The file-discovery entries of a fabric: the testbed's exporter (links and client) and
    every agent, labelled with what runs on them."""
    run = {"scenario": scenario, "policy": policy, "topology": plan.topology.name}
    entries = [{"targets": [f"{ROOT_MGMT_ADDRESS}:{EXPORTER_PORT}"],
                "labels": {"component": "testbed", **run}}]
    for host in plan.hosts:
        entries.append({"targets": [f"{host.address('mgmt')}:{METRICS_PORT}"], "labels": {
            "component": host.kind, **run, "host": host.name, "node": host.node or "",
            "gpu": host.name if host.kind == "gpu" else "", "role": host.role}})
    return entries


def write_targets(plan: ClusterPlan, scenario: str, policy: str = "") -> None:
    TARGETS_DIR.mkdir(parents=True, exist_ok=True)
    tmp = TARGETS_FILE.with_suffix(".tmp")
    tmp.write_text(json.dumps(scrape_targets(plan, scenario, policy), indent=1))
    tmp.replace(TARGETS_FILE)          # Prometheus never reads half a file


def remove_targets() -> None:
    TARGETS_FILE.unlink(missing_ok=True)


class PrometheusServer:
    """A Prometheus process for one run, its data kept in `data_dir`."""

    def __init__(self, data_dir: Path, listen: str = LISTEN):
        self.data_dir, self.listen = data_dir, listen
        self.url = f"http://{listen}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise TestbedError("no prometheus binary on PATH; `make setup` installs Debian's "
                               "(apt-get install prometheus)")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The shared configuration, pointed at this machine's targets file (the state
        # folder may be moved with DUALPATH_STATE_DIR).
        config = yaml.safe_load(CONFIG_FILE.read_text())
        for job in config["scrape_configs"]:
            for discovery in job.get("file_sd_configs", []):
                discovery["files"] = [str(TARGETS_FILE)]
        config_file = self.data_dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        log = open(self.data_dir / "prometheus.log", "w")
        # The marker lets `testbed clean` find a server whose run was killed.
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_file}", f"--storage.tsdb.path={self.data_dir}",
             f"--web.listen-address={self.listen}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, SERVER_MARKER: str(os.getpid())})
        log.close()
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise TestbedError(f"prometheus exited with {self.process.returncode} (is "
                                   f"{self.listen} in use?); see {self.data_dir / 'prometheus.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TestbedError(f"prometheus not ready on {self.listen} after {READY_SECONDS} s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@contextmanager
def run_prometheus(data_dir: Path) -> Iterator[PrometheusAPI]:
    """The Prometheus a run reports from: PROMETHEUS_URL's if set (it must read
    dashboards/prometheus.yml), else a server of our own for the length of the block."""
    url = os.environ.get("PROMETHEUS_URL")
    if url:
        yield PrometheusAPI(url)
        return
    server = PrometheusServer(data_dir)
    server.start()
    try:
        yield PrometheusAPI(server.url)
    finally:
        server.stop()


def utilization_query(nic: str, direction: str, **labels: str) -> str:
    """PromQL: the utilization of every `nic` link end in `direction`, over 5 s windows."""
    match = ", ".join(f'{k}="{v}"' for k, v in
                      {**labels, "nic": nic, "direction": direction}.items())
    return (f"rate(dualpath_link_bytes_total{{{match}}}[5s]) "
            f"/ dualpath_link_rate_bytes{{{match}}}")


class PrometheusAPI:
    """The few HTTP API calls a run needs: instant and range queries, and target health."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _get(self, path: str, **params) -> dict:
        query = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=QUERY_TIMEOUT) as r:
                body = json.load(r)
        except urllib.error.HTTPError as exc:
            body = json.loads(exc.read() or b"{}")
            raise TestbedError(f"prometheus at {self.url}: {body.get('error', exc)} "
                               f"(query {params.get('query', path)!r})") from None
        except OSError as exc:
            raise TestbedError(f"cannot reach prometheus at {self.url}: {exc}") from None
        return body["data"]

    def query(self, promql: str) -> list[dict]:
        return self._get("/api/v1/query", query=promql)["result"]

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict]:
        return self._get("/api/v1/query_range", query=promql, start=start, end=end,
                         step=step)["result"]

    def targets(self) -> list[dict]:
        return self._get("/api/v1/targets", state="active")["activeTargets"]

    def series(self, promql: str, start: float, end: float, label: str,
               step: float = 1.0) -> dict[str, list[tuple[float, float]]]:
        """A range query as {label value: [(seconds from start, value), ...]}."""
        return {s["metric"].get(label, ""): [(t - start, float(v)) for t, v in s["values"]]
                for s in self.query_range(promql, start, end, step)}
