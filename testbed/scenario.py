"""Scenario files: a topology, a model, a workload and the policies to compare.

    description: one line for the report
    topologies: [topologies/1p1d.yaml]  # relative to the repository; each runs every policy
    model: ds-27b
    workload: {dataset: 64k, agents: 8, seed: 1, start_turn: 0, max_turns: 4}
    policies: [basic, dualpath]
    paper:                               # optional: the paper's figures, printed beside ours
      source: Figure 8, DS 27B, 64K, 2,048 agents
      speedup: {1p1d: 1.77}              # DualPath over basic JCT, per topology name
      reduction: {dualpath: 0.4562}      # JCT reduction against basic, per policy
      capacity_ratio: 1.67               # online: DualPath over basic capacity
    faults:                              # optional: see testbed/faults.py
      - {kind: link-down, target: "n0:snic", at: 5}
      - {kind: kill, target: n1g0, after_turns: 20, every: 30, times: 3}
    chaos: {seed: 7, every: 20, repair: 8}   # optional: random faults of every kind
    time_dilation: auto                  # optional: a number >= 1, or auto (pilot runs pick
                                         # the smallest TDF with VALID runs); default: the
                                         # topology's, else 1. Or per topology name:
                                         # {1p2d-g2: 8, 2p1d-g2: 16} (one left out: its own)

Any problem is reported as one line naming the file, the field, the value and what was
expected, as for topologies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from testbed.errors import TestbedError
from testbed.faults import ChaosSpec, FaultSpec, check_target
from testbed.plan import build_plan
from testbed.topology import (Spec, load_topology, parse_dilation, read_yaml, require_mapping,
                              validation_message)

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "scenarios"


_TRAJECTORIES = {"dataset", "seed", "start_turn", "max_turns"}
USED_BY = {"offline": _TRAJECTORIES | {"agents"},
           "online": _TRAJECTORIES | {"aps", "duration", "slo_ttft", "slo_tpot"},
           "trace": {"trace", "skip", "limit", "speed"}}


class Workload(Spec):
    """offline: `agents` start at t = 0, the metric is JCT. online: agents arrive as a Poisson
    process, `duration` seconds at each rate in `aps`; the metrics are TTFT, TPOT and the
    capacity, the highest rate that meets the SLO (the sweep of a policy stops at the first
    rate that misses it). trace: the requests of a Mooncake-format trace at their timestamps
    (divided by `speed`), hits from shared block ids; the first `skip` requests' blocks are
    stored beforehand, and `limit` requests are replayed."""
    kind: Literal["offline", "online", "trace"] = "offline"
    dataset: str = "64k"
    agents: int | None = Field(default=None, ge=1, le=4096, strict=True)
    aps: list[float] = Field(default_factory=list, description="online: agents per second")
    duration: float = Field(default=60.0, gt=0, le=3600,
                            description="online: seconds of arrivals at each rate")
    seed: int = Field(default=1, strict=True)
    start_turn: int = Field(default=0, ge=0, strict=True,
                            description="replay from this turn on, its context already in "
                                        "storage: the middle of long trajectories, at once")
    max_turns: int | None = Field(default=None, ge=1, strict=True,
                                  description="replay at most this many turns per agent")
    trace: str | None = Field(default=None, description="trace: a JSONL file, relative to "
                                                        "the repository or absolute")
    skip: int = Field(default=0, ge=0, strict=True, description="trace: requests stored first")
    limit: int | None = Field(default=None, ge=1, strict=True,
                              description="trace: requests replayed")
    speed: float = Field(default=1.0, gt=0, le=1000, description="trace: timestamps / speed")
    slo_ttft: float = Field(default=4.0, gt=0, description="online SLO: mean TTFT, seconds")
    slo_tpot: float = Field(default=0.05, gt=0, description="online SLO: mean TPOT, seconds")

    @model_validator(mode="after")
    def complete(self) -> "Workload":
        if self.kind == "offline" and self.agents is None:
            raise ValueError("agents: missing, expected the number of agents for an "
                             "offline workload")
        if self.kind == "online":
            if not self.aps or any(a <= 0 for a in self.aps) or self.aps != sorted(set(self.aps)):
                raise ValueError(f"aps: got {self.aps}, expected increasing rates > 0 "
                                 "(agents per second) for an online workload")
            if self.agents is not None:
                raise ValueError("agents: an online workload's agents come from aps "
                                 "x duration, expected no agents field")
        if self.kind == "trace":
            if self.trace is None or not self.trace_path.is_file():
                raise ValueError(f"trace: got {self.trace!r}, expected a Mooncake-format JSONL "
                                 "file for a trace workload")
        elif self.trace is not None:
            raise ValueError(f"trace: got {self.trace!r} for a {self.kind} workload, expected "
                             "kind: trace")
        # A field another kind of workload reads would be silently ignored: refuse it.
        for field in sorted(self.model_fields_set - USED_BY[self.kind] - {"kind"}):
            raise ValueError(f"{field}: not read by {self.kind} workloads, expected it only "
                             f"with kind: {', '.join(k for k in USED_BY if field in USED_BY[k])}")
        return self

    @property
    def trace_path(self) -> Path:
        return REPO / self.trace if self.trace else REPO

    def levels(self) -> list[float | None]:
        """The arrival rates to run: one offline run (None), or each online rate."""
        return list(self.aps) if self.kind == "online" else [None]

    def agents_at(self, aps: float | None) -> int:
        return self.agents if aps is None else max(1, round(aps * self.duration))

    @property
    def timed(self) -> bool:
        """Whether work arrives over time (JCT is then a mean per arrival, not the batch's)."""
        return self.kind != "offline"


class PaperFigures(Spec):
    """What the paper reports for the same experiment, to print beside the measurement."""
    source: str = Field(description="where in the paper, e.g. 'Figure 8, DS 27B, 64K'")
    speedup: dict[str, float] = Field(default_factory=dict,
                                      description="DualPath over basic JCT, per topology name")
    reduction: dict[str, float] = Field(default_factory=dict,
                                        description="JCT reduction against basic, per policy")
    capacity_ratio: float | None = Field(default=None, gt=0,
                                         description="online: DualPath over basic capacity")


def parse_dilations(value: object) -> float | str | dict[str, float | str] | None:
    """A scenario's time_dilation: unset, one TDF for every topology, or one per topology
    name (`parse_dilation` for each)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return parse_dilation(value)
    parsed = {}
    for name, dilation in value.items():
        try:
            parsed[str(name)] = parse_dilation(dilation)
        except ValueError as exc:
            raise ValueError(f"{name}: got {dilation!r}, {exc}") from None
    return parsed


class Scenario(Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    description: str = ""
    topologies: list[str] = Field(min_length=1)
    model: str
    workload: Workload
    policies: list[str] = Field(min_length=1)
    paper: PaperFigures | None = None
    faults: list[FaultSpec] = Field(default_factory=list)
    chaos: ChaosSpec | None = None
    time_dilation: Annotated[float | str | dict[str, float | str] | None,
                             BeforeValidator(parse_dilations)] = Field(
        default=None, description="a number >= 1 or 'auto' for every topology, or one per "
                                  "topology name; unset: each topology's own "
                                  "(agents/clock.py, testbed/dilation.py)")

    @field_validator("topologies")
    @classmethod
    def topologies_exist(cls, value: list[str]) -> list[str]:
        for path in value:
            if not (REPO / path).is_file():
                raise ValueError(f"got {path!r}, expected a topology file under the "
                                 "repository, such as topologies/1p1d.yaml")
        if len(set(map(topology_name, value))) < len(value):
            raise ValueError("expected topologies with distinct file names")
        return value

    @model_validator(mode="after")
    def dilations_name_topologies(self) -> "Scenario":
        if isinstance(self.time_dilation, dict):
            names = [topology_name(t) for t in self.topologies]
            for name in self.time_dilation:
                if name not in names:
                    raise ValueError(f"time_dilation: got {name!r}, expected one of this "
                                     f"scenario's topology names: {', '.join(names)}")
        return self

    def dilation_of(self, topology: str) -> float | str | None:
        """The TDF this scenario asks for `topology` (a path): a number, 'auto', or None
        to leave it to the topology file."""
        if isinstance(self.time_dilation, dict):
            return self.time_dilation.get(topology_name(topology))
        return self.time_dilation


def topology_name(path: str) -> str:
    return Path(path).stem


def check_dilation(dilation: float, topologies: list[str], where: str) -> None:
    """Every topology's links must still be shapeable at `dilation`: a one-line error."""
    for topology in topologies:
        try:
            load_topology(REPO / topology).dilated(dilation)
        except TestbedError as exc:
            raise TestbedError(f"{where}: {dilation:g} does not fit {topology}: "
                               f"{str(exc).split(': ', 1)[1]}") from None


def load_scenario(name_or_path: str) -> Scenario:
    """A scenario by name (scenarios/NAME.yaml) or by path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = SCENARIOS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in SCENARIOS.glob("*.yaml")))
        raise TestbedError(f"{path}: no such scenario file; scenarios: {known}")
    data = require_mapping(path, read_yaml(path, "scenario"), "scenario",
                           "topologies, model, workload, policies")
    data.setdefault("name", path.stem)
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as exc:
        raise TestbedError(f"{path}: {validation_message(exc, Scenario)}") from None
    for topology in scenario.topologies:
        if isinstance(dilation := scenario.dilation_of(topology), float):
            check_dilation(dilation, [topology], f"{path}: time_dilation")
    for topology in scenario.topologies if scenario.faults else ():
        plan = build_plan(load_topology(REPO / topology).buildable())
        for i, fault in enumerate(scenario.faults):
            try:
                check_target(fault, plan, f"faults[{i}].target")
            except TestbedError as exc:
                raise TestbedError(f"{path}: {exc} (in {topology})") from None
    return scenario
