"""Property-based fuzzing (hypothesis, a bounded number of examples so that CI stays quick):
the topology, scenario and trace loaders and the protocol decoder either succeed or fail
with the project's own one-line errors (TestbedError, ProtocolError), never with another
exception, and never hang."""

from __future__ import annotations

import asyncio
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.protocol import (MAX_PAYLOAD, Frame, MessageType, ProtocolError, header,
                             read_frame)
from testbed import errors
from testbed.scenario import Scenario, load_scenario
from testbed.topology import Topology, load_topology
from testbed.trace import load_trace

# Derandomized: CI sees the same examples every run (a failure is a bug, never a flake).
EXAMPLES = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# YAML-able values, nested: what a hand-edited file may hold in any field.
scalars = (st.none() | st.booleans() | st.integers(-10**12, 10**12)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


def near(valid: dict, keys: list[str]) -> st.SearchStrategy:
    """A valid mapping with some fields replaced, dropped or added."""
    return st.builds(lambda replaced, dropped, added: {
        **{k: v for k, v in valid.items() if k not in dropped}, **replaced, **added},
        st.dictionaries(st.sampled_from(keys), values, max_size=3),
        st.sets(st.sampled_from(keys), max_size=2),
        st.dictionaries(st.text(max_size=8), values, max_size=2))


TOPOLOGY = yaml.safe_load((Path(__file__).resolve().parents[2] / "topologies/1p1d.yaml").read_text())
SCENARIO = yaml.safe_load((Path(__file__).resolve().parents[2] / "scenarios/smoke.yaml").read_text())
documents = st.text(max_size=300) | values.map(yaml.safe_dump)


def written(text: str, suffix: str) -> Path:
    with tempfile.NamedTemporaryFile("w", suffix=suffix, delete=False) as f:
        f.write(text)
    return Path(f.name)


def load_or_explain(loader, text: str, suffix: str):
    path = written(text, suffix)
    try:
        return loader(str(path))
    except errors.TestbedError as exc:
        assert str(exc).strip() and "\n" not in str(exc).strip(), repr(str(exc))
        return None
    finally:
        path.unlink()


@EXAMPLES
@given(documents | near(TOPOLOGY, list(TOPOLOGY) + ["links", "storage", "qos"]).map(yaml.safe_dump))
def test_the_topology_loader_gives_a_topology_or_a_one_line_error(text):
    result = load_or_explain(load_topology, text, ".yaml")
    assert result is None or isinstance(result, Topology)


@EXAMPLES
@given(documents | near(SCENARIO, list(SCENARIO) + ["paper"]).map(yaml.safe_dump)
       | near(SCENARIO["workload"], list(SCENARIO["workload"]) + ["kind", "aps", "trace"]).map(
           lambda w: yaml.safe_dump({**SCENARIO, "workload": w})))
def test_the_scenario_loader_gives_a_scenario_or_a_one_line_error(text):
    result = load_or_explain(load_scenario, text, ".yaml")
    assert result is None or isinstance(result, Scenario)


trace_line = st.fixed_dictionaries({
    "timestamp": st.integers(-5, 10**7) | values, "input_length": st.integers(-5, 5000) | values,
    "output_length": st.integers(-5, 500) | values,
    "hash_ids": st.lists(st.integers(-3, 50), max_size=12) | values}).map(json.dumps)


@EXAMPLES
@given(st.lists(trace_line | st.text(max_size=60), max_size=6).map("\n".join))
def test_the_trace_loader_gives_requests_or_a_one_line_error(text):
    result = load_or_explain(load_trace, text, ".jsonl")
    assert result is None or isinstance(result, list)


def decode(data: bytes):
    """Every frame in `data`, then None at its end, or the ProtocolError that stopped it;
    within a second (a decoder waiting for bytes that never come would hang a peer)."""
    async def frames():
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        found = []
        while (frame := await read_frame(reader)) is not None:
            found.append(frame)
        return found

    async def bounded():
        return await asyncio.wait_for(frames(), 1.0)

    try:
        return asyncio.run(bounded())
    except ProtocolError as exc:
        return exc


valid_frames = st.builds(
    lambda kind, request, payload: Frame(kind, request=request, payload=payload),
    st.sampled_from(list(MessageType)), st.integers(0, 2**64 - 1), st.binary(max_size=64))


def wire(frame: Frame) -> bytes:
    return frame.encode_header() + frame.payload


@EXAMPLES
@given(st.binary(max_size=200))
def test_random_bytes_decode_to_frames_or_a_protocol_error(data):
    result = decode(data)
    assert isinstance(result, (list, ProtocolError))


def boundaries(frames: list[Frame]) -> list[int]:
    ends, at = [], 0
    for frame in frames:
        at += len(wire(frame))
        ends.append(at)
    return ends


@EXAMPLES
@given(st.lists(valid_frames, min_size=1, max_size=3), st.data())
def test_truncated_or_damaged_frames_are_refused_and_intact_ones_come_through(frames, data):
    sent = [(f.type, f.request, f.payload) for f in frames]
    stream = b"".join(map(wire, frames))
    assert [(f.type, f.request, f.payload) for f in decode(stream)] == sent

    cut = data.draw(st.integers(1, len(stream) - 1))
    result = decode(stream[:cut])
    if cut in boundaries(frames):
        assert [(f.type, f.request, f.payload) for f in result] == sent[:len(result)]
    else:
        assert isinstance(result, ProtocolError), (cut, result)

    # A flipped byte anywhere fails a checksum, the header's or the payload's: the frame is
    # refused, never read as another one.
    flip = data.draw(st.integers(0, len(stream) - 1))
    damaged = bytearray(stream)
    damaged[flip] ^= data.draw(st.integers(1, 255))
    result = decode(bytes(damaged))
    assert isinstance(result, ProtocolError), (flip, result)


def test_a_length_beyond_the_limit_is_refused_without_waiting_for_it():
    result = decode(header(MessageType.ACK, 0, 0, 0, MAX_PAYLOAD + 1, 0, 0))
    assert isinstance(result, ProtocolError) and "exceeds" in str(result)
