"""testbed.profile: shipped model profiles load, match the paper, and bad files fail in one line.

Paper figures come from the digest of the DualPath paper ("digest"): §3.5 (KV sizes and
Table 1 reproduction), §6.3 (f(C) and the cache-compute ratio), §7 (models), §8 (results),
§9 (workloads).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from testbed import errors
from testbed.profile import (MODELS_DIR, ModelProfile, Sourced, available_profiles,
                             load_profile)

REPO = Path(__file__).parents[2]
NAMES = ["ds-27b", "ds-660b", "qwen-32b"]
GB_PER_PFLOP = 1e-6          # 1 GB/PFLOP = 1e9 B / 1e15 FLOP

# The 64K set (digest §9, Table 2): mean context and mean append per turn.
CONTEXT_64K = 32_721
APPEND_64K = 429


@pytest.fixture(scope="module", params=NAMES)
def profile(request: pytest.FixtureRequest) -> ModelProfile:
    return load_profile(request.param)


def sourced(model: Any, where: str = "") -> Iterator[tuple[str, Sourced]]:
    """Every Sourced figure in a profile, with its dotted field path."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{where}{name}"
        if isinstance(value, Sourced):
            yield path, value
        elif hasattr(type(value), "model_fields"):
            yield from sourced(value, path + ".")


# ---------------------------------------------------------------------------- shipped files

def test_profiles_are_shipped() -> None:
    assert available_profiles() == NAMES
    assert MODELS_DIR == REPO / "models"


@pytest.mark.parametrize("name", NAMES)
def test_name_and_path_give_the_same_profile(name: str) -> None:
    by_name = load_profile(name)
    assert by_name.name == name
    assert load_profile(REPO / "models" / f"{name}.yaml") == by_name
    assert (REPO / "models" / f"{name}.yaml").read_text().startswith("# ")


def test_every_figure_has_a_source(profile: ModelProfile) -> None:
    figures = dict(sourced(profile))
    assert set(figures) == {
        "layers", "kv_bytes_per_token_layer", "all_to_all_bytes_per_token_layer",
        "prefill.active_params", "prefill.attention_flops_per_context_token",
        "prefill.gpu_flops", "decode.step_seconds", "decode.seconds_per_context_token",
        "decode.hbm_kv_bytes"}
    for path, figure in figures.items():
        assert len(figure.source.strip()) >= 10, f"{profile.name}: {path}: {figure.source!r}"


@pytest.mark.parametrize("name, fields", [
    ("ds-660b", ["all_to_all_bytes_per_token_layer", "prefill.attention_flops_per_context_token",
                 "prefill.gpu_flops", "decode.step_seconds", "decode.seconds_per_context_token",
                 "decode.hbm_kv_bytes"]),
    ("ds-27b", ["kv_bytes_per_token_layer", "all_to_all_bytes_per_token_layer",
                "prefill.active_params", "prefill.attention_flops_per_context_token",
                "prefill.gpu_flops", "decode.step_seconds", "decode.seconds_per_context_token",
                "decode.hbm_kv_bytes"]),
    ("qwen-32b", ["prefill.gpu_flops", "decode.step_seconds",
                  "decode.seconds_per_context_token", "decode.hbm_kv_bytes"]),
])
def test_estimates_say_so(name: str, fields: list[str]) -> None:
    """Figures neither the paper nor a public config gives are marked 'estimate'."""
    figures = dict(sourced(load_profile(name)))
    for field in fields:
        assert "estimate" in figures[field].source, f"{name}: {field}"


@pytest.mark.parametrize("name, layers", [("ds-660b", 61), ("ds-27b", 30), ("qwen-32b", 64)])
def test_layers_match_the_paper(name: str, layers: int) -> None:
    assert load_profile(name).layers.value == layers


def test_kv_sizes() -> None:
    qwen, ds = load_profile("qwen-32b"), load_profile("ds-660b")
    # digest §3.5: 2 x 8 KV heads x 128 dims x 2 B; 256 KiB per token; 16 MiB per 64-token block
    assert qwen.kv_bytes_per_token_layer.value == 4096
    assert qwen.kv_bytes_per_token == 256 * 1024
    assert qwen.kv_bytes(64) == 16 * 2**20
    assert qwen.layer_kv_bytes(64) == 256 * 1024
    # ≈656 B per layer (FP8 MLA), ≈40 KB per token, ≈1.3 GB for the 64K set's mean context
    assert ds.kv_bytes_per_token_layer.value == 656
    assert ds.kv_bytes_per_token == 61 * 656
    assert ds.kv_bytes(CONTEXT_64K) == pytest.approx(1.31e9, rel=0.01)
    assert isinstance(ds.kv_bytes(1), float)
    # n Layer Blocks make one Full Block
    assert ds.layer_kv_bytes(64) * ds.layers.value == ds.kv_bytes(64)


# --------------------------------------------------------------------- FLOPs and the ratio

def test_ds660b_flops_per_token_at_the_64k_context() -> None:
    """digest §6.3: f ≈ 141 GFLOP per appended token at C = 32,721 for DeepSeek-V3.2."""
    ds = load_profile("ds-660b")
    assert ds.prefill_flops_per_token(CONTEXT_64K) == pytest.approx(141e9, rel=0.05)
    assert ds.prefill_flops_per_token(0) == 2 * 37e9


def test_ds660b_cache_compute_ratio_is_about_22() -> None:
    """digest §1/§6.3: ≈22 GB/PFLOP for DeepSeek-V3.2 on the trace (64K set, 429 appended)."""
    ratio = load_profile("ds-660b").cache_compute_ratio(CONTEXT_64K, APPEND_64K)
    assert ratio / GB_PER_PFLOP == pytest.approx(22, rel=0.15)


@pytest.mark.parametrize("name, low, high", [
    ("qwen-32b", 117, 267),
    ("ds-660b", 13, 36),
])
def test_cache_compute_ratio_inside_table_1(name: str, low: float, high: float) -> None:
    """Table 1: append 429, context 16K-64K; bounds are whole GB/PFLOP, so allow rounding."""
    profile = load_profile(name)
    for context in (16 * 1024, CONTEXT_64K, 64 * 1024):
        ratio = profile.cache_compute_ratio(context, APPEND_64K) / GB_PER_PFLOP
        assert low - 0.5 <= ratio <= high + 0.5, f"{name} at {context}: {ratio:.1f}"


def test_qwen_reproduces_table_1_ends() -> None:
    """Dense attention: the Table 1 range for Qwen2.5-32B is reproduced end to end."""
    qwen = load_profile("qwen-32b")
    assert qwen.cache_compute_ratio(16 * 1024, 429) / GB_PER_PFLOP == pytest.approx(117, abs=1)
    assert qwen.cache_compute_ratio(64 * 1024, 429) / GB_PER_PFLOP == pytest.approx(267, abs=1)


def test_ratio_definition(profile: ModelProfile) -> None:
    """rho = C b / (A f(C)) (digest §6.3)."""
    c, a = 20_000, 300
    expected = c * profile.kv_bytes_per_token / (a * profile.prefill_flops_per_token(c))
    assert profile.cache_compute_ratio(c, a) == pytest.approx(expected)
    with pytest.raises(ValueError):
        profile.cache_compute_ratio(c, 0)


# ------------------------------------------------------------------------------ time model

def test_prefill_time_model(profile: ModelProfile) -> None:
    c, a = 30_000, 500
    flops = a * profile.prefill_flops_per_token(c + a / 2)
    assert profile.prefill_flops(c, a) == pytest.approx(flops)
    assert profile.prefill_seconds(c, a) == pytest.approx(flops / profile.prefill.gpu_flops.value)
    assert (profile.prefill_layer_seconds(c, a) * profile.layers.value
            == pytest.approx(profile.prefill_seconds(c, a)))
    # attention over the growing prompt: the same tokens cost more on a longer context
    assert profile.prefill_seconds(2 * c, a) > profile.prefill_seconds(c, a)
    assert profile.prefill_seconds(c, 0) == 0
    with pytest.raises(ValueError):
        profile.prefill_seconds(-1, a)


def test_decode_and_all_to_all(profile: ModelProfile) -> None:
    step, per_token = profile.decode.step_seconds.value, profile.decode.seconds_per_context_token.value
    assert profile.decode_step_seconds(0) == step
    assert profile.decode_step_seconds(100_000) == pytest.approx(step + 100_000 * per_token)
    assert (profile.all_to_all_bytes(4096)
            == 4096 * profile.all_to_all_bytes_per_token_layer.value)


@pytest.mark.parametrize("name, low_tokens, low_tpot, high_tokens, high_tpot", [
    # Fig 10 Oracle TPOT; batch context = APS x JCT (Fig 11) / DE GPUs x ~28K tokens
    ("ds-660b", 0.1 * 535 / 32 * 28_000, 0.0293, 0.4 * 765 / 32 * 28_000, 0.0356),
    ("ds-27b", 0.25 * 240 / 8 * 28_000, 0.0100, 0.75 * 290 / 8 * 28_000, 0.0133),
])
def test_decode_step_matches_the_paper_tpot(name: str, low_tokens: float, low_tpot: float,
                                            high_tokens: float, high_tpot: float) -> None:
    profile = load_profile(name)
    assert profile.decode_step_seconds(low_tokens) == pytest.approx(low_tpot, rel=0.1)
    assert profile.decode_step_seconds(high_tokens) == pytest.approx(high_tpot, rel=0.1)


def test_every_decode_step_fits_the_tpot_slo_at_a_full_engine(profile: ModelProfile) -> None:
    """TPOT SLO 50 ms (paper §7): an engine with 8 agents of the 64K set's mean context."""
    assert profile.decode_step_seconds(8 * CONTEXT_64K) < 0.050


@pytest.mark.parametrize("name, gpus, basic_snics, dualpath_snics, dualpath_io_bound", [
    ("ds-660b", 16, 2, 6, False),   # 2P4D: DualPath ≈ Oracle, Basic storage-bound (Fig 7)
    ("ds-27b", 8, 1, 2, True),      # 1P1D: DualPath still 1.1-1.9x slower than Oracle
    ("qwen-32b", 8, 1, 3, True),    # 1P2D: DualPath 1.4-1.75x slower than Oracle
])
def test_io_bound_where_the_paper_says(name: str, gpus: int, basic_snics: int,
                                       dualpath_snics: int, dualpath_io_bound: bool) -> None:
    """digest §6.3: a PE is I/O-bound when rho x its FLOP rate exceeds its SNIC share."""
    profile = load_profile(name)
    demand = (profile.cache_compute_ratio(CONTEXT_64K, APPEND_64K)
              * profile.prefill.gpu_flops.value)              # bytes/s one PE GPU would read
    snic = 50e9
    assert demand > basic_snics * snic / gpus               # Basic is storage-bound
    assert (demand > dualpath_snics * snic / gpus) == dualpath_io_bound


# ---------------------------------------------------------------------- malformed files

GOOD: dict[str, Any] = yaml.safe_load((REPO / "models" / "ds-27b.yaml").read_text())
DELETE = object()


def spec(**changes: Any) -> str:
    """ds-27b as YAML, with fields ('prefill__gpu_flops__value') changed, added or DELETEd."""
    data = copy.deepcopy(GOOD)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for part in parents:
            target = target[part]
        if value is DELETE:
            del target[last]
        else:
            target[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def one_error_line(path: Path) -> str:
    """Load `path`, expecting one line naming the file and saying what was expected; return
    the text after the path."""
    with pytest.raises(errors.TestbedError) as info:
        load_profile(path)
    line = str(info.value)
    assert "\n" not in line, line
    assert line.startswith(f"{path}"), line
    assert re.search(r"\bexpected\b", line), line
    return line.removeprefix(f"{path}")


def test_good_spec_loads(tmp_path: Path) -> None:
    path = tmp_path / "mine.yaml"
    path.write_text(spec())
    assert load_profile(path).name == "mine"


def test_numbers_may_be_written_as_37e9(tmp_path: Path) -> None:
    """YAML 1.1 reads 37e9 as a string; the profile takes it as the number it means."""
    path = tmp_path / "exp.yaml"
    text = spec(prefill__active_params__value="@")
    assert "'@'" in text
    path.write_text(text.replace("'@'", "37e9"))
    assert yaml.safe_load(path.read_text())["prefill"]["active_params"]["value"] == "37e9"
    assert load_profile(path).prefill.active_params.value == 37e9


# (id, changes, field path the message names, bad value it shows)
FIELD_ERRORS = [
    ("unknown-field", dict(colour="blue"), "colour", "'blue'"),
    ("unknown-nested-field", dict(prefill__gpu_flop={"value": 1e14, "source": "x"}),
     "prefill.gpu_flop", "'value': 100000000000000.0"),
    ("unknown-field-in-figure", dict(layers__sauce="paper"), "layers.sauce", "'paper'"),
    ("wrong-type-count", dict(layers__value="thirty"), "layers.value", "'thirty'"),
    ("float-for-count", dict(layers__value=30.5), "layers.value", "30.5"),
    ("bool-for-count", dict(kv_bytes_per_token_layer__value=True),
     "kv_bytes_per_token_layer.value", "True"),
    ("wrong-type-number", dict(prefill__gpu_flops__value="fast"), "prefill.gpu_flops.value",
     "'fast'"),
    ("bool-for-number", dict(decode__step_seconds__value=True), "decode.step_seconds.value",
     "True"),
    ("list-for-number", dict(prefill__active_params__value=[1, 2]),
     "prefill.active_params.value", "[1, 2]"),
    ("bare-number", dict(layers=30), "layers", "30"),
    ("scalar-for-section", dict(decode="fast"), "decode", "'fast'"),
    ("negative-count", dict(layers__value=-30), "layers.value", "-30"),
    ("zero-count", dict(layers__value=0), "layers.value", "0"),
    ("negative-number", dict(prefill__gpu_flops__value=-1.8e14), "prefill.gpu_flops.value",
     "-180000000000000.0"),
    ("negative-rate", dict(decode__seconds_per_context_token__value=-1e-9),
     "decode.seconds_per_context_token.value", "-1e-09"),
    ("negative-bytes", dict(all_to_all_bytes_per_token_layer__value=-1),
     "all_to_all_bytes_per_token_layer.value", "-1"),
    ("infinite", dict(prefill__gpu_flops__value=float("inf")), "prefill.gpu_flops.value",
     "inf"),
    ("empty-source", dict(layers__source="  "), "layers.source", "'  '"),
    ("number-for-source", dict(decode__step_seconds__source=12), "decode.step_seconds.source",
     "12"),
    ("bad-name", dict(name="DS 27B"), "name", "'DS 27B'"),
]


@pytest.mark.parametrize("changes, field, value", [case[1:] for case in FIELD_ERRORS],
                         ids=[case[0] for case in FIELD_ERRORS])
def test_malformed_field(tmp_path: Path, changes: dict[str, Any], field: str,
                         value: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(spec(**changes))
    rest = one_error_line(path)
    assert rest.startswith(f": {field}: got "), rest
    assert value in rest, rest


@pytest.mark.parametrize("changes, field", [
    (dict(layers__source=DELETE), "layers.source"),
    (dict(prefill__gpu_flops__value=DELETE), "prefill.gpu_flops.value"),
    (dict(decode__step_seconds=DELETE), "decode.step_seconds"),
    (dict(prefill=DELETE), "prefill"),
    (dict(kv_bytes_per_token_layer=DELETE), "kv_bytes_per_token_layer"),
], ids=["source", "value", "nested-figure", "section", "top-level"])
def test_missing_field(tmp_path: Path, changes: dict[str, Any], field: str) -> None:
    path = tmp_path / "missing.yaml"
    path.write_text(spec(**changes))
    rest = one_error_line(path)
    assert rest.startswith(f": {field}: missing"), rest


def test_misspelt_field_suggests_the_right_one(tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(spec(decode__step_seconds=DELETE,
                         decode__step_second={"value": 0.01, "source": "x"}))
    rest = one_error_line(path)
    # the misspelling is reported, not the "missing" field it leaves behind
    assert rest.startswith(": decode.step_second: got "), rest
    assert "did you mean 'step_seconds'?" in rest
    path.write_text(spec(layers={"valeu": 30, "source": "x"}))
    rest = one_error_line(path)
    assert rest.startswith(": layers.valeu: got 30"), rest
    assert "'value'" in rest


def test_several_errors_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    path.write_text(spec(layers__value=-1, prefill__gpu_flops__value=-1))
    assert one_error_line(path).endswith("(and 1 more)")


@pytest.mark.parametrize("content, where, value", [
    ("layers:\n  value: 30\n\tsource: x\n", "3:1", "'source: x'"),
    ("layers: {value: 30, source: x\n", r"\d+:\d+", "layers"),
    ("layers:\n  value: 30\n  value: 31\n", "3:3", "'value'"),
], ids=["tab", "unclosed-brace", "duplicate-key"])
def test_yaml_syntax_error(tmp_path: Path, content: str, where: str, value: str) -> None:
    path = tmp_path / "syntax.yaml"
    path.write_text(content)
    rest = one_error_line(path)
    assert re.match(rf":{where}: invalid YAML: ", rest), rest
    assert value in rest, rest


@pytest.mark.parametrize("content, start", [
    ("", ": (top level): got an empty file"),
    ("# nothing\n", ": (top level): got an empty file"),
    ("- layers\n", ": (top level): got list ['layers']"),
], ids=["empty", "comment", "list"])
def test_not_a_mapping(tmp_path: Path, content: str, start: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(content)
    assert one_error_line(path).startswith(start)


def test_file_that_does_not_exist(tmp_path: Path) -> None:
    rest = one_error_line(tmp_path / "nowhere.yaml")
    assert rest.startswith(": cannot read"), rest
    assert "No such file" in rest


def test_unknown_model_name_lists_the_available_ones() -> None:
    with pytest.raises(errors.TestbedError) as info:
        load_profile("ds-999b")
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith("ds-999b: got unknown model 'ds-999b', expected one of: "), line
    assert "ds-27b, ds-660b, qwen-32b" in line, line
