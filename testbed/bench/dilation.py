"""`make bench-dilation`: does virtual time converge, and does the fidelity verdict agree?

Basic, DualPath and oracle on 1P2D-g2 and 2P2D-g2, one workload (one-turn agents arriving
faster than basic can read their KV), at TDF 1, 2 and 4 once, and at TDF 8 and TDF 16, the
reference, three times each. A run's distance is how far its emulated JCT, the mean over
agents of each one's finish less its arrival, lies from the reference's, the mean of the
reference repeats; the tolerance is max(3%, twice the spread of the reference repeats). The
emulated cluster's own run-to-run noise is measured where the host is least in the way: the
spread of the TDF 8 repeats also holds whatever the host added to one of them (one basic run
on 1P2D took 3.92 s against 3.29-3.39 s, INVALID), and one reference run holds its own noise
(oracle on 2P2D: 2.40 s and 2.26 s at TDF 16 in two benches). The last agent's finish
(MAKESPAN) is shown beside it but not judged: it is one agent's. The verdict agrees with
convergence when:
  - every run further from the reference than the tolerance is INVALID;
  - at most one run within the tolerance is INVALID;
  - `auto` (testbed/dilation.py, its pilots run here too) picks, per topology, the smallest
    TDF from which every policy's runs are within the tolerance.
The workload is sized so that basic's busiest SNIC is at least 80% busy, and the bench must
end within BENCH_MINUTES_MAX, pilots included (both checked, printed).
RESENT is the TCP segments the hosts' kernels resent in a run (testbed/tcpstats.py): with
nothing lost on the fabric, any would be spurious bytes on the links.
The bench exits 1 when any of these fails, after writing its results.

Prints the table and writes results/bench-dilation/<timestamp>.json and .md (and, as it
goes, <timestamp>.partial.json). About 115 minutes on a 2-core machine.

`--rejudge FILE` reads a finished bench's rows and tells, for other thresholds of kernel
lateness (other quantiles of it and its mean, 1 s windows, a coarser timer granularity,
from the histograms each run keeps), event-loop lag, CPU headroom and agent CPU, whether
the verdict would agree with convergence: the evidence behind the thresholds in
testbed/fidelity.py.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from agents.fidelity import LatenessPairs, Quantiles
from testbed import dilation as dilations
from testbed.bench import REPO, save
from testbed.fidelity import QUANTILE
from testbed.interrupts import run_interruptible
from testbed.report import table
from testbed.runner import run_policy, summarize
from testbed.scenario import Scenario
from testbed.topology import load_topology

TOPOLOGIES = ["topologies/1p2d-g2.yaml", "topologies/2p2d-g2.yaml"]
POLICIES = ["basic", "dualpath", "oracle"]
# The largest TDF is the reference; it and the second largest are repeated.
TDFS = [1.0, 2.0, 4.0, 8.0, 16.0]
REPEATS = 3
MIN_TOLERANCE = 0.03
SNIC_BUSY_MIN = 0.80
# The bench's own budget, pilots included: longer, and no one reruns it to check a change.
BENCH_MINUTES_MAX = 120
# One turn each from turn 30, arriving as a Poisson process at a rate that basic's prefill
# SNICs cannot keep up with (about 27 agents a second per prefill node here) and DualPath's
# reads through every SNIC can. Arrivals spread over seconds, not all at t = 0: a burst made
# the runs hang on which engine group's 20 ms fetch came first (one group took the whole
# burst, or none of it), which spread the repeats by up to 30%.
WORKLOAD = {"kind": "online", "dataset": "64k", "seed": 1, "start_turn": 30, "max_turns": 1}
AGENTS = 240
APS_PER_PREFILL_NODE = 40.0


def busiest_snic(result: dict) -> float:
    """The busiest node SNIC's mean read utilization while the run's SNICs carried anything."""
    per_node = [[u for _, u in series if u > 0.05] for series in result["snic_timeline"].values()]
    return max((sum(us) / len(us) for us in per_node if us), default=0.0)


# Per-turn figures whose means each row keeps: where a run's JCT went, to tell which part of
# the pipeline moved when a run lies far from the reference.
PHASES = ("ttft", "tpot", "prefill_queue", "prefill_load_wait", "prefill_load",
          "prefill_compute", "prefill_all_to_all", "prefill_push")


def phase_means(records: list[dict]) -> dict[str, float]:
    return {k: sum(r[k] for r in records) / len(records) for k in PHASES} if records else {}


def plan_runs(tdfs: list[float], repeats: int) -> list[tuple[float, int]]:
    """(TDF, repeat) in order: each TDF once, the two largest `repeats` times."""
    tdfs = sorted(tdfs)
    return [(tdf, r) for tdf in tdfs for r in range(repeats if tdf in tdfs[-2:] else 1)]


def reference_of(rows: list[dict]) -> tuple[float, float]:
    """The reference JCT (the mean of the runs at the largest TDF) and the tolerance."""
    largest = max(r["tdf"] for r in rows)
    jcts = [r["jct"] for r in rows if r["tdf"] == largest]
    mean = sum(jcts) / len(jcts)
    return mean, max(MIN_TOLERANCE, 2 * (max(jcts) - min(jcts)) / mean)


def converged_tdf(rows: list[dict]) -> float | None:
    """The smallest TDF from which every run (every policy, every repeat) is within."""
    for tdf in sorted({r["tdf"] for r in rows}):
        if all(r["within"] for r in rows if r["tdf"] >= tdf):
            return tdf
    return None


def judge(rows: list[dict]) -> dict:
    """Distances, the tolerance, and whether the verdict agrees with convergence."""
    for topology in {r["topology"] for r in rows}:
        mine = [r for r in rows if r["topology"] == topology]
        for policy in POLICIES:
            runs = [r for r in mine if r["policy"] == policy]
            reference, tolerance = reference_of(runs)
            for r in runs:
                r["distance"] = abs(r["jct"] / reference - 1)
                r["tolerance"] = tolerance
                r["within"] = r["distance"] <= tolerance
    far_valid = [r for r in rows if not r["within"] and r["valid"]]
    near_invalid = [r for r in rows if r["within"] and not r["valid"]]
    return {"far_but_valid": len(far_valid), "within_but_invalid": len(near_invalid),
            "agrees": not far_valid and len(near_invalid) <= 1}


def bench_scenario(topology: str, agents: int) -> Scenario:
    """`agents` arriving at APS_PER_PREFILL_NODE per prefill node of `topology`."""
    aps = APS_PER_PREFILL_NODE * load_topology(REPO / topology).prefill_nodes
    return Scenario.model_validate({
        "name": "bench-dilation", "topologies": [topology], "model": "ds-27b",
        "workload": {**WORKLOAD, "aps": [aps], "duration": agents / aps},
        "policies": POLICIES})


# The kernel-lateness statistics --rejudge tries: (unit, quantile or "mean"), where the unit
# is single kernels (what the verdict judges), 1 s windows of them (agents/fidelity.py,
# KernelLateness), or single kernels past N more ms of wall time than the verdict's timer
# granularity when the run was taken ("kernels+Nms", from LatenessPairs; agents/gpu.py,
# TIMER_GRANULARITY: 1 ms up to results/bench-dilation/20261203-113516, 2 ms since).
KERNEL_STATISTICS = [("windows", 0.95), ("windows", 0.99), ("windows", "mean"),
                     ("kernels", 0.95), ("kernels", 0.99), ("kernels", "mean"),
                     ("kernels+0.5ms", 0.99), ("kernels+1ms", 0.99), ("kernels+2ms", 0.99)]
PAST = "kernels+"


def kernel_figure(check: dict, statistic: tuple[str, float | str], tdf: float) -> float | None:
    """A run's kernel lateness at `statistic`, from the stored histograms (runs stored
    before windows were kept have single kernels as "all"; before histograms were kept,
    just their p99; before pairs were kept, no "kernels+" figure)."""
    unit, q = statistic
    histograms = check.get("histograms") or {}
    if unit.startswith(PAST) and "pairs" in histograms:
        past_wall = float(unit.removeprefix(PAST).removesuffix("ms")) / 1e3
        lateness = LatenessPairs.from_json(histograms["pairs"]).shares(beyond=past_wall / tdf)
    elif unit == "kernels" and "kernels" not in histograms and "all" in histograms:
        lateness = Quantiles.from_json(histograms["all"])
    elif unit in histograms:
        lateness = Quantiles.from_json(histograms[unit])
    else:
        return check["value"] if statistic == ("kernels", QUANTILE) and not histograms else None
    return lateness.mean() if q == "mean" else lateness.quantile(q)


def statistic_name(statistic: tuple[str, float | str]) -> str:
    unit, q = statistic
    return f"{unit} " + (q if q == "mean" else f"p{q * 100:g}")


def passes(checks: list[dict], tdf: float, kernel_q: tuple[str, float | str], kernel: float,
           loop: float, cpu: float, agent_cpu: float) -> bool:
    """A run's stored checks (taken at `tdf`) judged again at these thresholds (kernel
    lateness at its `kernel_q` statistic); link pace as it was (and, in runs stored before
    agents reported their CPU use, no agent CPU check)."""
    limits = {"kernel lateness": lambda v: v <= kernel, "event-loop lag": lambda v: v <= loop,
              "host CPU headroom": lambda v: v >= cpu, "agent CPU": lambda v: v <= agent_cpu}

    def holds(c: dict) -> bool:
        figure = c["value"]
        if c["name"] == "kernel lateness":
            # Read once per statistic: --rejudge tries thousands of threshold sets.
            figures = c.setdefault("figure_at", {})
            if kernel_q not in figures:
                figures[kernel_q] = kernel_figure(c, kernel_q, tdf)
            figure = figures[kernel_q]
        return (limits[c["name"]](figure) if c["name"] in limits and figure is not None
                else c["passed"])
    return all(map(holds, checks))


def rejudge(rows: list[dict], *thresholds) -> dict:
    """`judge` of `rows` (already judged: distances known) with the verdict taken again
    at these thresholds (as `passes` takes them)."""
    far_valid = sum(1 for r in rows
                    if not r["within"] and passes(r["checks"], r["tdf"], *thresholds))
    near_invalid = sum(1 for r in rows
                       if r["within"] and not passes(r["checks"], r["tdf"], *thresholds))
    return {"far_but_valid": far_valid, "within_but_invalid": near_invalid,
            "agrees": not far_valid and near_invalid <= 1}


def repick(pilots: list[dict], *thresholds) -> str:
    """`auto`'s pick from its stored pilots at these thresholds: the smallest TDF at which a
    majority of every piloted policy's pilots passes, with '?' when the stored pilots settle
    no vote there (auto drew no more once its own thresholds had settled one)."""
    for tdf in sorted({p["tdf"] for p in pilots}):
        for policy in dilations.pilot_policies(POLICIES):
            passed, failed, _ = dilations.vote(
                {"valid": passes(p["checks"], tdf, *thresholds), "summary": ""}
                for p in pilots if p["tdf"] == tdf and p["policy"] == policy)
            if passed >= dilations.PILOT_MAJORITY:
                continue
            if failed >= dilations.PILOT_MAJORITY:
                break
            return f"{tdf:g}?"
        else:
            return f"{tdf:g}"
    return "none"


def print_rejudged(path: Path) -> None:
    bench = json.loads(path.read_text())
    rows, picks = bench["rows"], bench.get("picks", {})
    judge(rows)
    converged = {t: converged_tdf([r for r in rows if r["topology"] == t])
                 for t in sorted({r["topology"] for r in rows})}
    print("converged from TDF: " + ", ".join(f"{t} {c}" for t, c in converged.items()))
    kept = {unit for r in rows for c in r["checks"] for unit in (c.get("histograms") or {})}
    kept |= {"kernels"} if "all" in kept else set()
    statistics = [s for s in KERNEL_STATISTICS
                  if ("pairs" if s[0].startswith(PAST) else s[0]) in kept]
    grid = itertools.product(statistics or [("kernels", QUANTILE)],
                             (0.0025, 0.004, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03,
                              0.05, 0.075, 0.09, 0.1, 0.15, 0.2, 0.3, 0.5),
                             (0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05), (0.95, 0.8),
                             (0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, float("inf")))
    judged = [(*t, rejudge(rows, *t)) for t in grid]
    # Those that agree, else the closest: fewest runs judged against convergence.
    shown = [t for t in judged if t[-1]["agrees"]] or sorted(
        judged, key=lambda t: t[-1]["far_but_valid"] + t[-1]["within_but_invalid"])[:15]
    print(f"{sum(t[-1]['agrees'] for t in judged)} of {len(judged)} threshold sets agree; "
          f"showing {'those' if shown[0][-1]['agrees'] else 'the closest'}:")
    print(table(["KERNEL LATENESS", "LOOP LAG <=", "CPU WINDOWS >=", "AGENT CPU <=",
                 "FAR BUT VALID", "WITHIN BUT INVALID", "AGREES", "AUTO WOULD PICK"],
                [[f"{statistic_name(q)} <= {k:.2%}", f"{lag * 1e3:g} ms", f"{c:.0%}",
                  "-" if a == float("inf") else f"{a:.0%}",
                  str(j["far_but_valid"]), str(j["within_but_invalid"]),
                  "yes" if j["agrees"] else "no",
                  ", ".join(f"{Path(t).stem} {repick(p['pilots'], q, k, lag, c, a)}"
                            for t, p in picks.items())]
                 for q, k, lag, c, a, j in shown]))


def run_one(scenario: Scenario, topology: str, policy: str, tdf: float,
            horizon: float | None = None) -> dict:
    started = time.monotonic()
    result = run_policy(scenario, topology, policy, scenario.workload.aps[0], dilation=tdf,
                        horizon=horizon)
    result["wall_seconds"] = time.monotonic() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench-dilation")
    parser.add_argument("--topologies", nargs="+", default=TOPOLOGIES)
    parser.add_argument("--tdfs", nargs="+", type=float, default=TDFS)
    parser.add_argument("--repeats", type=int, default=REPEATS,
                        help="runs at each of the two largest TDFs (at least 2)")
    parser.add_argument("--agents", type=int, default=AGENTS)
    parser.add_argument("--skip-auto", action="store_true",
                        help="no pilots: a quick look at the table, without auto's pick")
    parser.add_argument("--rejudge", type=Path, metavar="FILE",
                        help="a finished bench's JSON: agreement at other thresholds")
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error(f"--repeats: got {args.repeats}, expected at least 2 (the tolerance is "
                     "twice the spread of the reference repeats)")
    if args.rejudge:
        if not args.rejudge.is_file():
            parser.error(f"--rejudge: got {str(args.rejudge)!r}, expected a bench's JSON file")
        print_rejudged(args.rejudge)
        return
    started = time.strftime("%Y%m%d-%H%M%S")
    began = time.monotonic()
    partial = REPO / "results" / "bench-dilation" / f"{started}.partial.json"
    partial.parent.mkdir(parents=True, exist_ok=True)
    rows, picks = [], {}
    for topology in args.topologies:
        scenario = bench_scenario(topology, args.agents)
        pilots: list[dict] = []

        def pilot(policy: str, tdf: float) -> dict:
            result = run_one(scenario, topology, policy, tdf, horizon=dilations.PILOT_SECONDS)
            pilots.append({"policy": policy, "tdf": tdf, "checks": result["fidelity"]["checks"]})
            return result
        if not args.skip_auto:
            pick, why = dilations.pick(REPO / topology, POLICIES, pilot)
            picks[topology] = {"tdf": pick, "why": why, "pilots": pilots}
            print(why, flush=True)
        for tdf, repeat in plan_runs(args.tdfs, args.repeats):
            for policy in POLICIES:
                result = run_one(scenario, topology, policy, tdf)
                summary = summarize(result, scenario.workload)
                rows.append({"topology": result["topology"], "policy": policy, "tdf": tdf,
                             "repeat": repeat, "jct": result["mean_jct"],
                             "makespan": result["makespan"],
                             "wall_seconds": result["wall_seconds"],
                             "busiest_snic": busiest_snic(result), "failed": summary["failed"],
                             "host_cpu": result["host_cpu"],
                             "host_steal": result["host_steal"],
                             "resent": result["tcp_resent_segments"],
                             "phases": phase_means(result["records"]),
                             "valid": result["fidelity"]["valid"],
                             "verdict": result["fidelity"]["summary"],
                             "checks": result["fidelity"]["checks"]})
                partial.write_text(json.dumps({"rows": rows, "picks": picks}, indent=1))
    agreement = judge(rows)
    converged = {t: converged_tdf([r for r in rows if r["topology"] == t])
                 for t in {r["topology"] for r in rows}}
    for topology, pick in picks.items():
        name = topology.rsplit("/", 1)[-1].removesuffix(".yaml")
        pick["converged_tdf"] = converged.get(name)
        pick["agrees"] = pick["tdf"] == converged.get(name)
    basic_busy = min((r["busiest_snic"] for r in rows if r["policy"] == "basic"), default=0)
    minutes = (time.monotonic() - began) / 60

    text = table(["TOPOLOGY", "POLICY", "TDF", "#", "MEAN JCT", "MAKESPAN", "WALL", "DISTANCE",
                  "TOLERANCE", "BUSIEST SNIC", "RESENT", "VERDICT"],
                 [[r["topology"], r["policy"], f"{r['tdf']:g}", str(r["repeat"]),
                   f"{r['jct']:.2f} s", f"{r['makespan']:.2f} s", f"{r['wall_seconds']:.0f} s",
                   f"{r['distance']:.1%}",
                   f"{r['tolerance']:.1%}", f"{r['busiest_snic']:.0%}", str(r["resent"]),
                   r["verdict"]]
                  for r in rows])
    text += (f"\n\nverdict against convergence: {agreement['far_but_valid']} runs outside the "
             f"tolerance called VALID (needs 0), {agreement['within_but_invalid']} within it "
             f"called INVALID (needs <= 1): {'agrees' if agreement['agrees'] else 'DISAGREES'}")
    for topology, pick in picks.items():
        text += (f"\n{topology}: auto picked TDF {pick['tdf']:g}, converged from TDF "
                 f"{pick['converged_tdf']}: {'agrees' if pick['agrees'] else 'DISAGREES'}")
    text += (f"\nbasic's busiest SNIC, least busy run: {basic_busy:.0%} "
             f"(needs >= {SNIC_BUSY_MIN:.0%})")
    text += f"\nthe bench took {minutes:.0f} minutes (needs <= {BENCH_MINUTES_MAX})"
    print("\n" + text)
    out = save("dilation", started, {"workload": scenario.workload.model_dump(), "rows": rows,
                                     "picks": picks,
                                     "agreement": agreement, "basic_busiest_snic": basic_busy,
                                     "minutes": minutes})
    out.with_suffix(".md").write_text(f"# make bench-dilation, {started}\n\n```\n{text}\n```\n")
    partial.unlink(missing_ok=True)
    if not (agreement["agrees"] and all(p["agrees"] for p in picks.values())
            and basic_busy >= SNIC_BUSY_MIN and minutes <= BENCH_MINUTES_MAX):
        raise SystemExit(1)        # the table above says which requirement failed


if __name__ == "__main__":
    raise SystemExit(run_interruptible("bench", main))
