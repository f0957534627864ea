"""routed_attention on scattered routes on a GPU, against cuDNN's dense causal flash attention.

One run: (1) checks routed_attention (sorted and natural layouts) against the float32 reference
at a small size, outputs, LSE and gradients; (2) times, for every sequence length and number of
clusters, with each token's cluster drawn at random (what learned routes look like in token
order), cuDNN and routed_attention end to end: sort, gathers, schedules, kernels, merge and
un-permute included, routing excluded. Forward, and forward + backward in one jitted call
(backward = the difference). Times are medians after warm-up. Writes JSON to --out and prints
the table last.

  python3 experiments/bench_routed.py --out results/bench_routed.json
  python3 experiments/bench_routed.py --smollm2-shape --out results/bench_routed_smollm2.json
  python3 experiments/bench_routed.py --breakdown --out results/bench_routed/breakdown.json
  python3 experiments/bench_routed.py --toy --backend triton    # a CPU dry run, small shape

--breakdown times each stage of the sorted layout alone instead (routed_breakdown.py), at 8k
and 32k with 32 clusters unless --seqs / --clusters say otherwise.

Default shape: Llama-3-8B attention (B=1, Hq=32, Hkv=8, D=128, bf16, window 128, sink 1) at
8k, 32k and 128k for 8, 32 and 128 clusters; --smollm2-shape: Hq=9, Hkv=3, D=64 at 2k-8k.
The natural layout visits nearly every block on these routes; it is timed up to
--natural-max-seq only. Cases left when --budget-s has passed are skipped with a note.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import add_tuning_flag, finish, parsed_tuning, rel_err, timed  # noqa: E402
from pallas_kernels import (GpuTuning, band_schedule, build_schedule,  # noqa: E402
                            reference_attention, routed_attention, segment_schedule)
from pallas_kernels.routed import prefer_sorted  # noqa: E402
from pallas_kernels.sorted_layout import band_sink_tokens, sort_by_cluster  # noqa: E402
from routed_breakdown import run_breakdown  # noqa: E402

WINDOW, SINK, BLOCK = 128, 1, 128
SHAPES = {"llama3-8b": dict(hq=32, hkv=8, d=128, seqs=[8192, 32768, 131072]),
          "smollm2": dict(hq=9, hkv=3, d=64, seqs=[2048, 4096, 8192]),
          "toy": dict(hq=4, hkv=2, d=32, seqs=[256], window=32, block=32)}
TOY = False  # --toy: a CPU dry run (interpreted kernels, XLA attention for cuDNN)
BACKEND = "gpu"  # --backend: the kernels' backend ("mosaic": Mosaic GPU forward on Hopper;
#                  "triton": jax-triton, whose sorted forward reads through the order)
TUNING = {}  # --tuning: GpuTuning fields changed from the dtype's defaults


def gpu_tuning(dtype):
    """The GpuTuning of --tuning for inputs of this dtype, or None for its defaults."""
    return GpuTuning.for_dtype(dtype, **TUNING) if TUNING else None


def random_inputs(seq, hq, hkv, d, dtype, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return (jax.random.normal(keys[0], (1, seq, hq, d), dtype),
            jax.random.normal(keys[1], (1, seq, hkv, d), dtype),
            jax.random.normal(keys[2], (1, seq, hkv, d), dtype),
            jax.random.normal(keys[3], (1, seq, hq, d), dtype))


def random_routes(seq, hq, clusters, seed):
    """[1, hq, seq] ids, each token's cluster drawn uniformly at random."""
    return jax.random.randint(jax.random.PRNGKey(seed + 7), (1, hq, seq), 0, clusters, jnp.int32)


def check_correctness(shape, quick=False):
    """Outputs, LSE and gradients of both layouts against the reference on float32 copies
    (quick: the sorted layout in bf16 only)."""
    rows = []
    cases = [(200 if TOY else 1000, jnp.bfloat16, 16, WINDOW, SINK, 2e-2),
             (150 if TOY else 777, jnp.float32, 5, 16, 4, 2e-5)]
    cases = cases[:1] if quick or BACKEND == "mosaic" else cases  # mosaic: 2-byte inputs
    for seq, dtype, clusters, window, sink, tol in cases:
        q, k, v, ct = random_inputs(seq, shape["hq"], shape["hkv"], shape["d"], dtype, seed=seq)
        ids = random_routes(seq, shape["hq"], clusters, seed=seq)
        kw = dict(window=window, sink_tokens=sink)

        def out_lse_grads(f, q, k, v, ct, ids):
            (out, lse), vjp = jax.vjp(lambda q, k, v: f(q, k, v, ids), q, k, v)
            return out, lse, vjp((ct, jnp.zeros_like(lse)))

        f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
        want = jax.jit(out_lse_grads, static_argnums=0)(
            lambda q, k, v, ids: reference_attention(q, k, v, ids, ids, return_lse=True, **kw),
            *f32, ids)
        for layout in ("sorted",) if quick else ("sorted", "natural"):
            def routed(q, k, v, ids, layout=layout):
                return routed_attention(q, k, v, ids, layout=layout, backend=BACKEND,
                                        interpret=TOY, return_lse=True,
                                        gpu_tuning=gpu_tuning(q.dtype), **kw)

            got = jax.jit(out_lse_grads, static_argnums=0)(routed, q, k, v, ct, ids)
            errs = {"out": rel_err(got[0], want[0]), "lse": rel_err(got[1], want[1])}
            errs.update({n: rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), got[2],
                                                              want[2])})
            ok = all(e <= tol for e in errs.values())
            rows.append(dict(seq=seq, dtype=jnp.dtype(dtype).name, layout=layout, tol=tol,
                             ok=ok, **errs))
            print(f"correctness S={seq} {jnp.dtype(dtype).name} {layout}: "
                  + " ".join(f"{n}={e:.2e}" for n, e in errs.items())
                  + (" OK" if ok else " FAILED"), flush=True)
    return rows


@functools.partial(jax.jit, static_argnums=(1,))
def visited_shares(ids, seq):
    """(sorted layout's visited blocks, natural schedule's) over the causal blocks."""
    _, sorted_ids, _ = sort_by_cluster(ids)
    tree = segment_schedule(sorted_ids, block_q=BLOCK, block_k=BLOCK)
    band = band_schedule(1, ids.shape[1], seq, window=WINDOW,  # the sinks: a jnp partial
                         sink_tokens=band_sink_tokens(SINK), block_q=BLOCK, block_k=BLOCK)
    nq = -(-seq // BLOCK)
    causal = ids.shape[1] * nq * (nq + 1) / 2
    natural = build_schedule(ids, ids, window=WINDOW, sink_tokens=SINK, block_q=BLOCK,
                             block_k=BLOCK)
    return (jnp.sum(tree.kv_num_blocks) + jnp.sum(band.kv_num_blocks)) / causal, natural.density


def fits_memory(seq, shape):
    """Rough peak of the sorted layout's forward + backward: about 16 [S, Hq, D] bf16 arrays
    (inputs, per-query-head gathers, outputs, gradients) plus four [Hq, nq, nk] int32 lists."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    nq = -(-seq // BLOCK)
    need = 16 * seq * shape["hq"] * shape["d"] * 2 + 6 * shape["hq"] * nq * nq * 4
    return limit is None or need < 0.8 * limit, need


def time_case(q, k, v, ct, ids, fn, reps):
    """(forward s, forward + backward s) of fn(q, k, v, ids). The routes are an argument of the
    compiled function, as a model's are: routes baked in as constants let XLA constant-fold
    the sort, which takes minutes to compile and measures nothing real."""
    fwd = timed(jax.jit(fn), q, k, v, ids, reps=reps)

    def fwd_bwd(q, k, v, ct, ids):
        _, vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ids), q, k, v)
        return vjp(ct)

    return fwd, timed(jax.jit(fwd_bwd), q, k, v, ct, ids, reps=reps)


def run(args):
    shape = SHAPES["toy" if args.toy else "smollm2" if args.smollm2_shape else "llama3-8b"]
    seqs = args.seqs or shape["seqs"]
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "shape": dict(B=1, Hq=shape["hq"], Hkv=shape["hkv"], D=shape["d"],
                            dtype="bfloat16", window=WINDOW, sink=SINK, block=BLOCK),
              "backend": BACKEND, "tuning": TUNING,
              "correctness": check_correctness(shape, quick=args.breakdown or args.quick_check),
              "rows": [],
              "skipped": []}
    if args.breakdown:
        result["breakdown"] = run_breakdown(
            shape, args.seqs or [8192, 32768], args.clusters or [32], reps=args.reps,
            smoke=TOY, inputs=random_inputs, routes=random_routes, window=WINDOW, sink=SINK,
            block=BLOCK)
        return finish(result, args.out, lambda: print_breakdown(result))
    start = time.perf_counter()
    for seq in seqs:
        ok, need = fits_memory(seq, shape)
        if not ok:
            note = f"S={seq}: skipped, needs about {need / 2**30:.1f} GiB"
            print(note, flush=True)
            result["skipped"].append(note)
            continue
        q, k, v, ct = random_inputs(seq, shape["hq"], shape["hkv"], shape["d"], jnp.bfloat16,
                                    seed=seq)

        def cudnn(q, k, v, ids):
            impl = "xla" if TOY else "cudnn"
            return jax.nn.dot_product_attention(q, k, v, implementation=impl, is_causal=True)

        dense = time_case(q, k, v, ct, jnp.zeros((1, shape["hq"], seq), jnp.int32), cudnn,
                          args.reps)
        print(f"S={seq} cudnn fwd {1e3 * dense[0]:.3f} ms fwd+bwd {1e3 * dense[1]:.3f} ms",
              flush=True)
        for clusters in args.clusters or [8, 32, 128]:
            ids = random_routes(seq, shape["hq"], clusters, seed=seq + clusters)
            share_sorted, share_natural = (float(x) for x in visited_shares(ids, seq))
            for layout in args.layouts:
                label = f"S={seq} clusters={clusters} {layout}"
                if layout == "natural" and seq > args.natural_max_seq:
                    continue
                if time.perf_counter() - start > args.budget_s:
                    note = f"{label}: skipped, the time budget of {args.budget_s} s is spent"
                    print(note, flush=True)
                    result["skipped"].append(note)
                    continue
                def fn(q, k, v, ids, layout=layout):
                    return routed_attention(q, k, v, ids, window=WINDOW, sink_tokens=SINK,
                                            layout=layout, backend=BACKEND, interpret=TOY,
                                            block_q=BLOCK, block_k=BLOCK,
                                            gpu_tuning=gpu_tuning(q.dtype))

                fwd, fb = time_case(q, k, v, ct, ids, fn, args.reps)
                runs_sorted = layout == "sorted" or (layout == "auto"
                                                     and bool(prefer_sorted(share_natural)))
                share = share_sorted if runs_sorted else share_natural
                row = dict(seq=seq, clusters=clusters, layout=layout, visited_share=share,
                           natural_density=share_natural, fwd_ms=1e3 * fwd,
                           fwd_bwd_ms=1e3 * fb, bwd_ms=1e3 * (fb - fwd),
                           cudnn_fwd_ms=1e3 * dense[0], cudnn_fwd_bwd_ms=1e3 * dense[1],
                           cudnn_bwd_ms=1e3 * (dense[1] - dense[0]),
                           fwd_speedup=dense[0] / fwd, fwd_bwd_speedup=dense[1] / fb,
                           bwd_speedup=(dense[1] - dense[0]) / max(fb - fwd, 1e-9))
                result["rows"].append(row)
                print(f"{label}: visited {share:.1%}, fwd {row['fwd_ms']:.3f} ms "
                      f"({row['fwd_speedup']:.2f}x cuDNN), fwd+bwd {row['fwd_bwd_ms']:.3f} ms "
                      f"({row['fwd_bwd_speedup']:.2f}x)", flush=True)
        del q, k, v, ct
    return finish(result, args.out, lambda: print_table(result))


def print_table(result):
    s = result["shape"]
    print(f"\nrouted_attention end to end (routing excluded) vs cuDNN causal, B=1 Hq={s['Hq']} "
          f"Hkv={s['Hkv']} D={s['D']} bf16, window {WINDOW}, sink {SINK}, random routes. "
          "speedup = cuDNN time / routed time; visited = blocks run / causal blocks.")
    head = (f"{'S':>7} {'clusters':>8} {'layout':>8} {'visited':>8} {'fwd ms':>9} "
            f"{'cuDNN':>9} {'x':>6} {'bwd ms':>9} {'cuDNN':>9} {'x':>6} {'f+b ms':>9} "
            f"{'cuDNN':>9} {'x':>6}")
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        print(f"{r['seq']:>7} {r['clusters']:>8} {r['layout']:>8} {r['visited_share']:>8.1%} "
              f"{r['fwd_ms']:>9.3f} {r['cudnn_fwd_ms']:>9.3f} {r['fwd_speedup']:>6.2f} "
              f"{r['bwd_ms']:>9.3f} {r['cudnn_bwd_ms']:>9.3f} {r['bwd_speedup']:>6.2f} "
              f"{r['fwd_bwd_ms']:>9.3f} {r['cudnn_fwd_bwd_ms']:>9.3f} "
              f"{r['fwd_bwd_speedup']:>6.2f}")
    for note in result["skipped"]:
        print(note)


def print_breakdown(result):
    s = result["shape"]
    print(f"\nrouted_attention (sorted layout) stage by stage, B=1 Hq={s['Hq']} Hkv={s['Hkv']} "
          f"D={s['D']} bf16, window {WINDOW}, sink {SINK}, random routes; each stage jitted "
          "alone on precomputed inputs, medians in ms; share = stage / end to end.")
    cases = result["breakdown"]
    head = f"{'stage':<50}" + "".join(f"{c['label']:>22}" for c in cases)
    print(head)
    print("-" * len(head))
    for i, row in enumerate(cases[0]["stages"]):
        line = f"{row['stage']:<50}"
        for c in cases:
            r = c["stages"][i]
            share = "" if r["share"] is None else f" ({r['share']:.0%})"
            line += f"{r['ms']:>14.3f}{share:>8}"
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--clusters", type=int, nargs="+", default=None,
                        help="default 8 32 128 (32 with --breakdown)")
    parser.add_argument("--layouts", nargs="+", default=["sorted", "natural"],
                        choices=["sorted", "natural", "auto"])
    parser.add_argument("--natural-max-seq", type=int, default=32768)
    parser.add_argument("--smollm2-shape", action="store_true",
                        help="SmolLM2-135M's attention shape (Hq=9, Hkv=3, D=64) at 2k-8k")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--budget-s", type=float, default=360.0,
                        help="skip the timings left once this many seconds have passed")
    parser.add_argument("--breakdown", action="store_true",
                        help="time each stage of the sorted layout alone (forward, backward)")
    parser.add_argument("--out", default="results/bench_routed.json")
    parser.add_argument("--backend", choices=["gpu", "mosaic", "triton"], default="gpu",
                        help="the kernels: Pallas through Triton, the Mosaic GPU forward, or "
                             "the Triton kernels through jax-triton (sorted forward fused)")
    parser.add_argument("--quick-check", action="store_true",
                        help="check the sorted layout in bf16 only (the float32 kernels at "
                             "D = 128 take minutes to compile)")
    add_tuning_flag(parser, "GpuTuning fields for the end-to-end rows and the check, e.g. "
                            "dq_atomic=1 (default: the dtype's own)")
    parser.add_argument("--toy", action="store_true",
                        help="CPU dry run: Hq=4, Hkv=2, D=32 at 256 tokens, 8 clusters, "
                             "window 32, 32 x 32 blocks, interpreted kernels, XLA attention "
                             "for cuDNN")
    args = parser.parse_args()
    global TOY, BACKEND, TUNING, WINDOW, BLOCK
    TUNING = parsed_tuning(parser, args.tuning)
    TOY, BACKEND = args.toy, args.backend
    if args.toy:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read at triton's first import
        args.clusters, args.reps = args.clusters or [8], 1
        WINDOW, BLOCK = SHAPES["toy"]["window"], SHAPES["toy"]["block"]
    sys.exit(run(args))


if __name__ == "__main__":
    main()
