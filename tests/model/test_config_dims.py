"""Head and width sizes of a LlamaConfig must be positive: a ConfigError naming the field,
never a ZeroDivisionError or a model with empty heads."""
import numpy as np
import pytest

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model.config import LlamaConfig

BASE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128,
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)


@pytest.mark.parametrize("patch, message", [
    (dict(head_dim=0), r"head_dim=0 must be a whole number >= 1"),
    (dict(head_dim=-8), r"head_dim=-8 must be a whole number >= 1"),
    (dict(hidden_size=0), r"hidden_size=0 must be a whole number >= 1"),
    (dict(num_attention_heads=0), r"num_attention_heads=0 must be a whole number >= 1"),
    (dict(num_key_value_heads=0), r"num_key_value_heads=0 must be a whole number >= 1"),
    (dict(head_dim=16.0), r"head_dim=16\.0 must be a whole number >= 1"),
], ids=["head_dim_0", "head_dim_negative", "hidden_0", "heads_0", "kv_heads_0", "float"])
def test_non_positive_sizes_are_config_errors(patch, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_dict(dict(BASE, **patch))


def test_valid_sizes_still_derive_head_dim():
    assert LlamaConfig.from_hf_dict(BASE).head_dim == 64 // 4
    cfg = LlamaConfig.from_hf_dict(dict(BASE, head_dim=np.int64(24)))  # numpy ints are whole
    assert cfg.head_dim == 24 and cfg.num_groups == 2
