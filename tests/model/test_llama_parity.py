"""The Flax Llama equals transformers' LlamaForCausalLM (float32) on tiny random configs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import hf_logits, rel_err
from ultrametric_jax import LlamaConfig, load_pretrained
from ultrametric_jax.model.llama import LlamaForCausalLM, causal_mask, masked_attention

pytestmark = pytest.mark.usefixtures("highest_precision")

TOL = 1e-4

CASES = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa_ratio3": dict(num_attention_heads=6, num_key_value_heads=2, hidden_size=48),
    "gqa_ratio4": dict(num_attention_heads=8, num_key_value_heads=2),
    "gqa_ratio1_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "head_dim_explicit": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "attention_bias": dict(attention_bias=True, mlp_bias=True),
    "linear_rope": dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                         "rope_theta": 500.0}),
    # Wavelengths for head_dim 8 span all three llama3 bands with an original length of 16.
    "llama3_rope": dict(max_position_embeddings=64, rope_parameters={
        "rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tiny_hf, name):
    hf, path = tiny_hf(**CASES[name])
    model = load_pretrained(path)
    # 40 positions: past the llama3 case's original_max_position_embeddings of 16.
    ids = np.random.RandomState(1).randint(0, hf.config.vocab_size, (2, 40))
    ref = hf_logits(hf, ids)
    out = np.asarray(model(jnp.asarray(ids)))
    assert out.dtype == np.float32 and out.shape == ref.shape
    assert rel_err(out, ref) <= TOL, name
    assert (model.lm_head is None) == bool(hf.config.tie_word_embeddings)


def test_llama3_scaling_changes_logits(tiny_hf):
    """The llama3 case is not vacuous: without the scaling the logits differ past 16 tokens."""
    hf, path = tiny_hf(**CASES["llama3_rope"])
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    scaled = load_pretrained(path)
    plain_cfg = LlamaConfig.from_hf_dict({**cfg, "rope_parameters": {"rope_theta": 10000.0}})
    assert scaled.config.rope_scaling["rope_type"] == "llama3"
    assert plain_cfg.rope_scaling is None
    plain = LlamaForCausalLM(plain_cfg, rngs=nnx.Rngs(0))
    nnx.update(plain, nnx.state(scaled))
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 96, (1, 40)))
    assert rel_err(plain(ids), np.asarray(scaled(ids))) > 1e-3


@pytest.mark.parametrize("form", ["legacy_rope_scaling", "rope_parameters"])
def test_both_rope_config_forms(tiny_hf, form):
    hf, path = tiny_hf(**CASES["llama3_rope"])
    cfg_path = os.path.join(path, "config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    rope = dict(hf.config.rope_parameters)
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        cfg.pop(key, None)
    if form == "legacy_rope_scaling":
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
    else:
        cfg["rope_parameters"] = rope
    with open(cfg_path, "w") as f:
        json.dump(cfg, f)
    model = load_pretrained(path)
    assert model.config.rope_scaling["rope_type"] == "llama3"
    assert model.config.rope_scaling["factor"] == 4.0
    ids = np.random.RandomState(2).randint(0, 96, (1, 40))
    assert rel_err(model(jnp.asarray(ids)), hf_logits(hf, ids)) <= TOL


def test_sharded_checkpoint(tiny_hf):
    hf, path = tiny_hf(save_kwargs={"max_shard_size": "20KB"})
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 3
    model = load_pretrained(path)
    ids = np.random.RandomState(3).randint(0, 96, (2, 17))
    assert rel_err(model(jnp.asarray(ids)), hf_logits(hf, ids)) <= TOL


def test_right_padding_matches_transformers(tiny_hf):
    hf, path = tiny_hf()
    model = load_pretrained(path)
    ids = np.random.RandomState(4).randint(0, 96, (3, 12))
    mask = np.ones((3, 12), bool)
    mask[1, 7:] = False
    mask[2, 3:] = False
    ref = hf_logits(hf, ids, mask)
    out = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)))
    assert rel_err(out[mask], ref[mask]) <= TOL
    # Padding really is masked: real tokens equal the unpadded rows run alone.
    alone = np.asarray(model(jnp.asarray(ids[1:2, :7])))
    assert rel_err(out[1, :7], alone[0]) <= 1e-6


def test_bfloat16_params(tiny_hf):
    hf, path = tiny_hf()
    model = load_pretrained(path, dtype="bfloat16")
    kernel = model.model.layers[0].self_attn.q_proj.kernel.get_value()
    assert kernel.dtype == jnp.bfloat16
    ids = np.random.RandomState(5).randint(0, 96, (1, 16))
    out = np.asarray(model(jnp.asarray(ids)))
    assert out.dtype == np.float32
    assert rel_err(out, hf_logits(hf, ids)) < 5e-2  # bf16 rounding, not a structural error


def test_logical_axis_metadata():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))
    specs = {".".join(map(str, p)): v.get_metadata().get("out_sharding")
             for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    assert specs["model.embed_tokens.embedding"] == ("vocab", "embed")
    assert specs["model.layers.0.self_attn.q_proj.kernel"] == ("embed", "heads")
    assert specs["model.layers.0.self_attn.k_proj.kernel"] == ("embed", "kv_heads")
    assert specs["model.layers.0.self_attn.v_proj.kernel"] == ("embed", "kv_heads")
    assert specs["model.layers.0.self_attn.o_proj.kernel"] == ("heads", "embed")
    assert specs["model.layers.0.mlp.gate_proj.kernel"] == ("embed", "mlp")
    assert specs["model.layers.0.mlp.down_proj.kernel"] == ("mlp", "embed")
    assert specs["model.layers.0.input_layernorm.weight"] == (None,)
    assert specs["lm_head.kernel"] == ("embed", "vocab")
    assert all(s is not None for s in specs.values())


def test_loaded_model_keeps_axis_metadata(tiny_hf):
    _, path = tiny_hf(attention_bias=True)
    model = load_pretrained(path)
    attn = model.model.layers[1].self_attn
    assert attn.q_proj.kernel.get_metadata()["out_sharding"] == ("embed", "heads")
    assert attn.k_proj.bias.get_metadata()["out_sharding"] == ("kv_heads",)
    assert model.lm_head.kernel.get_metadata()["out_sharding"] == ("embed", "vocab")


# ----------------------------------------------------------------------------- attention math

def _reference_attention(q, k, v, mask, scale):
    """float64 numpy oracle with kv heads repeated explicitly."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, rep, axis=2), np.repeat(v, rep, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(np.broadcast_to(mask, s.shape), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.mark.parametrize("heads,groups", [(4, 4), (6, 2), (8, 2), (3, 1)])
def test_masked_attention_gqa_grouping(heads, groups):
    rng = np.random.RandomState(heads)
    q = rng.randn(2, 5, heads, 8).astype(np.float32)
    k = rng.randn(2, 7, groups, 8).astype(np.float32)
    v = rng.randn(2, 7, groups, 8).astype(np.float32)
    # A per-head mask: each head sees a different key subset (never empty here).
    mask = rng.rand(2, heads, 5, 7) < 0.6
    mask[..., 0] = True
    out = masked_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), 0.3)
    np.testing.assert_allclose(np.asarray(out), _reference_attention(q, k, v, mask, 0.3),
                               atol=2e-6)


def test_masked_attention_empty_row_is_finite():
    q = jnp.ones((1, 2, 2, 4))
    k = v = jnp.arange(24, dtype=jnp.float32).reshape(1, 3, 2, 4)
    mask = jnp.array([[[[False, False, False], [True, True, False]]]])
    out = np.asarray(masked_attention(q, k, v, mask, 0.5))
    assert np.isfinite(out).all()


def test_causal_mask():
    q_pos = jnp.array([[0, 1, 2]])
    k_pos = jnp.array([[0, 1, 2, 3]])
    valid = jnp.array([[True, False, True, True]])
    got = np.asarray(causal_mask(q_pos, k_pos, valid))
    want = (np.arange(4)[None, :] <= np.arange(3)[:, None]) & np.array([1, 0, 1, 1], bool)
    assert got.shape == (1, 1, 3, 4)
    np.testing.assert_array_equal(got[0, 0], want)


def test_replaced_attention_module_is_called(tiny_hf):
    """layer.self_attn can be swapped for any module with the same call signature."""
    hf, path = tiny_hf()
    model = load_pretrained(path)
    ids = jnp.asarray(np.random.RandomState(6).randint(0, 96, (1, 9)))
    base = np.asarray(model(ids))

    class Zero(nnx.Module):
        def __init__(self, inner):
            self.inner = inner

        def __call__(self, x, positions, attention_mask=None, cache=None):
            out = self.inner(x, positions, attention_mask=attention_mask, cache=cache)
            return jax.tree.map(lambda a: a * 0, out) if cache is None else out

    model.model.layers[1].self_attn = Zero(model.model.layers[1].self_attn)
    assert rel_err(model(ids), base) > 1e-3
