"""The paper's scheduling rules (§5) on hand-built engine states."""

from __future__ import annotations

from collections import Counter, deque

from agents.scheduling import (EngineState, Request, alpha_tokens, beta_tokens,
                               choose_read_path, de_group_schedule, de_schedule, pe_schedule,
                               prefill_batch)


def req(i: int, context: int, append: int = 0, generate: int = 0) -> Request:
    return Request(i, context, append, generate)


def names(assigned) -> list[tuple[int, str]]:
    return [(r.id, e.name) for r, e in assigned]


# -- PE scheduling ------------------------------------------------------------------------

def test_short_read_queue_nodes_come_first_even_with_more_tokens():
    e_short = EngineState("a0", "A", tok=50)
    e_long = EngineState("b0", "B", tok=0)
    waiting = deque([req(1, 10)])
    assigned = pe_schedule(waiting, [e_long, e_short], {"A": 100, "B": 101}, alpha=100, beta=1000)
    assert names(assigned) == [(1, "a0")]
    assert e_short.tok == 60 and e_short.seq == 1 and not waiting


def test_fewest_tokens_within_a_category():
    engines = [EngineState("a0", "A", tok=30), EngineState("a1", "A", tok=20),
               EngineState("a2", "A", tok=40)]
    assigned = pe_schedule(deque([req(1, 5), req(2, 5), req(3, 5)]), engines, {"A": 0},
                           alpha=10, beta=1000)
    # a1 (20) -> 25, then a1 (25) again, then a0 (30) vs a1 (30): the first at the minimum
    assert names(assigned) == [(1, "a1"), (2, "a1"), (3, "a0")]


def test_categories_are_recomputed_after_every_assignment():
    """An engine that crosses beta stops receiving work within the same fetch."""
    e_short = EngineState("a0", "A")
    e_long = EngineState("b0", "B")
    waiting = deque([req(i, 60) for i in range(3)])
    assigned = pe_schedule(waiting, [e_short, e_long], {"A": 0, "B": 500}, alpha=100, beta=100)
    # a0: 0 -> 60 -> 120 (> beta after the second), so the third goes to the long queue
    assert names(assigned) == [(0, "a0"), (1, "a0"), (2, "b0")]


def test_all_engines_over_beta_stops_the_fetch():
    engines = [EngineState("a0", "A", tok=101), EngineState("b0", "B", tok=150)]
    waiting = deque([req(1, 10), req(2, 10)])
    assert pe_schedule(waiting, engines, {"A": 0, "B": 0}, alpha=10, beta=100) == []
    assert len(waiting) == 2      # nothing lost: they wait for the next fetch


def test_long_queue_engines_are_used_when_no_short_one_is_left():
    engines = [EngineState("a0", "A", tok=10), EngineState("b0", "B", tok=5)]
    assigned = pe_schedule(deque([req(1, 1)]), engines, {"A": 200, "B": 300}, alpha=100, beta=50)
    assert names(assigned) == [(1, "b0")]


# -- DE scheduling ------------------------------------------------------------------------

def test_group_choice_drains_the_global_queue_by_fewest_tokens():
    groups = {"g0": [EngineState("x", "n0", tok=100)], "g1": [EngineState("y", "n1", tok=30)]}
    private = {"g0": deque(), "g1": deque()}
    queue = deque([req(1, 50), req(2, 50), req(3, 10)])
    de_group_schedule(queue, groups, private)
    # g1: 30 -> 80 -> (g0 100 vs g1 80) 130; then g0 100 < 130
    assert [r.id for r in private["g1"]] == [1, 2]
    assert [r.id for r in private["g0"]] == [3]
    assert not queue


def test_z_rule_low_engines_by_fewest_requests():
    group = [EngineState("d0", "n", seq=5, tok=100, free_hbm=10_000),
             EngineState("d1", "n", seq=1, tok=200, free_hbm=10_000),
             EngineState("d2", "n", seq=1, tok=400, free_hbm=10_000)]
    private = deque([req(1, 50)])
    # Z = 1.05 * (50 + 700) / 3 = 262.5: d0 (150) and d1 (250) are low, d2 (450) high
    assigned = de_schedule(private, group)
    assert names(assigned) == [(1, "d1")]          # fewest requests among the low ones
    assert group[1].tok == 250 and group[1].seq == 2 and group[1].free_hbm == 9_950


def test_z_rule_high_engines_by_fewest_tokens():
    group = [EngineState("d0", "n", seq=0, tok=300, free_hbm=10_000),
             EngineState("d1", "n", seq=9, tok=290, free_hbm=10_000)]
    private = deque([req(1, 200)])
    # Z = 1.05 * (200 + 590) / 2 = 414.75: both would exceed it -> fewest tokens, d1
    assert names(de_schedule(private, group)) == [(1, "d1")]


def test_hbm_filter_excludes_engines_and_stops_when_none_fits():
    group = [EngineState("d0", "n", tok=0, free_hbm=100),
             EngineState("d1", "n", tok=500, free_hbm=1_000)]
    private = deque([req(1, 300, 0, 100), req(2, 900)])
    assigned = de_schedule(private, group)
    # r1 needs 400: only d1 has room. r2 needs 900: d1 has 600 left, d0 100 -> stop.
    assert names(assigned) == [(1, "d1")]
    assert [r.id for r in private] == [2]


def test_placements_are_counted_by_the_category_they_came_from():
    """What the scheduler exports as dualpath_scheduler_categories_total."""
    counts = Counter()
    engines = [EngineState("a0", "A"), EngineState("b0", "B")]
    waiting = deque([req(i, 60) for i in range(4)])
    pe_schedule(waiting, engines, {"A": 0, "B": 500}, alpha=100, beta=100, categories=counts)
    # a0 (short queue) twice, then b0 (long) twice, then every engine is over beta
    assert counts == Counter(pe_short=2, pe_long=2)
    pe_schedule(deque([req(9, 1)]), engines, {"A": 0, "B": 500}, 100, 100, categories=counts)
    assert counts["pe_over_beta"] == 1

    group = [EngineState("d0", "n", tok=0, free_hbm=1_000),
             EngineState("d1", "n", tok=0, free_hbm=100)]
    de_schedule(deque([req(1, 100), req(2, 700), req(3, 500)]), group, categories=counts)
    # Z = 1.05 * 800 / 2 = 420: r1 low (d0, fewest requests), r2 high (only d0 has the
    # HBM), r3 finds no engine with 500 tokens of HBM left: the fetch stops
    assert (counts["de_low"], counts["de_high"], counts["de_no_hbm"]) == (1, 1, 1)


# -- read path ----------------------------------------------------------------------------

def test_read_path_goes_to_the_shorter_read_queue():
    pe, de = EngineState("p", "P"), EngineState("d", "D")
    assert choose_read_path(pe, de, {"P": 900, "D": 100}) == "de"
    assert choose_read_path(pe, de, {"P": 100, "D": 900}) == "pe"
    assert choose_read_path(pe, de, {"P": 100, "D": 100}) == "pe"


def test_a_tie_goes_to_the_node_that_has_read_less():
    """1P2D's prefill node is compared with each decode node: if it took every tie, it would
    read most whenever the queues run empty."""
    pe, de = EngineState("p", "P"), EngineState("d", "D")
    empty = {"P": 0, "D": 0}
    assert choose_read_path(pe, de, empty, {"P": 5000, "D": 2000}) == "de"
    assert choose_read_path(pe, de, empty, {"P": 2000, "D": 5000}) == "pe"
    assert choose_read_path(pe, de, empty, {"P": 2000, "D": 2000}) == "pe"
    # Only a tie: a shorter queue wins whatever was read before.
    assert choose_read_path(pe, de, {"P": 0, "D": 10}, {"P": 5000, "D": 0}) == "pe"


# -- intra-engine batching ----------------------------------------------------------------

def linear_attention(batch) -> float:
    """A stand-in cost model: one second per million (attended, new) token pairs."""
    return sum((cached + new) * new for _, cached, new in batch) / 1e6


def test_batch_takes_whole_requests_then_a_binary_searched_chunk():
    a, b = req(1, 0, 300), req(2, 0, 1000)
    queue = deque([(a, 0, 300), (b, 0, 1000)])
    batch = prefill_batch(queue, linear_attention, quota=0.3)
    # a alone: 300 * 300 / 1e6 = 0.09 s. b: largest n with 0.09 + n*n/1e6 <= 0.3 is 458.
    assert batch[0] == (a, 0, 300)
    assert batch[1] == (b, 0, 458)
    assert linear_attention(batch) <= 0.3
    assert linear_attention(batch[:1] + [(b, 0, 459)]) > 0.3
    assert list(queue) == [(b, 458, 542)]      # the rest waits, its chunk now cached


def test_next_batch_continues_the_chunked_request():
    b = req(2, 0, 1000)
    queue = deque([(b, 458, 542)])
    batch = prefill_batch(queue, linear_attention, quota=0.3)
    assert batch and batch[0][0] is b and batch[0][1] == 458
    assert linear_attention(batch) <= 0.3


def test_a_request_too_big_for_the_quota_alone_still_runs():
    huge = req(1, 10**6, 10)
    queue = deque([(huge, 10**6, 10)])
    assert prefill_batch(queue, linear_attention, quota=0.3) == [(huge, 10**6, 10)]
    assert not queue


# -- thresholds ---------------------------------------------------------------------------

def test_alpha_and_beta_from_rates():
    # 50 GB/s SNIC, 40,016 B/token (DS 660B): about 1.25 M tokens/s, alpha = 3 s of it.
    assert alpha_tokens(50e9, 40_016) == int(3 * 50e9 / 40_016)
    assert 3.7e6 < alpha_tokens(50e9, 40_016) < 3.8e6
    assert beta_tokens(1e-4) == 50_000


def test_a_split_read_cuts_the_hit_blocks_at_the_share():
    from agents.scheduling import pe_blocks
    hit = [(1, 512), (2, 512), (3, 512), (4, 100)]
    assert pe_blocks(hit, 0.0) == 0 and pe_blocks(hit, 1.0) == 4
    assert pe_blocks(hit, 0.5) == 2        # 1,024 of 1,636 tokens: nearest to half
    assert pe_blocks(hit, 0.2) == 1
