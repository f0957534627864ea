"""Checkpoints: load a Llama from HF safetensors, GGUF or the native format; save as HF.

    model = load_pretrained(path, dtype=jnp.float32)   # model.config is its LlamaConfig
    save_hf(model, out_dir, tokenizer=None)             # transformers-loadable directory
"""
from __future__ import annotations

import os

import jax.numpy as jnp

from ultrametric_jax.errors import CheckpointError, ConfigError
from ultrametric_jax.io import native
from ultrametric_jax.io.destination import check_destination, staged_directory
from ultrametric_jax.io.hf import (base_filter, hf_source, load_hf, param_leaves, parse_size,
                                   save_hf_weights, write_hf_config)
from ultrametric_jax.io.tokenizer import save_tokenizer

__all__ = ["CheckpointError", "load_pretrained", "save_hf", "detect_format", "resolve_dtype",
           "convert_checkpoint", "base_filter"]
TARGET_FORMATS = ("native", "hf")

_DTYPES = {"float32": jnp.float32, "fp32": jnp.float32, "bfloat16": jnp.bfloat16,
           "bf16": jnp.bfloat16, "float16": jnp.float16, "fp16": jnp.float16}


def resolve_dtype(dtype):
    """A jnp dtype from a name ('float32', 'bf16', ...) or a dtype."""
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
        return _DTYPES[dtype.lower()]
    return jnp.dtype(dtype).type


def detect_format(path: str) -> str:
    """'gguf', 'native' or 'hf' for a checkpoint path; raises naming what is missing."""
    if os.path.isfile(path):
        if path.endswith(".gguf") or _has_gguf_magic(path):
            return "gguf"
        raise CheckpointError(f"unrecognised checkpoint file {path}: expected a .gguf file or a "
                              "directory (HF safetensors or native)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint path does not exist: {path}")
    if native.is_native(path):
        return "native"
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"missing config.json in {path}")
    return "hf"


def _has_gguf_magic(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def load_pretrained(path: str, dtype=jnp.float32, param_dtype=None, progress: bool = False):
    """Load a Llama model from an HF dir, a .gguf file or a native checkpoint dir.

    `dtype` is the compute dtype and, unless `param_dtype` is given, the parameter dtype.
    Tensors are streamed one at a time into an abstractly built model, each verified (byte
    ranges, shapes, finite values); a damaged file raises a CheckpointError naming it.
    """
    dtype = resolve_dtype(dtype)
    param_dtype = resolve_dtype(param_dtype) if param_dtype is not None else dtype
    fmt = detect_format(path)
    if fmt == "gguf":
        from ultrametric_jax.io.gguf import load_gguf  # the gguf package: only for GGUF files
        return load_gguf(path, dtype=dtype, param_dtype=param_dtype, progress=progress)
    if fmt == "native":
        return native.load_native(path, dtype=dtype, param_dtype=param_dtype)
    return load_hf(path, dtype=dtype, param_dtype=param_dtype, progress=progress)


def convert_checkpoint(src: str, dst: str, to: str = "native", dtype=jnp.float32, tokenizer=None,
                       max_shard_size="5GB", progress: bool = False,
                       overwrite: bool = False) -> str:
    """Convert src (HF dir, .gguf, native dir) to dst in the `to` format ('native' or 'hf').

    HF/GGUF -> native streams one group of tensors at a time and never builds the model;
    the other directions load the model (one copy) and write it out. The destination must be
    new or empty (or `overwrite`), and neither the source nor inside it; the output is
    written beside it and renamed into place when complete. Returns dst's absolute path.
    """
    if to not in TARGET_FORMATS:
        raise ConfigError(f"unknown target format {to!r}; expected one of {TARGET_FORMATS}")
    dtype = resolve_dtype(dtype)
    max_shard_bytes = parse_size(max_shard_size)
    fmt = detect_format(src)
    dst = check_destination(dst, sources=[src], overwrite=overwrite)
    with staged_directory(dst) as out:
        if to == "native" and fmt in ("hf", "gguf"):
            if fmt == "hf":
                config, fetch = hf_source(src)
            else:
                from ultrametric_jax.io.gguf import gguf_source  # the gguf package: GGUF only
                config, fetch = gguf_source(src)
            native.convert_to_native(config, fetch, out, dtype, source=src, tokenizer=tokenizer,
                                     progress=progress)
        else:
            model = load_pretrained(src, dtype=dtype, progress=progress)
            if to == "native":
                native.save_native(model, out, tokenizer=tokenizer)
            else:
                save_hf(model, out, tokenizer=tokenizer, max_shard_size=max_shard_bytes,
                        progress=progress)
    return dst


def save_hf(model, out_dir: str, tokenizer=None, max_shard_size="5GB", progress: bool = False,
            config_extra: dict | None = None) -> str:
    """Write config.json, the base model's safetensors weights and (when known) tokenizer.json.

    Routers of an injected topology are not written: they are no part of a transformers Llama
    (`ultrametric_jax.run.export` writes them). `tokenizer` may be a `tokenizers.Tokenizer`, a
    transformers tokenizer or a path to a tokenizer.json; `config_extra` adds config.json keys.
    """
    os.makedirs(out_dir, exist_ok=True)
    first = param_leaves(model, base_filter())[0][1].get_value()
    write_hf_config(model.config, first.dtype, out_dir, config_extra)
    save_hf_weights(model, out_dir, max_shard_size=max_shard_size, filter_=base_filter(),
                    progress=progress)
    if tokenizer is not None:
        save_tokenizer(tokenizer, out_dir, config=model.config)
    return out_dir
