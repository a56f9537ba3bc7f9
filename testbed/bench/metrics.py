"""`make bench-metrics`: what exporting the links to Prometheus costs.

On 2P4D x 8 (netns hosts, no agents), the testbed's exporter is scraped once a second, as
Prometheus does, for SCRAPES seconds: its CPU time per second (target: under 5% of one core),
and how long a scrape takes. The CPU is this process's, the scraping client included (a
slight overestimate of the exporter's own).

Prints a table and writes results/bench-metrics/<timestamp>.json.
"""

from __future__ import annotations

import time
import urllib.request

from testbed.agentset import RunningCluster
from testbed.bench import REPO, save
from testbed.exporter import EXPORTER_PORT
from testbed.interrupts import run_interruptible
from testbed.plan import ROOT_MGMT_ADDRESS
from testbed.report import table
from testbed.topology import load_topology

SCRAPES = 30
TOPOLOGY = "topologies/2p4d.yaml"


def scrape(url: str) -> tuple[float, int]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = reply.read()
    return time.monotonic() - started, body.count(b"\n")


def main() -> None:
    started = time.strftime("%Y%m%d-%H%M%S")
    topology = load_topology(REPO / TOPOLOGY, backend="netns", gpus_per_node=8)
    url = f"http://{ROOT_MGMT_ADDRESS}:{EXPORTER_PORT}/metrics"
    print(f"exporter on {topology.name} x 8 ({TOPOLOGY}, netns), {SCRAPES} scrapes at 1 s:",
          flush=True)
    with RunningCluster(topology, agents=False) as fabric:
        links = len(fabric.plan.interfaces)
        durations, lines = [], 0
        cpu0, wall0 = time.process_time(), time.monotonic()
        for i in range(SCRAPES):
            seconds, lines = scrape(url)
            durations.append(seconds)
            time.sleep(max(0.0, wall0 + i + 1 - time.monotonic()))
        cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    durations.sort()
    figures = {"topology": topology.name, "gpus_per_node": 8, "interfaces": links,
               "series_lines": lines, "scrapes": SCRAPES,
               "cpu_share_of_one_core": cpu / wall,
               "scrape_seconds_median": durations[len(durations) // 2],
               "scrape_seconds_max": durations[-1]}
    print()
    print(table(["TOPOLOGY", "INTERFACES", "SAMPLES/SCRAPE", "CPU (1 CORE)", "SCRAPE MEDIAN",
                 "SCRAPE MAX"],
                [[f"{topology.name} x 8", links, lines, f"{cpu / wall:.1%}",
                  f"{figures['scrape_seconds_median'] * 1e3:.0f} ms",
                  f"{durations[-1] * 1e3:.0f} ms"]]))
    save("metrics", started, figures)


if __name__ == "__main__":
    raise SystemExit(run_interruptible("bench", main))
