"""GGUF loading: tiny GGUFs written from a transformers model, bad files, and real SmolLM2."""
import numpy as np
import pytest
import torch

from conftest import build_hf_llama, hf_logits, rel_err
from ultrametric_jax import ConfigError, load_pretrained
from ultrametric_jax.checkpoint import CheckpointError
from ultrametric_jax.checkpoint.gguf import NAME_TABLE, permute_rope_rows, unpermute_rope_rows

pytestmark = pytest.mark.usefixtures("highest_precision")


def write_llama_gguf(hf, path, arch="llama", drop=()):
    """Write a float32 GGUF the way llama.cpp's converter does (q/k rows permuted)."""
    import gguf
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(float(c.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_vocab_size(c.vocab_size)
    reverse = {}
    for hf_pattern, gguf_pattern in NAME_TABLE.items():
        for i in range(c.num_hidden_layers):
            reverse[hf_pattern.format(i=i)] = gguf_pattern.format(i=i)
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp stores tied embeddings once, as token_embd.weight
        arr = p.detach().numpy().astype(np.float32)
        if ".q_proj." in name:
            arr = permute_rope_rows(arr, c.num_attention_heads)
        elif ".k_proj." in name:
            arr = permute_rope_rows(arr, c.num_key_value_heads)
        if reverse[name] not in drop:
            w.add_tensor(reverse[name], arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


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
    from ultrametric_jax.checkpoint import convert_checkpoint
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
