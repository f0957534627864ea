"""`ultrametric convert SRC DST [--to native|hf] [--dtype auto|float32|bfloat16] [--overwrite]`."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from ultrametric_jax.io.assets import resolve_model
from ultrametric_jax.io.checkpoints import convert_checkpoint, detect_format, resolve_dtype
from ultrametric_jax.io.hf import parse_size
from ultrametric_jax.io.native import FORMAT_FILE
from ultrametric_jax.io.tokenizer import load_tokenizer


def source_dtype(path: str) -> str:
    """The dtype a checkpoint stores its parameters in ('float32' for dequantised GGUF)."""
    fmt = detect_format(path)
    if fmt == "gguf":
        return "float32"
    if fmt == "native":
        with open(os.path.join(path, FORMAT_FILE)) as f:
            return json.load(f).get("param_dtype", "float32")
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="ultrametric convert",
                                     description="Convert a Llama checkpoint.")
    parser.add_argument("src", help="HF dir, .gguf file, native dir, or 'smollm2'")
    parser.add_argument("dst", help="output directory (new or empty, unless --overwrite)")
    parser.add_argument("--to", choices=("native", "hf"), default="native")
    parser.add_argument("--dtype", default="auto",
                        help="float32 | bfloat16 | float16 | auto (keep the source's)")
    parser.add_argument("--max-shard-size", default="5GB", help="HF output shard size")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty destination (never the source)")
    args = parser.parse_args(argv)

    start = time.time()
    # Argument errors first, before anything is read. User errors (UserError, a missing source,
    # a full disk) reach cli.app as one line, or as a traceback with --debug.
    if args.dtype != "auto":
        resolve_dtype(args.dtype)
    parse_size(args.max_shard_size)
    source = resolve_model(args.src)
    dtype = source_dtype(source.weights) if args.dtype == "auto" else args.dtype
    tokenizer = load_tokenizer(source.tokenizer) if source.tokenizer else None
    convert_checkpoint(source.weights, args.dst, to=args.to, dtype=dtype,
                       tokenizer=tokenizer, max_shard_size=args.max_shard_size,
                       progress=True, overwrite=args.overwrite)
    print(f"converted {args.src} -> {args.dst} ({args.to}, {dtype}) in "
          f"{time.time() - start:.1f}s", file=sys.stderr)
    return 0
