"""Replaying Mooncake-format request traces (kvcache-ai/Mooncake, FAST'25 release).

One JSON object a line: `timestamp` (arrival, ms from the start), `input_length` (prompt
tokens), `output_length` (generated tokens) and `hash_ids` (remapped prefix-block hashes, one
per 512-token block, the last block possibly partial; equal ids are reusable KV). The
synthetic, conversation and tool-and-agent traces of the release share this format.

Hits are derived by replaying the requests in order against an unbounded cache of the block
ids seen so far, with prefix caching: a request's blocks hit from its first block up to (not
including) its first block not seen before; everything after that is a miss, even blocks seen
elsewhere. A hit block counts its own tokens (the last one may be partial). Once a request is
served, all its blocks are cached.

A bad line is reported as one line: `file:LINE: field: got VALUE, expected WHAT`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from testbed.errors import TestbedError
from testbed.topology import _show

BLOCK_TOKENS = 512
FIELDS = ("timestamp", "input_length", "output_length", "hash_ids")


@dataclass(frozen=True)
class TraceRequest:
    arrival: float                  # seconds from the start of the trace
    input_length: int               # prompt tokens
    output_length: int              # generated tokens
    hash_ids: tuple[int, ...]       # one per block of BLOCK_TOKENS prompt tokens
    hit_tokens: int                 # prompt tokens in the cached prefix
    miss_tokens: int                # prompt tokens to prefill
    hit_blocks: int                 # blocks in the cached prefix

    @property
    def blocks(self) -> int:
        return len(self.hash_ids)


class _LineError(Exception):
    """A problem with one field of one line; load_trace adds the file and line number."""


def _integer(record: dict, field: str, least: int, what: str) -> int:
    value = record[field]
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _LineError(f"{field}: got {_show(value)}, expected {what}")
    return value


def _parse(text: str, previous_ms: float | None, block_tokens: int,
           ) -> tuple[float, int, int, tuple[int, ...]]:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _LineError(f"(line): got {_show(text)}, expected a JSON object (not JSON: "
                         f"{exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise _LineError(f"(line): got {type(record).__name__} {_show(record)}, expected a "
                         f"JSON object with {', '.join(FIELDS)}")
    for field in FIELDS:
        if field not in record:
            raise _LineError(f"{field}: missing, expected this field to be set")
    for field in record:
        if field not in FIELDS:
            raise _LineError(f"{field}: got {_show(record[field])}, expected no such field "
                             f"(fields: {', '.join(FIELDS)})")
    timestamp = record["timestamp"]
    if (isinstance(timestamp, bool) or not isinstance(timestamp, (int, float))
            or not math.isfinite(timestamp) or timestamp < 0):
        raise _LineError(f"timestamp: got {_show(timestamp)}, expected milliseconds >= 0")
    if previous_ms is not None and timestamp < previous_ms:
        raise _LineError(f"timestamp: got {_show(timestamp)}, expected >= {previous_ms:g}, the "
                         "previous request's (timestamps must not decrease)")
    input_length = _integer(record, "input_length", 1, "a prompt length in tokens >= 1")
    output_length = _integer(record, "output_length", 0, "an output length in tokens >= 0")
    hash_ids = record["hash_ids"]
    if not isinstance(hash_ids, list) or any(
            isinstance(block, bool) or not isinstance(block, int) or block < 0
            for block in hash_ids):
        raise _LineError(f"hash_ids: got {_show(hash_ids)}, expected a list of block ids "
                         "(integers >= 0)")
    blocks = math.ceil(input_length / block_tokens)
    if len(hash_ids) != blocks:
        raise _LineError(f"hash_ids: got {len(hash_ids)} ids, expected {blocks} = "
                         f"ceil(input_length {input_length} / {block_tokens})")
    return float(timestamp), input_length, output_length, tuple(hash_ids)


def load_trace(path: str | Path, limit: int | None = None,
               block_tokens: int = BLOCK_TOKENS) -> list[TraceRequest]:
    """The first `limit` requests (all if None) of a Mooncake-format trace, with hit and miss
    tokens from an in-order replay (see the module docstring). Blank lines are skipped."""
    path = Path(path)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                              or limit < 0):
        raise TestbedError(f"limit: got {_show(limit)}, expected None or an integer >= 0")
    if isinstance(block_tokens, bool) or not isinstance(block_tokens, int) or block_tokens < 1:
        raise TestbedError(f"block_tokens: got {_show(block_tokens)}, expected an integer >= 1")
    requests: list[TraceRequest] = []
    seen: set[int] = set()
    previous_ms: float | None = None
    try:
        with path.open(encoding="utf-8") as lines:
            for number, text in enumerate(lines, start=1):
                if limit is not None and len(requests) >= limit:
                    break
                if not text.strip():
                    continue
                try:
                    timestamp, input_length, output_length, hash_ids = _parse(
                        text.strip(), previous_ms, block_tokens)
                except _LineError as exc:
                    raise TestbedError(f"{path}:{number}: {exc}") from None
                previous_ms = timestamp
                hit_blocks = 0
                for block in hash_ids:
                    if block not in seen:
                        break
                    hit_blocks += 1
                hit_tokens = min(hit_blocks * block_tokens, input_length)
                seen.update(hash_ids)
                requests.append(TraceRequest(
                    arrival=timestamp / 1000.0, input_length=input_length,
                    output_length=output_length, hash_ids=hash_ids, hit_tokens=hit_tokens,
                    miss_tokens=input_length - hit_tokens, hit_blocks=hit_blocks))
    except OSError as exc:
        raise TestbedError(f"{path}: cannot read ({exc.strerror or exc}), expected a readable "
                           "trace file (JSON lines)") from None
    except UnicodeDecodeError as exc:
        raise TestbedError(f"{path}: got bytes that are not UTF-8 ({exc.reason}), expected a "
                           "text file of JSON lines") from None
    return requests


def trace_stats(requests: Iterable[TraceRequest]) -> dict[str, float]:
    """count, duration (s), mean_input, mean_output, block_hit_rate (prefix-hit blocks / all
    blocks) and token_hit_rate (hit tokens / prompt tokens) of replayed requests."""
    requests = list(requests)
    if not requests:
        raise TestbedError("requests: got an empty list, expected at least one request")
    count = len(requests)
    inputs = sum(request.input_length for request in requests)
    blocks = sum(request.blocks for request in requests)
    return {
        "count": count,
        "duration": requests[-1].arrival - requests[0].arrival,
        "mean_input": inputs / count,
        "mean_output": sum(request.output_length for request in requests) / count,
        "blocks": blocks,
        "hit_blocks": sum(request.hit_blocks for request in requests),
        "block_hit_rate": sum(request.hit_blocks for request in requests) / blocks,
        "token_hit_rate": sum(request.hit_tokens for request in requests) / inputs,
    }
