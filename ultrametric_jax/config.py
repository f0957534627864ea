"""Model and surgery configuration.

`LlamaConfig` mirrors the fields of a Hugging Face Llama `config.json` (both the older
`rope_theta`/`rope_scaling` keys and the newer `rope_parameters` block). `SurgeryConfig` holds
the hyper-parameters of the ultrametric topology (see the method's specification in the
README) and validates them eagerly, so a bad value fails with a message naming the field.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA_MODEL_TYPES = ("llama",)
# Choices of SurgeryConfig.depth_op / .ste, and the bound on cluster ids (packed in int32).
DEPTH_OPS = ("cumprod", "cummin")
STE_FORMS = ("gate", "renorm")
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # The non-default rope parameters ({"rope_type": "llama3", "factor": ..., ...}) or None.
    rope_scaling: Optional[dict] = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: Optional[int] = 1
    eos_token_id: Any = 2
    pad_token_id: Optional[int] = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported (only 'silu')")
        object.__setattr__(self, "rope_scaling", _checked_rope_scaling(self.rope_scaling))

    def __hash__(self):
        # rope_scaling is a dict; hash the canonical JSON form so jit caches can key on configs.
        return hash(json.dumps(dataclasses.asdict(self), sort_keys=True, default=str))

    @property
    def num_groups(self) -> int:
        """Query heads per kv head."""
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf_dict(cls, cfg: dict) -> "LlamaConfig":
        """Build from a transformers `config.json` dict; rejects non-Llama architectures."""
        archs = cfg.get("architectures") or []
        model_type = cfg.get("model_type")
        if model_type not in LLAMA_MODEL_TYPES or (archs and not set(archs) & set(LLAMA_ARCHITECTURES)):
            raise ConfigError(
                f"unsupported architecture: model_type={model_type!r}, architectures={archs}; "
                "only Llama-architecture checkpoints (model_type 'llama', LlamaForCausalLM) "
                "can be loaded")
        rope = dict(cfg.get("rope_parameters") or {})
        legacy = cfg.get("rope_scaling")
        if legacy:
            rope.update(legacy)
        rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in cfg.items() if k in fields and k not in ("rope_theta", "rope_scaling")}
        for required in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads"):
            if required not in kwargs:
                raise ConfigError(f"config.json is missing the required field {required!r}")
        return cls(rope_theta=rope_theta, rope_scaling=rope or None, **kwargs)

    @classmethod
    def from_json_file(cls, path: str) -> "LlamaConfig":
        if not os.path.exists(path):
            raise FileNotFoundError(f"missing config.json: {path} does not exist")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict:
        """A transformers-loadable `config.json` dict (rope in the `rope_parameters` form)."""
        d = dataclasses.asdict(self)
        rope = {"rope_theta": d.pop("rope_theta"), "rope_type": "default"}
        scaling = d.pop("rope_scaling")
        if scaling:
            rope.update(scaling)
        d.update(
            architectures=list(LLAMA_ARCHITECTURES), model_type="llama",
            rope_parameters=rope,
            # Older transformers read these two keys instead of rope_parameters.
            rope_theta=rope["rope_theta"],
            rope_scaling=dict(scaling) if scaling else None)
        return d


# Fields each supported rope scaling needs; llama3's original_max_position_embeddings is
# optional (transformers falls back to max_position_embeddings).
ROPE_SCALING_FIELDS = {"linear": ("factor",),
                       "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


def _checked_rope_scaling(scaling: Optional[dict]) -> Optional[dict]:
    """A copy keyed by `rope_type` (the legacy key is `type`), None for the default rope.

    Checked here so that a bad rope config fails on load, not inside the first traced forward.
    """
    if not scaling:
        return None
    scaling = dict(scaling)
    legacy_type = scaling.pop("type", "default")
    rope_type = scaling.setdefault("rope_type", legacy_type)
    if rope_type == "default":
        return None
    if rope_type not in ROPE_SCALING_FIELDS:
        raise ConfigError(f"rope_scaling type {rope_type!r} is not supported "
                          f"(supported: default, {', '.join(ROPE_SCALING_FIELDS)})")
    for field in ROPE_SCALING_FIELDS[rope_type]:
        value = scaling.get(field)
        if value is None:
            raise ConfigError(f"rope_scaling type {rope_type!r} is missing the field {field!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"rope_scaling.{field}={value!r} must be a number > 0")
    if rope_type == "llama3" and not scaling["low_freq_factor"] < scaling["high_freq_factor"]:
        raise ConfigError(f"llama3 rope_scaling needs low_freq_factor < high_freq_factor, got "
                          f"{scaling['low_freq_factor']} and {scaling['high_freq_factor']}")
    return scaling


def levels_for(arity: int, max_len: int) -> int:
    """Smallest L with arity**L >= max_len, in integer arithmetic (log_5(125) is exactly 3)."""
    levels, capacity = 0, 1
    while capacity < max_len:
        capacity *= arity
        levels += 1
    return max(levels, 1)


@dataclasses.dataclass(frozen=True)
class SurgeryConfig:
    """Hyper-parameters of the ultrametric topology injected into every attention layer."""
    arity: int = 2                      # p: children per tree node
    levels: Optional[int] = None        # L; None derives it from max_len
    max_len: int = 8192
    d_max: Optional[int] = None         # allowed tree distance; None means L // 2
    mask_temperature: float = 0.5       # T of the soft tree mask
    window: int = 128                   # local window: i - j < window is always allowed
    sink_tokens: int = 1                # keys j < sink_tokens are always allowed
    depth_op: str = "cumprod"           # "cumprod" | "cummin"
    ste: str = "gate"                   # "gate" | "renorm"
    init_margin: float = 5.0            # collapse initialisation margin of the router bias
    # Gumbel temperature schedule (tau0 -> tau_min) and balance-loss ramp (0 -> lambda_max).
    tau_start: float = 1.0
    tau_end: float = 0.1
    tau_steps: int = 1000
    lambda_max: float = 1.0
    lambda_ramp_steps: int = 100

    def __post_init__(self):
        def bad(field, why):
            raise ConfigError(f"invalid SurgeryConfig.{field}={getattr(self, field)!r}: {why}")
        if int(self.arity) != self.arity or self.arity < 2:
            bad("arity", "the tree arity p must be an integer >= 2")
        if self.max_len < 1:
            bad("max_len", "must be >= 1")
        if self.levels is not None and self.levels < 1:
            bad("levels", "the tree depth L must be >= 1")
        if self.d_max is not None and not 0 <= self.d_max <= self.num_levels:
            bad("d_max", f"must lie in [0, L={self.num_levels}]")
        if self.mask_temperature <= 0:
            bad("mask_temperature", "must be > 0")
        if self.window < 0:
            bad("window", "must be >= 0")
        if self.sink_tokens < 0:
            bad("sink_tokens", "must be >= 0")
        if self.depth_op not in DEPTH_OPS:
            bad("depth_op", f"must be one of {DEPTH_OPS}")
        if self.ste not in STE_FORMS:
            bad("ste", f"must be one of {STE_FORMS}")
        if self.arity ** self.cut_level - 1 > INT32_MAX:
            raise ConfigError(
                f"invalid SurgeryConfig: arity**(L - d_max) = {self.arity}**{self.cut_level} "
                "cluster ids do not fit in int32; raise d_max or lower levels / arity")
        if self.init_margin <= 0:
            bad("init_margin", "must be > 0")
        if not 0 < self.tau_end <= self.tau_start:
            bad("tau_end", "need 0 < tau_end <= tau_start")
        if self.tau_steps < 0 or self.lambda_ramp_steps < 0:
            bad("tau_steps" if self.tau_steps < 0 else "lambda_ramp_steps", "must be >= 0")
        if self.lambda_max < 0:
            bad("lambda_max", "must be >= 0")

    @property
    def num_levels(self) -> int:
        """L, resolved."""
        return self.levels if self.levels is not None else levels_for(self.arity, self.max_len)

    @property
    def max_distance(self) -> int:
        """d_max, resolved."""
        return self.d_max if self.d_max is not None else self.num_levels // 2

    @property
    def cut_level(self) -> int:
        """k = L - d_max: hard-allowed pairs are exactly those sharing the first k digits."""
        return self.num_levels - self.max_distance

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SurgeryConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ConfigError(f"unknown SurgeryConfig fields: {sorted(unknown)}")
        return cls(**d)
