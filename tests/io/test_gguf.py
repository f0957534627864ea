"""GGUF loading: tiny GGUFs written from a transformers model, bad files, and real SmolLM2."""
import numpy as np
import pytest
import torch

from conftest import build_hf_llama, hf_logits, rel_err
from gguf_writer import write_llama_gguf
from ultrametric_jax import ConfigError, load_pretrained
from ultrametric_jax.io.checkpoints import CheckpointError
from ultrametric_jax.io.gguf import permute_rope_rows, unpermute_rope_rows

pytestmark = pytest.mark.usefixtures("highest_precision")


@pytest.mark.parametrize("overrides", [
    dict(num_attention_heads=4, num_key_value_heads=2),
    dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    dict(num_attention_heads=8, num_key_value_heads=2, attention_bias=True),
], ids=["gqa", "mha_tied", "gqa4_bias"])
def test_tiny_gguf_matches_transformers(tmp_path, overrides):
    hf = build_hf_llama(**overrides)
    path = write_llama_gguf(hf, tmp_path / "tiny.gguf")
    model = load_pretrained(path)
    assert model.config.tie_word_embeddings == bool(hf.config.tie_word_embeddings)
    assert model.config.attention_bias == bool(hf.config.attention_bias)
    ids = np.random.RandomState(0).randint(0, 96, (2, 13))
    assert rel_err(model(ids), hf_logits(hf, ids)) <= 1e-4


def test_gguf_to_native_streaming(tmp_path):
    from ultrametric_jax.io.checkpoints import convert_checkpoint
    hf = build_hf_llama(num_attention_heads=4, num_key_value_heads=2)
    path = write_llama_gguf(hf, tmp_path / "tiny.gguf")
    out = convert_checkpoint(path, str(tmp_path / "native"), to="native")
    ids = np.random.RandomState(4).randint(0, 96, (1, 10))
    assert rel_err(load_pretrained(out)(ids), hf_logits(hf, ids)) <= 1e-4


def test_unpermute_inverts_llama_cpp_permutation():
    w = np.random.RandomState(0).randn(3 * 8, 5)
    np.testing.assert_array_equal(unpermute_rope_rows(permute_rope_rows(w, 3), 3), w)
    # Per head, llama.cpp interleaves the two rotary halves: rows (0, 4, 1, 5, 2, 6, 3, 7).
    perm = permute_rope_rows(np.arange(8.0)[:, None], 1)[:, 0]
    np.testing.assert_array_equal(perm, [0, 4, 1, 5, 2, 6, 3, 7])


def test_error_invalid_gguf(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 3)
    with pytest.raises(CheckpointError, match="invalid GGUF file"):
        load_pretrained(str(bad))
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    with pytest.raises(CheckpointError, match="invalid GGUF file"):
        load_pretrained(str(junk))


def test_error_gguf_other_architecture(tmp_path):
    path = write_llama_gguf(build_hf_llama(), tmp_path / "other.gguf", arch="gpt2")
    with pytest.raises(ConfigError, match="unsupported GGUF architecture 'gpt2'"):
        load_pretrained(path)


def test_error_gguf_missing_tensor(tmp_path):
    path = write_llama_gguf(build_hf_llama(), tmp_path / "partial.gguf",
                            drop=("blk.1.ffn_up.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensor blk\.1\.ffn_up\.weight"):
        load_pretrained(path)


def _rope_scaling(kind, factor=None):
    def edit(w):
        import gguf
        w.add_rope_scaling_type(gguf.RopeScalingType(kind))
        if factor is not None:
            w.add_rope_scaling_factor(factor)
    return edit


def test_linear_rope_scaling_matches_transformers(tmp_path):
    hf = build_hf_llama(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                         "rope_theta": 10000.0})
    path = write_llama_gguf(hf, tmp_path / "linear.gguf", edit=_rope_scaling("linear", 2.0))
    model = load_pretrained(path)
    assert model.config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    ids = np.random.RandomState(5).randint(0, 96, (1, 40))
    assert rel_err(model(ids), hf_logits(hf, ids)) <= 1e-4


def _rope_freqs(w):
    w.add_tensor("rope_freqs.weight", np.ones(4, np.float32))


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(omit=("feed_forward_length",)), ConfigError,
     r"missing the metadata field llama\.feed_forward_length"),
    (dict(omit=("attention.head_count",)), ConfigError,
     r"missing the metadata field llama\.attention\.head_count"),
    (dict(omit=("block_count",)), ConfigError, r"missing the metadata field llama\.block_count"),
    (dict(edit=_rope_scaling("yarn", 4.0)), ConfigError, "rope scaling 'yarn' is not supported"),
    (dict(edit=_rope_scaling("linear")), ConfigError,
     r"missing the metadata field llama\.rope\.scaling\.factor"),
    (dict(edit=_rope_freqs), ConfigError,
     r"per-frequency rope factors \(rope_freqs\.weight\), which are not supported"),
    (dict(omit=("vocab_size",), drop=("token_embd.weight",)), CheckpointError,
     "has no token_embd.weight tensor and no llama.vocab_size or tokenizer.ggml.tokens"),
], ids=["no_ffn_length", "no_head_count", "no_block_count", "yarn", "linear_no_factor",
        "rope_freqs", "no_vocab"])
def test_error_bad_gguf_metadata(tmp_path, kwargs, error, message):
    path = write_llama_gguf(build_hf_llama(), tmp_path / "bad.gguf", **kwargs)
    with pytest.raises(error, match=message):
        load_pretrained(path)


def test_error_partial_rotary(tmp_path):
    def edit(w):
        w.add_rope_dimension_count(4)
    path = write_llama_gguf(build_hf_llama(), tmp_path / "partial.gguf",
                            omit=("rope.dimension_count",), edit=edit)
    with pytest.raises(ConfigError, match=r"partial rotary embeddings \(rope dimension 4 != "
                       r"head_dim 8\) are not supported"):
        load_pretrained(path)


def test_gguf_names_follow_the_gguf_package():
    import gguf
    from ultrametric_jax.io.gguf import gguf_name
    assert gguf_name("model.layers.2.self_attn.q_proj.weight", 3) == "blk.2.attn_q.weight"
    assert gguf_name("lm_head.weight", 3) == gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    with pytest.raises(CheckpointError, match=r"no GGUF name for tensor model\.layers\.3\.mlp"):
        gguf_name("model.layers.3.mlp.up_proj.weight", 3)


# ----------------------------------------------------------------------------- real model

def _shakespeare_ids(tokenizer, text, count):
    ids = tokenizer.encode(text[20000:20000 + 12 * count]).ids
    assert len(ids) >= count
    return np.asarray(ids[:count])[None]


@pytest.mark.slow
def test_smollm2_logits_match_transformers(smollm2_jax, smollm2_forward, smollm2_torch, smollm2_tokenizer,
                                           shakespeare_text):
    cfg = smollm2_jax.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 9, 3, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0
    ids = _shakespeare_ids(smollm2_tokenizer, shakespeare_text, 128)
    ref = hf_logits(smollm2_torch, ids)
    assert rel_err(smollm2_forward(ids), ref) <= 1e-3


@pytest.mark.slow
def test_smollm2_perplexity_matches_transformers(smollm2_forward, smollm2_torch, smollm2_tokenizer,
                                                 shakespeare_text):
    ids = smollm2_tokenizer.encode(shakespeare_text[30000:30000 + 4 * 512 * 8]).ids
    assert len(ids) >= 4 * 512
    batch = np.asarray(ids[: 4 * 512]).reshape(4, 512)

    def perplexity(logits):
        logits = np.asarray(logits, np.float64)[:, :-1]
        logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
        target = np.take_along_axis(logits, batch[:, 1:, None], -1)[..., 0]
        return float(np.exp(np.mean(logz - target)))

    with torch.no_grad():
        ref = perplexity(smollm2_torch(torch.tensor(batch)).logits.float().numpy())
    ours = perplexity(smollm2_forward(batch))
    assert 5 < ref < 100
    assert abs(ours - ref) / ref <= 1e-3, (ours, ref)
