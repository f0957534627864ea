"""One decode step of the route cache against dense decoding over the same cache, on a GPU.

A decode step of a surgical model reads, per (batch, query head), only the keys of its token's
cluster (the block table's pages), the window and the sink: pallas_kernels.decode's
decode_attention, the read plan included. Dense decoding reads the whole cache:
jax.nn.dot_product_attention over every stored key, and a plain jnp softmax (einsum, softmax,
einsum). One run: (1) checks decode_attention against the masked dense reference
(pallas_kernels.reference_attention) on a small cache; (2) times, for each cache length and
batch, the three on a cache of random bf16 keys whose clusters are drawn at random per token
and head (scattered, as learned routes are in token order). Times are medians after warm-up
(block_until_ready). Writes JSON to --out and prints a markdown table last.

  python3 experiments/bench_decode.py                  # GPU, Llama-3-8B attention shape
  python3 experiments/bench_decode.py --toy            # tiny sizes, CPU

Shape: Hq 32, Hkv 8, D 128, bf16, 32 clusters, window 128, sink 1, page 64; cache lengths
8k, 32k, 128k; batch 1 and 8. The new token's key is already in the cache (appending it costs
the same for both caches and is not timed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import rel_err, timed  # noqa: E402
from pallas_kernels import reference_attention  # noqa: E402
from pallas_kernels.decode import (append, decode_attention, init_route_cache,  # noqa: E402
                                   pages_to_read)

FULL = dict(hq=32, hkv=8, d=128, clusters=32, window=128, sink=1, page=64,
            seqs=[8192, 32768, 131072], batches=[1, 8], dtype="bfloat16")
TOY = dict(hq=4, hkv=2, d=16, clusters=8, window=16, sink=1, page=8,
           seqs=[256, 1024], batches=[1, 2], dtype="float32")


def filled_cache(shape, batch, seq, seed):
    """(RouteCache of seq tokens, q [B, 1, Hq, D]): random keys, values, scattered clusters."""
    dtype = jnp.dtype(shape["dtype"])
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    k = jax.random.normal(keys[0], (batch, seq, shape["hkv"], shape["d"]), dtype)
    v = jax.random.normal(keys[1], (batch, seq, shape["hkv"], shape["d"]), dtype)
    ids = jax.random.randint(keys[2], (batch, shape["hq"], seq), 0, shape["clusters"], jnp.int32)
    q = jax.random.normal(keys[3], (batch, 1, shape["hq"], shape["d"]), dtype)
    cache = init_route_cache(batch, seq, shape["hkv"], shape["d"], shape["hq"],
                             shape["clusters"], page_size=shape["page"], dtype=dtype)
    cache = jax.jit(append)(cache, k, v, ids)
    return jax.block_until_ready(cache), q


def route_step(shape, max_pages):
    return jax.jit(lambda cache, q: decode_attention(
        cache, q, window=shape["window"], sink_tokens=shape["sink"], max_pages=max_pages))


@jax.jit
def dense_dpa(cache, q):
    """The dense decode step: every stored key, through jax.nn.dot_product_attention."""
    return jax.nn.dot_product_attention(q, cache.k, cache.v)


@jax.jit
def dense_jnp(cache, q):
    """The dense decode step as a plain softmax over every stored key (grouped heads)."""
    batch, _, hq, d = q.shape
    hkv = cache.k.shape[2]
    qg = q[:, 0].reshape(batch, hkv, hq // hkv, d)
    s = jnp.einsum("bgrd,bsgd->bgrs", qg, cache.k, preferred_element_type=jnp.float32)
    p = jax.nn.softmax(s * d ** -0.5, axis=-1)
    out = jnp.einsum("bgrs,bsgd->bgrd", p.astype(cache.v.dtype), cache.v)
    return out.reshape(batch, 1, hq, d)


def check_correctness(shape, toy):
    """decode_attention against the masked dense reference on float32 copies, and the dense
    steps against each other (they serve as timings only, but must compute the same)."""
    rows = []
    seq, batch = (200, 2) if toy else (2048, 2)
    cache, q = filled_cache(shape, batch, seq, seed=1)
    got = route_step(shape, pages_to_read(cache))(cache, q)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = reference_attention(f32(q), f32(cache.k), f32(cache.v), cache.ids[..., -1:],
                               cache.ids, window=shape["window"], sink_tokens=shape["sink"],
                               q_offset=seq - 1)
    tol = 2e-2 if jnp.dtype(shape["dtype"]).itemsize == 2 else 2e-5
    err = rel_err(got, want)
    rows.append(dict(check="route decode vs masked reference", seq=seq, err=err, tol=tol,
                     ok=err <= tol))
    full = reference_attention(f32(q), f32(cache.k), f32(cache.v), jnp.zeros_like(
        cache.ids[..., -1:]), jnp.zeros_like(cache.ids), window=0, sink_tokens=0,
        q_offset=seq - 1)
    for name, fn in (("dot_product_attention", dense_dpa), ("jnp softmax", dense_jnp)):
        err = rel_err(fn(cache, q), full)
        rows.append(dict(check=f"dense {name} vs reference", seq=seq, err=err, tol=tol,
                         ok=err <= tol))
    return rows


def run(args):
    shape = dict(TOY if args.toy else FULL)
    if args.seqs:
        shape["seqs"] = args.seqs
    if args.batches:
        shape["batches"] = args.batches
    result = dict(device=str(jax.devices()[0]), jax=jax.__version__, shape=shape,
                  correctness=check_correctness(shape, args.toy), rows=[], skipped=[])
    start = time.perf_counter()
    for seq in shape["seqs"]:
        for batch in shape["batches"]:
            if time.perf_counter() - start > args.budget_s:
                result["skipped"].append(dict(seq=seq, batch=batch, why="time budget"))
                continue
            cache, q = filled_cache(shape, batch, seq, seed=seq + batch)
            max_pages = pages_to_read(cache)
            reads = max_pages * shape["page"] + shape["sink"] + shape["window"]
            largest = int(jnp.max(cache.counts))
            row = dict(seq=seq, batch=batch, max_pages=max_pages, reads=reads,
                       largest_cluster=largest)
            for name, fn in (("route_ms", route_step(shape, max_pages)),
                             ("dpa_ms", dense_dpa), ("jnp_ms", dense_jnp)):
                row[name] = 1e3 * timed(fn, cache, q, reps=args.reps)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            del cache, q
    return result


def print_table(result):
    s = result["shape"]
    print(f"\nDecode step, {result['device']}: Hq {s['hq']}, Hkv {s['hkv']}, D {s['d']}, "
          f"{s['dtype']}, {s['clusters']} scattered clusters, window {s['window']}, sink "
          f"{s['sink']}, page {s['page']}. reads = keys gathered per (batch, head) by the "
          "route step (pages of the largest cluster, bucketed, + sink + window).\n")
    for c in result["correctness"]:
        print(f"- check {c['check']} (S={c['seq']}): rel err {c['err']:.2e} "
              f"(tol {c['tol']:.0e}) {'ok' if c['ok'] else 'FAILED'}")
    for skipped in result["skipped"]:
        print(f"- skipped S={skipped['seq']} B={skipped['batch']}: {skipped['why']}")
    print("\n| S | B | reads | route ms | dot_product_attention ms | jnp softmax ms | "
          "speed-up vs dpa |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['seq']} | {r['batch']} | {r['reads']} | {r['route_ms']:.3f} | "
              f"{r['dpa_ms']:.3f} | {r['jnp_ms']:.3f} | {r['dpa_ms'] / r['route_ms']:.2f}x |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPU)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="cases left after this many seconds are skipped")
    parser.add_argument("--out", default="results/bench_decode/",
                        help="JSON file, or a directory (bench_decode[_toy].json in it)")
    args = parser.parse_args()
    result = run(args)
    out = Path(args.out)
    if args.out.endswith("/") or out.is_dir():
        out = out / ("bench_decode_toy.json" if args.toy else "bench_decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    print_table(result)
    if not all(c["ok"] for c in result["correctness"]):
        print("CORRECTNESS CHECK FAILED: the timings above are of wrong results")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
