"""`ultrametric generate --model PATH|smollm2 --prompt TEXT [...]`: print a continuation.

--model is a Llama checkpoint (HF directory, .gguf, native directory, or 'smollm2'), a surgery
export (`ultrametric export`: the routers are loaded with the base weights) or a surgery run
directory (its latest checkpoint, or --step N; the base model it trained on must still hash
as recorded). A surgical model decodes through the route cache (--cache auto): each new token
reads its cluster's keys, the window and the sink only.
"""
from __future__ import annotations

import argparse
import math
import os

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.io.assets import load_model_and_tokenizer
from ultrametric_jax.io.checkpoints import resolve_dtype
from ultrametric_jax.io.tokenizer import load_tokenizer
from ultrametric_jax.run.checkpoint import CHECKPOINT_SUBDIR
from ultrametric_jax.run.export import (checkpoint_dir_of, load_surgical_export,
                                        surgery_export_config, tokenizer_source)
from ultrametric_jax.run.generate import CACHE_KINDS, generate_text
from ultrametric_jax.run.pipeline import restore_run


def check_arguments(args) -> None:
    """The arguments' errors, found before any model is loaded."""
    if not args.prompt:
        raise ConfigError("--prompt is empty: give some text to continue")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0 and finite (0 = greedy), got "
                          f"{args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1 (leave it out for no limit), got {args.top_k}")
    resolve_dtype(args.dtype)
    kind = model_kind(args.model)
    if args.step is not None and kind != "run":
        raise ConfigError(f"--step picks a checkpoint of a surgery run directory; {args.model} "
                          "is not one (it has no checkpoints/)")


def model_kind(path: str) -> str:
    """"run" (a surgery run directory or its checkpoints/), "export" (a surgery export) or
    "llama" (anything else: the model loader decides)."""
    if os.path.isdir(os.path.join(path, CHECKPOINT_SUBDIR)) or (
            os.path.basename(os.path.normpath(path)) == CHECKPOINT_SUBDIR and os.path.isdir(path)):
        return "run"
    return "export" if surgery_export_config(path) is not None else "llama"


def _run_model(path: str, step):
    """(surgical model, tokenizer) of a run directory's checkpoint."""
    if os.path.basename(os.path.normpath(path)) == CHECKPOINT_SUBDIR:
        directory, step = checkpoint_dir_of(checkpoint=path, step=step)
    else:
        directory, step = checkpoint_dir_of(workdir=path, step=step)
    restored = restore_run(directory, step)
    tokenizer, tokenizer_dir = tokenizer_source(restored.base_model["path"])
    if tokenizer_dir is not None:
        tokenizer = load_tokenizer(tokenizer_dir)
    elif isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    return restored.model, tokenizer


def load_for_generation(args):
    """(model, tokenizer or None) of --model: a Llama, a surgery export or a run directory."""
    kind = model_kind(args.model)
    if kind == "run":
        return _run_model(args.model, args.step)
    if kind == "export":
        return load_surgical_export(args.model, dtype=args.dtype)[0], load_tokenizer(args.model)
    return load_model_and_tokenizer(args.model, dtype=args.dtype)


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="ultrametric generate",
                                     description="Generate text with a Llama model, a surgery "
                                                 "export or a surgery run directory.")
    parser.add_argument("--model", required=True,
                        help="checkpoint path, 'smollm2', surgery export or run directory")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype (a run directory keeps the dtype it trained in)")
    parser.add_argument("--step", type=int, default=None,
                        help="checkpoint step of a run directory (default: the latest)")
    parser.add_argument("--cache", choices=CACHE_KINDS, default="auto",
                        help="KV cache: auto (route cache for a surgical model), route, dense")
    args = parser.parse_args(argv)

    # User errors reach cli.app as one line (a traceback with --debug).
    check_arguments(args)
    model, tokenizer = load_for_generation(args)
    if tokenizer is None:
        raise ConfigError(f"no tokenizer found for {args.model} (expected tokenizer.json "
                          "beside the weights)")
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                         cache=args.cache)
    print(args.prompt + text)
    return 0
