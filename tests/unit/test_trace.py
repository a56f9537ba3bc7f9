"""testbed.trace: Mooncake-format traces load, prefix-cache hits are counted right, and a bad
line fails in one line naming the file, line, field, value and what was expected.

The shipped excerpt (tests/data/mooncake_excerpt.jsonl) is the first 200 lines of the Mooncake
synthetic trace; traces/README.md gives the full trace's figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from testbed import errors
from testbed.trace import BLOCK_TOKENS, TraceRequest, load_trace, trace_stats

EXCERPT = Path(__file__).parents[1] / "data" / "mooncake_excerpt.jsonl"
FULL_TRACE = Path(__file__).parents[2] / "traces" / "mooncake_synthetic_trace.jsonl"


def write_trace(tmp_path: Path, *rows: dict | str) -> Path:
    """A trace file of `rows` (dicts as JSON, strings verbatim), one a line."""
    path = tmp_path / "trace.jsonl"
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n"
                            for row in rows))
    return path


def row(timestamp: float, input_length: int, hash_ids: list, output_length: int = 10) -> dict:
    return {"timestamp": timestamp, "input_length": input_length,
            "output_length": output_length, "hash_ids": hash_ids}


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert excinfo.value.__cause__ is None
    return message


# --------------------------------------------------------------------------------- excerpt

def test_the_excerpt_loads() -> None:
    requests = load_trace(EXCERPT)
    assert len(requests) == 200
    first = requests[0]
    assert isinstance(first, TraceRequest)
    assert (first.arrival, first.input_length, first.output_length) == (0.0, 40160, 6)
    assert first.hash_ids == tuple(range(79))
    assert (first.hit_tokens, first.miss_tokens) == (0, 40160)
    assert requests[2].arrival == pytest.approx(0.040)        # timestamp 40 ms
    assert requests[3].arrival == pytest.approx(0.277)
    for request in requests:
        assert len(request.hash_ids) == math.ceil(request.input_length / BLOCK_TOKENS)
        assert request.hit_tokens + request.miss_tokens == request.input_length
        assert 0 <= request.hit_blocks <= len(request.hash_ids)
    assert [r.arrival for r in requests] == sorted(r.arrival for r in requests)
    assert any(request.hit_tokens > 0 for request in requests)


def test_the_excerpt_is_the_head_of_the_shared_trace_with_attribution() -> None:
    readme = (EXCERPT.parent / "README.md").read_text()
    assert "Mooncake trace, kvcache-ai/Mooncake, Apache License 2.0" in readme
    assert len(EXCERPT.read_text().splitlines()) == 200
    if FULL_TRACE.is_file():
        assert FULL_TRACE.read_text().splitlines()[:200] == EXCERPT.read_text().splitlines()


def test_limit_takes_the_first_requests() -> None:
    assert load_trace(EXCERPT, limit=7) == load_trace(EXCERPT)[:7]
    assert load_trace(EXCERPT, limit=0) == []


# ------------------------------------------------------------------------ hit accounting

def test_a_repeated_prefix_hits(tmp_path: Path) -> None:
    path = write_trace(tmp_path,
                       row(0, 1024, [1, 2]),
                       row(5, 1536, [1, 2, 3]),
                       row(9, 1536, [1, 2, 3]))
    first, second, third = load_trace(path)
    assert (first.hit_blocks, first.hit_tokens, first.miss_tokens) == (0, 0, 1024)
    assert (second.hit_blocks, second.hit_tokens, second.miss_tokens) == (2, 1024, 512)
    assert (third.hit_blocks, third.hit_tokens, third.miss_tokens) == (3, 1536, 0)


def test_a_diverging_suffix_stops_the_prefix(tmp_path: Path) -> None:
    """Block 3 was seen, but after the unseen block 4 it is not a prefix hit."""
    path = write_trace(tmp_path,
                       row(0, 1536, [1, 2, 3]),
                       row(1, 1500, [1, 4, 3]),
                       row(2, 1536, [5, 2, 3]),
                       row(3, 2048, [1, 4, 3, 6]))
    requests = load_trace(path)
    assert [(r.hit_blocks, r.hit_tokens, r.miss_tokens) for r in requests] == [
        (0, 0, 1536),
        (1, 512, 988),          # 1 hits; 4 is new, so 3 (seen) is a miss
        (0, 0, 1536),           # the first block is new: nothing hits
        (3, 1536, 512),         # 1, 4, 3 were all cached by now
    ]


def test_a_partial_last_block_counts_its_own_tokens(tmp_path: Path) -> None:
    path = write_trace(tmp_path,
                       row(0, 700, [1, 9]),       # 512 + 188 tokens
                       row(0, 700, [1, 9]),       # equal timestamps are allowed
                       row(1, 600, [1, 10]),      # 512 hit + 88 new
                       row(2, 1, [11]))           # a one-token prompt: one partial block
    requests = load_trace(path)
    assert [(r.hit_tokens, r.miss_tokens) for r in requests] == [
        (0, 700), (700, 0), (512, 88), (0, 1)]
    assert requests[0].arrival == requests[1].arrival == 0.0


def test_trace_stats_by_hand(tmp_path: Path) -> None:
    path = write_trace(tmp_path,
                       row(0, 1024, [1, 2], output_length=4),
                       row(500, 1200, [1, 2, 3], output_length=8),
                       row(2500, 512, [7], output_length=0))
    stats = trace_stats(load_trace(path))
    assert stats["count"] == 3 and stats["duration"] == pytest.approx(2.5)
    assert stats["mean_input"] == pytest.approx((1024 + 1200 + 512) / 3)
    assert stats["mean_output"] == pytest.approx(4)
    assert (stats["blocks"], stats["hit_blocks"]) == (6, 2)
    assert stats["block_hit_rate"] == pytest.approx(2 / 6)
    assert stats["token_hit_rate"] == pytest.approx(1024 / 2736)


def test_the_excerpts_stats_are_consistent() -> None:
    requests = load_trace(EXCERPT)
    stats = trace_stats(requests)
    assert stats["count"] == 200
    assert stats["blocks"] == sum(len(r.hash_ids) for r in requests)
    assert 0 < stats["block_hit_rate"] < 1 and 0 < stats["token_hit_rate"] < 1


@pytest.mark.skipif(not FULL_TRACE.is_file(),
                    reason=f"{FULL_TRACE} is absent: the repository ships it")
def test_the_full_trace_matches_its_readme() -> None:
    """README: 3,993 requests, about 64% of the 121,877 blocks are prefix hits, average input
    15,325 tokens, average output 149."""
    stats = trace_stats(load_trace(FULL_TRACE))
    assert stats["count"] == 3993
    assert stats["blocks"] == 121_877
    assert stats["block_hit_rate"] == pytest.approx(0.64, abs=0.01)
    assert stats["mean_input"] == pytest.approx(15_325, abs=1)
    assert stats["mean_output"] == pytest.approx(149, abs=1)


# ------------------------------------------------------------------------- malformed lines

GOOD = row(0, 1024, [1, 2])


@pytest.mark.parametrize("bad, fragment", [
    ('{"timestamp": 0, "input_length": 1024,',
     "(line): got '{\"timestamp\": 0, \"input_length\": 1024,', expected a JSON object (not JSON"),
    ("[0, 1024, 10, [1, 2]]", "(line): got list [0, 1024, 10, [1, 2]], expected a JSON object"),
    ({k: v for k, v in GOOD.items() if k != "hash_ids"},
     "hash_ids: missing, expected this field to be set"),
    ({**GOOD, "output_length": -5}, "output_length: got -5, expected an output length in tokens"),
    ({**GOOD, "input_length": -1024}, "input_length: got -1024, expected a prompt length"),
    ({**GOOD, "input_length": 1025},
     "hash_ids: got 2 ids, expected 3 = ceil(input_length 1025 / 512)"),
    ({**GOOD, "hash_ids": [1, 2, 3]},
     "hash_ids: got 3 ids, expected 2 = ceil(input_length 1024 / 512)"),
    ({**GOOD, "hash_ids": [1, "2"]}, "hash_ids: got [1, '2'], expected a list of block ids"),
    ({**GOOD, "timestamp": "0"}, "timestamp: got '0', expected milliseconds >= 0"),
    ({**GOOD, "timestamp": -3}, "timestamp: got -3, expected milliseconds >= 0"),
    ({**GOOD, "input_length": 1024.0}, "input_length: got 1024.0, expected a prompt length"),
    ({**GOOD, "output_length": True}, "output_length: got True, expected an output length"),
    ({**GOOD, "session": 4}, "session: got 4, expected no such field"),
])
def test_a_malformed_line_fails_in_one_line(tmp_path: Path, bad: dict | str,
                                            fragment: str) -> None:
    path = write_trace(tmp_path, GOOD, "", bad, GOOD)    # line 3, after a blank line
    with pytest.raises(errors.TestbedError) as excinfo:
        load_trace(path)
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}:3: {fragment}"), message


def test_a_decreasing_timestamp_fails(tmp_path: Path) -> None:
    path = write_trace(tmp_path, row(100, 512, [1]), row(100, 512, [1]), row(99, 512, [1]))
    with pytest.raises(errors.TestbedError) as excinfo:
        load_trace(path)
    assert one_line_error(excinfo) == (
        f"{path}:3: timestamp: got 99, expected >= 100, the previous request's (timestamps "
        "must not decrease)")


def test_a_bad_line_after_the_limit_is_not_read(tmp_path: Path) -> None:
    path = write_trace(tmp_path, GOOD, "not json")
    assert len(load_trace(path, limit=1)) == 1
    with pytest.raises(errors.TestbedError):
        load_trace(path)


@pytest.mark.parametrize("call, fragment", [
    (lambda tmp: load_trace(tmp / "absent.jsonl"), "absent.jsonl: cannot read ("),
    (lambda tmp: load_trace(EXCERPT, limit=-1), "limit: got -1, expected None or an integer"),
    (lambda tmp: trace_stats([]), "requests: got an empty list"),
])
def test_bad_arguments_fail_in_one_line(tmp_path: Path, call, fragment: str) -> None:
    with pytest.raises(errors.TestbedError) as excinfo:
        call(tmp_path)
    assert fragment in one_line_error(excinfo)
