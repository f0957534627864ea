"""Tokenizers: load tokenizer.json with `tokenizers`, or build one from a GGUF's metadata.

A GGUF carries its vocabulary, merges and special tokens; transformers converts those into a
fast tokenizer, whose tokenizer.json is what this project stores and reads afterwards.
"""
from __future__ import annotations

import importlib.util
import json
import os

from tokenizers import Tokenizer

from ultrametric_jax.errors import CheckpointError

TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: str):
    """A `tokenizers.Tokenizer` for a checkpoint (dir, tokenizer.json or .gguf), or None."""
    if os.path.isdir(path):
        candidate = os.path.join(path, TOKENIZER_FILE)
        return Tokenizer.from_file(candidate) if os.path.exists(candidate) else None
    if path.endswith(".json"):
        return Tokenizer.from_file(path)
    if path.endswith(".gguf"):
        return tokenizer_from_gguf(path) if gguf_has_tokenizer(path) else None
    return None


def gguf_has_tokenizer(gguf_path: str) -> bool:
    from ultrametric_jax.io.gguf import open_gguf  # the gguf package: only for GGUF files
    return "tokenizer.ggml.tokens" in open_gguf(gguf_path).fields


def tokenizer_from_gguf(gguf_path: str):
    """Convert the tokenizer stored in a GGUF file's metadata (takes a few seconds)."""
    from transformers import AutoTokenizer  # seconds to import: only for a GGUF's tokenizer
    # transformers reads GGUF metadata through its PyTorch integration.
    if importlib.util.find_spec("torch") is None:
        raise CheckpointError(
            f"cannot build a tokenizer from the GGUF metadata of {gguf_path}: transformers' "
            "GGUF reader needs PyTorch; install it (`pip install torch`, or "
            "`bash scripts/install.sh`, which installs the CPU build) or pass a tokenizer.json")
    directory, name = os.path.split(os.path.abspath(gguf_path))
    try:
        tok = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    except Exception as e:
        raise CheckpointError(f"cannot build a tokenizer from the GGUF metadata of {gguf_path}: "
                         f"{type(e).__name__}: {e}") from e
    return tok.backend_tokenizer


def as_tokenizer(tokenizer):
    """Normalise a Tokenizer, a transformers tokenizer or a path to a `tokenizers.Tokenizer`."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        tok = load_tokenizer(os.fspath(tokenizer))
        if tok is None:
            raise FileNotFoundError(f"no tokenizer found at {tokenizer}")
        return tok
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend
    raise TypeError(f"unsupported tokenizer object of type {type(tokenizer).__name__}")


def save_tokenizer(tokenizer, out_dir: str, config=None) -> str:
    """Write tokenizer.json (+ a tokenizer_config.json naming the special tokens) to out_dir."""
    tok = as_tokenizer(tokenizer)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, TOKENIZER_FILE)
    tok.save(path)
    special = {}
    if config is not None:
        for field, key in (("bos_token_id", "bos_token"), ("eos_token_id", "eos_token"),
                           ("pad_token_id", "pad_token")):
            token_id = getattr(config, field, None)
            if isinstance(token_id, (list, tuple)):
                token_id = token_id[0] if token_id else None
            if token_id is not None and tok.id_to_token(int(token_id)) is not None:
                special[key] = tok.id_to_token(int(token_id))
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", **special}, f, indent=2)
    return path


def encode(tokenizer, text: str) -> list[int]:
    return as_tokenizer(tokenizer).encode(text, add_special_tokens=False).ids


def decode(tokenizer, ids) -> str:
    return as_tokenizer(tokenizer).decode([int(i) for i in ids], skip_special_tokens=False)
