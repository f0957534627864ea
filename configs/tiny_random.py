"""A tiny random Llama (2 layers, d=32, GQA 4/2) and a byte-level tokenizer, for fast tests.

`write_model(path)` saves it as a Hugging Face directory (config.json, model.safetensors,
tokenizer.json); point `model.path` at that directory:
  ultrametric train --config configs/tiny_random.py --config.model.path=/tmp/tiny
"""
import json
import os
import pathlib
import runpy

import numpy as np

_base = runpy.run_path(str(pathlib.Path(__file__).with_name("base.py")))

ARCH = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2)
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")


def get_config():
    config = _base["get_config"]()
    config.name = "tiny_random"
    config.surgery.levels = 3
    config.surgery.d_max = 1
    config.surgery.max_len = 256
    config.surgery.window = 4
    config.surgery.init_margin = 2.0
    config.surgery.tau_steps = 40
    config.surgery.lambda_ramp_steps = 0
    config.data.max_chars = 60000
    config.data.chunk_chars = 3000
    config.train.steps = 12
    config.train.batch_size = 4
    config.train.seq_len = 32
    config.train.lr = 3e-2
    config.eval.batches = 2
    config.checkpoint.every = 4
    config.checkpoint.keep = 2
    config.mesh.data = 1              # one device unless a test asks for a mesh
    return config


def _tokenizer_json(path: str) -> None:
    """Byte-level BPE without merges: ids 0-2 are special, 3-258 the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({ch: len(SPECIAL_TOKENS) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.save(path)


def write_model(path: str, seed: int = 0) -> str:
    """Write the tiny random Llama as an HF directory at `path`; returns `path`."""
    from safetensors.numpy import save_file

    from ultrametric_jax.model.config import LlamaConfig
    cfg = LlamaConfig(**ARCH)
    rng = np.random.default_rng(seed)
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q_out, kv_out = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd

    def w(out_dim, in_dim, scale=None):
        scale = scale if scale is not None else in_dim ** -0.5
        return (rng.standard_normal((out_dim, in_dim)) * scale).astype(np.float32)

    tensors = {"model.embed_tokens.weight": w(cfg.vocab_size, d, 1.0)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        tensors.update({
            p + "self_attn.q_proj.weight": w(q_out, d, 2.0 * d ** -0.5),
            p + "self_attn.k_proj.weight": w(kv_out, d, 2.0 * d ** -0.5),
            p + "self_attn.v_proj.weight": w(kv_out, d),
            p + "self_attn.o_proj.weight": w(d, q_out),
            p + "mlp.gate_proj.weight": w(f, d),
            p + "mlp.up_proj.weight": w(f, d),
            p + "mlp.down_proj.weight": w(d, f),
            p + "input_layernorm.weight": (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
            p + "post_attention_layernorm.weight":
                (1 + 0.1 * rng.standard_normal(d)).astype(np.float32),
        })
    tensors["model.norm.weight"] = np.ones(d, np.float32)
    tensors["lm_head.weight"] = w(cfg.vocab_size, d)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    hf = cfg.to_hf_dict()
    hf["torch_dtype"] = "float32"
    with open(os.path.join(path, "config.json"), "w") as fh:
        json.dump(hf, fh, indent=2)
    _tokenizer_json(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
                   "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False}, fh)
    return path
