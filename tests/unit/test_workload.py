"""testbed.workload: synthetic trajectories match the paper's datasets, copies are distinct,
arrivals are Poisson, and bad input fails in one line.

Paper figures come from the project's digest of the DualPath paper ("digest") §9 (Table 2 and the
motivation trace); workloads/datasets.yaml holds them with their sources.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import yaml

from testbed import errors
from testbed.profile import Sourced
from testbed.workload import (COPY_ROUND_GENERATE, COPY_ROUND_TOKENS, DATASETS_FILE,
                              DatasetProfile, Trajectory, Turn, available_datasets,
                              build_trajectory, distinct_copies, generate_trajectories,
                              load_dataset, load_datasets, poisson_arrivals, workload_stats)

REPO = Path(__file__).parents[2]
DATASETS = ["32k", "48k", "64k"]
AGENTS = 2000
SEED = 2026
# Table 2 (digest §9), as printed: MaxLen, turns, append, gen, total, context.
TABLE_2 = {
    "32k": (32 * 1024, 60, 608, 148, 28_639, 17_183),
    "48k": (48 * 1024, 106, 474, 172, 42_607, 25_120),
    "64k": (64 * 1024, 157, 429, 176, 55_958, 32_721),
}
HIT_RATE_64K = 0.987        # digest §1, §9: 1 - 429/32,721


@pytest.fixture(scope="module", params=DATASETS)
def generated(request: pytest.FixtureRequest) -> tuple[str, list[Trajectory]]:
    return request.param, generate_trajectories(request.param, AGENTS, SEED)


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "Traceback" not in message
    assert excinfo.value.__cause__ is None
    return message


# ------------------------------------------------------------------------ shipped datasets

def test_datasets_are_shipped_with_table_2() -> None:
    assert DATASETS_FILE == REPO / "workloads" / "datasets.yaml"
    assert available_datasets() == DATASETS
    for name, (max_len, turns, append, gen, total, context) in TABLE_2.items():
        profile = load_dataset(name)
        assert profile.max_len.value == max_len
        assert profile.trajectories.value == 500
        assert (profile.turns.value, profile.append_per_turn.value,
                profile.generate_per_turn.value) == (turns, append, gen)
        assert (profile.total_tokens.value, profile.context_tokens.value) == (total, context)
    assert load_dataset("64k").hit_rate.value == HIT_RATE_64K
    assert load_dataset("64K") == load_dataset("64k")


def test_every_figure_names_its_source() -> None:
    def figures(model, where=""):
        for name in type(model).model_fields:
            value = getattr(model, name)
            if isinstance(value, Sourced):
                yield where + name, value
            elif hasattr(type(value), "model_fields"):
                yield from figures(value, f"{where}{name}.")

    for name in DATASETS:
        found = dict(figures(load_dataset(name)))
        assert len(found) >= 14, name
        for field, figure in found.items():
            assert len(figure.source.strip()) > 20, f"{name}.{field}"
            assert "digest" in figure.source or figure.source.startswith(("fitted", "estimate")), \
                f"{name}.{field}: {figure.source}"


def test_table_2_as_read_is_consistent() -> None:
    """The reading in datasets.yaml: replayed rounds = total / (append + gen), fewer than the
    drawn ones, and the 64K means give the paper's own 98.7% hit rate."""
    for name in DATASETS:
        profile = load_dataset(name)
        assert profile.replayed_turns < profile.turns.value
        assert profile.turns.value * (profile.append_per_turn.value
                                      + profile.generate_per_turn.value) > profile.max_len.value
    assert load_dataset("64k").implied_hit_rate == pytest.approx(HIT_RATE_64K, abs=0.001)
    assert load_dataset("64k").replayed_turns == pytest.approx(92.5, abs=0.1)


# ------------------------------------------------------------------------------ statistics

def test_statistics_match_the_calibration(generated: tuple[str, list[Trajectory]]) -> None:
    name, trajectories = generated
    stats = workload_stats(trajectories)
    targets = load_dataset(name).targets()
    assert stats["agents"] == AGENTS
    for key in ("turns_uncut", "turns", "total_tokens", "context_tokens", "append_per_turn",
                "generate_per_turn"):
        assert stats[key] == pytest.approx(targets[key], rel=0.05), (name, key, stats[key])
    assert stats["hit_rate"] == pytest.approx(targets["hit_rate"], abs=0.005)


def test_64k_hit_rate_is_the_papers() -> None:
    stats = workload_stats(generate_trajectories("64k", AGENTS, SEED))
    assert abs(stats["hit_rate"] - HIT_RATE_64K) < 0.005
    assert stats["context_tokens"] == pytest.approx(32_721, rel=0.05)
    assert stats["append_per_turn"] == pytest.approx(429, rel=0.05)


def test_no_trajectory_exceeds_max_len(generated: tuple[str, list[Trajectory]]) -> None:
    name, trajectories = generated
    max_len = TABLE_2[name][0]
    assert max(t.total_tokens for t in trajectories) <= max_len
    # The cap binds: most trajectories were cut, and the cut ones end near MaxLen.
    cut = [t for t in trajectories if t.uncut_turns is not None]
    assert len(cut) > AGENTS / 2
    assert all(t.uncut_turns > len(t.turns) for t in cut)
    assert statistics.mean(t.total_tokens for t in cut) > 0.9 * max_len


def test_context_grows_by_each_turns_prompt_and_output(
        generated: tuple[str, list[Trajectory]]) -> None:
    _, trajectories = generated
    for trajectory in trajectories[:200]:
        assert trajectory.turns[0].context == 0
        for before, after in zip(trajectory.turns, trajectory.turns[1:]):
            assert after.context == before.context + before.append + before.generate
        last = trajectory.turns[-1]
        assert trajectory.total_tokens == last.context + last.append + last.generate
        assert all(turn.append >= 1 and turn.generate >= 1 for turn in trajectory.turns)
    # The first round carries the task (digest §9 A.3): far longer than a later append.
    firsts = statistics.mean(t.turns[0].append for t in trajectories)
    laters = statistics.mean(turn.append for t in trajectories for turn in t.turns[1:])
    assert firsts > 5 * laters


def test_trajectory_properties_by_hand() -> None:
    trajectory = Trajectory("t", (Turn(0, 100, 10), Turn(110, 50, 5), Turn(165, 20, 7)))
    assert trajectory.total_tokens == 192
    assert trajectory.hit_rate == pytest.approx((110 + 165) / (110 + 165 + 170))
    assert trajectory.drawn_turns == 3
    stats = workload_stats([trajectory, Trajectory("u", (Turn(0, 40, 2),))])
    assert stats["turns"] == 2 and stats["total_tokens"] == (192 + 42) / 2
    assert stats["context_tokens"] == 275 / 4
    assert stats["append_per_turn"] == 210 / 4 and stats["generate_per_turn"] == 24 / 4
    assert stats["hit_rate"] == pytest.approx(275 / (275 + 210))


def test_build_trajectory_cuts_at_max_len() -> None:
    trajectory = build_trajectory("b", [(100, 10), (50, 5), (60, 6), (1, 1)], max_len=200)
    assert trajectory.turns == (Turn(0, 100, 10), Turn(110, 50, 5))
    assert trajectory.uncut_turns == 4 and trajectory.total_tokens == 165
    assert build_trajectory("b", [(100, 10)], max_len=110).uncut_turns is None


@pytest.mark.parametrize("turns, fragment", [
    ((Turn(0, 10, 1), Turn(5, 1, 1)), "t: turns[1].context: got 5, expected 11"),
    ((Turn(3, 10, 1),), "t: turns[0].context: got 3, expected 0"),
    ((), "t: turns: got (), expected a non-empty tuple of Turn"),
])
def test_a_broken_trajectory_is_refused(turns: tuple, fragment: str) -> None:
    with pytest.raises(errors.TestbedError) as excinfo:
        Trajectory("t", turns)
    assert one_line_error(excinfo).startswith(fragment)


def test_a_negative_turn_is_refused() -> None:
    with pytest.raises(errors.TestbedError) as excinfo:
        Turn(0, -1, 3)
    assert one_line_error(excinfo) == "turn.append: got -1, expected an integer >= 0"


# ----------------------------------------------------------------------------- determinism

def test_generation_is_deterministic_per_seed() -> None:
    first = generate_trajectories("32k", 50, seed=7)
    assert generate_trajectories("32k", 50, seed=7) == first
    assert generate_trajectories("32k", 20, seed=7) == first[:20]
    other = generate_trajectories("32k", 50, seed=8)
    assert [t.turns for t in other] != [t.turns for t in first]
    assert sum(a.turns == b.turns for a, b in zip(first, other)) == 0
    assert len({t.id for t in first + other}) == 100
    assert len({t.turns for t in first}) == 50


def test_datasets_differ() -> None:
    means = [workload_stats(generate_trajectories(name, 300, SEED))["total_tokens"]
             for name in DATASETS]
    assert means == sorted(means) and means[0] < 0.7 * means[2]


# ---------------------------------------------------------------------------------- copies

def test_distinct_copies_share_no_first_round() -> None:
    original = generate_trajectories("64k", 1, SEED)[0]
    copies = distinct_copies(original, 20, seed=3)
    assert len(copies) == 20
    assert len({c.id for c in copies} | {original.id}) == 21
    assert len({c.salt for c in copies}) == 20 and original.salt is None
    low, high = COPY_ROUND_TOKENS
    for copy in copies:
        first = copy.turns[0]
        assert first.context == 0 and low <= first.append <= high
        assert first.generate == COPY_ROUND_GENERATE
        assert first != original.turns[0]
        # The original follows, every context shifted by the new round.
        shift = first.append + first.generate
        assert [(t.append, t.generate) for t in copy.turns[1:]] == \
            [(t.append, t.generate) for t in original.turns]
        assert [t.context - shift for t in copy.turns[1:]] == [t.context for t in original.turns]
        assert copy.drawn_turns == original.drawn_turns + 1
    assert distinct_copies(original, 20, seed=3) == copies
    assert {c.salt for c in distinct_copies(original, 20, seed=4)}.isdisjoint(
        {c.salt for c in copies})
    assert distinct_copies(original, 0, seed=3) == []


def test_distinct_copies_stay_within_max_len() -> None:
    full = Trajectory("full", (Turn(0, 60_000, 100), Turn(60_100, 5_000, 436)))
    assert full.total_tokens == 65_536
    for copy in distinct_copies(full, 5, seed=1, max_len=65_536):
        assert copy.total_tokens <= 65_536
        assert len(copy.turns) == 2 and copy.uncut_turns == 3


def test_more_agents_than_unique_trajectories_are_distinct_copies() -> None:
    trajectories = generate_trajectories("64k", 1200, SEED, unique=500)
    assert len(trajectories) == 1200
    assert trajectories[:500] == generate_trajectories("64k", 500, SEED)
    assert len({t.id for t in trajectories}) == 1200
    copies = trajectories[500:]
    assert all(c.salt is not None and c.turns[0].generate == 1 for c in copies)
    assert len({c.salt for c in copies}) == 700
    assert max(t.total_tokens for t in trajectories) <= 65_536
    stats = workload_stats(trajectories)
    assert stats["total_tokens"] == pytest.approx(55_958, rel=0.05)
    assert abs(stats["hit_rate"] - HIT_RATE_64K) < 0.005


# -------------------------------------------------------------------------------- arrivals

def test_poisson_arrivals_have_mean_gap_one_over_aps() -> None:
    for aps in (0.1, 0.45, 8.8):
        arrivals = poisson_arrivals(aps, 10_000, seed=11)
        assert len(arrivals) == 10_000 and arrivals == sorted(arrivals) and arrivals[0] > 0
        gaps = [b - a for a, b in zip([0.0] + arrivals, arrivals)]
        assert statistics.mean(gaps) == pytest.approx(1 / aps, rel=0.05)
        # Exponential gaps: standard deviation equals the mean.
        assert statistics.stdev(gaps) == pytest.approx(1 / aps, rel=0.1)
    assert poisson_arrivals(0.5, 100, seed=1) == poisson_arrivals(0.5, 100, seed=1)
    assert poisson_arrivals(0.5, 100, seed=1) != poisson_arrivals(0.5, 100, seed=2)
    assert poisson_arrivals(0.5, 0, seed=1) == []


@pytest.mark.parametrize("aps", [0, -1.0, float("nan"), float("inf"), "1", True])
def test_a_bad_rate_is_refused(aps) -> None:
    with pytest.raises(errors.TestbedError) as excinfo:
        poisson_arrivals(aps, 10, seed=1)
    assert one_line_error(excinfo).startswith(f"aps: got {aps!r}, expected a rate > 0")


# ------------------------------------------------------------------------------ bad inputs

def test_an_unknown_dataset_lists_the_available_ones() -> None:
    with pytest.raises(errors.TestbedError) as excinfo:
        generate_trajectories("128k", 10, SEED)
    message = one_line_error(excinfo)
    assert message.startswith("dataset: got '128k', expected one of: 32k, 48k, 64k")


@pytest.mark.parametrize("call, fragment", [
    (lambda: generate_trajectories("32k", -1, 1), "agents: got -1, expected an integer >= 0"),
    (lambda: generate_trajectories("32k", 5, "x"), "seed: got 'x', expected an integer"),
    (lambda: generate_trajectories("32k", 5, 1, unique=0), "unique: got 0, expected an integer"),
    (lambda: distinct_copies(Trajectory("t", (Turn(0, 1, 1),)), -2, 1), "copies: got -2"),
    (lambda: workload_stats([]), "trajectories: got an empty list"),
])
def test_bad_arguments_are_refused(call, fragment: str) -> None:
    with pytest.raises(errors.TestbedError) as excinfo:
        call()
    assert one_line_error(excinfo).startswith(fragment)


def _write_datasets(tmp_path: Path, change) -> Path:
    data = yaml.safe_load(DATASETS_FILE.read_text())
    change(data["datasets"]["64k"])
    path = tmp_path / "datasets.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, fragment", [
    (lambda d: d.pop("context_tokens"),
     "datasets.64k.context_tokens: missing, expected this field to be set"),
    (lambda d: d.update(totl_tokens={"value": 1, "source": "x"}),
     "datasets.64k.totl_tokens: got {'source': 'x', 'value': 1}, expected no such field "
     "(did you mean 'total_tokens'?)"),
    (lambda d: d.update(total_tokens={"value": 70_000, "source": "x"}),
     "datasets.64k.total_tokens.value: got 70000, expected at most max_len (65536)"),
    (lambda d: d["turns"].update(value=-3),
     "datasets.64k.turns.value: got -3, expected greater than 0"),
    (lambda d: d["generator"].update(append_mean=400),
     "datasets.64k.generator.append_mean: got 400, expected a mapping {value: ..., source:"),
])
def test_a_bad_datasets_file_fails_in_one_line(tmp_path: Path, change, fragment: str) -> None:
    path = _write_datasets(tmp_path, change)
    with pytest.raises(errors.TestbedError) as excinfo:
        load_datasets(path)
    assert one_line_error(excinfo).startswith(f"{path}: {fragment}")


def test_the_shipped_file_validates_as_a_whole() -> None:
    datasets = load_datasets()
    assert sorted(datasets) == DATASETS
    assert all(isinstance(profile, DatasetProfile) for profile in datasets.values())
