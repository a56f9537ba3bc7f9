"""`make bench-dataplane`: how fast the agents move KV, against iperf3 and the host CPU.

1. Agent against iperf3 on one shaped link (1 Gbit/s, everything else 4x faster): the
   storage -> node read over the SNIC (LOAD) and the node -> GPU bulk H2D over the CNIC
   (FETCH), as payload throughput divided by iperf3's goodput on the same link.
2. CPU-seconds of all agents per real-cluster GB of KV moved (all hops counted).
3. Where the host CPU starts to limit the emulation: 1P1D x 4 at falling scale factors
   (rising real byte rates), four concurrent requests; the SNIC read and the H2D each as a
   share of its configured rate (wire bytes from the interface counters). The smallest
   scale at which both stay >= 95% is the fastest faithful setting on this machine.

Prints tables and writes results/bench-dataplane/<timestamp>.json.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from testbed import counters
from testbed.agentset import RunningCluster
from testbed.bench import REPO, save
from testbed.cpuwatch import CpuWatch
from testbed.interrupts import run_interruptible
from testbed.iperf import measure
from testbed.report import table
from testbed.request import RequestSpec, decode, prefill, prepare, seed
from testbed.state import FabricRecord
from testbed.topology import load_topology, probe_topology

LINK_RATE = 1_000_000_000
SCALES = [4000, 2000, 1000, 500, 250]


def run_together(plan, specs: list[RequestSpec]) -> list[tuple[dict, dict]]:
    """Prefill all at once, then decode all at once; (prefill, decode) reports."""
    reqs = [prepare(plan, spec) for spec in specs]
    for req in reqs:
        seed(plan, req)
    with ThreadPoolExecutor(len(reqs)) as pool:
        prefills = list(pool.map(lambda r: prefill(plan, r), reqs))
        decodes = list(pool.map(lambda r: decode(plan, r), reqs))
    return list(zip(prefills, decodes))


def span(windows: list[list[float]]) -> float:
    """Seconds from the first start to the last end of overlapping transfers."""
    return max(end for _, end in windows) - min(start for start, _ in windows)


def bench_agent_vs_iperf3() -> dict:
    # A context of 1M tokens of DS 660B (40 KB per token) is 40 MB here: 0.3 s at 1 Gbit/s.
    topo = probe_topology(LINK_RATE, pcie=4 * LINK_RATE, storage=4 * LINK_RATE)
    cluster = RunningCluster(topo)
    with cluster as fabric:
        plan = fabric.plan
        node = fabric.node
        snic_iperf = measure(node("st0"), node("n0"), plan.host("n0").address("snic"), seconds=4)
        cnic_iperf = measure(node("n1"), node("n1g0"), plan.host("n1g0").address("cnic"),
                             seconds=4)
        cpu_before = cluster.agents.cpu_seconds()
        loaded = load_seconds = fetched = h2d_seconds = moved = 0.0
        for _ in range(4):
            spec = RequestSpec("ds-660b", 1_000_000, 1024, 0, "pe", "n0g0", "n1g0")
            [(p, d)] = run_together(plan, [spec])
            loaded += p["layer_bytes"]
            load_seconds += p["timings"]["load"]
            fetched += d["prompt_bytes"]
            h2d_seconds += d["h2d_seconds"]
            moved += 2 * p["layer_bytes"] + p["pushed_bytes"] + d["prompt_bytes"]
        cpu = cluster.agents.cpu_seconds() - cpu_before
    snic_agent, cnic_agent = 8 * loaded / load_seconds, 8 * fetched / h2d_seconds
    real_gb = moved * topo.scale / 1e9
    return dict(link_rate=LINK_RATE, snic_iperf3=snic_iperf, snic_agent=snic_agent,
                snic_ratio=snic_agent / snic_iperf, cnic_iperf3=cnic_iperf,
                cnic_agent=cnic_agent, cnic_ratio=cnic_agent / cnic_iperf,
                agent_cpu_seconds=cpu, real_gb_moved=real_gb,
                cpu_seconds_per_real_gb=cpu / real_gb)


def bench_cpu_limit() -> list[dict]:
    rows = []
    for scale in SCALES:
        topo = load_topology(REPO / "topologies/1p1d.yaml", backend="netns", scale=scale)
        with RunningCluster(topo) as fabric:
            plan = fabric.plan
            # 4 x 128K tokens of DS 660B: 21 GB per node, long enough that the links'
            # burst allowance does not show.
            specs = [RequestSpec("ds-660b", 131072, 429, 0, "pe", f"n0g{i}", f"n1g{i}")
                     for i in range(topo.gpus_per_node)]
            record = FabricRecord.read()
            before = counters.snapshot(record)
            started = time.monotonic()
            with CpuWatch(interval=0.2) as cpu:
                results = run_together(plan, specs)
            moved = counters.delta(before, counters.snapshot(record))
            load_window = span([p["load_window"] for p, _ in results])
            h2d_windows = [span([d["h2d_window"]]) for _, d in results]
        snic_rate = plan.host("n0").interface("snic").rate
        cnic_rate = plan.host("n1g0").interface("cnic").rate
        snic_share = 8 * moved[("n0", "snic", "rx")] / load_window / snic_rate
        # Each GPU's bulk H2D is limited by its own CNIC: its rate over its own window.
        h2d_share = sum(8 * moved[(f"n1g{i}", "cnic", "rx")] / h2d_windows[i] / cnic_rate
                        for i in range(topo.gpus_per_node)) / topo.gpus_per_node
        row = dict(scale=scale, snic_rate=snic_rate, snic_share=snic_share,
                   h2d_share=h2d_share, seconds=time.monotonic() - started,
                   real_snic_gbit=topo.links.snic / 1e9, host_cpu=cpu.mean,
                   cpu_saturated=cpu.saturated_share)
        rows.append(row)
        print(f"  scale {scale}: SNIC {snic_rate / 1e6:.0f} Mbit/s emulated, read at "
              f"{snic_share:.1%}, H2D at {h2d_share:.1%}, host CPU {cpu.mean:.0%}", flush=True)
    return rows


def main() -> None:
    started = time.strftime("%Y%m%d-%H%M%S")
    print("agent against iperf3 on one 1 Gbit/s link:", flush=True)
    link = bench_agent_vs_iperf3()
    print("where the CPU starts to limit 1P1D x 4:", flush=True)
    sweep = bench_cpu_limit()
    faithful = [r["scale"] for r in sweep if r["snic_share"] >= 0.95 and r["h2d_share"] >= 0.95]

    print()
    print(table(["LINK", "IPERF3", "AGENT", "RATIO"], [
        ["snic (storage -> node)", f"{link['snic_iperf3'] / 1e6:.0f} Mbit/s",
         f"{link['snic_agent'] / 1e6:.0f} Mbit/s", f"{link['snic_ratio']:.3f}"],
        ["cnic (node -> GPU, H2D)", f"{link['cnic_iperf3'] / 1e6:.0f} Mbit/s",
         f"{link['cnic_agent'] / 1e6:.0f} Mbit/s", f"{link['cnic_ratio']:.3f}"]]))
    print(f"\nagent CPU: {link['agent_cpu_seconds']:.2f} s for {link['real_gb_moved']:.0f} "
          f"real-cluster GB moved = {link['cpu_seconds_per_real_gb'] * 1e3:.2f} ms per real GB")
    print()
    print(table(["SCALE", "SNIC (EMULATED)", "SNIC (REAL)", "SNIC READ", "H2D", "HOST CPU"], [
        [str(r["scale"]), f"{r['snic_rate'] / 1e6:.0f} Mbit/s", f"{r['real_snic_gbit']:.0f} Gbit/s",
         f"{r['snic_share']:.1%}", f"{r['h2d_share']:.1%}", f"{r['host_cpu']:.0%}"]
        for r in sweep]))
    print(f"\nsmallest scale with both >= 95%: {min(faithful) if faithful else 'none'}")

    save("dataplane", started, dict(link=link, cpu_limit=sweep,
                                    smallest_faithful_scale=min(faithful) if faithful else None))


if __name__ == "__main__":
    raise SystemExit(run_interruptible("bench", main))
