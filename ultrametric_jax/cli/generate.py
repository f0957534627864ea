"""`ultrametric generate --model PATH|smollm2 --prompt TEXT [...]`: print a continuation."""
from __future__ import annotations

import argparse
import sys


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

    from ultrametric_jax.io.assets import load_model_and_tokenizer
    from ultrametric_jax.io.checkpoints import CheckpointError
    from ultrametric_jax.errors import ConfigError
    from ultrametric_jax.run.generate import generate_text

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, dtype=args.dtype)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"ultrametric generate: error: {e}", file=sys.stderr)
        return 2
    if tokenizer is None:
        parser.error(f"no tokenizer found for {args.model} (expected tokenizer.json)")
    text = generate_text(model, tokenizer, args.prompt, args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    print(args.prompt + text)
    return 0
