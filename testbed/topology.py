"""The topology spec: a YAML file describing the emulated cluster, validated into typed objects.

Rates are written in real-cluster units; the scale factor divides them into the rates the
emulated links are shaped to. Any problem in a file is reported as one line naming the file,
the field, the bad value and what was expected.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      model_validator)

from testbed.errors import TestbedError
from testbed.rates import format_rate, parse_rate

Rate = Annotated[int, BeforeValidator(parse_rate)]
# What one 2-core machine can shape and forward: below 1 Mbit/s HTB is coarse, above
# 10 Gbit/s no veth pair on this class of machine keeps up.
MIN_SCALED_RATE = 10**6
MAX_SCALED_RATE = 10 * 10**9
MAX_NODES = 120          # the address plan gives each node a /24 on the management network
MAX_GPUS_PER_NODE = 16
MAX_STORAGE_HOSTS = 64


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Links(Spec):
    cnic: Rate = Field(description="per GPU, on the compute fabric")
    snic: Rate = Field(description="per node, on the storage fabric")
    pcie: Rate = Field(description="per node: its DRAM side on the compute fabric")


class Storage(Spec):
    hosts: int = Field(ge=1, le=MAX_STORAGE_HOSTS, strict=True)
    link: Rate


class QosShares(Spec):
    """Guaranteed shares of a CNIC for model-execution (high) and KV (low) traffic."""
    high: float = Field(gt=0, lt=1)
    low: float = Field(gt=0, lt=1)

    @model_validator(mode="after")
    def shares_fit_the_link(self) -> "QosShares":
        if self.high + self.low > 1.0 + 1e-9:
            raise ValueError(f"expected high + low <= 1, got {self.high} + {self.low}")
        return self


class Topology(Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    prefill_nodes: int = Field(ge=1, le=MAX_NODES, strict=True)
    decode_nodes: int = Field(ge=1, le=MAX_NODES, strict=True)
    gpus_per_node: int = Field(ge=1, le=MAX_GPUS_PER_NODE, strict=True)
    links: Links
    storage: Storage
    scale: float = Field(ge=1, description="real-cluster bandwidth / emulated bandwidth")
    qos: QosShares = QosShares(high=0.99, low=0.01)
    backend: Literal["docker", "netns"] = "docker"

    @model_validator(mode="after")
    def fits_the_machine(self) -> "Topology":
        if self.prefill_nodes + self.decode_nodes > MAX_NODES:
            raise ValueError(f"expected at most {MAX_NODES} nodes in all, got "
                             f"{self.prefill_nodes + self.decode_nodes}")
        rates = {f"links.{nic}": getattr(self.links, nic) for nic in ("cnic", "snic", "pcie")}
        rates["storage.link"] = self.storage.link
        for field, real in rates.items():
            scaled = real / self.scale
            if not MIN_SCALED_RATE <= scaled <= MAX_SCALED_RATE:
                raise ValueError(
                    f"{field}: scaled rate {format_rate(scaled)} ({format_rate(real)} / scale "
                    f"{self.scale:g}) is out of range, expected {format_rate(MIN_SCALED_RATE)}"
                    f" to {format_rate(MAX_SCALED_RATE)}; change the rate or the scale")
        return self

    def scaled(self, real_bits_per_second: int) -> int:
        return int(real_bits_per_second / self.scale)

    @property
    def nodes(self) -> int:
        return self.prefill_nodes + self.decode_nodes


def _describe_error(error: dict[str, Any]) -> str:
    field = ".".join(str(part) for part in error["loc"]) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "missing":
        return f"{field}: missing, expected this field to be set"
    if error["type"] == "extra_forbidden":
        return f"{field}: got {error['input']!r}, expected no such field (is it misspelt?)"
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    elif message.startswith("String should match pattern"):
        message = "expected lowercase letters, digits and '-', at most 32 characters"
    if field == "(top level)" and ": " in message and message.split(": ", 1)[0].count(".") == 1:
        field, message = message.split(": ", 1)   # a cross-field check names its own field
    value = error.get("input")
    shown = "" if isinstance(value, dict) else f"got {value!r}, "
    return f"{field}: {shown}{message}"


def load_topology(path: str | Path, **overrides: Any) -> Topology:
    """Read and validate a topology file. `overrides` replace top-level fields (tests, CLI)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise TestbedError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TestbedError(f"{path}{where}: invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise TestbedError(f"{path}: (top level): got {type(data).__name__} {data!r:.40}, "
                           "expected a mapping of topology fields")
    data.setdefault("name", path.stem)
    data.update(overrides)
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise TestbedError(f"{path}: {_describe_error(errors[0])}{more}") from None
