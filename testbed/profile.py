"""Model profiles: what the emulated engines need to know about the model they serve.

A profile is a YAML file under `models/` (one per model) giving the layer count, the KV bytes
per token per layer, a prefill FLOP model, a decode step-time model and the bytes of the
per-layer expert-parallel all-to-all. Every number is written as `{value: ..., source: "..."}`,
where the source says where the figure comes from (the paper, a public model config, the
digest in docs/dualpath-paper.md) or starts with "estimate:" and gives the reasoning.

Everything here is in REAL-cluster units (bytes, FLOPs, seconds on one Hopper GPU); the
scenario's scale factor is applied elsewhere. Any problem in a file is reported as one line
naming the file, the field, the bad value and what was expected, as for topologies.

Time model (digest §6.3):
  f(C)             = 2 * N_active + a * C         FLOPs per appended token at context C
  prefill FLOPs    = A * f(C + A/2)               A appended tokens on top of C cached ones
  prefill seconds  = prefill FLOPs / gpu_flops    one engine (GPU) alone
  decode step      = step_seconds + seconds_per_context_token * (batch's total context)
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Generic, TypeVar

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from testbed.errors import TestbedError
from testbed.topology import Spec, read_yaml, require_mapping, validation_message

MODELS_DIR = Path(__file__).parents[1] / "models"


def _number(value: Any) -> Any:
    """Let '37e9' through as a number: YAML 1.1 reads it as a string (it wants 3.7e+10)."""
    if isinstance(value, str):
        try:
            return float(value.replace("_", ""))
        except ValueError:
            raise ValueError("expected a number, e.g. 3.7e+10 or 37e9") from None
    return value


PositiveNumber = Annotated[float, BeforeValidator(_number),
                           Field(strict=True, gt=0, allow_inf_nan=False)]
NonNegativeNumber = Annotated[float, BeforeValidator(_number),
                              Field(strict=True, ge=0, allow_inf_nan=False)]
PositiveCount = Annotated[int, Field(strict=True, ge=1)]
NonNegativeCount = Annotated[int, Field(strict=True, ge=0)]

T = TypeVar("T")


class Sourced(Spec, Generic[T]):
    """A figure and where it comes from ("paper §7 [P]", "... config.json", "estimate: ...")."""
    value: T
    source: str = Field(strict=True)

    @model_validator(mode="before")
    @classmethod
    def is_a_mapping(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            raise ValueError('expected a mapping {value: ..., source: "where it comes from"}')
        return data

    @field_validator("source")
    @classmethod
    def says_something(cls, source: str) -> str:
        if not source.strip():
            raise ValueError("expected a non-empty source (a reference, or 'estimate: why')")
        return source


class PrefillModel(Spec):
    active_params: Sourced[PositiveNumber] = Field(
        description="N_active: parameters used per token (2 FLOPs each)")
    attention_flops_per_context_token: Sourced[NonNegativeNumber] = Field(
        description="FLOPs per appended token per context token, summed over layers")
    gpu_flops: Sourced[PositiveNumber] = Field(
        description="effective FLOP/s of one GPU (engine) in prefill")


class DecodeModel(Spec):
    step_seconds: Sourced[PositiveNumber] = Field(
        description="base time of one decode step of one engine's batch")
    seconds_per_context_token: Sourced[NonNegativeNumber] = Field(
        description="growth of the step per token of the batch's total context")
    hbm_kv_bytes: Sourced[PositiveNumber] = Field(
        description="HBM of one decode GPU left for KV: its requests' prompts and generations")


class ModelProfile(Spec):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,31}$")
    description: str = ""
    layers: Sourced[PositiveCount]
    kv_bytes_per_token_layer: Sourced[PositiveCount]
    all_to_all_bytes_per_token_layer: Sourced[NonNegativeCount] = Field(
        description="expert-parallel dispatch + combine bytes per token per layer")
    prefill: PrefillModel
    decode: DecodeModel

    # ------------------------------------------------------------------------- KV sizes

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token over all layers (one token's share of a Full Block)."""
        return self.layers.value * self.kv_bytes_per_token_layer.value

    def kv_bytes(self, tokens: float) -> float:
        """KV bytes of `tokens` tokens, all layers (a Full Block of that many tokens)."""
        return float(_tokens(tokens) * self.kv_bytes_per_token)

    def layer_kv_bytes(self, tokens: float) -> float:
        """KV bytes of `tokens` tokens in one layer (a Layer Block of that many tokens)."""
        return float(_tokens(tokens) * self.kv_bytes_per_token_layer.value)

    # -------------------------------------------------------------------------- prefill

    def prefill_flops_per_token(self, context_tokens: float) -> float:
        """f(C) = 2 N_active + a C: FLOPs to prefill one token that sees C earlier tokens."""
        return (2 * self.prefill.active_params.value
                + self.prefill.attention_flops_per_context_token.value * _tokens(context_tokens))

    def prefill_flops(self, context_tokens: float, appended_tokens: float) -> float:
        """FLOPs to prefill `appended_tokens` on top of `context_tokens` cached ones.

        The appended tokens attend to the cache and to each other (causally), so token i sees
        C + i earlier tokens; f is linear, so the sum is A * f(C + A/2) (to within half a
        token's attention).
        """
        appended = _tokens(appended_tokens)
        return appended * self.prefill_flops_per_token(_tokens(context_tokens) + appended / 2)

    def prefill_seconds(self, context_tokens: float, appended_tokens: float) -> float:
        """Compute time of that prefill on one GPU: A * f(C + A/2) / gpu_flops."""
        return self.prefill_flops(context_tokens, appended_tokens) / self.prefill.gpu_flops.value

    def prefill_layer_seconds(self, context_tokens: float, appended_tokens: float) -> float:
        """One layer's share of prefill_seconds (layers are taken as equal)."""
        return self.prefill_seconds(context_tokens, appended_tokens) / self.layers.value

    def attention_seconds(self, context_tokens: float, appended_tokens: float) -> float:
        """The attention part of prefill_seconds, over all layers: what the 300 ms batching
        quota of the paper's §5.5 bounds. The paper does not say whether the quota is per
        layer or per forward pass; per layer, no realistic batch would ever reach it."""
        appended = _tokens(appended_tokens)
        flops = (self.prefill.attention_flops_per_context_token.value
                 * (_tokens(context_tokens) + appended / 2) * appended)
        return flops / self.prefill.gpu_flops.value

    # --------------------------------------------------------------------------- decode

    def decode_step_seconds(self, batch_context_tokens: float) -> float:
        """One decode step of one engine whose batch holds this many context tokens in all."""
        return (self.decode.step_seconds.value
                + self.decode.seconds_per_context_token.value * _tokens(batch_context_tokens))

    # ---------------------------------------------------------------------- collectives

    def all_to_all_bytes(self, tokens: float) -> float:
        """Dispatch + combine bytes of one layer's all-to-all for a batch of `tokens`."""
        return float(_tokens(tokens) * self.all_to_all_bytes_per_token_layer.value)

    # -------------------------------------------------------------------------- I/O vs compute

    def cache_compute_ratio(self, context_tokens: float, appended_tokens: float) -> float:
        """Bytes of KV to load per FLOP of prefill compute for one turn (digest §6.3).

        rho = C b / (A f(C)), the definition the paper's Table 1 is reproduced with; multiply
        by 1e6 for GB/PFLOP. (prefill_seconds uses f(C + A/2); the difference is < 1% for
        appends of a few hundred tokens.)
        """
        appended = _tokens(appended_tokens)
        if appended <= 0:
            raise ValueError(f"appended_tokens: got {appended_tokens!r}, expected > 0")
        return self.kv_bytes(context_tokens) / (
            appended * self.prefill_flops_per_token(context_tokens))


def _tokens(tokens: float) -> float:
    if tokens < 0:
        raise ValueError(f"tokens: got {tokens!r}, expected a count >= 0")
    return tokens


def available_profiles() -> list[str]:
    """Names of the profiles shipped in models/ (what load_profile takes as a bare name)."""
    return sorted(path.stem for path in MODELS_DIR.glob("*.yaml"))


def _resolve(name_or_path: str | Path) -> Path:
    text = str(name_or_path)
    if isinstance(name_or_path, Path) or "/" in text or text.endswith((".yaml", ".yml")):
        return Path(name_or_path)
    path = MODELS_DIR / f"{text}.yaml"
    if not path.is_file():
        names = ", ".join(available_profiles()) or "(none)"
        raise TestbedError(f"{text}: got unknown model {text!r}, expected one of: {names} "
                           f"(profiles in {MODELS_DIR}), or a path to a profile file")
    return path


def load_profile(name_or_path: str | Path) -> ModelProfile:
    """Read and validate a model profile: a name from models/ ("ds-27b") or a file path."""
    path = _resolve(name_or_path)
    data = require_mapping(path, read_yaml(path, "model profile"), "profile",
                           "layers, kv_bytes_per_token_layer")
    named_by_file = "name" not in data
    data.setdefault("name", path.stem)
    try:
        return ModelProfile.model_validate(data)
    except ValidationError as exc:
        message = validation_message(exc, ModelProfile, named_by_file=named_by_file)
        raise TestbedError(f"{path}: {message}") from None
