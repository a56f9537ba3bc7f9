"""A group leader's waits between fetches (agents/engine.py): jittered in emulated time, so
that two leaders' relative phase wanders over the whole period at any TDF."""

from __future__ import annotations

import itertools

from agents.engine import FETCH_JITTER, FETCH_SECONDS, fetch_waits


def take(leader: str, n: int) -> list[float]:
    return list(itertools.islice(fetch_waits(leader), n))


def test_waits_average_the_fetch_period_within_the_jitter():
    waits = take("n0g0", 5000)
    assert abs(sum(waits) / len(waits) / FETCH_SECONDS - 1) < 0.02
    assert min(waits) >= FETCH_SECONDS * (1 - FETCH_JITTER)
    assert max(waits) <= FETCH_SECONDS * (1 + FETCH_JITTER)
    assert max(waits) - min(waits) > FETCH_SECONDS * FETCH_JITTER    # it does vary


def test_each_leader_draws_its_own_sequence_and_draws_it_again():
    assert take("n0g0", 20) == take("n0g0", 20)
    assert take("n0g0", 20) != take("n1g0", 20)


def test_two_leaders_phase_covers_the_whole_period():
    """Which prefill group takes a new request is whichever fetches first, so over a few
    hundred fetches the two leaders' relative phase should visit every tenth of the period,
    not stay where the start-up put it."""
    a = list(itertools.accumulate(take("n0g0", 500)))
    b = list(itertools.accumulate(take("n1g0", 500)))
    phases = [((y - x) % FETCH_SECONDS) / FETCH_SECONDS for x, y in zip(a, b)]
    tenths = {int(p * 10) for p in phases}
    assert tenths == set(range(10)), f"the phase stayed in {sorted(tenths)}"
