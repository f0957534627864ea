"""Router-training throughput on 1 device against data- and tensor-parallel meshes.

Same model (a random Llama with injected topology), same global batch, same step function;
only the mesh changes. Prints steps/s per mesh and the speed-up over one device, and writes
JSON.

  python experiments/bench_sharding.py --out results/sharding.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from ultrametric_jax import sharding  # noqa: E402
from ultrametric_jax.config import LlamaConfig, SurgeryConfig  # noqa: E402
from ultrametric_jax.llama import LlamaForCausalLM  # noqa: E402
from ultrametric_jax.router import RouterParam  # noqa: E402
from ultrametric_jax.surgery import inject_topology  # noqa: E402
from ultrametric_jax.train import MUTABLE, make_train_step  # noqa: E402


def build(args):
    config = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=4096)
    surgery = SurgeryConfig(arity=2, max_len=args.seq, window=64, sink_tokens=1)
    model = LlamaForCausalLM(config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                             rngs=nnx.Rngs(0))
    inject_topology(model, surgery, nnx.Rngs(params=1, gumbel=2))
    model.train()
    return model


def time_mesh(args, devices, axes):
    mesh = sharding.make_mesh(axes, devices)
    model = build(args)
    sharding.shard_module(model, mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32000, (args.batch, args.seq), dtype=np.int32)
    mask = np.ones_like(ids, dtype=bool)
    ids, mask = sharding.global_batch(ids, mesh), sharding.global_batch(mask, mesh)
    graphdef, params, mutable, frozen = nnx.split(model, RouterParam, MUTABLE, ...)
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    step = make_train_step(graphdef, tx, lambda s: 1.0, lambda s: 0.1)
    times = []
    t_compile = time.perf_counter()
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        params, opt_state, mutable, metrics = step(params, opt_state, mutable, frozen,
                                                   jnp.int32(i), ids[None], mask[None])
        jax.block_until_ready(metrics["loss"])
        if i == 0:
            t_compile = time.perf_counter() - t_compile
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"mesh": axes, "devices": len(devices), "median_step_s": med, "steps_per_s": 1 / med,
            "first_step_s": t_compile, "loss": float(metrics["loss"])}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    devs = jax.devices()
    plans = [(devs[:1], {"data": 1})]
    n = len(devs)
    if n > 1:
        plans += [(devs, {"data": n}), (devs, {"fsdp": n}), (devs, {"tensor": n})]
        if n >= 4:
            plans.append((devs, {"data": n // 2, "tensor": 2}))
    rows = []
    for devices, axes in plans:
        row = time_mesh(args, devices, axes)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["steps_per_s"]
    print(f"\n{jax.devices()[0].device_kind}; layers={args.layers} d={args.hidden} "
          f"heads={args.heads}/{args.kv_heads} seq={args.seq} global batch={args.batch}")
    print(f"{'mesh':<34}{'devices':>8}{'steps/s':>10}{'speed-up':>10}{'loss':>10}")
    for r in rows:
        print(f"{json.dumps(r['mesh']):<34}{r['devices']:>8}{r['steps_per_s']:>10.3f}"
              f"{r['steps_per_s'] / base:>10.2f}{r['loss']:>10.4f}")
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
