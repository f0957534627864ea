"""Decode speed: the dense KV cache's on-device loop against one host step per token, for the
base model and the surgical one (masked evaluation path), compile included and excluded.

  python3 experiments/bench_generate.py --batch 64 --new-tokens 128      # SmolLM2-135M shape
  python3 experiments/bench_generate.py --toy                             # CPU: a tiny Llama

The model has random weights and random routers (decode time does not depend on them;
nothing is loaded) and
every prompt decodes all its new tokens (no EOS). Each variant decodes three prompt sets
(the first call compiles); the per-step time is the third call's. The device loop and the host
loop must produce the same tokens (checked, "tokens_equal"). Writes JSON to --out and prints
the table last.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ultrametric_jax.model.config import LlamaConfig
from ultrametric_jax.model.llama import LlamaForCausalLM
from ultrametric_jax.run.generate import generate
from ultrametric_jax.surgery.config import SurgeryConfig
from ultrametric_jax.surgery.inject import base_model_mode, evaluation_mode, inject_topology

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
               tie_word_embeddings=True)
TOY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)


def build(toy: bool):
    config = LlamaConfig(**(TOY if toy else SMOLLM2))
    dtype = jnp.float32 if toy else jnp.bfloat16
    model = LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    surgery = SurgeryConfig(max_len=64 if toy else 2048, d_max=2 if toy else 5,
                            window=4 if toy else 256, init_margin=2.0)
    inject_topology(model, surgery, nnx.Rngs(1))
    # Random routers: the collapse initialisation would make the surgical model the dense one.
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model_routes import perturb_routers
    perturb_routers(model)
    return model


def measure(model, prompt_sets, new_tokens):
    rows, tokens = [], {}
    for name in ("dense", "surgical"):
        for loop in ("device", "host"):
            base = base_model_mode(model) if name == "dense" else contextlib.nullcontext()
            with evaluation_mode(model), base:
                times, outs = [], []
                for prompts in prompt_sets:
                    start = time.perf_counter()
                    out = generate(model, prompts, new_tokens, cache="dense",
                                   return_logits=loop == "host")
                    out = np.asarray(out[0] if loop == "host" else out)
                    times.append(time.perf_counter() - start)
                    outs.append(out)
            tokens[name, loop] = outs
            rows.append(dict(model=name, loop=loop, first_s=times[0], second_s=times[1],
                             third_s=times[2], ms_per_step=1000 * times[2] / new_tokens))
    equal = {name: all(np.array_equal(a, b) for a, b in zip(tokens[name, "device"],
                                                             tokens[name, "host"]))
             for name in ("dense", "surgical")}
    return rows, equal


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=(200, 500),
                        help="prompt lengths drawn uniformly from [lo, hi)")
    parser.add_argument("--toy", action="store_true", help="a tiny random Llama (CPU)")
    parser.add_argument("--out", default="results/bench_generate/bench_generate.json")
    args = parser.parse_args(argv)
    if args.toy:
        args.batch, args.new_tokens, args.prompt_len = 3, 6, (5, 20)
    model = build(args.toy)
    rng = np.random.default_rng(0)
    vocab = model.config.vocab_size

    def prompts():
        return [list(rng.integers(3, vocab, int(n)))
                for n in rng.integers(*args.prompt_len, args.batch)]
    first = prompts()
    rows, equal = measure(model, [first, prompts(), first], args.new_tokens)
    result = dict(device=str(jax.devices()[0].device_kind), batch=args.batch,
                  new_tokens=args.new_tokens, prompt_len=list(args.prompt_len), rows=rows,
                  tokens_equal=equal)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"{result['device']}, batch {args.batch}, {args.new_tokens} new tokens; device and "
          f"host loops give the same tokens: {equal}")
    print("| model | loop | 1st call (compiles) s | 3rd call s | ms / step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['loop']} | {r['first_s']:.2f} | {r['third_s']:.2f} | "
              f"{r['ms_per_step']:.1f} |")
    return result


if __name__ == "__main__":
    main()
