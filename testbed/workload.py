"""Agent workloads: synthetic trajectories shaped like the paper's datasets, and arrival times.

A trajectory is one agent run: a sequence of turns (rounds). Turn i's prompt is everything
before it (its *context*, whose KV is already in storage: hit tokens) plus newly *appended*
tokens (mostly tool output: miss tokens); the model then *generates* a few tokens, the next
tool call. The whole prompt and output of a turn are cached, so turn i+1's context is turn i's
context + append + generate, and the first turn's context is 0: hits come only from earlier
turns of the same trajectory (digest §3.3, §9 A.3-A.4).

The paper's datasets (Table 2: MaxLen 32K, 48K, 64K) are described in workloads/datasets.yaml,
every figure with its source; see its header for how Table 2's means are read. The generator
draws a raw round count and per-round sizes from lognormal distributions whose means are
those figures (or fitted to them), and cuts each trajectory at MaxLen, as the paper does
(digest §8.4). Randomness comes from `random.Random` with explicit seeds: a trajectory depends
only on (dataset, seed, index), so a longer list starts with the shorter one.

"digest" = the project's digest of the DualPath paper (arXiv 2602.21548), by its sections.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Iterable

from pydantic import Field, StringConstraints, ValidationError, model_validator

from testbed.errors import TestbedError
from testbed.profile import PositiveCount, PositiveNumber, Sourced
from testbed.topology import Spec, _describe_error, _show, read_yaml, validation_message

WORKLOADS_DIR = Path(__file__).parents[1] / "workloads"
DATASETS_FILE = WORKLOADS_DIR / "datasets.yaml"

# A copy's prepended round of random tokens (digest §9 A.3: "A_1 with g_1 = 1"). The paper
# does not give its length; a few dozen tokens make the copy distinct without moving the
# dataset's statistics [I].
COPY_ROUND_TOKENS = (16, 64)
COPY_ROUND_GENERATE = 1


# ----------------------------------------------------------------------------- trajectories

def _count(where: str, value: Any, least: int = 0) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise TestbedError(f"{where}: got {_show(value)}, expected an integer >= {least}")


@dataclass(frozen=True)
class Turn:
    """One round: `context` cached tokens (hits), `append` new prompt tokens (misses),
    `generate` output tokens."""
    context: int
    append: int
    generate: int

    def __post_init__(self) -> None:
        for name in ("context", "append", "generate"):
            _count(f"turn.{name}", getattr(self, name))

    @property
    def prompt(self) -> int:
        """Prompt tokens of this turn: context + append."""
        return self.context + self.append

    @property
    def end(self) -> int:
        """Tokens in the trajectory once this turn is done: the next turn's context."""
        return self.context + self.append + self.generate


@dataclass(frozen=True)
class Trajectory:
    """One agent's turns. Turn 0 has context 0 and turn i+1's context is turn i's `end`.

    `uncut_turns` is the number of rounds drawn before the trajectory was cut at MaxLen (None:
    never cut, i.e. len(turns)). `salt` stands for the random tokens of a first round that
    distinct_copies prepended (None for an original): KV keys derived from it (or from the
    unique `id`) are shared with no other trajectory.
    """
    id: str
    turns: tuple[Turn, ...]
    uncut_turns: int | None = None
    salt: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.id, str) or not self.id:
            raise TestbedError(f"trajectory.id: got {_show(self.id)}, expected a non-empty string")
        if not isinstance(self.turns, tuple) or not self.turns:
            raise TestbedError(f"{self.id}: turns: got {_show(self.turns)}, expected a "
                               "non-empty tuple of Turn")
        expected = 0
        for index, turn in enumerate(self.turns):
            if not isinstance(turn, Turn):
                raise TestbedError(f"{self.id}: turns[{index}]: got {_show(turn)}, expected a Turn")
            if turn.context != expected:
                raise TestbedError(
                    f"{self.id}: turns[{index}].context: got {turn.context}, expected {expected} "
                    "(the previous turn's context + append + generate; the first turn's is 0)")
            expected = turn.end
        if self.uncut_turns is not None:
            _count(f"{self.id}: uncut_turns", self.uncut_turns, least=len(self.turns))

    @property
    def total_tokens(self) -> int:
        """The agent's length: the last turn's context + append + generate."""
        return self.turns[-1].end

    @property
    def context_tokens(self) -> int:
        """Sum over turns of the cached (hit) tokens."""
        return sum(turn.context for turn in self.turns)

    @property
    def append_tokens(self) -> int:
        """Sum over turns of the appended (miss) tokens."""
        return sum(turn.append for turn in self.turns)

    @property
    def generate_tokens(self) -> int:
        return sum(turn.generate for turn in self.turns)

    @property
    def hit_rate(self) -> float:
        """Hit tokens over prompt tokens, summed over turns."""
        prompts = self.context_tokens + self.append_tokens
        return self.context_tokens / prompts if prompts else 0.0

    @property
    def drawn_turns(self) -> int:
        """Rounds before the cut at MaxLen (len(turns) if never cut)."""
        return self.uncut_turns if self.uncut_turns is not None else len(self.turns)


def build_trajectory(id: str, rounds: Iterable[tuple[int, int]], max_len: int | None = None,
                     ) -> Trajectory:
    """A trajectory from its rounds' (append, generate), cut before the first round that would
    take it past `max_len` (digest §8.4: "the trajectory is then cut at MAL")."""
    rounds = list(rounds)
    turns: list[Turn] = []
    context = 0
    for append, generate in rounds:
        if max_len is not None and context + append + generate > max_len:
            break
        turns.append(Turn(context, append, generate))
        context += append + generate
    if not turns:
        raise TestbedError(f"{id}: turns: got no round within max_len {max_len}, expected at "
                           "least one")
    return Trajectory(id, tuple(turns),
                      uncut_turns=len(rounds) if len(turns) < len(rounds) else None)


# --------------------------------------------------------------------------------- datasets

class GeneratorShape(Spec):
    """Distributions the generator draws from (all lognormal, given by mean and sigma)."""
    turns_sigma: Sourced[PositiveNumber]
    first_append_mean: Sourced[PositiveNumber]
    first_append_sigma: Sourced[PositiveNumber]
    append_mean: Sourced[PositiveNumber]
    append_sigma: Sourced[PositiveNumber]
    generate_mean: Sourced[PositiveNumber]
    generate_sigma: Sourced[PositiveNumber]


class DatasetProfile(Spec):
    """One of the paper's datasets (Table 2), with the generator's fitted shape."""
    max_len: Sourced[PositiveCount] = Field(description="MaxLen: cap on a trajectory's tokens")
    trajectories: Sourced[PositiveCount] = Field(description="distinct trajectories in the set")
    turns: Sourced[PositiveNumber] = Field(description="mean rounds per trajectory, before the cut")
    append_per_turn: Sourced[PositiveNumber] = Field(description="turn-weighted mean append")
    generate_per_turn: Sourced[PositiveNumber] = Field(description="turn-weighted mean generation")
    total_tokens: Sourced[PositiveNumber] = Field(description="mean tokens per trajectory")
    context_tokens: Sourced[PositiveNumber] = Field(description="turn-weighted mean context")
    hit_rate: Sourced[PositiveNumber] | None = Field(
        default=None, description="stated hit rate (64K only); else context / (context + append)")
    generator: GeneratorShape

    @model_validator(mode="after")
    def consistent(self) -> "DatasetProfile":
        if self.total_tokens.value > self.max_len.value:
            raise ValueError(f"total_tokens.value: got {self.total_tokens.value:g}, expected at "
                             f"most max_len ({self.max_len.value})")
        if self.context_tokens.value >= self.total_tokens.value:
            raise ValueError(f"context_tokens.value: got {self.context_tokens.value:g}, expected "
                             f"less than total_tokens ({self.total_tokens.value:g})")
        if self.hit_rate is not None and not 0 < self.hit_rate.value < 1:
            raise ValueError(f"hit_rate.value: got {self.hit_rate.value:g}, expected a fraction "
                             "between 0 and 1")
        return self

    @property
    def replayed_turns(self) -> float:
        """Mean rounds a trajectory keeps after the cut [I]: every token of a trajectory is some
        round's append or generation, so this is total / (append + generate) per turn."""
        return self.total_tokens.value / (self.append_per_turn.value
                                          + self.generate_per_turn.value)

    @property
    def implied_hit_rate(self) -> float:
        """context / (context + append): the hit rate the turn-weighted means imply."""
        return self.context_tokens.value / (self.context_tokens.value
                                            + self.append_per_turn.value)

    def targets(self) -> dict[str, float]:
        """The means a generated set should reproduce, keyed as in workload_stats."""
        return {
            "turns_uncut": self.turns.value,
            "turns": self.replayed_turns,
            "total_tokens": self.total_tokens.value,
            "context_tokens": self.context_tokens.value,
            "append_per_turn": self.append_per_turn.value,
            "generate_per_turn": self.generate_per_turn.value,
            "hit_rate": (self.hit_rate.value if self.hit_rate is not None
                         else self.implied_hit_rate),
        }


DatasetName = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")]


class DatasetFile(Spec):
    datasets: dict[DatasetName, DatasetProfile]


def _describe_dataset_error(error: dict[str, Any]) -> str:
    """As topology._describe_error, with 'did you mean' looking inside a dataset's fields."""
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden" and len(loc) > 2 and loc[0] == "datasets":
        inner = _describe_error({**error, "loc": loc[2:]}, DatasetProfile)
        return f"datasets.{loc[1]}.{inner}"
    return _describe_error(error, DatasetFile)


def load_datasets(path: str | Path = DATASETS_FILE) -> dict[str, DatasetProfile]:
    """Read and validate a datasets file (workloads/datasets.yaml unless told)."""
    path = Path(path)
    data = read_yaml(path, "datasets")
    if not isinstance(data, dict):
        raise TestbedError(f"{path}: (top level): got {_show(data)}, expected a mapping with "
                           "datasets: {name: {max_len: ..., turns: ..., ...}}")
    try:
        return dict(DatasetFile.model_validate(data).datasets)
    except ValidationError as exc:
        message = validation_message(exc, DatasetFile, describe=_describe_dataset_error)
        raise TestbedError(f"{path}: {message}") from None


_CACHE: dict[Path, dict[str, DatasetProfile]] = {}


def available_datasets() -> list[str]:
    """Names of the datasets in workloads/datasets.yaml ("32k", "48k", "64k")."""
    return sorted(_shipped(), key=lambda name: (len(name), name))


def _shipped() -> dict[str, DatasetProfile]:
    if DATASETS_FILE not in _CACHE:
        _CACHE[DATASETS_FILE] = load_datasets(DATASETS_FILE)
    return _CACHE[DATASETS_FILE]


def load_dataset(name: str) -> DatasetProfile:
    """One shipped dataset by name ("64k"; case does not matter)."""
    datasets = _shipped()
    key = name.lower() if isinstance(name, str) else name
    if key not in datasets:
        raise TestbedError(f"dataset: got {_show(name)}, expected one of: "
                           f"{', '.join(available_datasets())} (from {DATASETS_FILE})")
    return datasets[key]


# -------------------------------------------------------------------------------- generator

def _lognormal(rng: random.Random, mean: float, sigma: float) -> float:
    """A lognormal draw with the given mean (not median): mu = ln(mean) - sigma^2 / 2."""
    return rng.lognormvariate(math.log(mean) - sigma * sigma / 2, sigma)


def _tokens(rng: random.Random, mean: float, sigma: float, most: int) -> int:
    return min(most, max(1, round(_lognormal(rng, mean, sigma))))


def draw_trajectory(profile: DatasetProfile, id: str, rng: random.Random) -> Trajectory:
    """One synthetic trajectory of `profile`: a raw round count, a long first round, then
    heavy-tailed appends and short generations, cut at MaxLen (rounds after the cut are not
    drawn)."""
    shape = profile.generator
    max_len = profile.max_len.value
    # No single round is too big to fit, so every trajectory keeps its first round.
    most_append, most_generate = max_len // 4, max_len // 8
    drawn = max(1, round(_lognormal(rng, profile.turns.value, shape.turns_sigma.value)))
    turns: list[Turn] = []
    context = 0
    for index in range(drawn):
        if index == 0:
            append = _tokens(rng, shape.first_append_mean.value, shape.first_append_sigma.value,
                             most_append)
        else:
            append = _tokens(rng, shape.append_mean.value, shape.append_sigma.value,
                             most_append)
        generate = _tokens(rng, shape.generate_mean.value, shape.generate_sigma.value,
                           most_generate)
        if context + append + generate > max_len:
            return Trajectory(id, tuple(turns), uncut_turns=drawn)
        turns.append(Turn(context, append, generate))
        context += append + generate
    return Trajectory(id, tuple(turns))


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TestbedError(f"seed: got {_show(seed)}, expected an integer")


def generate_trajectories(dataset: str, agents: int, seed: int, *,
                          unique: int | None = None) -> list[Trajectory]:
    """`agents` synthetic trajectories with the statistics of `dataset` ("32k", "48k", "64k").

    Trajectory i depends only on (dataset, seed, i) and has id "<dataset>-s<seed>-<i>". With
    `unique` (the paper used 500), only that many distinct trajectories are drawn and the rest
    are distinct copies of randomly chosen ones (digest §9 A.3), cut at MaxLen again.
    """
    profile = load_dataset(dataset)
    name = dataset.lower()
    _count("agents", agents)
    _check_seed(seed)
    if unique is not None:
        _count("unique", unique, least=1)
    distinct = agents if unique is None else min(unique, agents)
    trajectories = [draw_trajectory(profile, f"{name}-s{seed}-{index}",
                                    random.Random(f"{name}:{seed}:{index}"))
                    for index in range(distinct)]
    if distinct < agents:
        rng = random.Random(f"{name}:{seed}:copies")
        copies: dict[int, int] = {}
        for _ in range(agents - distinct):
            picked = rng.randrange(distinct)
            copies[picked] = copies.get(picked, 0) + 1
        for picked in sorted(copies):
            trajectories += distinct_copies(trajectories[picked], copies[picked],
                                            seed=rng.getrandbits(32),
                                            max_len=profile.max_len.value)
    return trajectories


def distinct_copies(trajectory: Trajectory, copies: int, seed: int,
                    max_len: int | None = None) -> list[Trajectory]:
    """`copies` copies of `trajectory`, each with a prepended first round of random tokens
    (A_1 of 16-64 tokens, g_1 = 1; digest §9 A.3) so that no two share a cached prefix.

    Each copy gets a unique id ("<id>/copy-<seed>-<k>") and a random `salt` standing for the
    random tokens; the original's turns follow, their contexts shifted by the new round. With
    `max_len`, rounds that would then run past it are cut.
    """
    _count("copies", copies)
    _check_seed(seed)
    rng = random.Random(f"copies:{trajectory.id}:{seed}")
    salts: set[int] = set()
    result = []
    for k in range(1, copies + 1):
        salt = rng.getrandbits(64)
        while salt in salts:   # practically never; copies must not share the random round
            salt = rng.getrandbits(64)
        salts.add(salt)
        first = (rng.randint(*COPY_ROUND_TOKENS), COPY_ROUND_GENERATE)
        rounds = [first] + [(turn.append, turn.generate) for turn in trajectory.turns]
        copy = build_trajectory(f"{trajectory.id}/copy-{seed}-{k}", rounds, max_len)
        drawn = 1 + trajectory.drawn_turns
        result.append(Trajectory(copy.id, copy.turns,
                                 uncut_turns=drawn if drawn != len(copy.turns) else None,
                                 salt=salt))
    return result


# ------------------------------------------------------------------------------- statistics

def workload_stats(trajectories: Iterable[Trajectory]) -> dict[str, float]:
    """The means the paper reports for a set of trajectories (keys as DatasetProfile.targets):

    agents; turns (rounds replayed per trajectory) and turns_uncut (before the cut at MaxLen);
    total_tokens and max_total_tokens per trajectory; context_tokens, append_per_turn and
    generate_per_turn as means over all turns; hit_rate = all hit tokens / all prompt tokens.
    """
    trajectories = list(trajectories)
    if not trajectories:
        raise TestbedError("trajectories: got an empty list, expected at least one trajectory")
    agents = len(trajectories)
    turns = sum(len(t.turns) for t in trajectories)
    context = sum(t.context_tokens for t in trajectories)
    append = sum(t.append_tokens for t in trajectories)
    return {
        "agents": agents,
        "turns": turns / agents,
        "turns_uncut": sum(t.drawn_turns for t in trajectories) / agents,
        "total_tokens": sum(t.total_tokens for t in trajectories) / agents,
        "max_total_tokens": max(t.total_tokens for t in trajectories),
        "context_tokens": context / turns,
        "append_per_turn": append / turns,
        "generate_per_turn": sum(t.generate_tokens for t in trajectories) / turns,
        "hit_rate": context / (context + append) if context + append else 0.0,
    }


# --------------------------------------------------------------------------------- arrivals

def poisson_arrivals(aps: float, count: int, seed: int) -> list[float]:
    """Arrival times in seconds of `count` agents at `aps` agents per second (a Poisson process
    from t = 0: exponential gaps of mean 1/aps; digest §7 online metric)."""
    if (isinstance(aps, bool) or not isinstance(aps, (int, float)) or not math.isfinite(aps)
            or aps <= 0):
        raise TestbedError(f"aps: got {_show(aps)}, expected a rate > 0 (agents per second)")
    _count("count", count)
    _check_seed(seed)
    rng = random.Random(f"poisson:{seed}")
    now = 0.0
    arrivals = []
    for _ in range(count):
        now += rng.expovariate(aps)
        arrivals.append(now)
    return arrivals
