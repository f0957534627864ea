"""One decode step of the route cache against dense decoding over the same cache, on a GPU.

A decode step of a surgical model reads, per (batch, query head), only the keys of its token's
cluster (the block table's pages), the window and the sink: pallas_kernels.decode's
decode_attention, the read plan included, with backend "jnp" (XLA gathers of the plan's rows)
and "triton" (the split-K kernel of triton_decode.py, which reads them in place). Dense
decoding reads the whole cache: jax.nn.dot_product_attention over every stored key, and a
plain jnp softmax (einsum, softmax, einsum). One run: (1) checks both route backends against
the masked dense reference (pallas_kernels.reference_attention) on a small cache; (2) times,
for each cache length and batch, the four (and the read plan alone, plan_ms) on a cache of
random bf16 keys whose clusters are drawn at random per token and head (scattered, as learned
routes are in token order); (3) times the Triton kernel's tunings (rows per chunk, warps,
programs to fill the GPU) at one cache length, each checked against the jnp route. Times are
medians after warm-up (block_until_ready). Writes JSON to --out and prints markdown tables
last. Where the Triton kernel cannot run (no GPU, no jax_triton) its column is skipped, with
the reason in "skipped".

  python3 experiments/bench_decode.py                  # GPU, Llama-3-8B attention shape
  python3 experiments/bench_decode.py --toy            # tiny sizes, CPU
  python3 experiments/bench_decode.py --toy --interpret  # + the Triton kernel interpreted

Shape: Hq 32, Hkv 8, D 128, bf16, 32 clusters, window 128, sink 1, page 64; cache lengths
8k, 32k, 128k; batch 1 and 8. The new token's key is already in the cache (appending it costs
the same for both caches and is not timed).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import rel_err, timed  # noqa: E402
from pallas_kernels import reference_attention  # noqa: E402
from pallas_kernels.decode import (append, decode_attention, decode_read_plan,  # noqa: E402
                                   init_route_cache, pages_to_read)

FULL = dict(hq=32, hkv=8, d=128, clusters=32, window=128, sink=1, page=64,
            seqs=[8192, 32768, 131072], batches=[1, 8], dtype="bfloat16")
TOY = dict(hq=4, hkv=2, d=16, clusters=8, window=16, sink=1, page=8,
           seqs=[256, 1024], batches=[1, 2], dtype="float32")
# The Triton kernel's tuning: (rows per chunk, warps, programs the splits aim for).
SWEEP = [(block_r, warps, programs) for block_r in (32, 64, 128) for warps in (4, 8)
         for programs in (264, 1056)]


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


# --interpret: the Triton kernel runs in triton's interpreter (CPU; checks the code paths, its
# times mean nothing).
INTERPRET = False


def route_step(shape, max_pages, backend):
    return jax.jit(lambda cache, q: decode_attention(
        cache, q, window=shape["window"], sink_tokens=shape["sink"], max_pages=max_pages,
        backend=backend, interpret=INTERPRET and backend == "triton"))


def triton_step(shape, max_pages, *, block_r, num_warps, programs):
    """The route step through the Triton kernel at one tuning (decode_attention's plan)."""
    from pallas_kernels.triton_decode import choose_splits, decode_attention_triton

    def step(cache, q):
        positions, valid = decode_read_plan(cache, window=shape["window"],
                                            sink_tokens=shape["sink"], max_pages=max_pages)
        splits = choose_splits(q.shape[0] * q.shape[2], positions.shape[-1], block_r,
                               programs)
        prefix = max_pages * shape["page"]
        used = jnp.sum(valid[..., :prefix], axis=-1, dtype=jnp.int32)
        return decode_attention_triton(q, cache.k, cache.v, jnp.where(valid, positions, -1),
                                       scale=shape["d"] ** -0.5, prefix=prefix, used=used,
                                       splits=splits,
                                       block_r=block_r, num_warps=num_warps,
                                       interpret=INTERPRET)
    return jax.jit(step)


def plan_step(shape, max_pages):
    """The read plan alone (part of both route steps): how much of a step it costs."""
    return jax.jit(lambda cache, q: decode_read_plan(
        cache, window=shape["window"], sink_tokens=shape["sink"], max_pages=max_pages))


def triton_unavailable():
    """Why the compiled Triton kernel cannot run here (None when it can)."""
    try:
        from pallas_kernels.triton_backend import unavailable
        return unavailable(INTERPRET)
    except Exception as e:  # noqa: BLE001  (reported, not fatal: the jnp columns still run)
        return f"{type(e).__name__}: {e}"


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


def check_correctness(shape, toy, backends):
    """decode_attention (each route backend) against the masked dense reference on float32
    copies, and the dense steps against each other (they serve as timings only, but must
    compute the same)."""
    rows = []
    seq, batch = (200, 2) if toy else (2048, 2)
    cache, q = filled_cache(shape, batch, seq, seed=1)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    want = reference_attention(f32(q), f32(cache.k), f32(cache.v), cache.ids[..., -1:],
                               cache.ids, window=shape["window"], sink_tokens=shape["sink"],
                               q_offset=seq - 1)
    tol = 2e-2 if jnp.dtype(shape["dtype"]).itemsize == 2 else 2e-5
    for backend in backends:
        err = rel_err(route_step(shape, pages_to_read(cache), backend)(cache, q), want)
        rows.append(dict(check=f"route decode ({backend}) vs masked reference", seq=seq,
                         err=err, tol=tol, ok=err <= tol))
    full = reference_attention(f32(q), f32(cache.k), f32(cache.v), jnp.zeros_like(
        cache.ids[..., -1:]), jnp.zeros_like(cache.ids), window=0, sink_tokens=0,
        q_offset=seq - 1)
    for name, fn in (("dot_product_attention", dense_dpa), ("jnp softmax", dense_jnp)):
        err = rel_err(fn(cache, q), full)
        rows.append(dict(check=f"dense {name} vs reference", seq=seq, err=err, tol=tol,
                         ok=err <= tol))
    return rows


def sweep(shape, args, result):
    """Triton tunings at one cache length, per batch: ms of each (the plan included)."""
    seq = args.sweep_seq or (shape["seqs"][len(shape["seqs"]) // 2])
    start = time.perf_counter()
    tol = 2e-2 if jnp.dtype(shape["dtype"]).itemsize == 2 else 2e-5
    for batch in shape["batches"]:
        cache, q = filled_cache(shape, batch, seq, seed=seq + batch)
        max_pages = pages_to_read(cache)
        want = route_step(shape, max_pages, "jnp")(cache, q)
        for block_r, warps, programs in SWEEP:
            if time.perf_counter() - start > args.sweep_budget_s:
                result["skipped"].append(dict(seq=seq, batch=batch, why=(
                    f"tuning block_r={block_r} warps={warps} programs={programs}: time "
                    "budget")))
                continue
            fn = triton_step(shape, max_pages, block_r=block_r, num_warps=warps,
                             programs=programs)
            err = rel_err(fn(cache, q), want)  # a tuning must not change the result
            row = dict(seq=seq, batch=batch, block_r=block_r, num_warps=warps,
                       programs=programs, ms=1e3 * timed(fn, cache, q, reps=args.reps),
                       err_vs_jnp=err, ok=err <= tol)
            result["sweep"].append(row)
            print(json.dumps(row), flush=True)
        del cache, q


def run(args):
    shape = dict(TOY if args.toy else FULL)
    if args.seqs:
        shape["seqs"] = args.seqs
    if args.batches:
        shape["batches"] = args.batches
    backends = ["jnp"]
    why = triton_unavailable()
    skipped = []
    if why is None:
        backends.append("triton")
    else:
        skipped.append(dict(seq="all", batch="all", why=f"route_triton_ms: {why}"))
    result = dict(device=str(jax.devices()[0]), jax=jax.__version__, shape=shape,
                  correctness=check_correctness(shape, args.toy, backends), rows=[],
                  sweep=[], skipped=skipped)
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
            timings = [(f"route_{b}_ms", route_step(shape, max_pages, b)) for b in backends]
            timings.append(("plan_ms", plan_step(shape, max_pages)))
            for name, fn in timings + [("dpa_ms", dense_dpa), ("jnp_ms", dense_jnp)]:
                row[name] = 1e3 * timed(fn, cache, q, reps=args.reps)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
            del cache, q
    if "triton" in backends and args.sweep_budget_s > 0:
        sweep(shape, args, result)
    return result


def _ms(row, key):
    return f"{row[key]:.3f}" if key in row else "-"


def _speedup(row, key):
    return f"{row['dpa_ms'] / row[key]:.2f}x" if key in row else "-"


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
    if result["sweep"]:
        print("\nTriton kernel tunings (block_r rows per chunk, warps, programs the splits "
              "aim for; ms per step, plan included):\n")
        print("| S | B | block_r | warps | programs | ms | rel err vs jnp route |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in sorted(result["sweep"], key=lambda r: (r["batch"], r["ms"])):
            print(f"| {r['seq']} | {r['batch']} | {r['block_r']} | {r['num_warps']} | "
                  f"{r['programs']} | {r['ms']:.3f} | {r['err_vs_jnp']:.1e}"
                  f"{'' if r['ok'] else ' FAILED'} |")
    print("\nplan ms: the read plan alone (included in both route columns).\n")
    print("| S | B | reads | route jnp ms | route triton ms | plan ms | dot_product_attention ms "
          "| jnp softmax ms | jnp speed-up vs dpa | triton speed-up vs dpa |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in result["rows"]:
        print(f"| {r['seq']} | {r['batch']} | {r['reads']} | {_ms(r, 'route_jnp_ms')} | "
              f"{_ms(r, 'route_triton_ms')} | {_ms(r, 'plan_ms')} | {r['dpa_ms']:.3f} | "
              f"{r['jnp_ms']:.3f} | "
              f"{_speedup(r, 'route_jnp_ms')} | {_speedup(r, 'route_triton_ms')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toy", action="store_true", help="tiny sizes (CPU)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=150.0,
                        help="cases left after this many seconds are skipped")
    parser.add_argument("--sweep-seq", type=int, default=None,
                        help="cache length of the Triton tuning sweep (default: the middle one)")
    parser.add_argument("--sweep-budget-s", type=float, default=90.0,
                        help="tunings left after this many seconds are skipped (0: no sweep)")
    parser.add_argument("--out", default="results/bench_decode/",
                        help="JSON file, or a directory (bench_decode[_toy].json in it)")
    parser.add_argument("--interpret", action="store_true",
                        help="the Triton kernel in triton's interpreter (CPU, toy sizes)")
    args = parser.parse_args()
    if args.interpret:
        global INTERPRET
        INTERPRET = True
        os.environ["TRITON_INTERPRET"] = "1"  # before triton's first import
    result = run(args)
    out = Path(args.out)
    if args.out.endswith("/") or out.is_dir():
        out = out / ("bench_decode_toy.json" if args.toy else "bench_decode.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    print_table(result)
    if not all(c["ok"] for c in result["correctness"] + result["sweep"]):
        print("CORRECTNESS CHECK FAILED: the timings above are of wrong results")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
