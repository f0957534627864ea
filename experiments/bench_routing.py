"""One layer's routing step (router MLP -> evaluation routes -> cluster ids), as the surgical
model runs it, against its former form, with their accuracy against a float64 router.

  python3 experiments/bench_routing.py                      # GPU: SmolLM2-135M's router shape
  python3 experiments/bench_routing.py --toy                # CPU: a small shape, short lengths

"current": DynamicTopologyRouter (router_matmul: on a GPU the float32 matmuls as bfloat16
pieces on the tensor cores), hard_assignment and hard_digits (small_argmax), cluster_ids, as
SurgicalAttention's evaluation path calls them. "former": the same math with float32 HIGHEST
matmuls (CUDA cores on a GPU) and jnp.argmax over the p children, the routing step before
both changes. Inputs: x random bf16 [1, S, d] (the attention input of a bf16 model), router
weights random at a trained router's scale (fc2 nonzero, so the routes split). For each S and
variant: median ms per layer, times the model's layers, the logits' largest error against a
float64 numpy router, and the share of cluster ids equal to the float64 router's.

Writes JSON (--out; with --toy also an .npz of x and the weights) and prints the table last.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import timed  # noqa: E402
from ultrametric_jax.surgery import tree as um  # noqa: E402
from ultrametric_jax.surgery.router import DynamicTopologyRouter  # noqa: E402

# SmolLM2-135M with the p = 2 tree of max_len 1024 (L 10, d_max 4: cut 6, 64 clusters).
SHAPE = dict(hidden=576, heads=9, levels=10, arity=2, cut=6, layers=30)
TOY_SHAPE = dict(hidden=48, heads=3, levels=4, arity=3, cut=2, layers=2)
VARIANTS = ("former", "current")


def make_router(shape, seed):
    router = DynamicTopologyRouter(shape["hidden"], shape["heads"], shape["levels"],
                                   shape["arity"], 2.0, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    d, out = shape["hidden"], router.fc2.out_features
    router.fc1.bias[...] = jnp.asarray(rng.normal(size=d) * 0.02, jnp.float32)
    router.fc2.kernel[...] = jnp.asarray(rng.normal(size=(d, out)) * 0.05, jnp.float32)
    router.fc2.bias[...] = jnp.asarray(rng.normal(size=out) * 0.1, jnp.float32)
    return router


def weights_of(router):
    return {name: np.asarray(v[...]) for name, v in (
        ("w1", router.fc1.kernel), ("b1", router.fc1.bias), ("w2", router.fc2.kernel),
        ("b2", router.fc2.bias))}


def current_step(router, shape):
    """(logits, cluster ids) of SurgicalAttention's evaluation path."""
    def step(x):
        logits = router(x)
        digits = um.hard_digits(um.hard_assignment(logits))
        return logits, um.cluster_ids(digits, shape["arity"], shape["cut"])
    return step


def former_step(weights, shape):
    """The same step with float32 HIGHEST matmuls and jnp.argmax over the children."""
    w1, b1, w2, b2 = (jnp.asarray(weights[k]) for k in ("w1", "b1", "w2", "b2"))

    def step(x):
        h = jnp.dot(x.astype(jnp.float32), w1, precision=jax.lax.Precision.HIGHEST) + b1
        h = jax.nn.gelu(h, approximate=False)
        logits = jnp.dot(h, w2, precision=jax.lax.Precision.HIGHEST) + b2
        logits = jnp.transpose(logits.reshape(*x.shape[:2], shape["heads"], shape["levels"],
                                              shape["arity"]), (0, 2, 1, 3, 4))
        assign = jax.nn.one_hot(jnp.argmax(logits, -1), shape["arity"], dtype=jnp.float32)
        digits = jnp.argmax(assign, -1).astype(jnp.int32)
        return logits, um.cluster_ids(digits, shape["arity"], shape["cut"])
    return step


def float64_routes(x, weights, shape):
    """(logits [1, H, S, L, p], cluster ids [1, H, S]) of a float64 numpy router."""
    erf = np.vectorize(math.erf)
    w = {k: np.asarray(v, np.float64) for k, v in weights.items()}
    h = np.asarray(x, np.float64) @ w["w1"] + w["b1"]
    h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))
    logits = (h @ w["w2"] + w["b2"]).reshape(*x.shape[:2], shape["heads"], shape["levels"],
                                             shape["arity"]).transpose(0, 2, 1, 3, 4)
    digits = np.argmax(logits, -1)
    ids = np.zeros(digits.shape[:-1], np.int64)
    for level in range(shape["cut"]):
        ids = ids * shape["arity"] + digits[..., level]
    return logits, ids


def run(args):
    shape = TOY_SHAPE if args.toy else SHAPE
    router = make_router(shape, args.seed)
    weights = weights_of(router)
    steps = {"current": current_step(router, shape), "former": former_step(weights, shape)}
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind, "shape": shape,
              "rows": []}
    arrays = dict(weights)
    rng = np.random.default_rng(args.seed + 1)
    for seq in args.seqs:
        x = jnp.asarray(rng.normal(size=(1, seq, shape["hidden"])), jnp.bfloat16)
        x32 = np.asarray(x.astype(jnp.float32))
        arrays[f"x{seq}"] = x32
        ref_logits, ref_ids = float64_routes(x32, weights, shape)
        for name in VARIANTS:
            fn = jax.jit(steps[name])
            ms = 1e3 * timed(lambda x: fn(x)[1], x, reps=args.reps)
            logits, ids = (np.asarray(a) for a in fn(x))
            result["rows"].append({
                "seq": seq, "variant": name, "ms_per_layer": ms,
                "ms_all_layers": ms * shape["layers"],
                "logits_max_abs_err": float(np.abs(logits.astype(np.float64) - ref_logits).max()),
                "ids_equal": float(np.mean(ids == ref_ids))})
            print(json.dumps(result["rows"][-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.toy:
        np.savez(out.with_suffix(".npz"), **arrays)
    print(table(result))
    return result


def table(result):
    lines = [f"Routing step, {result['device']} (jax {result['jax']}), shape {result['shape']}:",
             "| S | variant | ms per layer | x layers | logits max abs err vs float64 | ids equal "
             "to float64's |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['seq']} | {r['variant']} | {r['ms_per_layer']:.4f} | "
                     f"{r['ms_all_layers']:.2f} | {r['logits_max_abs_err']:.2e} | "
                     f"{100 * r['ids_equal']:.4f}% |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", default=None, help="comma-separated lengths (2048,8192; "
                        "--toy 16,40)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="results/routing_step/routing.json")
    parser.add_argument("--toy", action="store_true", help="a small shape (CPU)")
    args = parser.parse_args(argv)
    text = args.seqs if args.seqs is not None else ("16,40" if args.toy else "2048,8192")
    try:
        args.seqs = [int(s) for s in text.split(",") if s]
    except ValueError:
        parser.error(f"--seqs must be comma-separated integers, got {text!r}")
    if not args.seqs or min(args.seqs) < 1:
        parser.error(f"--seqs must be positive lengths, got {text!r}")
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
