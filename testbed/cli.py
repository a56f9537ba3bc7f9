"""The `testbed` command line: bring the emulated cluster up and down, look inside it, clean up."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from testbed.errors import TestbedError
from testbed.interrupts import Stop, raise_stop, run_interruptible

DETACH_TIMEOUT_SECONDS = 600


def cmd_image_build(args: argparse.Namespace) -> int:
    from testbed.image import build_agent_image
    build_agent_image(force=args.force)
    return 0


def _running_dilation() -> float:
    """The time dilation of the fabric that is up (1 if none: the caller reports that)."""
    from testbed.state import FabricRecord
    from testbed.topology import Topology
    record = FabricRecord.read()
    return Topology.model_validate_json(record.topology_json).dilation if record else 1.0


def _fixed_dilation(text: str) -> float:
    """--time-dilation for a fabric brought up by hand: a number (auto needs a scenario)."""
    from testbed.dilation import dilation_argument
    value = dilation_argument(text)
    if isinstance(value, str):
        raise TestbedError("--time-dilation: got 'auto', expected a number >= 1 for a fabric "
                           "brought up by hand (auto pilots a scenario's runs)")
    return value


def cmd_topology_check(args: argparse.Namespace) -> int:
    from testbed.plan import build_plan
    from testbed.topology import load_topology
    for path in args.topology:
        topology = load_topology(path)
        plan = build_plan(topology.buildable())
        tdf = topology.time_dilation
        print(f"{path}: ok: {topology.prefill_nodes}P{topology.decode_nodes}D x "
              f"{topology.gpus_per_node} GPUs, {len(plan.hosts)} hosts, backend "
              f"{topology.backend}, scale {topology.scale:g}, time dilation "
              f"{tdf if tdf == 'auto' else format(tdf, 'g')}")
    return 0


def cmd_fabric_up(args: argparse.Namespace) -> int:
    from testbed.fabric import Fabric, refuse_if_running
    from testbed.plan import build_plan
    from testbed.report import fabric_table
    from testbed.state import FabricRecord
    from testbed.topology import load_topology

    from agents.clock import clock
    overrides = {"backend": args.backend} if args.backend else {}
    if args.time_dilation is not None:
        overrides["time_dilation"] = _fixed_dilation(args.time_dilation)
    plan = build_plan(load_topology(args.topology, **overrides))
    clock.set_dilation(plan.topology.dilation)    # faults' durations and times are emulated
    refuse_if_running()
    if args.detach:
        return _detach(args)
    # Teardown must run however this process is asked to stop. A detached owner leads its
    # own session, so the first host pty it opens becomes its controlling terminal and
    # sends it SIGHUP when that shell ends: there, SIGHUP means nothing.
    signal.signal(signal.SIGINT, raise_stop)
    signal.signal(signal.SIGTERM, raise_stop)
    signal.signal(signal.SIGHUP, signal.SIG_IGN if args.owner else raise_stop)
    fabric = Fabric(plan, os.path.abspath(args.topology),
                    progress=lambda line: print(line, flush=True))
    hosts = len(plan.hosts)
    print(f"bringing up {plan.topology.name}: {hosts} hosts on the {plan.topology.backend} "
          f"backend ...", flush=True)
    agents = faults = None
    try:
        fabric.up()
        if not args.no_agents:
            from testbed.agentset import LOG_DIR, AgentSet
            agents = AgentSet(fabric)
            agents.start()
            print(f"  agents running (logs: {LOG_DIR})", flush=True)
        from testbed.injector import FaultServer, Injector
        faults = FaultServer(Injector(fabric, agents))   # `testbed fault`
        mark_ready()
        print(fabric_table(FabricRecord.read()), flush=True)
        print(f"up in {fabric.up_seconds:.1f} s. Ctrl-C (or `testbed fabric down`) tears it "
              f"down.", flush=True)
        while True:
            signal.pause()
    except (KeyboardInterrupt, Stop) as stop:
        reason = "Ctrl-C" if isinstance(stop, KeyboardInterrupt) else str(stop)
        print(f"\nstopping ({reason}) ...", flush=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)   # let teardown finish
        if faults:
            faults.stop()
            faults.injector.close()
        if agents:
            agents.stop()
        fabric.down()   # a no-op if up() already tore down after a failure
        if fabric.down_seconds is not None:
            print(f"torn down in {fabric.down_seconds:.1f} s", flush=True)
    return 0


def _detach(args: argparse.Namespace) -> int:
    """Run the fabric's owner in its own session and return once the fabric is up."""
    from testbed.report import fabric_table
    from testbed.state import LOG_FILE, STATE_DIR, FabricRecord

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "testbed", "fabric", "up", args.topology, "--owner"]
    if args.no_agents:
        cmd.append("--no-agents")
    if args.backend:
        cmd += ["--backend", args.backend]
    if args.time_dilation is not None:
        cmd += ["--time-dilation", args.time_dilation]
    spawned = time.monotonic()
    with open(LOG_FILE, "w") as log:
        owner = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                 start_new_session=True)
    deadline = time.monotonic() + DETACH_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if owner.poll() is not None:
            lines = LOG_FILE.read_text().strip().splitlines()
            raise TestbedError(lines[-1].removeprefix("testbed: ") if lines
                               else f"the fabric owner exited with {owner.returncode}")
        record = FabricRecord.read()
        if record and record.owner_pid == owner.pid and record.status == "ready":
            print(fabric_table(record))
            print(f"ready in {time.monotonic() - spawned:.1f} s (network {record.up_seconds:.1f} s),"
                  f" owned by pid {owner.pid} (log: {LOG_FILE}). `testbed fabric down` tears it "
                  f"down.")
            return 0
        time.sleep(0.2)
    os.kill(owner.pid, signal.SIGTERM)
    raise TestbedError(f"the fabric did not come up within {DETACH_TIMEOUT_SECONDS} s; "
                       f"see {LOG_FILE}")


def mark_ready() -> None:
    """The fabric is up and its agents answer: what `--detach` and tests wait for."""
    from testbed.state import FabricRecord
    record = FabricRecord.read()
    record.status = "ready"
    record.write()


def _running_record():
    from testbed.state import FabricRecord, fabric_running
    record = FabricRecord.read()
    if record is None or not fabric_running():
        raise TestbedError("no fabric is up (start one with `testbed fabric up TOPOLOGY`)")
    return record


def cmd_fabric_status(args: argparse.Namespace) -> int:
    from testbed.report import fabric_table
    record = _running_record()
    print(fabric_table(record))
    print(f"{record.name}: {record.status}, {len(record.hosts)} hosts, owned by pid "
          f"{record.owner_pid}")
    return 0


def cmd_fabric_exec(args: argparse.Namespace) -> int:
    from testbed.hosts import HOST_MARKER
    record = _running_record()
    host = record.host(args.host)
    if host is None:
        names = ", ".join(h.name for h in record.hosts)
        raise TestbedError(f"no host {args.host!r} in {record.name}; hosts: {names}")
    if not args.cmd:
        raise TestbedError("no command given: testbed fabric exec HOST -- CMD ...")
    # mnexec -a enters the host's network (and, for a container, mount) namespace.
    os.chdir("/")
    os.execvp("mnexec", ["mnexec", "-a", str(host.pid), "env",
                         f"{HOST_MARKER}={host.name}", *args.cmd])


def cmd_fabric_down(args: argparse.Namespace) -> int:
    from testbed import cleanup
    from testbed.state import FabricRecord, fabric_running
    record = FabricRecord.read()
    if record is None or not fabric_running():
        print("no fabric is up; removing any leftovers")
    else:
        print(f"stopping {record.name} (owner pid {record.owner_pid}) ...", flush=True)
    started = time.monotonic()
    cleanup.remove_leftovers()
    print(f"down in {time.monotonic() - started:.1f} s")
    return 0


def cmd_request(args: argparse.Namespace) -> int:
    import json

    from testbed.plan import build_plan
    from testbed.report import request_table
    from testbed.request import RequestSpec, run_request
    from testbed.topology import Topology
    from agents.clock import clock
    record = _running_record()
    plan = build_plan(Topology.model_validate_json(record.topology_json))
    clock.set_dilation(plan.topology.dilation)      # the report's times are emulated
    decode_gpu = args.decode_gpu or next(h.name for h in plan.of_kind("gpu")
                                         if h.role == "decode")
    spec = RequestSpec(args.model, args.context, args.append, args.generate, args.path,
                       args.prefill_gpu, decode_gpu, args.oracle)
    from testbed.cpuwatch import CpuWatch
    try:
        with CpuWatch() as cpu:
            report = run_request(record, plan, spec)
    except (OSError, RuntimeError) as exc:
        raise TestbedError(f"request failed: {exc}") from None
    report["host_cpu"] = {"mean": cpu.mean, "saturated_share": cpu.saturated_share}
    print(json.dumps(report, indent=1) if args.json else request_table(report))
    if cpu.warning():
        print(cpu.warning(), file=sys.stderr)
    return 0


def cmd_scenario_run(args: argparse.Namespace) -> int:
    from testbed.runner import RESULTS, run_scenario
    from testbed.scenario import load_scenario
    from testbed.dilation import dilation_argument
    from testbed.scenario import check_dilation
    dilation = None if args.time_dilation is None else dilation_argument(args.time_dilation)
    scenario = load_scenario(args.scenario)
    if isinstance(dilation, float):
        check_dilation(dilation, scenario.topologies, "--time-dilation")

    def runs() -> None:          # the report's folder is printed, not an exit code
        run_scenario(scenario, args.results or RESULTS, dilation=dilation)
    return _scenario_runs(scenario.name, runs)


def cmd_scenario_pilot(args: argparse.Namespace) -> int:
    from testbed.runner import pilot_scenario
    from testbed.scenario import load_scenario
    scenario = load_scenario(args.scenario)
    picks = {}
    code = _scenario_runs(scenario.name, lambda: picks.update(pilot_scenario(scenario)))
    if picks:
        print(f"{scenario.name} needs: " + ", ".join(f"TDF {tdf:g} on {topology}"
                                                    for topology, tdf in picks.items()))
    return code


def _scenario_runs(name: str, runs) -> int:
    """A scenario's runs (`runs()`), each on a cluster of its own: none may be up already,
    and Ctrl-C or SIGTERM tears down the one running."""
    from testbed.state import fabric_running
    if fabric_running():
        raise TestbedError("a fabric is up: a scenario brings up its own; "
                           "`testbed fabric down` first")
    try:
        return run_interruptible("scenario", runs)
    except (OSError, RuntimeError) as exc:
        raise TestbedError(f"scenario {name} failed: {exc}") from None


def cmd_fault(args: argparse.Namespace) -> int:
    from testbed.injector import send_fault
    fields = {"kind": args.kind, "target": args.target}
    if args.duration is not None:
        fields["duration"] = args.duration
    if args.factor is not None:
        fields["factor"] = args.factor
    for event in send_fault(fields, timeout=_running_dilation() * 600):
        result = "ok" if event["error"] is None else f"FAILED: {event['error']}"
        print(f"{event['t']:.1f} s into the run: {event['action']}: {result}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from testbed import cleanup
    found = cleanup.remove_leftovers()
    if any(found.values()):
        print("removed " + ", ".join(f"{n} {kind}" for kind, n in found.items() if n))
    else:
        print("nothing to clean")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="testbed", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    fabric = sub.add_parser("fabric", help="the emulated cluster network").add_subparsers(
        dest="fabric_command", required=True, metavar="ACTION")
    up = fabric.add_parser("up", help="bring a topology up; stays up until Ctrl-C")
    up.add_argument("topology", help="topology file, e.g. topologies/1p1d.yaml")
    up.add_argument("--backend", choices=["docker", "netns"],
                    help="override the topology's host backend")
    up.add_argument("--time-dilation", metavar="N",
                    help="time-dilation factor: link rates / N, agents' durations x N")
    up.add_argument("--detach", action="store_true",
                    help="return once the fabric is up and leave it running")
    up.add_argument("--no-agents", action="store_true",
                    help="only the network: start no storage, node or engine agents")
    up.add_argument("--owner", action="store_true", help=argparse.SUPPRESS)  # detached owner
    up.set_defaults(func=cmd_fabric_up)
    fabric.add_parser("status", help="show the running fabric").set_defaults(
        func=cmd_fabric_status)
    run = fabric.add_parser("exec", help="run a command inside one host: exec HOST -- CMD ...")
    run.add_argument("host")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    run.set_defaults(func=cmd_fabric_exec)
    fabric.add_parser("down", help="tear the running fabric down").set_defaults(
        func=cmd_fabric_down)

    topology = sub.add_parser("topology", help="topology files").add_subparsers(
        dest="topology_command", required=True, metavar="ACTION")
    check = topology.add_parser("check", help="validate topology files")
    check.add_argument("topology", nargs="+")
    check.set_defaults(func=cmd_topology_check)

    req = sub.add_parser("request", help="push one request through the running fabric's "
                                         "data plane, without a scheduler")
    req.add_argument("--model", default="ds-27b", help="model profile (models/NAME.yaml)")
    req.add_argument("--context", type=int, default=32768, help="hit tokens (KV in storage)")
    req.add_argument("--append", type=int, default=429, help="miss tokens (prefilled)")
    req.add_argument("--generate", type=int, default=176, help="tokens to decode")
    req.add_argument("--path", choices=["pe", "de", "split"], default="pe",
                     help="KV read path (split: half the hit blocks on each side)")
    req.add_argument("--prefill-gpu", default="n0g0")
    req.add_argument("--decode-gpu", help="default: the first GPU of the first decode node")
    req.add_argument("--oracle", action="store_true", help="skip all KV I/O")
    req.add_argument("--json", action="store_true", help="print the full report as JSON")
    req.set_defaults(func=cmd_request)

    scenario = sub.add_parser("scenario", help="scenario files").add_subparsers(
        dest="scenario_command", required=True, metavar="ACTION")
    srun = scenario.add_parser("run", help="run a scenario: each policy on the same workload")
    srun.add_argument("scenario", help="a name in scenarios/ or a path")
    srun.add_argument("--time-dilation", metavar="N|auto",
                      help="run every topology at this time-dilation factor (a number >= 1), "
                           "or pick it by pilot runs (auto); overrides the scenario's")
    srun.add_argument("--results", type=Path, metavar="DIR",
                      help="where the report's folder goes (default: the repository's results/)")
    srun.set_defaults(func=cmd_scenario_run)
    spilot = scenario.add_parser(
        "pilot", help="which TDF a scenario needs: auto's pilots alone, without the runs")
    spilot.add_argument("scenario", help="a name in scenarios/ or a path")
    spilot.set_defaults(func=cmd_scenario_pilot)

    from testbed.faults import FaultSpec
    fault = sub.add_parser(
        "fault", help="inject a fault into the running fabric (a scenario's or fabric up's)",
        description="Carried out by the fabric's owner, logged in its run's report. Links "
                    "are host:interface (n0:snic, n0g1:cnic, st0:stor); agents are hosts "
                    "(n0g0, n0, st0, sched).")
    fault.add_argument("kind", choices=list(FaultSpec.model_fields["kind"].annotation.__args__))
    fault.add_argument("target", help="host:interface for link faults, else a host")
    fault.add_argument("--duration", type=float,
                       help="link-flap: seconds down; link-rate, storage-slow: seconds until "
                            "the rate is restored, 0 for never (default 3)")
    fault.add_argument("--factor", type=float,
                       help="link-rate, storage-slow: the share of the configured rate "
                            "(default 0.1)")
    fault.set_defaults(func=cmd_fault)

    sub.add_parser("clean", help="remove every leftover of earlier runs").set_defaults(
        func=cmd_clean)

    image = sub.add_parser("image", help="the agent container image").add_subparsers(
        dest="image_command", required=True, metavar="ACTION")
    build = image.add_parser("build", help="build the agent image if it is missing or stale")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    build.set_defaults(func=cmd_image_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "cmd", None) and args.cmd[0] == "--":
        args.cmd = args.cmd[1:]
    try:
        return args.func(args)
    except TestbedError as exc:
        print(f"testbed: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
