"""LlamaConfig: the fields of a Hugging Face Llama `config.json` (both the older
`rope_theta`/`rope_scaling` keys and the newer `rope_parameters` block), validated eagerly."""
from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Optional

from ultrametric_jax.errors import ConfigError

LLAMA_ARCHITECTURES = ("LlamaForCausalLM",)
LLAMA_MODEL_TYPES = ("llama",)


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
        _check_dims(self)
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size={self.hidden_size} is not divisible by "
                    f"num_attention_heads={self.num_attention_heads}; set head_dim explicitly")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not self.head_dim >= 1:
            raise ConfigError(f"head_dim={self.head_dim} must be >= 1 (hidden_size="
                              f"{self.hidden_size}, num_attention_heads="
                              f"{self.num_attention_heads})")
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


def _check_dims(config: LlamaConfig) -> None:
    """Sizes that divide or index must be positive whole numbers (0 heads would divide by 0)."""
    for field in ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim"):
        value = getattr(config, field)
        if value is None and field in ("num_key_value_heads", "head_dim"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ConfigError(f"{field}={value!r} must be a whole number >= 1")


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
