"""Which time dilation a topology runs at: given, or picked by pilot runs (`auto`).

The TDF comes from the command line (`--time-dilation`), else the scenario, else the
topology file, else 1. `auto` picks one TDF per topology, for all of its policies, so that a
speedup never divides JCTs taken at different TDFs: the smallest of AUTO_CANDIDATES (of
those at which the topology's link rates fit) at which the pilots of every policy that moves
KV (the first PILOT_SECONDS emulated seconds of the scenario's heaviest load) vote for a
VALID fidelity verdict. Oracle, which moves no KV, costs the host least, so it is piloted
only when it is all the scenario runs.
"""

from __future__ import annotations

from collections.abc import Callable

from testbed.errors import TestbedError
from testbed.topology import AUTO, DILATION_EXPECTED, load_topology, parse_dilation

PILOT_SECONDS = 20.0
# A pilot is one draw of a noisy verdict, wrong both ways. Near the smallest TDF that suffices
# the same run passes about one time in two (DualPath on 1P2D at TDF 4, earlier agents:
# kernel lateness p99 5.7%, 11.9% and 22.4% in whole runs against 9%), and one lucky pilot
# would pick a TDF whose runs fail; where runs pass, a host hiccup now and then fails one
# (basic on 1P2D at TDF 4: p99 1.7%, 2.4%, 2.5%, 1.7%, 1.8% and 10.3% against 10%), and
# one unlucky pilot would skip that TDF. So each policy's pilots vote, up to PILOT_ROUNDS
# of them: a majority settles it, and a split vote takes one more.
PILOT_ROUNDS = 3
PILOT_MAJORITY = PILOT_ROUNDS // 2 + 1

# pilot(policy, tdf) -> the run's result, with its "fidelity" verdict
Pilot = Callable[[str, float], dict]


def dilation_argument(text: str) -> float | str:
    """--time-dilation as given on the command line, or a one-line error."""
    try:
        value = text if text == AUTO else float(text)
        return parse_dilation(value)
    except ValueError:
        raise TestbedError(f"--time-dilation: got {text!r}, expected "
                           f"{DILATION_EXPECTED}") from None


def chosen(override: float | str | None, scenario_tdf: float | str | None,
           topology_path) -> float | str:
    """The TDF asked for, in order of precedence: a number or 'auto'."""
    if override is not None:
        return override
    if scenario_tdf is not None:
        return scenario_tdf
    return load_topology(topology_path).time_dilation


def pilot_policies(policies: list[str]) -> list[str]:
    moving = [p for p in policies if p != "oracle"]
    return moving or list(policies)


def vote(verdicts) -> tuple[int, int, str]:
    """A policy's vote at one TDF from its pilots' verdicts, taken one at a time until
    PILOT_MAJORITY agree: (VALID, INVALID, the last INVALID summary). It passes when the
    VALID reach PILOT_MAJORITY."""
    passed = failed = 0
    summary = ""
    for verdict in verdicts:
        if verdict["valid"]:
            passed += 1
        else:
            failed += 1
            summary = verdict["summary"]
        if PILOT_MAJORITY in (passed, failed):
            break
    return passed, failed, summary


def pick(topology_path, policies: list[str], pilot: Pilot) -> tuple[float, str]:
    """The smallest candidate TDF at which every piloted policy's vote is VALID, and why, in
    one line. When none is, the largest that the topology's rates allow, said so."""
    topology = load_topology(topology_path)
    tried: list[str] = []
    usable = topology.fitting_dilations()      # loading refused a topology with none
    for tdf in usable:
        failed = None
        tallies = []
        for policy in pilot_policies(policies):
            drawn = (pilot(policy, tdf)["fidelity"] for _ in range(PILOT_ROUNDS))
            passed, invalid, summary = vote(drawn)
            if passed < PILOT_MAJORITY:
                failed = (f"{policy} {summary} (INVALID in {invalid} of {passed + invalid} "
                          f"pilots, the last shown)")
                break
            tallies.append(f"{policy} in {passed} of {passed + invalid}")
        if failed is None:
            why = "; ".join(tried + [f"TDF {tdf:g} VALID: {', '.join(tallies)}"])
            return tdf, f"auto: TDF {tdf:g} for {topology.name} ({why})"
        tried.append(f"TDF {tdf:g} {failed}")
    return usable[-1], (f"auto: TDF {usable[-1]:g} for {topology.name}, the largest its rates "
                        f"allow, though no pilot was VALID ({'; '.join(tried)})")


def resolve(topology_path, override: float | str | None, scenario_tdf: float | str | None,
            policies: list[str], pilot: Pilot) -> tuple[float, str]:
    """The TDF for one topology's runs, and a line saying where it came from."""
    asked = chosen(override, scenario_tdf, topology_path)
    if asked != AUTO:
        source = ("--time-dilation" if override is not None
                  else "the scenario" if scenario_tdf is not None else "the topology")
        return asked, f"TDF {asked:g} (from {source})"
    return pick(topology_path, policies, pilot)
