"""LlamaConfig parsing of config.json in both rope forms, and its hashing; SurgeryConfig checks."""
import pytest
import transformers

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.surgery.config import SurgeryConfig

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
    (dict(rope_scaling={"rope_type": "linear"}), "'linear' is missing the field 'factor'"),
    (dict(rope_scaling={"type": "linear", "factor": "2"}),
     r"rope_scaling.factor='2' must be a number > 0"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 0}), r"rope_scaling.factor=0 must be"),
    (dict(rope_scaling={k: v for k, v in LLAMA3.items() if k != "low_freq_factor"}),
     "'llama3' is missing the field 'low_freq_factor'"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}),
     "'llama3' is missing the field 'high_freq_factor'"),
    (dict(rope_scaling=dict(LLAMA3, low_freq_factor=4.0, high_freq_factor=1.0)),
     "needs low_freq_factor < high_freq_factor, got 4.0 and 1.0"),
])
def test_invalid_configs_name_the_problem(patch, message):
    with pytest.raises(ConfigError, match=message):
        LlamaConfig.from_hf_dict(dict(BASE, **patch))


def test_missing_required_field():
    cfg = dict(BASE)
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="missing the required field 'hidden_size'"):
        LlamaConfig.from_hf_dict(cfg)


def test_direct_construction_checks_rope_and_accepts_the_legacy_key():
    with pytest.raises(ConfigError, match="'llama3' is missing the field 'factor'"):
        LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                    num_attention_heads=2, rope_scaling={"rope_type": "llama3"})
    cfg = LlamaConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, rope_scaling={"type": "linear", "factor": 2.0})
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}


@pytest.mark.parametrize("kwargs, message", [
    (dict(levels=40, d_max=0), r"arity\*\*\(L - d_max\) = 2\*\*40 cluster ids do not fit in int32"),
    (dict(arity=5, levels=14, d_max=0), r"5\*\*14 cluster ids do not fit in int32"),
    (dict(depth_op="max"), r"SurgeryConfig.depth_op='max': must be one of \('cumprod', 'cummin'\)"),
    (dict(ste="hard"), r"SurgeryConfig.ste='hard': must be one of \('gate', 'renorm'\)"),
])
def test_invalid_surgery_configs_name_the_problem(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SurgeryConfig(**kwargs)


def test_largest_int32_cluster_count_is_accepted():
    # 2**31 - 1 is the largest id: 31 binary digits fit, 32 do not.
    assert SurgeryConfig(levels=31, d_max=0).cut_level == 31
    with pytest.raises(ConfigError, match="do not fit in int32"):
        SurgeryConfig(levels=32, d_max=0)


def test_unknown_surgery_config_fields():
    with pytest.raises(ConfigError, match=r"unknown SurgeryConfig fields: \['aritty', 'depth'\]"):
        SurgeryConfig.from_dict({"aritty": 3, "depth": 2, "window": 4})
