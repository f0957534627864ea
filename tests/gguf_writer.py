"""A float32 GGUF written from a transformers Llama the way llama.cpp's converter writes it:
the tests' GGUF files (tests/io, tests/cli), independent of the loader under test except for
the q/k row permutation, which tests/io/test_gguf.py checks on its own."""
import numpy as np

from ultrametric_jax.io.gguf import permute_rope_rows


def write_llama_gguf(hf, path, arch="llama", drop=(), omit=(), edit=None):
    """Write a float32 GGUF the way llama.cpp's converter does (q/k rows permuted).

    Tensor names come from the gguf package's own llama table. `drop` leaves out tensors (GGUF
    names), `omit` metadata fields (llama.* keys without the prefix); `edit(writer)` adds more.
    """
    import gguf
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch=arch)
    metadata = {
        "block_count": lambda: w.add_block_count(c.num_hidden_layers),
        "context_length": lambda: w.add_context_length(c.max_position_embeddings),
        "embedding_length": lambda: w.add_embedding_length(c.hidden_size),
        "feed_forward_length": lambda: w.add_feed_forward_length(c.intermediate_size),
        "attention.head_count": lambda: w.add_head_count(c.num_attention_heads),
        "attention.head_count_kv": lambda: w.add_head_count_kv(c.num_key_value_heads),
        "rope.freq_base": lambda: w.add_rope_freq_base(float(c.rope_parameters["rope_theta"])),
        "attention.layer_norm_rms_epsilon": lambda: w.add_layer_norm_rms_eps(c.rms_norm_eps),
        "rope.dimension_count": lambda: w.add_rope_dimension_count(
            c.hidden_size // c.num_attention_heads),
        "vocab_size": lambda: w.add_vocab_size(c.vocab_size),
    }
    for key, add in metadata.items():
        if key not in omit:
            add()
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for name, p in hf.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue  # llama.cpp stores tied embeddings once, as token_embd.weight
        arr = p.detach().numpy().astype(np.float32)
        if ".q_proj." in name:
            arr = permute_rope_rows(arr, c.num_attention_heads)
        elif ".k_proj." in name:
            arr = permute_rope_rows(arr, c.num_key_value_heads)
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        if gguf_name not in drop:
            w.add_tensor(gguf_name, arr)
    if edit is not None:
        edit(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)
