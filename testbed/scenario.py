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

Any problem is reported as one line naming the file, the field, the value and what was
expected, as for topologies.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, field_validator

from testbed.errors import TestbedError
from testbed.topology import Spec, read_yaml, require_mapping, validation_message

REPO = Path(__file__).resolve().parent.parent
SCENARIOS = REPO / "scenarios"


class Workload(Spec):
    kind: Literal["offline"] = "offline"     # all agents start at t = 0; the metric is JCT
    dataset: str = "64k"
    agents: int = Field(ge=1, le=4096, strict=True)
    seed: int = Field(default=1, strict=True)
    start_turn: int = Field(default=0, ge=0, strict=True,
                            description="replay from this turn on, its context already in "
                                        "storage: the middle of long trajectories, at once")
    max_turns: int | None = Field(default=None, ge=1, strict=True,
                                  description="replay at most this many turns per agent")


class PaperFigures(Spec):
    """What the paper reports for the same experiment, to print beside the measurement."""
    source: str = Field(description="where in the paper, e.g. 'Figure 8, DS 27B, 64K'")
    speedup: dict[str, float] = Field(default_factory=dict,
                                      description="DualPath over basic JCT, per topology name")
    reduction: dict[str, float] = Field(default_factory=dict,
                                        description="JCT reduction against basic, per policy")


class Scenario(Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")
    description: str = ""
    topologies: list[str] = Field(min_length=1)
    model: str
    workload: Workload
    policies: list[str] = Field(min_length=1)
    paper: PaperFigures | None = None

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


def topology_name(path: str) -> str:
    return Path(path).stem


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
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise TestbedError(f"{path}: {validation_message(exc, Scenario)}") from None
