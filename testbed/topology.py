"""The topology spec: a YAML file describing the emulated cluster, validated into typed objects.

Rates are written in real-cluster units; the scale factor divides them into the rates the
emulated links are shaped to. Any problem in a file is reported as one line naming the file,
the field, the bad value and what was expected.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer,
                      ValidationError, model_validator)

from agents.clock import MIN_DILATION
from testbed.errors import TestbedError
from testbed.rates import format_rate, parse_rate

# Written and serialised as text ("400000000000bit"), so a dumped topology loads again.
Rate = Annotated[int, BeforeValidator(parse_rate), PlainSerializer(lambda bits: f"{bits}bit")]
AUTO = "auto"
DILATION_EXPECTED = "a number >= 1 (1: real time) or 'auto'"
# The TDFs `auto` tries, smallest first (testbed/dilation.py).
AUTO_CANDIDATES = (1.0, 2.0, 4.0, 8.0, 16.0)


def parse_dilation(value: object) -> float | str:
    """A time-dilation factor as written: a number >= 1, or 'auto' (picked per topology by
    a pilot run, `testbed.dilation`). Raises ValueError naming what was expected."""
    if value == AUTO:
        return AUTO
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected {DILATION_EXPECTED}")
    if not value >= MIN_DILATION or value == float("inf"):
        raise ValueError(f"expected {DILATION_EXPECTED}")
    try:
        return float(value)
    except OverflowError:          # an integer beyond any float
        raise ValueError(f"expected {DILATION_EXPECTED}") from None


Dilation = Annotated[float | str, BeforeValidator(parse_dilation)]
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
    replicas: int = Field(default=1, ge=1, le=MAX_STORAGE_HOSTS, strict=True,
                          description="copies of every block, on consecutive storage hosts")

    @model_validator(mode="after")
    def enough_hosts(self) -> "Storage":
        if self.replicas > self.hosts:
            raise ValueError(f"storage.replicas: got {self.replicas}, expected at most "
                             f"storage.hosts ({self.hosts})")
        return self


class QosShares(Spec):
    """Guaranteed shares of a CNIC for model-execution (high) and KV (low) traffic."""
    high: float = Field(gt=0, lt=1)
    low: float = Field(gt=0, lt=1)
    priority_classes: bool = Field(
        default=True, strict=True,
        description="false: every CNIC is one FIFO, to measure what isolation buys")

    @model_validator(mode="after")
    def shares_fit_the_link(self) -> "QosShares":
        if self.high + self.low > 1.0 + 1e-9:
            raise ValueError(f"got high {self.high:g} + low {self.low:g} = "
                             f"{self.high + self.low:g}, expected high + low <= 1")
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
    mtu: int = Field(default=9000, ge=1280, le=9000, strict=True,
                     description="bytes per packet on the compute and storage fabrics: data "
                                 "center fabrics run jumbo frames (InfiniBand 4 KiB)")
    backend: Literal["docker", "netns"] = "docker"
    time_dilation: Dilation = Field(
        default=1.0, description="time-dilation factor: link rates / TDF, emulated durations "
                                 "x TDF (agents/clock.py); 'auto' is resolved before a run")

    @model_validator(mode="after")
    def fits_the_machine(self) -> "Topology":
        if self.prefill_nodes + self.decode_nodes > MAX_NODES:
            raise ValueError(f"prefill_nodes + decode_nodes: got {self.prefill_nodes} + "
                             f"{self.decode_nodes} = {self.nodes}, expected at most "
                             f"{MAX_NODES} nodes in all")
        if self.time_dilation != AUTO:
            error = self.rate_error(self.time_dilation)
        elif self.fitting_dilations():
            error = None
        else:          # auto, and not one candidate fits: the smallest's error, and the range
            candidates = ", ".join(f"{tdf:g}" for tdf in AUTO_CANDIDATES)
            error = (f"{self.rate_error(AUTO_CANDIDATES[0])} (time_dilation auto: no TDF of "
                     f"{candidates} fits)")
        if error:
            raise ValueError(error)
        return self

    def rate_error(self, dilation: float) -> str | None:
        """Why a link's shaped rate at `dilation` is beyond what the machine shapes, or None."""
        rates = {f"links.{nic}": getattr(self.links, nic) for nic in ("cnic", "snic", "pcie")}
        rates["storage.link"] = self.storage.link
        for field, real in rates.items():
            scaled = real / self.scale / dilation
            if not MIN_SCALED_RATE <= scaled <= MAX_SCALED_RATE:
                by = f" / time_dilation {dilation:g}" if dilation != 1 else ""
                return (f"{field}: scaled rate {format_rate(scaled)} ({format_rate(real)} / "
                        f"scale {self.scale:g}{by}) is out of range, expected "
                        f"{format_rate(MIN_SCALED_RATE)} to {format_rate(MAX_SCALED_RATE)}; "
                        f"change the rate, the scale or the time dilation")
        return None

    def fitting_dilations(self) -> list[float]:
        """The TDFs `auto` may pick: its candidates at which every link rate fits."""
        return [tdf for tdf in AUTO_CANDIDATES if self.rate_error(tdf) is None]

    def scaled(self, real_bits_per_second: int) -> int:
        """The rate a link is shaped to: the real rate / scale / the time dilation."""
        return int(real_bits_per_second / self.scale / self.dilation)

    @property
    def dilation(self) -> float:
        """The time-dilation factor; refused while still 'auto' (a run resolves it first)."""
        if self.time_dilation == AUTO:
            raise TestbedError(f"topology {self.name}: time_dilation is 'auto', expected it "
                               "resolved to a number before the cluster is built")
        return self.time_dilation

    def dilated(self, dilation: float | str) -> "Topology":
        """This topology at another time dilation (validated: the rates must still fit);
        a one-line error otherwise."""
        try:
            return Topology.model_validate({**self.model_dump(), "time_dilation": dilation})
        except ValidationError as exc:
            raise TestbedError(f"topology {self.name} at time_dilation {dilation}: "
                               f"{validation_message(exc, Topology)}") from None

    def buildable(self) -> "Topology":
        """This topology, an 'auto' time dilation taken as the smallest that fits (for checks
        of its plan)."""
        return self.dilated(self.fitting_dilations()[0]) if self.time_dilation == AUTO else self

    @property
    def nodes(self) -> int:
        return self.prefill_nodes + self.decode_nodes


# A cross-field check names its own field(s): "links.cnic: ..." or "a + b: ...".
_FIELD_PREFIX = re.compile(r"^([a-z_]+(?:\.[a-z_]+)*(?: \+ [a-z_]+(?:\.[a-z_]+)*)*): (.*)$")


def _show(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _field_part(part: Any) -> str:
    """A field name as written, or quoted when it would not read as one (a key of spaces,
    a newline, an empty string)."""
    text = str(part)
    return text if text and text.isprintable() and text.strip() == text else repr(part)


def _known_fields(loc: tuple, root: type[BaseModel] = Topology) -> list[str]:
    """The field names allowed where `loc` points in `root` (for 'did you mean')."""
    model: Any = root
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = field.annotation if field else None
    return list(getattr(model, "model_fields", {}))


def _describe_error(error: dict[str, Any], root: type[BaseModel] = Topology) -> str:
    """One pydantic error of validating `root` (a Topology unless told) as one line."""
    loc = tuple(error["loc"])
    field = ".".join(map(_field_part, loc)) or "(top level)"
    message = error["msg"].removeprefix("Value error, ")
    value = error.get("input")
    if error["type"] == "missing":
        return f"{field}: missing, expected this field to be set"
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), _known_fields(loc, root), n=1)
        hint = f"did you mean {close[0]!r}?" if close else "is it misspelt?"
        return f"{field}: got {_show(value)}, expected no such field ({hint})"
    if message.startswith("Input should be "):
        message = "expected " + message.removeprefix("Input should be ")
    if message.startswith("expected a valid dictionary or instance of "):
        message = "expected a mapping of its fields"
    if message.startswith("String should match pattern"):
        message = "expected lowercase letters, digits and '-', at most 32 characters"
    prefixed = _FIELD_PREFIX.match(message) if error["type"] == "value_error" else None
    if prefixed:
        named, message = prefixed.groups()
        field = named if not loc else f"{field}.{named}"
    # A model-level check (its input is the whole mapping) puts the bad values in its message.
    model_level = error["type"] == "value_error" and isinstance(value, dict)
    shown = "" if model_level else f"got {_show(value)}, "
    return f"{field}: {shown}{message}"


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses a key given twice (PyYAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":   # '<<: *anchor' may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                again = key in seen
            except TypeError:     # unhashable: the base constructor reports it
                continue
            if again:
                raise yaml.constructor.ConstructorError(
                    None, None, f"got {key!r} a second time, expected each key once",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
                                 _UniqueKeyLoader.construct_mapping)


def _describe_yaml_error(path: Path, text: str, exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    lines = text.splitlines()
    line = lines[mark.line].strip() if mark and mark.line < len(lines) else ""
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if not line and context and context_mark and context_mark.line < len(lines):
        # e.g. an unclosed quote: the problem is at the end, the cause where it started
        problem += f" {context} from line {context_mark.line + 1}"
        line = lines[context_mark.line].strip()
    word = "in" if re.search(r"\bgot\b", problem) else "got"
    got = f", {word} {_show(line)}" if line else ""
    expected = "" if re.search(r"\bexpected\b", problem) else ", expected well-formed YAML"
    return f"{path}{where}: invalid YAML: {problem}{got}{expected}"


def validation_message(exc: ValidationError, root: type[BaseModel], describe=None,
                       named_by_file: bool = False) -> str:
    """One line for a failed validation of a `root` file: its first error, and how many more.
    A misspelt field also makes the real one "missing": the misspelling is named first."""
    errors = sorted(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
    message = describe(errors[0]) if describe else _describe_error(errors[0], root)
    if named_by_file and tuple(errors[0]["loc"]) == ("name",):
        message += " (the name defaults to the file name; set name: to override it)"
    return message + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def read_yaml(path: Path, what: str) -> Any:
    """The parsed content of a YAML spec file (`what`: "topology", "model profile", ...),
    or a one-line error naming the file and what is wrong with it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise TestbedError(f"{path}: cannot read ({exc.strerror or exc}), expected a readable "
                           f"{what} file") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        raise TestbedError(_describe_yaml_error(path, text, exc)) from None


def require_mapping(path: Path, data: Any, what: str, examples: str) -> dict:
    if data is None:
        raise TestbedError(f"{path}: (top level): got an empty file, expected a mapping of "
                           f"{what} fields ({examples}, ...)")
    if not isinstance(data, dict):
        raise TestbedError(f"{path}: (top level): got {type(data).__name__} {_show(data)}, "
                           f"expected a mapping of {what} fields")
    return data


def load_topology(path: str | Path, **overrides: Any) -> Topology:
    """Read and validate a topology file. `overrides` replace top-level fields (tests, CLI)."""
    path = Path(path)
    data = require_mapping(path, read_yaml(path, "topology"), "topology",
                           "prefill_nodes, decode_nodes")
    named_by_file = "name" not in data and "name" not in overrides
    data.setdefault("name", path.stem)
    data.update(overrides)
    try:
        return Topology.model_validate(data)
    except ValidationError as exc:
        message = validation_message(exc, Topology, named_by_file=named_by_file)
        raise TestbedError(f"{path}: {message}") from None


def probe_topology(rate: int, backend: str = "netns", **faster: int) -> Topology:
    """A 1P1D topology, one GPU per node, whose links run at `rate` scaled bits/s, except
    those named in `faster` (cnic, snic, pcie, storage). For measuring one link type."""
    scale = 1000
    real = {nic: f"{faster.get(nic, rate) * scale}bit" for nic in ("cnic", "snic", "pcie", "storage")}
    return Topology.model_validate(dict(
        name="probe", prefill_nodes=1, decode_nodes=1, gpus_per_node=1,
        links=dict(cnic=real["cnic"], snic=real["snic"], pcie=real["pcie"]),
        storage=dict(hosts=1, link=real["storage"]), scale=scale, backend=backend))
