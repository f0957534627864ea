"""Throughput on 1 device against data-, fsdp- and tensor-parallel meshes.

Two workloads on a random Llama with injected topology, each with the same model, the same
global batch and the same step function on every mesh; only the mesh changes:
  train  router-training steps (the dense straight-through path, AdamW on the routers);
  eval   hard-topology forward passes with the block-sparse kernel under shard_map.
Prints steps/s per mesh and the speed-up over one device, and writes JSON.

  python experiments/bench_sharding.py --part train --out results/sharding_train.json
  python experiments/bench_sharding.py --part eval --out results/sharding_eval.json
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

from ultrametric_jax.parallel import sharding  # noqa: E402
from ultrametric_jax.surgery import inject as surgery  # noqa: E402
from ultrametric_jax.model.config import LlamaConfig  # noqa: E402
from ultrametric_jax.surgery.config import SurgeryConfig  # noqa: E402
from ultrametric_jax.model.llama import LlamaForCausalLM  # noqa: E402
from ultrametric_jax.surgery.router import RouterParam  # noqa: E402
from ultrametric_jax.run.step import MUTABLE, make_train_step  # noqa: E402

VOCAB = 32000


def build(args, seq, dtype=jnp.bfloat16):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=seq)
    topology = SurgeryConfig(arity=2, max_len=seq, window=args.window, sink_tokens=1,
                             d_max=args.d_max)
    model = LlamaForCausalLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
    surgery.inject_topology(model, topology, nnx.Rngs(params=1, gumbel=2))
    # Off the collapse point, so that the hard topology is sparse and the routes differ by
    # head and token (a collapsed router gives one cluster and full density).
    rng = np.random.default_rng(3)
    for attn in surgery.surgical_layers(model):
        fc2 = attn.router.fc2
        fc2.kernel[...] = jnp.asarray(rng.normal(size=fc2.kernel.shape), jnp.float32)
        fc2.bias[...] = jnp.zeros(fc2.bias.shape, jnp.float32)
    return model


def token_batch(args, batch, seq, mesh):
    ids = np.random.default_rng(0).integers(0, VOCAB, (batch, seq), dtype=np.int32)
    return ids, sharding.global_batch(ids, mesh)


def median_time(run, warmup, steps):
    """(median seconds per call, seconds of the first call, last result)."""
    times, first, out = [], 0.0, None
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(run(i))
        if i == 0:
            first = time.perf_counter() - t0
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), first, out


def time_train(args, mesh):
    model = build(args, args.seq)
    model.train()
    sharding.shard_module(model, mesh)
    _, ids = token_batch(args, args.batch, args.seq, mesh)
    mask = sharding.global_batch(np.ones(ids.shape, bool), mesh)
    graphdef, params, mutable, frozen = nnx.split(model, RouterParam, MUTABLE, ...)
    tx = optax.adamw(1e-3)
    state = {"params": params, "opt": tx.init(params), "mutable": mutable}
    step = make_train_step(graphdef, tx, lambda s: 1.0, lambda s: 0.1)

    def run(i):
        state["params"], state["opt"], state["mutable"], metrics = step(
            state["params"], state["opt"], state["mutable"], frozen, jnp.int32(i),
            ids[None], mask[None])
        return metrics

    med, first, metrics = median_time(run, args.warmup, args.steps)
    return {"median_step_s": med, "steps_per_s": 1 / med, "first_step_s": first,
            "tokens_per_s": args.batch * args.seq / med, "loss": float(metrics["loss"]),
            "grad_norm": float(metrics["grad_norm"])}


def time_eval(args, mesh):
    host_ids, ids = token_batch(args, args.eval_batch, args.eval_seq, mesh)
    model = build(args, args.eval_seq)
    model.eval()
    check = {}
    if mesh.size == 1:
        one = jnp.asarray(host_ids[:1])
        check = {"density": float(surgery.extract_routes(model, one).density),
                 "kernel_vs_dense": kernel_check(args, one)}
    sharding.shard_module(model, mesh)
    surgery.set_attention_impl(model, "kernel", mesh=mesh)
    # The mean logit stands in for a loss: it needs every logit but returns one scalar; the
    # "loss" column of eval rows is this value.
    forward = nnx.jit(lambda m, x: jnp.mean(m(x)))
    med, first, value = median_time(lambda i: forward(model, ids), args.warmup, args.steps)
    return {"median_step_s": med, "steps_per_s": 1 / med, "first_step_s": first,
            "tokens_per_s": args.eval_batch * args.eval_seq / med, "loss": float(value),
            **check}


def kernel_check(args, ids) -> float:
    """max |Δlogit| / max |logit| between the kernel and the dense path, on a one-layer float32
    copy of the model at full matmul precision. With more layers, or in bf16 or TF32, a
    rounding difference in one layer can flip a near-tied route in the next, which changes
    that token's mask and hides what the kernel itself does."""
    one_layer = argparse.Namespace(**dict(vars(args), layers=1))
    model = build(one_layer, ids.shape[1], dtype=jnp.float32)
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))
    with jax.default_matmul_precision("highest"):
        dense = np.asarray(logits(model, ids))
        surgery.set_attention_impl(model, "kernel")
        kernel = np.asarray(logits(model, ids))
    return float(np.abs(kernel - dense).max() / np.abs(dense).max())


def mesh_plans(devices):
    """(device count, mesh axes) per row: one device first, then every layout of 2 and of
    all the devices."""
    plans = [(1, {"data": 1})]
    for n in sorted({2, len(devices)} - {1}):
        if n > len(devices):
            continue
        plans += [(n, {"data": n}), (n, {"fsdp": n}), (n, {"tensor": n})]
        if n >= 4:
            plans.append((n, {"data": n // 2, "tensor": 2}))
    return plans


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("train", "eval"), default="train")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--d-max", type=int, default=3)
    p.add_argument("--seq", type=int, default=512, help="training sequence length")
    p.add_argument("--batch", type=int, default=16, help="training global batch")
    p.add_argument("--eval-seq", type=int, default=8192)
    p.add_argument("--eval-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default="")
    args = p.parse_args()
    devices = jax.devices()
    timer = time_train if args.part == "train" else time_eval
    rows = []
    for n, axes in mesh_plans(devices):
        mesh = sharding.make_mesh(axes, devices[:n])
        row = {"mesh": axes, "devices": n, **timer(args, mesh)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:   # after every row, so that a run cut short keeps what it measured
            os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"args": vars(args), "device": devices[0].device_kind,
                           "rows": rows}, f, indent=1)
    base = rows[0]["steps_per_s"]
    seq, batch = ((args.seq, args.batch) if args.part == "train"
                  else (args.eval_seq, args.eval_batch))
    print(f"\n{args.part}: {devices[0].device_kind}; layers={args.layers} d={args.hidden} "
          f"heads={args.heads}/{args.kv_heads} seq={seq} global batch={batch}"
          + (f" density={rows[0]['density']:.4f} kernel vs dense (max |Δlogit| / max |logit|)="
             f"{rows[0]['kernel_vs_dense']:.2e}" if args.part == "eval" else ""))
    print(f"{'mesh':<30}{'devices':>8}{'steps/s':>10}{'tokens/s':>12}{'speed-up':>10}"
          f"{'per device':>12}{'loss':>12}")
    for r in rows:
        speedup = r["steps_per_s"] / base
        print(f"{json.dumps(r['mesh']):<30}{r['devices']:>8}{r['steps_per_s']:>10.3f}"
              f"{r['tokens_per_s']:>12.0f}{speedup:>10.2f}{speedup / r['devices']:>12.2f}"
              f"{r['loss']:>12.6g}")


if __name__ == "__main__":
    main()
