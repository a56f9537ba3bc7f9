"""Running a scenario: for each policy, a fresh cluster, the same workload, one report.

The client runs every agent trajectory turn after turn, back to back (no tool latency),
from `start_turn` on (its context written to storage beforehand, off the network):
each turn is submitted to the scheduler, which places it; the next turn starts when the
previous one has finished decoding. A turn's hit KV is everything the trajectory stored
before: its earlier prompts (persisted by the decode node) and its generated blocks (64
tokens each); generated tokens not yet in a full block are recomputed as misses.

Every time here is emulated (agents/clock.py): arrivals, fault times and every figure of the
report; wall time is kept only for Prometheus queries and Grafana. Each run ends with its
fidelity verdict (testbed/fidelity.py).
"""

from __future__ import annotations

import asyncio
import csv
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from agents.clock import clock
from agents.control import acall, closing_idle, error_text
from agents.fidelity import LatenessPairs, Quantiles, Timeliness, freeze_heap
from agents.kv import Block, Geometry
from agents.node import DE_BUFFER_SHARE, DRAM_BYTES
from agents.scheduling import alpha_tokens, beta_tokens
from testbed import counters
from testbed.agentset import RunningCluster
from testbed.annotations import Annotator, annotator_from_env
from testbed import dilation as dilations
from testbed.fidelity import FidelityWatch
from testbed.plan import ClusterPlan
from testbed.plots import write_plots
from testbed.profile import ModelProfile, load_profile
from testbed.prometheus import PrometheusAPI, run_prometheus, utilization_query
from testbed.report import table
from testbed.errors import TestbedError
from testbed.exporter import ClientMetrics
from testbed.faultreport import accounting_text, failures_text, faults_text
from testbed.faults import FaultSpec, chaos_faults
from testbed.injector import Injector
from testbed.request import (GENERATED_BLOCKS, MISS_BLOCKS, PROMPT_BLOCK_TOKENS, seed_blocks,
                             split)
from testbed.scenario import REPO, Scenario, Workload, topology_name
from testbed.state import FabricRecord
from testbed.tcpstats import resent_segments
from testbed.topology import load_topology
from testbed.trace import load_trace
from testbed.workload import Turn, generate_trajectories, poisson_arrivals

TRACE_BLOCKS = 1 << 62   # trace block ids start here, above any request's own (< 2**62)
SAMPLE_SECONDS = 1.0     # SNIC utilization samples (emulated, as every duration here)
PROGRESS_SECONDS = 5.0   # progress lines
RESULTS = REPO / "results"  # where a scenario's report folder goes unless told otherwise
# A turn whose request failed is submitted again, as a new request, up to this many times in
# all; then it fails with the last reason, and so do the trajectory's later turns.
ATTEMPTS = 3
RETRY_SECONDS = 1.0
# How long a client waits for a scheduler that refuses connections (one restarting).
SCHEDULER_WAIT_SECONDS = 60.0
# How long a run waits, before its first arrival, for the scheduler to be able to place work
# on every engine group (leaders retry every agents.engine.IDLE_FETCH_SECONDS while they find
# no scheduler; the health watch looks every agents.health.HEALTH_SECONDS).
GROUPS_WAIT_SECONDS = 10.0
GROUPS_POLL_SECONDS = 0.02


@dataclass
class Agent:
    """The turns of one trajectory being replayed, and the KV it has stored so far."""
    id: str
    turns: tuple[Turn, ...]
    stored: list[Block] = field(default_factory=list)
    arrival: float = 0.0                 # seconds after the run's start
    hash_ids: tuple[int, ...] | None = None   # a trace request's prompt blocks
    finished: float | None = None

    @property
    def stored_tokens(self) -> int:
        return sum(t for _, t in self.stored)


@dataclass
class ClientView:
    """The client's Prometheus metrics for one policy's run."""
    metrics: ClientMetrics
    policy: str
    scale: int

    def turn(self, record: dict) -> None:
        m, policy = self.metrics, self.policy
        m.ttft.labels(policy).observe(record["ttft"])
        if record["ttst"] is not None:
            m.ttst.labels(policy).observe(record["ttst"])
        m.tpot.labels(policy).observe(record["tpot"])
        m.turns.labels(policy, "completed").inc()
        m.verified.labels(policy).inc(record["prompt_bytes_verified"] * self.scale)
        m.corrupt.labels(policy).inc(record["corrupt_bytes"] * self.scale)

    def failed(self) -> None:
        self.metrics.turns.labels(self.policy, "failed").inc()

    def agent_done(self, jct: float) -> None:
        self.metrics.jct.labels(self.policy).observe(jct)


def thresholds(plan: ClusterPlan, profile: ModelProfile, context: int, append: int) -> dict:
    """alpha: 3 s of one node's SNIC; beta: 5 s of one GPU's prefill; a decode GPU's HBM
    and its share of the DE buffer, in tokens."""
    topo = plan.topology
    per_token = profile.prefill_seconds(context, append) / max(1, context + append)
    buffer_bytes = DE_BUFFER_SHARE * DRAM_BYTES / topo.gpus_per_node
    return {"alpha": alpha_tokens(topo.links.snic / 8, profile.kv_bytes_per_token),
            "beta": beta_tokens(per_token),
            "hbm_tokens": int(profile.decode.hbm_kv_bytes.value / profile.kv_bytes_per_token),
            "buffer_tokens": int(buffer_bytes / profile.kv_bytes_per_token)}


def trace_blocks(agent: Agent, turn: Turn, cache: set[int], base: int,
                 ) -> tuple[list[Block], list[Block]]:
    """A trace request's hit and miss blocks: its full blocks, named by their trace ids, hit
    from the first up to the first one not stored yet; the rest, and a partial last block
    (never shared), are misses."""
    full = [TRACE_BLOCKS + h for h in agent.hash_ids[:turn.prompt // PROMPT_BLOCK_TOKENS]]
    stored = next((i for i, block in enumerate(full) if block not in cache), len(full))
    hit = [(block, PROMPT_BLOCK_TOKENS) for block in full[:stored]]
    miss = [(block, PROMPT_BLOCK_TOKENS) for block in full[stored:]]
    return hit, miss + split(turn.prompt % PROMPT_BLOCK_TOKENS, base + MISS_BLOCKS)


@dataclass
class Outcome:
    """How the turns of one run ended: every issued turn is in exactly one of the lists."""
    records: list[dict] = field(default_factory=list)     # completed
    failures: list[dict] = field(default_factory=list)    # failed, with the reason


async def submit(scheduler: str, request: int, **fields) -> dict:
    """One submission; a scheduler that refuses connections is waited for (it may be
    restarting), one that fails the request or goes away mid-way raises."""
    deadline = clock.now() + SCHEDULER_WAIT_SECONDS
    while True:
        try:
            return await acall(scheduler, "submit", request=request, **fields)
        except ConnectionRefusedError:
            if clock.now() > deadline:
                raise
            await clock.sleep(RETRY_SECONDS)


async def run_agent(agent: Agent, scheduler: str, geometry: Geometry, model: str,
                    outcome: Outcome, started: float, cache: set[int], client: ClientView,
                    ) -> None:
    """Replays an agent's turns one after the other, or one trace request (`cache`: the
    trace blocks stored so far). A failed request is submitted again, as a new request;
    a turn that fails every attempt ends the trajectory: it and the later turns fail."""
    await clock.sleep(started + agent.arrival - clock.time())
    for number, turn in enumerate(agent.turns):
        for attempt in range(1, ATTEMPTS + 1):
            request = random.randrange(1, 1 << 46)
            base = request << 16
            if agent.hash_ids is None:
                hit = list(agent.stored)
                miss = split(turn.context - agent.stored_tokens + turn.append, base + MISS_BLOCKS)
            else:
                hit, miss = trace_blocks(agent, turn, cache, base)
            try:
                result = await submit(scheduler, request, model=model, hit=hit, miss=miss,
                                      generate=turn.generate,
                                      generated_block_base=base + GENERATED_BLOCKS)
                break
            except (OSError, RuntimeError, ValueError, asyncio.TimeoutError) as exc:
                reason = error_text(exc)
                if attempt < ATTEMPTS:
                    await clock.sleep(RETRY_SECONDS)
        else:
            fail_rest(agent, number, reason, outcome, client, clock.time() - started)
            agent.finished = clock.time() - started
            return
        decode, prefill = result["decode"], result["prefill"]
        agent.stored += miss + [tuple(b) for b in decode["persisted"]]
        cache.update(block for block, _ in miss if block >= TRACE_BLOCKS)
        records = outcome.records
        records.append({
            "trajectory": agent.id, "turn": number, "request": request, "attempts": attempt,
            "arrival": agent.arrival,
            "hit_tokens": sum(t for _, t in hit), "miss_tokens": sum(t for _, t in miss),
            "generated": turn.generate, "path": result["path"], "pe": result["pe"],
            "de": result["de"], "submitted": result["submitted"] - started,
            "ttft": (decode["first_token_at"] or clock.time()) - result["submitted"],
            "ttst": (decode["second_token_at"] - result["submitted"]
                     if decode.get("second_token_at") else None),
            "tpot": decode["tpot"], "prefill_seconds": prefill["seconds"],
            **{f"prefill_{phase}": seconds for phase, seconds in prefill["timings"].items()},
            "decode_hbm_wait": decode["hbm_wait_seconds"],
            "prompt_bytes_verified": decode["prompt_bytes"],
            "prompt_bytes_expected": 0 if result["oracle"] else geometry.blocks_bytes(hit + miss),
            "corrupt_bytes": decode["verifier"]["corrupt_bytes"]})
        client.turn(records[-1])
    agent.finished = clock.time() - started
    client.agent_done(agent.finished - agent.arrival)


def fail_rest(agent: Agent, first: int, reason: str, outcome: Outcome, client: ClientView,
              at: float) -> None:
    """Turn `first` failed every attempt: it fails with `reason`, the later turns (whose
    context it was to store) with a reason naming it."""
    for number in range(first, len(agent.turns)):
        why = reason if number == first else f"turn {first} of the trajectory failed"
        outcome.failures.append({"trajectory": agent.id, "turn": number, "failed_at": at,
                                 "attempts": ATTEMPTS if number == first else 0,
                                 "reason": why})
        client.failed()


def replays(workload: Workload, aps: float | None) -> list[Agent]:
    """The agents of one run: their trajectories cut to the replayed turns, and their
    arrival times (all at 0 offline; a Poisson process at `aps` online); or a trace's
    requests, one turn each, at their timestamps."""
    if workload.kind == "trace":
        return trace_replays(workload)
    end = None if workload.max_turns is None else workload.start_turn + workload.max_turns
    count = workload.agents_at(aps)
    cut = [(t.id, t.turns[workload.start_turn:end])
           for t in generate_trajectories(workload.dataset, count, workload.seed)]
    cut = [(name, turns) for name, turns in cut if turns]
    if not cut:
        raise TestbedError(f"workload.start_turn: got {workload.start_turn}, expected fewer "
                           "than the trajectories' turns")
    arrivals = ([0.0] * len(cut) if aps is None
                else poisson_arrivals(aps, len(cut), workload.seed))
    return [Agent(name, turns, arrival=at) for (name, turns), at in zip(cut, arrivals)]


def trace_replays(workload: Workload) -> list[Agent]:
    """The trace's requests after the first `skip` (whose blocks are stored beforehand:
    the first replayed one carries them as `stored`), `limit` of them, arrivals from the
    first replayed one on, divided by `speed`."""
    end = None if workload.limit is None else workload.skip + workload.limit
    requests = load_trace(workload.trace_path, end)
    head, replayed = requests[:workload.skip], requests[workload.skip:]
    if not replayed:
        raise TestbedError(f"workload.skip: got {workload.skip}, expected fewer than the "
                           f"trace's {len(requests)} requests")
    warm = sorted({TRACE_BLOCKS + h for r in head
                   for h in r.hash_ids[:r.input_length // PROMPT_BLOCK_TOKENS]})
    t0 = replayed[0].arrival
    agents = [Agent(f"request-{workload.skip + i}",
                    (Turn(r.hit_tokens, r.miss_tokens, r.output_length),),
                    arrival=(r.arrival - t0) / workload.speed, hash_ids=r.hash_ids)
              for i, r in enumerate(replayed)]
    agents[0].stored = [(block, PROMPT_BLOCK_TOKENS) for block in warm]
    return agents


def warm_start(plan: ClusterPlan, profile: ModelProfile, agents: list[Agent],
               ) -> tuple[list[Agent], set[int]]:
    """Fresh copies of `agents` whose first replayed turn finds its context in storage,
    written off-network; and the trace blocks so stored."""
    geometry = Geometry.of(profile, plan.topology.scale)
    ready, cache = [], set()
    for agent in agents:
        if agent.hash_ids is None:
            stored = split(agent.turns[0].context, random.randrange(1, 1 << 46) << 16)
        else:
            stored = agent.stored
            cache.update(block for block, _ in stored)
        seed_blocks(plan, geometry, stored)
        ready.append(Agent(agent.id, agent.turns, stored, agent.arrival, agent.hash_ids))
    return ready, cache


async def inject(faults: list[FaultSpec], injector: Injector, outcome: Outcome,
                 started: float) -> None:
    """Each fault at its time (or once its number of turns completed), as often as it
    repeats. Cancelled when the workload ends; a fault being carried out finishes first."""
    applying: set[asyncio.Future] = set()

    async def one(fault: FaultSpec) -> None:
        if fault.after_turns is not None:
            while len(outcome.records) < fault.after_turns:
                await clock.sleep(0.2)
            first = clock.time()
        else:
            first = started + fault.at
        for n in range(fault.times):
            await clock.sleep(first + n * (fault.every or 0) - clock.time())
            applied = asyncio.ensure_future(asyncio.to_thread(injector.apply, fault))
            applying.add(applied)
            await asyncio.shield(applied)

    tasks = [asyncio.create_task(one(f)) for f in faults]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, *applying, return_exceptions=True)


async def collect_timeliness(plan: ClusterPlan, reset: bool) -> dict[str, dict]:
    """Every agent's event-loop lag, CPU share and kernel lateness since its last reset
    (`reset`: start anew); an agent that does not answer is left out (the verdict names it)."""
    hosts = plan.hosts
    replies = await asyncio.gather(*(acall(h.address("mgmt"), "fidelity", timeout=10,
                                           reset=reset) for h in hosts), return_exceptions=True)
    return {h.name: r for h, r in zip(hosts, replies) if isinstance(r, dict)}


async def groups_ready(scheduler: str) -> None:
    """Wait until the scheduler can place work on every engine group: each group's leader
    has fetched from it since it was configured, and its health watch has seen each engine
    answer. Either may lag the cluster's start by a second of emulated time (a leader's
    back-off, a health round), 16 s of wall time at TDF 16: arrivals in that second queued
    for the rest of it."""
    deadline = clock.now() + GROUPS_WAIT_SECONDS
    while waiting := (await acall(scheduler, "ready"))["waiting"]:
        if clock.now() > deadline:
            raise TestbedError(f"engine groups {', '.join(waiting)}: not ready to take work "
                               f"within {GROUPS_WAIT_SECONDS:g} s (no fetch from the "
                               "scheduler, or an engine it does not see answer)")
        await clock.sleep(GROUPS_POLL_SECONDS)


async def run_workload(plan: ClusterPlan, scenario: Scenario, policy: str,
                       workload: list[Agent], client: ClientView, cluster: RunningCluster,
                       watch: FidelityWatch, horizon: float | None = None) -> dict:
    """The workload on a running cluster; the SNIC timeline from `watch`'s link samples.
    `horizon`: stop after this many seconds (a pilot run of `testbed.dilation`), leaving
    turns unfinished."""
    scheduler = plan.host("sched").address("mgmt")
    profile = load_profile(scenario.model)
    turns = [t for a in workload for t in a.turns]
    mean_context = sum(t.context for t in turns) // len(turns)
    mean_append = sum(t.append for t in turns) // len(turns)
    configuration = {"policy": policy, **thresholds(plan, profile, mean_context, mean_append)}
    await acall(scheduler, "configure", **configuration)
    cluster.agents.restart_args["sched"] = ["--configuration", json.dumps(configuration)]
    agents, cache = warm_start(plan, profile, workload)
    await groups_ready(scheduler)
    outcome = Outcome()
    records = outcome.records
    geometry = Geometry.of(profile, plan.topology.scale)
    await collect_timeliness(plan, reset=True)
    freeze_heap()                            # as each agent did on that reset
    client_timeliness = Timeliness()
    client_timeliness.start()
    began = time.time()                      # wall, for Prometheus
    started = cluster.injector.started = clock.time()
    watch.workload_starts()
    tasks = [asyncio.create_task(run_agent(a, scheduler, geometry, scenario.model, outcome,
                                           started, cache, client)) for a in agents]
    faults = scenario.faults + (chaos_faults(scenario.chaos, plan, scenario.workload.duration)
                                if scenario.chaos else [])
    injecting = asyncio.create_task(inject(faults, cluster.injector, outcome, started))
    snic_rate = {n.name: n.interface("snic").rate for n in plan.of_kind("node")}
    timeline: dict[str, list[tuple[float, float]]] = {node: [] for node in snic_rate}
    last = watch.received("snic")
    printed = 0.0
    while not all(t.done() for t in tasks):
        if horizon is not None and clock.time() - started >= horizon:
            break
        await asyncio.wait(tasks, timeout=clock.wall(SAMPLE_SECONDS))
        now = watch.received("snic")
        if now[0] <= last[0]:
            continue                 # no new sample yet
        elapsed = clock.time() - started
        for node, rate in snic_rate.items():
            moved = now[1].get(node, 0) - last[1].get(node, 0)
            # the rate is a wall rate (dilated), so bytes over the samples' wall seconds
            timeline[node].append((elapsed, 8 * moved / (now[0] - last[0]) / rate))
        last = now
        if elapsed - printed >= PROGRESS_SECONDS or all(t.done() for t in tasks):
            printed = elapsed
            done = sum(a.finished is not None for a in agents)
            arrived = sum(a.arrival <= elapsed for a in agents)
            tokens = sum(r["hit_tokens"] + r["miss_tokens"] + r["generated"] for r in records)
            snic = max((series[-1][1] for series in timeline.values() if series), default=0)
            failed = f", {len(outcome.failures)} failed" if outcome.failures else ""
            print(f"  {policy}: {elapsed:6.1f} s, agents {done}/{arrived}/{len(agents)} "
                  "done/arrived/all, "
                  f"{len(records)} turns{failed}, {tokens / elapsed / 1e3:.1f} K tokens/s, "
                  f"busiest SNIC {snic:.0%}", flush=True)
    injecting.cancel()
    await asyncio.gather(injecting, return_exceptions=True)
    watch.workload_ends()
    reported = await collect_timeliness(plan, reset=False)
    client_timeliness.stop()
    ending = time.time()
    if horizon is not None:             # a pilot: the turns still running are cut short
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled():
            task.result()      # a bug in the client itself, not a request's failure
    lags = {host: Quantiles.from_json(reply["loop_lag"])
            for host, reply in reported.items()}
    silent = sorted(h.name for h in plan.hosts
                    if h.name not in reported and h.name not in cluster.injector.stopped)
    lags["client"] = client_timeliness.loop_lag
    cpu = {host: Quantiles.from_json(reply["cpu"]) for host, reply in reported.items()}
    cpu["client"] = client_timeliness.cpu
    lateness = {"windows": Quantiles(), "kernels": Quantiles(), "pairs": LatenessPairs()}
    for reply in reported.values():
        for unit, histogram in lateness.items():
            histogram.merge(type(histogram).from_json(reply["kernel_lateness"][unit]))
    ended = [a for a in agents if a.finished is not None]
    mean_jct = sum(a.finished - a.arrival for a in ended) / max(1, len(ended))
    makespan = max((a.finished for a in ended), default=0.0)
    # Offline the batch's completion; online the mean trajectory's (paper §7).
    jct = mean_jct if scenario.workload.timed else makespan
    return {"policy": policy, "jct": jct, "mean_jct": mean_jct, "makespan": makespan,
            "records": records,
            "failures": outcome.failures,
            "issued": len(turns), "faults": list(cluster.injector.events),
            "snic_timeline": timeline, "wall": [began, ending],
            "kernel_lateness": lateness, "loop_lags": lags, "agent_cpu": cpu,
            "silent": silent}


def run_policy(scenario: Scenario, topology_path: str, policy: str, aps: float | None,
               annotator: Annotator | None = None, dilation: float | None = None,
               horizon: float | None = None) -> dict:
    """One policy's run on a fresh cluster at time dilation `dilation` (None: the
    topology's), with its fidelity verdict; `horizon`: stop after so many emulated seconds
    (a pilot)."""
    topology = load_topology(REPO / topology_path)
    if dilation is not None:
        topology = topology.dilated(dilation)
    dilation = topology.dilation
    workload = replays(scenario.workload, aps)
    rate = "" if aps is None else f" at {aps:g} APS"
    tdf = f", TDF {dilation:g}" if dilation != 1 else ""
    pilot = f", pilot of {horizon:g} s" if horizon is not None else ""
    print(f"{topology.name} / {policy}{rate}: {len(workload)} agents, "
          f"{sum(len(a.turns) for a in workload)} turns{tdf}{pilot}", flush=True)
    if annotator:
        annotator.post(f"{scenario.name}: {policy} on {topology.name}{rate}",
                       f"scenario:{scenario.name}", f"policy:{policy}")
    cluster = RunningCluster(topology, topology_path=str(REPO / topology_path),
                             scenario=scenario.name, policy=policy, annotator=annotator)
    with cluster as fabric:
        record = FabricRecord.read()
        before, resent_before = counters.snapshot(record), resent_segments(record)
        client = ClientView(cluster.exporter.client, policy, topology.scale)
        with FidelityWatch(record, cluster.injector.intended_rate) as watch:
            result = asyncio.run(closing_idle(run_workload(fabric.plan, scenario, policy,
                                                           workload, client, cluster, watch,
                                                           horizon)))
        moved = counters.delta(before, counters.snapshot(record))
        resent = resent_segments(record) - resent_before
    verdict = watch.verdict(result.pop("kernel_lateness"), result.pop("loop_lags"),
                            result.pop("agent_cpu"), result.pop("silent"))
    print(f"  {policy}: {verdict.summary()}", flush=True)
    snic = {n.name: moved.get((n.name, "snic", "rx"), 0) * topology.scale
            for n in fabric.plan.of_kind("node")}
    result.update(topology=topology.name, aps=aps, prefill_nodes=topology.prefill_nodes,
                  decode_nodes=topology.decode_nodes, scale=topology.scale,
                  snic_read_bytes=snic, host_cpu=watch.cpu_mean, host_steal=watch.cpu_steal,
                  time_dilation=dilation,
                  tcp_resent_segments=resent,
                  fidelity=verdict.to_json())
    return result


def link_timelines(prometheus: PrometheusAPI, scenario: str, result: dict) -> dict:
    """From Prometheus: each node's SNIC read and each GPU's CNIC receive utilization over
    the run, per wall second (Prometheus runs on wall time), on the emulated time axis."""
    start, end = result["wall"]
    tdf = result["time_dilation"]
    labels = {"scenario": scenario, "policy": result["policy"], "topology": result["topology"]}
    return {f"{nic} {direction}": {
                host: [(t / tdf, u) for t, u in series] for host, series in prometheus.series(
                    utilization_query(nic, direction, **labels), start, end, label="host").items()}
            for nic, direction in (("snic", "rx"), ("cnic", "rx"))}


def snic_balance(timeline: dict[str, list[tuple[float, float]]], busy: float = 0.2) -> float:
    """Max over mean SNIC read utilization across nodes, per sample, averaged over the
    samples where the SNICs were busy (mean above `busy`): the paper's Figure 13 metric."""
    samples = list(zip(*timeline.values()))
    ratios = [max(u for _, u in s) / mean for s in samples
              if (mean := sum(u for _, u in s) / len(s)) > busy]
    return sum(ratios) / len(ratios) if ratios else 0.0


def steady(result: dict, duration: float) -> list[dict]:
    """An online run's turns submitted in the last quarter of its arrival window. The agents
    present build up for about a trajectory's length, and an overload shows as a TTFT that
    grows until the arrivals stop; the drain after the window is lighter than the load."""
    window = [r for r in result["records"] if 0.75 * duration <= r["submitted"] <= duration]
    return window or result["records"]


def summarize(result: dict, workload: Workload) -> dict:
    """The run's figures; online, TTFT and TPOT (which the SLO judges) are over the steady
    part of the arrival window, `steady`."""
    records = result["records"]
    judged = records if result["aps"] is None else steady(result, workload.duration)
    snic = list(result["snic_read_bytes"].values())
    def mean(key: str, rows: list[dict] = records) -> float:
        return sum(r[key] for r in rows) / len(rows) if rows else float("nan")

    failures = result.get("failures", [])
    issued = result.get("issued", len(records))
    return {"topology": result["topology"], "policy": result["policy"], "aps": result["aps"],
            "jct": result["jct"],
            "turns": len(records), "ttft": mean("ttft", judged), "tpot": mean("tpot", judged),
            # every issued turn completed or failed with a reason; a completed one had every
            # prompt byte verified by its decode engine
            "issued": issued, "failed": len(failures),
            "unaccounted": issued - len(records) - len(failures),
            "unverified": sum(r["prompt_bytes_verified"] < r.get("prompt_bytes_expected", 0)
                              for r in records),
            "de_reads": sum(r["path"] == "de" for r in records) / max(1, len(records)),
            "snic_max_over_avg": max(snic) / (sum(snic) / len(snic)) if sum(snic) else 0.0,
            "snic_balance": snic_balance(result["snic_timeline"]),
            # real-cluster bytes, as every figure of the report
            "verified_bytes": sum(r["prompt_bytes_verified"] for r in records) * result["scale"],
            "corrupt_bytes": sum(r["corrupt_bytes"] for r in records) * result["scale"],
            "host_cpu": result["host_cpu"], "time_dilation": result["time_dilation"],
            "tcp_resent_segments": result["tcp_resent_segments"],
            "valid": result["fidelity"]["valid"], "verdict": result["fidelity"]["summary"],
            "dilation_source": result.get("dilation_source", "")}


def invalid_policies(summaries: list[dict], topology: str, policies) -> list[str]:
    """Which of `policies` had an INVALID run on `topology`: a figure drawn from one is not
    a result."""
    return [p for p in dict.fromkeys(policies)
            if any(s["topology"] == topology and s["policy"] == p and not s["valid"]
                   for s in summaries)]


def comparisons(scenario: Scenario, summaries: list[dict], results: list[dict]) -> list[dict]:
    """Per topology: DualPath's speedup over basic against what the configuration allows,
    min((P + D) / P, JCT_basic / JCT_oracle), the SNIC and the compute bound, and the
    paper's figure."""
    paper = scenario.paper.speedup if scenario.paper else {}
    rows = []
    for topology in dict.fromkeys(s["topology"] for s in summaries):
        jct = {s["policy"]: s["jct"] for s in summaries if s["topology"] == topology}
        if "basic" not in jct or "dualpath" not in jct or any(
                s["failed"] for s in summaries if s["topology"] == topology):
            continue        # a run that failed turns has no JCT to compare
        shape = next(r for r in results if r["topology"] == topology)
        p, d = shape["prefill_nodes"], shape["decode_nodes"]
        row = {"topology": topology, "speedup": jct["basic"] / jct["dualpath"],
               "snic_bound": (p + d) / p, "compute_bound": None, "limit": None,
               "share_of_limit": None, "paper_speedup": paper.get(topology),
               # the speedup needs basic and dualpath; the bounds and the share oracle too
               "invalid_speedup": invalid_policies(summaries, topology, ("basic", "dualpath")),
               "invalid": invalid_policies(summaries, topology, ("basic", "dualpath", "oracle"))}
        if "oracle" in jct:
            row["compute_bound"] = jct["basic"] / jct["oracle"]
            row["limit"] = min(row["snic_bound"], row["compute_bound"])
            row["share_of_limit"] = row["speedup"] / row["limit"]
        rows.append(row)
    return rows


def reductions(scenario: Scenario, summaries: list[dict]) -> list[dict]:
    """Per topology and policy, the JCT reduction against basic (the paper's ablation)."""
    paper = scenario.paper.reduction if scenario.paper else {}
    basic = {s["topology"]: s["jct"] for s in summaries if s["policy"] == "basic"}
    return [{"topology": s["topology"], "policy": s["policy"],
             "reduction": 1 - s["jct"] / basic[s["topology"]],
             "paper_reduction": paper.get(s["policy"]),
             "invalid": invalid_policies(summaries, s["topology"], ("basic", s["policy"]))}
            for s in summaries if s["topology"] in basic and s["policy"] != "basic"]


def _at_least(flag: bool) -> str:
    return ">= " if flag else ""


def _optional(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _unless(invalid: list[str], text: str) -> str:
    """A figure drawn from an INVALID run is marked, never shown as a result."""
    return "INVALID" if invalid else text


def _verdict(invalid: list[str]) -> str:
    return f"INVALID ({', '.join(invalid)})" if invalid else "VALID"


def verdict_text(summaries: list[dict]) -> str:
    """Each run's fidelity verdict: one line for all when all are VALID, else the reason of
    each INVALID one."""
    sources = "".join(f"\nTime dilation of {topology}: {source}" for topology, source in
                      dict.fromkeys((s["topology"], s["dilation_source"]) for s in summaries)
                      if source)
    invalid = [s for s in summaries if not s["valid"]]
    if not invalid:
        return f"Fidelity: all {len(summaries)} runs VALID (testbed/fidelity.py).{sources}"
    return (f"Fidelity: {len(invalid)} of {len(summaries)} runs INVALID; their figures measure "
            "the host, not the emulated cluster (raise time_dilation, or use auto):\n"
            + "\n".join(f"  {s['topology']} / {s['policy']}"
                        + (f" at {s['aps']:g} APS" if s["aps"] is not None else "")
                        + f", TDF {s['time_dilation']:g}: {s['verdict']}" for s in invalid)
            + sources)


def report_text(scenario: Scenario, summaries: list[dict], compared: list[dict],
                reduced: list[dict], capacity: list[dict]) -> str:
    parts = [table(["TOPOLOGY", "POLICY", "APS", "JCT", "TURNS", "MEAN TTFT", "MEAN TPOT", "DE READS",
                    "SNIC MAX/AVG", "SNIC BALANCE", "VERIFIED", "CORRUPT", "HOST CPU", "TDF",
                    "VERDICT"],
                   [[s["topology"], s["policy"], _optional(s["aps"], "g"),
                     f"{s['jct']:.1f} s", str(s["turns"]),
                     f"{s['ttft']:.3f} s", f"{s['tpot'] * 1e3:.1f} ms", f"{s['de_reads']:.0%}",
                     f"{s['snic_max_over_avg']:.2f}", f"{s['snic_balance']:.2f}",
                     f"{s['verified_bytes'] / 1e9:.1f} GB", f"{s['corrupt_bytes']:.0f} B",
                     f"{s['host_cpu']:.0%}", f"{s['time_dilation']:g}",
                     "VALID" if s["valid"] else "INVALID"] for s in summaries]),
             verdict_text(summaries)]
    source = f" (paper: {scenario.paper.source})" if scenario.paper else ""
    if compared:
        parts.append(f"DualPath over basic, against what each configuration allows{source}:\n"
                     + table(["TOPOLOGY", "SPEEDUP", "SNIC BOUND (P+D)/P",
                              "COMPUTE BOUND BASIC/ORACLE", "LIMIT", "SHARE OF LIMIT",
                              "PAPER SPEEDUP", "VERDICT"],
                             [[c["topology"],
                               _unless(c["invalid_speedup"], f"{c['speedup']:.2f}x"),
                               f"{c['snic_bound']:.2f}x",
                               _unless(c["invalid"], _optional(c["compute_bound"], ".2f")),
                               _unless(c["invalid"], _optional(c["limit"], ".2f")),
                               _unless(c["invalid"], _optional(c["share_of_limit"], ".1%")),
                               _optional(c["paper_speedup"], ".2f"), _verdict(c["invalid"])]
                              for c in compared]))
    if reduced and scenario.paper and scenario.paper.reduction:
        parts.append(f"JCT reduction against basic{source}:\n"
                     + table(["TOPOLOGY", "POLICY", "REDUCTION", "PAPER", "VERDICT"],
                             [[r["topology"], r["policy"],
                               _unless(r["invalid"], f"{r['reduction']:.1%}"),
                               _optional(r["paper_reduction"], ".1%"), _verdict(r["invalid"])]
                              for r in reduced]))
    if capacity:
        w = scenario.workload
        parts.append(f"Capacity under the SLO (mean TTFT <= {w.slo_ttft:g} s, mean TPOT <= "
                     f"{w.slo_tpot * 1e3:g} ms){source}:\n"
                     + table(["TOPOLOGY", *(p.upper() for p in scenario.policies),
                              "DUALPATH/BASIC", "PAPER", "VERDICT"],
                             [[c["topology"], *(_unless([p] if p in c["invalid"] else [],
                                                        _at_least(c["at_least"][p])
                                                        + f"{c['capacity'][p]:g} APS")
                                                for p in scenario.policies),
                               _unless([p for p in ("basic", "dualpath") if p in c["invalid"]],
                                       _at_least(c["ratio_at_least"] and c["ratio"] is not None)
                                       + _optional(c["ratio"], ".2f")),
                               _optional(c["paper_ratio"], ".2f"), _verdict(c["invalid"])]
                              for c in capacity]))
        if any(any(c["at_least"].values()) for c in capacity):
            parts[-1] += ("\n>= : the SLO held up to the sweep's top rate; add higher rates "
                          "to find the capacity")
    return "\n\n".join(parts)


def write_csv(path: Path, rows: list[dict]) -> None:
    """Rows as CSV, columns from all rows in order of appearance; nothing if no rows."""
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)


def meets_slo(summary: dict, workload: Workload) -> bool:
    return summary["ttft"] <= workload.slo_ttft and summary["tpot"] <= workload.slo_tpot


def topology_dilation(scenario: Scenario, topology: str,
                      dilation: float | str | None) -> tuple[float, str]:
    """The TDF of one topology's runs, and a line saying where it came from (printed);
    'auto' pilots it (testbed.dilation) on the scenario's heaviest load."""
    heaviest = scenario.workload.levels()[-1]

    def pilot(policy: str, tdf: float) -> dict:
        return run_policy(scenario, topology, policy, heaviest, None, tdf,
                          horizon=dilations.PILOT_SECONDS)
    tdf, why = dilations.resolve(REPO / topology, dilation, scenario.dilation_of(topology),
                                 scenario.policies, pilot)
    print(f"{topology_name(topology)}: {why}", flush=True)
    return tdf, why


def pilot_scenario(scenario: Scenario) -> dict[str, float]:
    """`auto`'s pick for each of the scenario's topologies, from its pilots alone: which TDF
    a scenario needs, in minutes rather than the hours its full runs may take at it."""
    return {topology_name(topology): topology_dilation(scenario, topology, dilations.AUTO)[0]
            for topology in scenario.topologies}


def run_all(scenario: Scenario, annotator: Annotator | None = None,
            dilation: float | str | None = None) -> list[dict]:
    """Every topology x policy x arrival rate, each topology at one time dilation (`dilation`
    overrides the scenario's and the topology's; 'auto' pilots it, testbed.dilation); an
    online sweep of a policy stops at the first rate that misses the SLO (the paper's stop
    rule: TTFT over 4 s)."""
    results = []
    for topology in scenario.topologies:
        tdf, why = topology_dilation(scenario, topology, dilation)
        for policy in scenario.policies:
            for aps in scenario.workload.levels():
                results.append(run_policy(scenario, topology, policy, aps, annotator, tdf))
                results[-1]["dilation_source"] = why
                if aps is not None and not meets_slo(summarize(results[-1], scenario.workload),
                                                     scenario.workload):
                    print(f"  {policy} misses the SLO at {aps:g} APS: its sweep stops",
                          flush=True)
                    break
    return results


def capacities(scenario: Scenario, summaries: list[dict]) -> list[dict]:
    """Online: per topology and policy, the highest rate of the sweep meeting the SLO from the
    lowest rate up (0 if even the lowest misses it), and DualPath's over basic's. A policy
    that met the SLO at the sweep's top rate has a capacity of at least that (`at_least`)."""
    top = max(scenario.workload.aps)
    rows = []
    for topology in dict.fromkeys(s["topology"] for s in summaries):
        capacity, at_least = {}, {}
        for policy in scenario.policies:
            capacity[policy] = 0.0
            for s in summaries:
                if s["topology"] == topology and s["policy"] == policy:
                    if not meets_slo(s, scenario.workload):
                        break
                    capacity[policy] = s["aps"]
            at_least[policy] = capacity[policy] == top
        ratio = (capacity["dualpath"] / capacity["basic"]
                 if capacity.get("basic") and "dualpath" in capacity else None)
        rows.append({"topology": topology, "capacity": capacity, "at_least": at_least,
                     "invalid": invalid_policies(summaries, topology, scenario.policies),
                     "ratio": ratio, "ratio_at_least": at_least.get("dualpath", False),
                     "paper_ratio": scenario.paper.capacity_ratio if scenario.paper else None})
    return rows


def run_scenario(scenario: Scenario, results_root: Path = RESULTS,
                 dilation: float | str | None = None) -> Path:
    w = scenario.workload
    levels = "" if w.kind == "offline" else f", {', '.join(f'{a:g}' for a in w.aps)} APS"
    print(f"scenario {scenario.name}: {w.kind}, topologies "
          f"{', '.join(map(topology_name, scenario.topologies))}, policies "
          f"{', '.join(scenario.policies)}{levels}", flush=True)
    out = results_root / scenario.name / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    annotator, started = annotator_from_env(), time.time()
    with run_prometheus(out / "prometheus") as prometheus:
        results = run_all(scenario, annotator, dilation)
        for result in results:
            result["links"] = link_timelines(prometheus, scenario.name, result)
    summaries = [summarize(r, w) for r in results]
    offline = [s for s in summaries if s["aps"] is None]
    compared, reduced = comparisons(scenario, offline, results), reductions(scenario, offline)
    capacity = capacities(scenario, summaries) if w.kind == "online" else []

    (out / "results.json").write_text(json.dumps(
        {"scenario": scenario.model_dump(), "summaries": summaries, "comparisons": compared,
         "reductions": reduced, "capacities": capacity, "results": results}, indent=1))
    for name, key in (("requests", "records"), ("failures", "failures"), ("faults", "faults")):
        write_csv(out / f"{name}.csv", [
            {"topology": r["topology"], "policy": r["policy"], "aps": r["aps"], **row}
            for r in results for row in r.get(key, [])])
    text = "\n\n".join(part for part in (
        report_text(scenario, summaries, compared, reduced, capacity),
        accounting_text(summaries), failures_text(results), faults_text(results)) if part)
    figures = write_plots(out, results, summaries, w.slo_ttft)
    (out / "summary.md").write_text(
        f"# {scenario.name}\n\n{scenario.description}\n\n```\n{text}\n```\n"
        + "".join(f"\n![{f.stem}]({f.name})\n" for f in figures))
    if annotator:
        annotator.post(f"scenario {scenario.name}", f"scenario:{scenario.name}",
                       start=started, end=time.time())
    print("\n" + text)
    print(f"\nwritten {out.relative_to(results_root.parent) if out.is_relative_to(REPO) else out}")
    return out
