"""GGUF (llama.cpp) checkpoints of the llama architecture.

Tensors are dequantised one at a time with `gguf.quants.dequantize`. llama.cpp stores the
q/k projection rows permuted (its RoPE rotates interleaved pairs, transformers' rotates the
two halves), so those rows are permuted back here. The config comes from the metadata.

GGUF has no checksums: a file is verified by every tensor's byte range lying inside it (a
truncated file is refused naming the first tensor cut off) and by every dequantised value
being finite (overwritten bytes decode to NaN or inf, most of all in quantisation scales).
"""
from __future__ import annotations

import functools
import os

import gguf
import jax.numpy as jnp
import numpy as np
from gguf.quants import dequantize

from ultrametric_jax.errors import CheckpointError, ConfigError
from ultrametric_jax.io.hf import abstract_model, fill_model
from ultrametric_jax.io.verify import check_finite
from ultrametric_jax.model.config import LlamaConfig


@functools.lru_cache(maxsize=8)
def _name_map(n_blocks: int):
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)


def gguf_name(hf: str, n_blocks: int) -> str:
    """The GGUF name of a transformers tensor name, from the gguf package's own llama table."""
    name = _name_map(n_blocks).get_name(hf, try_suffixes=(".weight", ".bias"))
    if name is None:
        raise CheckpointError(f"no GGUF name for tensor {hf}")
    return name


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (per head: interleaved pairs -> two halves)."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's permutation (the inverse of unpermute_rope_rows), for writing GGUF files."""
    rows = w.shape[0]
    return (w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


class _Truncated(Exception):
    pass


class _RangeCheckedReader(gguf.GGUFReader):
    """A GGUFReader that first checks every tensor's byte range against the file's size (the
    stock reader fails on a truncated file with a numpy reshape error naming no tensor)."""

    def _build_tensors(self, start_offs: int, fields) -> None:
        for field in fields:
            extent = _tensor_extent(field, start_offs)
            if extent is not None and extent[2] > len(self.data):
                name, begin, end = extent
                raise _Truncated(f"tensor {name} needs bytes [{begin}, {end}) but the file has "
                                 f"{len(self.data)} bytes: the file is truncated")
        super()._build_tensors(start_offs, fields)


def _tensor_extent(field, start_offs: int):
    """(name, begin, end) of a tensor-info field, None for a layout this check does not know
    (the reader's own checks then remain)."""
    try:
        _, name, _, dims, raw_type, offset = field.parts
        block, type_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
        begin = int(start_offs + offset[0])
        end = begin + int(np.prod(dims, dtype=np.int64)) * type_bytes // block
    except (ValueError, KeyError, TypeError, IndexError):
        return None
    return bytes(name).decode(errors="replace"), begin, end


def open_gguf(path: str):
    """A gguf.GGUFReader, or a CheckpointError naming the file when it is not valid GGUF."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file does not exist: {path}")
    try:
        return _RangeCheckedReader(path)
    except _Truncated as e:
        raise CheckpointError(f"invalid GGUF file {path}: {e}") from None
    except Exception as e:  # the reader raises ValueError/struct errors/IndexError on garbage
        raise CheckpointError(f"invalid GGUF file {path}: {type(e).__name__}: {e}") from None


def field_value(reader, key: str, default=None):
    """The Python value of a metadata field (scalar, string or list)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    if hasattr(field, "contents"):
        return field.contents()
    # Older gguf releases: decode the parts by hand.
    vals = [field.parts[i] for i in field.data]
    if field.types and field.types[-1].name == "STRING":
        vals = [bytes(v).decode("utf-8") for v in vals]
    else:
        vals = [v.tolist()[0] if hasattr(v, "tolist") else v for v in vals]
    return vals if field.types[0].name == "ARRAY" else vals[0]


def config_from_gguf(reader, path: str = "") -> LlamaConfig:
    arch = field_value(reader, "general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported GGUF architecture {arch!r} in {path}: only 'llama' "
                          "GGUF files can be loaded")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors:
        raise ConfigError(f"GGUF {path} uses per-frequency rope factors (rope_freqs.weight), "
                          "which are not supported")

    def need(key):
        value = field_value(reader, f"llama.{key}")
        if value is None:
            raise ConfigError(f"GGUF {path} is missing the metadata field llama.{key}")
        return value

    hidden = int(need("embedding_length"))
    heads = int(need("attention.head_count"))
    head_dim = int(field_value(reader, "llama.attention.key_length", hidden // heads))
    rope_dim = field_value(reader, "llama.rope.dimension_count", head_dim)
    if int(rope_dim) != head_dim:
        raise ConfigError(f"GGUF {path}: partial rotary embeddings (rope dimension {rope_dim} "
                          f"!= head_dim {head_dim}) are not supported")
    vocab = field_value(reader, "llama.vocab_size")
    if vocab is None:
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        if tokens:
            vocab = len(tokens)
        elif "token_embd.weight" in tensors:
            vocab = tensors["token_embd.weight"].shape[1]  # ggml order: [hidden, vocab]
        else:
            raise CheckpointError(f"GGUF {path} has no token_embd.weight tensor and no "
                                  "llama.vocab_size or tokenizer.ggml.tokens metadata")
    rope_scaling = None
    scaling_type = field_value(reader, "llama.rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(need("rope.scaling.factor"))}
    elif scaling_type not in (None, "none"):
        raise ConfigError(f"GGUF {path}: rope scaling {scaling_type!r} is not supported")
    bias = "blk.0.attn_q.bias" in tensors
    return LlamaConfig(
        vocab_size=int(vocab), hidden_size=hidden,
        intermediate_size=int(need("feed_forward_length")),
        num_hidden_layers=int(need("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(field_value(reader, "llama.attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position_embeddings=int(field_value(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(field_value(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(field_value(reader, "llama.rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=bias, mlp_bias="blk.0.ffn_up.bias" in tensors,
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"))


def read_tensor(tensor, path: str = "") -> np.ndarray:
    """Dequantised float32 tensor in transformers layout ([out, in] for matrices), checked
    finite."""
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    with np.errstate(over="ignore", invalid="ignore"):  # damage is reported just below
        arr = np.asarray(dequantize(tensor.data, tensor.tensor_type), np.float32).reshape(shape)
    check_finite(arr, tensor.name, path, after="dequantisation")
    return arr


def gguf_source(path: str):
    """(config, fetch) of a llama GGUF; fetch(hf_name) dequantises one tensor."""
    reader = open_gguf(path)
    config = config_from_gguf(reader, path)
    tensors = {t.name: t for t in reader.tensors}

    def fetch(hf):
        name = gguf_name(hf, config.num_hidden_layers)
        if name not in tensors:
            raise CheckpointError(f"missing tensor {name} (for {hf}) in GGUF file {path}")
        arr = read_tensor(tensors[name], path)
        heads = (config.num_attention_heads if ".q_proj." in hf
                 else config.num_key_value_heads if ".k_proj." in hf else None)
        # A wrongly shaped tensor is left as is so that the shape check names it.
        if heads and arr.shape[0] == heads * config.head_dim:
            arr = unpermute_rope_rows(arr, heads)
        return arr

    return config, fetch


def load_gguf(path: str, dtype=jnp.float32, param_dtype=None, progress: bool = False):
    config, fetch = gguf_source(path)
    return fill_model(abstract_model(config, dtype, param_dtype), fetch, source=path,
                      progress=progress)
