"""LlamaConfig parsing of config.json in both rope forms, and its hashing."""
import pytest
import transformers

from ultrametric_jax.config import ConfigError, LlamaConfig

BASE = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128,
            hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def test_legacy_and_rope_parameters_forms_agree():
    legacy = LlamaConfig.from_hf_dict(dict(BASE, rope_theta=5e5, rope_scaling=LLAMA3))
    new = LlamaConfig.from_hf_dict(dict(BASE, rope_parameters=dict(LLAMA3, rope_theta=5e5)))
    assert legacy == new and hash(legacy) == hash(new)
    assert new.rope_theta == 5e5 and new.rope_scaling["factor"] == 8.0
    assert new.head_dim == 16 and new.num_groups == 2


def test_round_trip_through_transformers_config():
    ours = LlamaConfig.from_hf_dict(dict(BASE, rope_parameters=dict(LLAMA3, rope_theta=5e5)))
    hf = transformers.LlamaConfig(**ours.to_hf_dict())
    again = LlamaConfig.from_hf_dict(hf.to_dict())
    assert again == ours


def test_default_rope_has_no_scaling():
    cfg = LlamaConfig.from_hf_dict(dict(BASE, rope_parameters={"rope_type": "default",
                                                                "rope_theta": 1e5}))
    assert cfg.rope_scaling is None and cfg.rope_theta == 1e5


@pytest.mark.parametrize("patch, message", [
    (dict(model_type="mistral", architectures=["MistralForCausalLM"]), "unsupported architecture"),
    (dict(architectures=["GPT2LMHeadModel"]), "only Llama-architecture"),
    (dict(num_attention_heads=3, num_key_value_heads=2, head_dim=16), "must be a multiple of"),
    (dict(num_attention_heads=3), "not divisible by num_attention_heads=3"),
    (dict(hidden_act="gelu"), "hidden_act='gelu' is not supported"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "'yarn' is not supported"),
])
def test_invalid_configs_name_the_problem(patch, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_dict(dict(BASE, **patch))


def test_missing_required_field():
    cfg = dict(BASE)
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="missing the required field 'hidden_size'"):
        LlamaConfig.from_hf_dict(cfg)
