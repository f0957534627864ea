"""Write a synthetic Llama-3-8B-shaped bfloat16 checkpoint as sharded safetensors.

The weights are random bf16 bit patterns (finite, magnitudes 2^-10..2^-3), generated tensor by
tensor and written shard by shard by the safetensors library, so memory stays at about one
shard (--max-shard-size) whatever the model size. It is the input of bench_convert.py.

    python3 experiments/make_synthetic_llama.py --out /tmp/synthetic_llama3_8b
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib

import ml_dtypes
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from ultrametric_jax.io.hf import (abstract_model, hf_name, param_leaves,  # noqa: E402
                                           parse_size, write_sharded)
from ultrametric_jax.model.config import LlamaConfig  # noqa: E402

LLAMA3_8B = dict(
    vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192})


def tensor_specs(cfg: dict) -> list[tuple[str, tuple, np.dtype]]:
    """(transformers name, torch-layout shape, bf16) of every weight of the Llama `cfg`
    describes, as the project's conversion table (checkpoint.hf) names and lays them out."""
    bf16 = np.dtype(ml_dtypes.bfloat16)
    model = abstract_model(LlamaConfig.from_hf_dict({**cfg, "model_type": "llama"}))
    specs = []
    for path, var in param_leaves(model):
        name, transpose = hf_name(path)
        shape = tuple(var.get_value().shape)
        specs.append((name, shape[::-1] if transpose and len(shape) == 2 else shape, bf16))
    return specs


def random_bf16(name: str, shape: tuple) -> np.ndarray:
    """Random finite bf16 values, seeded by the tensor name (cheap: integer ops only)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    # Keep sign and mantissa bits; exponent 117..124, i.e. |x| in [2^-10, 2^-3). In place, so
    # that a tensor costs two buffers of its size.
    exponent = bits >> np.uint16(7)
    exponent &= np.uint16(7)
    exponent += np.uint16(117)
    exponent <<= np.uint16(7)
    bits &= np.uint16(0x807F)
    bits |= exponent
    return bits.view(ml_dtypes.bfloat16)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/synthetic_llama3_8b")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--small", action="store_true", help="tiny dimensions (a smoke test)")
    args = parser.parse_args(argv)
    cfg = dict(LLAMA3_8B)
    if args.small:
        cfg.update(vocab_size=512, hidden_size=128, intermediate_size=256,
                   num_attention_heads=4, num_key_value_heads=2)
    if args.layers is not None:
        cfg["num_hidden_layers"] = args.layers
    specs = tensor_specs(cfg)
    shapes = {name: shape for name, shape, _ in specs}
    start = time.time()
    files = write_sharded(args.out, specs, lambda name: random_bf16(name, shapes[name]),
                          parse_size(args.max_shard_size), progress=True)
    config = {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "head_dim": cfg["hidden_size"] // cfg["num_attention_heads"], "hidden_act": "silu",
              "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    total = sum(os.path.getsize(os.path.join(args.out, n)) for n in files)
    params = sum(int(np.prod(s[1])) for s in specs)
    print(json.dumps({"out": args.out, "files": len(files), "bytes": total, "params": params,
                      "seconds": round(time.time() - start, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
