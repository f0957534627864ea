"""`ultrametric generate --model PATH|smollm2 --prompt TEXT [...]`: print a continuation."""
from __future__ import annotations

import argparse
import json
import math
import os

from ultrametric_jax.errors import ConfigError
from ultrametric_jax.io.assets import load_model_and_tokenizer
from ultrametric_jax.io.checkpoints import resolve_dtype
from ultrametric_jax.io.export_format import ROUTER_FILE, SURGERY_CONFIG_KEY
from ultrametric_jax.run.generate import generate_text


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
    check_not_a_surgery_export(args.model)


def check_not_a_surgery_export(path: str) -> None:
    """Refuse a surgery export: this command runs a plain Llama and would silently drop the
    routers, i.e. answer as the dense base model."""
    if not os.path.isdir(path):
        return
    config = os.path.join(path, "config.json")
    has_surgery = False
    if os.path.isfile(config):
        try:
            with open(config) as f:
                has_surgery = SURGERY_CONFIG_KEY in json.load(f)
        except (OSError, ValueError):
            pass  # the loader reports a bad config.json
    if has_surgery or os.path.exists(os.path.join(path, ROUTER_FILE)):
        raise ConfigError(
            f"{path} is a surgery export: `generate` runs a plain Llama and would ignore its "
            f"routers ({ROUTER_FILE}); run the surgical model in PyTorch with "
            f"ultrametric_jax.pytorch.surgical_llama.load_surgical_llama({path!r}), or pass "
            "the base model")


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="ultrametric generate",
                                     description="Generate text with a Llama model.")
    parser.add_argument("--model", required=True, help="checkpoint path or 'smollm2'")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    # User errors reach cli.app as one line (a traceback with --debug).
    check_arguments(args)
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    if tokenizer is None:
        raise ConfigError(f"no tokenizer found for {args.model} (expected tokenizer.json "
                          "beside the weights)")
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0
