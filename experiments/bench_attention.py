"""Block-sparse attention on a GPU against cuDNN's dense causal flash attention.

One run: (1) checks the kernels against the float32 reference at a small size, (2) optionally
sweeps launch parameters at one size and keeps the fastest, (3) times, for every sequence
length, cuDNN (forward and backward) and the block-sparse kernels at several block densities
(contiguous clusters, window 128, sink 1), plus the schedule build. Llama-3-8B attention shape:
B=1, Hq=32, Hkv=8, D=128, bf16. Times are medians; backward is the VJP alone. Writes JSON and
prints the table last.

  python3 experiments/bench_attention.py --out results/bench_attention.json
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pallas_kernels import build_schedule, reference_attention  # noqa: E402
from pallas_kernels.config import GpuTuning  # noqa: E402
from pallas_kernels.ops import attention_with_schedule, make_config  # noqa: E402
from pallas_kernels.schedule import resolve_compaction  # noqa: E402

HQ, HKV, D, WINDOW, SINK = 32, 8, 128, 128, 1
# Added to the ids to time the schedule's general path (ids past its signature range).
TABLE_OFFSET = 1 << 20
# --smoke: a CPU dry run of this script (Pallas interpret mode, XLA attention for cuDNN).
SMOKE = False
# --backend: the kernels timed (gpu: Pallas with the Triton lowering; mosaic; triton).
BACKEND = "gpu"


def timed(fn, *args, reps=7, min_batch_s=0.05):
    """Median seconds per call; calls are queued back to back so launch gaps stay hidden."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    inner = max(1, int(min_batch_s / max(time.perf_counter() - start, 1e-6)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / inner)
    return statistics.median(samples)


def contiguous_clusters(seq, clusters, seed):
    """[1, HQ, seq] ids: `clusters` runs of equal length, cut at a different place per head."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(0, max(seq // clusters, 1), size=(1, HQ, 1))
    ids = np.minimum((np.arange(seq) + shift) * clusters // seq, clusters - 1)
    return jnp.asarray(ids, jnp.int32)


def random_inputs(seq, dtype, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (1, seq, HQ, D), dtype)
    k = jax.random.normal(keys[1], (1, seq, HKV, D), dtype)
    v = jax.random.normal(keys[2], (1, seq, HKV, D), dtype)
    return q, k, v, jax.random.normal(keys[3], (1, seq, HQ, D), dtype)


def rel_err(got, want):
    """max |got - want| / max(1, max |want|). Entries -inf in both (the LSE of a row without a
    key) agree; any other non-finite entry of got gives inf."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    empty = np.isneginf(got) & np.isneginf(want)
    got, want = np.where(empty, 0.0, got), np.where(empty, 0.0, want)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.max(np.abs(got - want)) / max(1.0, np.max(np.abs(want))))


def check_correctness(tuning):
    """Outputs, LSE and gradients against the reference on float32 copies of the inputs."""
    rows = []
    for seq, dtype, clusters, window, sink, tol in [
            (1000, jnp.bfloat16, 4, WINDOW, SINK, 2e-2),
            (777, jnp.float32, 3, 16, 4, 2e-5)]:
        if BACKEND == "mosaic" and jnp.dtype(dtype).itemsize != 2:
            continue                     # the Mosaic forward runs 2-byte inputs only
        q, k, v, ct = random_inputs(seq, dtype, seed=seq)
        qc = contiguous_clusters(seq, clusters, seed=1)
        kw = dict(window=window, sink_tokens=sink)
        cfg = make_config(q, k, q_offset=0, scale=None, backend=BACKEND, interpret=SMOKE,
                          block_q=None, block_k=None, **kw,
                          gpu_tuning=tuning if jnp.dtype(dtype).itemsize == 2 else None)
        sched = build_schedule(qc, qc, block_q=cfg.block_q, block_k=cfg.block_k, **kw)

        def kernel(q, k, v):
            return attention_with_schedule(q, k, v, qc, qc, sched, backend=BACKEND, config=cfg)

        def reference(q, k, v):
            return reference_attention(q, k, v, qc, qc, return_lse=True, **kw)

        def out_lse_grads(f, q, k, v, ct):
            (out, lse), vjp = jax.vjp(f, q, k, v)
            return out, lse, vjp((ct, jnp.zeros_like(lse)))

        got = jax.jit(out_lse_grads, static_argnums=0)(kernel, q, k, v, ct)
        f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
        want = jax.jit(out_lse_grads, static_argnums=0)(reference, *f32)
        errs = {"out": rel_err(got[0], want[0]), "lse": rel_err(got[1], want[1])}
        errs.update({n: rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), got[2], want[2])})
        ok = all(e <= tol for e in errs.values())
        rows.append(dict(seq=seq, dtype=jnp.dtype(dtype).name, tol=tol, ok=ok, **errs))
        print(f"correctness S={seq} {jnp.dtype(dtype).name}: "
              + " ".join(f"{n}={e:.2e}" for n, e in errs.items()) + (" OK" if ok else " FAILED"),
              flush=True)
    return rows


class Problem:
    """Inputs of one sequence length, and the timing of any kernel configuration on them."""

    def __init__(self, seq):
        self.seq = seq
        self.q, self.k, self.v, self.ct = random_inputs(seq, jnp.bfloat16, seed=seq)
        self.schedule_fn = jax.jit(self.schedule, static_argnums=(1, 2, 3))
        self.forward_schedule_fn = jax.jit(
            lambda ids, bq, bk, num_ids=0: _forward_lists(self.schedule(ids, bq, bk,
                                                                        num_ids=num_ids)),
            static_argnums=(1, 2, 3))

    def schedule(self, ids, block_q, block_k, compaction="auto", num_ids=0):
        return build_schedule(ids, ids, window=WINDOW, sink_tokens=SINK, block_q=block_q,
                              block_k=block_k, compaction=compaction, num_ids=num_ids)

    def time_kernels(self, ids, sched, block_q, block_k, tuning, *, fwd=True, bwd=True, reps=7,
                     num_ids=None):
        """Median seconds of the forward ("fwd") and backward ("bwd") kernels on a schedule
        built beforehand; num_ids given: also of one jitted forward that builds its schedule
        with that promise ("fwd_built"), whose excess over "fwd" is what the schedule adds
        where it runs inside the caller's jit, with no dispatch of its own."""
        cfg = make_config(self.q, self.k, window=WINDOW, sink_tokens=SINK, q_offset=0,
                          scale=None, backend=BACKEND, interpret=SMOKE, block_q=block_q,
                          block_k=block_k, gpu_tuning=tuning)

        def forward(q, k, v, ids, sched):
            return attention_with_schedule(q, k, v, ids, ids, sched, backend=BACKEND,
                                           config=cfg)[0]

        out = {}
        if fwd:
            out["fwd"] = timed(jax.jit(forward), self.q, self.k, self.v, ids, sched, reps=reps)
        if fwd and num_ids is not None:
            def built(q, k, v, ids):
                return forward(q, k, v, ids, self.schedule(ids, block_q, block_k,
                                                           num_ids=num_ids))
            out["fwd_built"] = timed(jax.jit(built), self.q, self.k, self.v, ids, reps=reps)
        if bwd:
            _, vjp = jax.vjp(functools.partial(forward, ids=ids, sched=sched),
                             self.q, self.k, self.v)
            out["bwd"] = timed(jax.jit(lambda f, ct: f(ct)), vjp, self.ct, reps=reps)
        return out

    def time_cudnn(self, reps=7):
        def forward(q, k, v):
            impl = "xla" if SMOKE else "cudnn"
            return jax.nn.dot_product_attention(q, k, v, implementation=impl, is_causal=True)

        _, vjp = jax.vjp(forward, self.q, self.k, self.v)
        return {"fwd": timed(jax.jit(forward), self.q, self.k, self.v, reps=reps),
                "bwd": timed(jax.jit(lambda f, ct: f(ct)), vjp, self.ct, reps=reps)}


FWD_VARIANTS = [dict(fwd_warps=8, fwd_stages=3), dict(fwd_warps=8, fwd_stages=2),
                dict(fwd_warps=4, fwd_stages=3)]
BWD_VARIANTS = [
    dict(dq_tile_q=64, dq_tile_k=64, dq_warps=4, dq_stages=2,
         dkv_tile_q=64, dkv_tile_k=64, dkv_warps=4, dkv_stages=2),
    dict(dq_tile_q=128, dq_tile_k=64, dq_warps=8, dq_stages=2,
         dkv_tile_q=64, dkv_tile_k=128, dkv_warps=8, dkv_stages=2),
    dict(dq_tile_q=128, dq_tile_k=32, dq_warps=4, dq_stages=3,
         dkv_tile_q=32, dkv_tile_k=128, dkv_warps=8, dkv_stages=3),
    dict(dq_tile_q=64, dq_tile_k=64, dq_warps=4, dq_stages=3,
         dkv_tile_q=64, dkv_tile_k=64, dkv_warps=4, dkv_stages=3),
]


def tune(seq, blocks):
    """Fastest (blocks, tuning) at full density, forward and backward chosen separately."""
    prob = Problem(seq)
    ids = contiguous_clusters(seq, 1, seed=0)
    rows, best = [], None
    for bq, bk in blocks:
        sched = prob.schedule_fn(ids, bq, bk)
        fwd = []
        for var in FWD_VARIANTS:
            t = prob.time_kernels(ids, sched, bq, bk, GpuTuning(**var), bwd=False, reps=5)["fwd"]
            fwd.append((t, var))
            rows.append(dict(seq=seq, block_q=bq, block_k=bk, **var, fwd_ms=1e3 * t))
            print(f"tune S={seq} blocks {bq}x{bk} {var}: fwd {1e3 * t:.3f} ms", flush=True)
        bwd = []
        for var in BWD_VARIANTS:
            try:
                t = prob.time_kernels(ids, sched, bq, bk, GpuTuning(**var), fwd=False,
                                      reps=5)["bwd"]
            except Exception as e:  # a tile that does not fit is skipped, not fatal
                print(f"tune {var}: failed ({type(e).__name__}: {str(e)[:200]})", flush=True)
                continue
            bwd.append((t, var))
            rows.append(dict(seq=seq, block_q=bq, block_k=bk, **var, bwd_ms=1e3 * t))
            print(f"tune S={seq} blocks {bq}x{bk} {var}: bwd {1e3 * t:.3f} ms", flush=True)
        if not bwd:
            print(f"tune S={seq} blocks {bq}x{bk}: every backward variant failed", flush=True)
            continue
        f, b = min(fwd, key=lambda x: x[0]), min(bwd, key=lambda x: x[0])
        if best is None or f[0] + b[0] < best[0]:
            best = (f[0] + b[0], (bq, bk), GpuTuning(**f[1], **b[1]))
    if best is None:
        raise RuntimeError(f"tune S={seq}: no backward variant ran at any of the blocks {blocks} "
                           "(the failures are printed above)")
    return rows, best[1], best[2]


def pick_clusters(prob, target, block_q, block_k, cache):
    """Number of contiguous clusters whose schedule density is closest to target."""
    lo, hi = max(1, int(0.5 / target)), max(2, int(1.6 / target) + 2)
    best = None
    for n in range(lo, hi):
        if n not in cache:
            ids = contiguous_clusters(prob.seq, n, seed=n)
            cache[n] = (float(prob.schedule_fn(ids, block_q, block_k).density), ids)
        if best is None or abs(cache[n][0] - target) < abs(cache[best][0] - target):
            best = n
    return best, cache[best][1], cache[best][0]


def run(args):
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    tuning, (bq, bk) = GpuTuning(), (128, 128)
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "backend": BACKEND,
              "shape": dict(B=1, Hq=HQ, Hkv=HKV, D=D, dtype="bfloat16", window=WINDOW,
                            sink=SINK)}
    if args.tune:
        result["tuning"], (bq, bk), tuning = tune(args.tune, [(128, 128), (128, 64)])
    result["chosen"] = dict(block_q=bq, block_k=bk, **dataclasses.asdict(tuning))
    print(f"chosen blocks {bq}x{bk} {tuning}", flush=True)
    result["correctness"] = check_correctness(tuning)

    rows = []
    for seq in args.seqs:
        prob = Problem(seq)
        causal_flops = 4 * seq * (seq + 1) / 2 * D * HQ
        dense = prob.time_cudnn(reps=args.reps)
        rows.append(dict(seq=seq, variant="cudnn", density=1.0, fwd_ms=1e3 * dense["fwd"],
                         bwd_ms=1e3 * dense["bwd"],
                         fwd_tflops=causal_flops / dense["fwd"] / 1e12,
                         bwd_tflops=2.5 * causal_flops / dense["bwd"] / 1e12))
        print(f"S={seq} cudnn fwd {1e3 * dense['fwd']:.3f} ms bwd {1e3 * dense['bwd']:.3f} ms",
              flush=True)
        cache = {}
        for target in args.densities:
            n, ids, density = pick_clusters(prob, target, bq, bk, cache)
            sched = prob.schedule_fn(ids, bq, bk)
            t = prob.time_kernels(ids, sched, bq, bk, tuning, bwd=not args.no_backward,
                                  reps=args.reps, num_ids=n)
            t_sched = timed(prob.schedule_fn, ids, bq, bk, reps=args.reps)
            # What a forward alone builds: its key-block lists and density, the transposed
            # (dk/dv) lists left for XLA to drop.
            t_sched_fwd = timed(prob.forward_schedule_fn, ids, bq, bk, reps=args.reps)
            # The same with the ids' range promised (num_ids, as a surgical model knows it):
            # no device-side range check.
            t_promised = timed(prob.forward_schedule_fn, ids, bq, bk, n, reps=args.reps)
            # The same schedule from ids past the signature range (the sorted-table path).
            t_table = timed(prob.schedule_fn, ids + TABLE_OFFSET, bq, bk, reps=args.reps)
            # The same lists compacted by XLA passes instead of the Triton kernel ("auto" on a
            # GPU with jax_triton).
            t_xla = timed(prob.schedule_fn, ids, bq, bk, "xla", reps=args.reps)
            flops = 4 * float(jnp.sum(sched.kv_num_blocks)) * bq * bk * D
            row = dict(seq=seq, variant=f"sparse {target:.0%}", target=target, clusters=n,
                       density=density, fwd_ms=1e3 * t["fwd"], sched_ms=1e3 * t_sched,
                       sched_table_ms=1e3 * t_table, sched_xla_ms=1e3 * t_xla,
                       sched_compaction=resolve_compaction("auto"), fwd_tflops=flops / t["fwd"] / 1e12,
                       fwd_ratio=t["fwd"] / (density * dense["fwd"]),
                       sched_pct_fwd=100 * t_sched / t["fwd"], sched_fwd_ms=1e3 * t_sched_fwd,
                       sched_fwd_pct_fwd=100 * t_sched_fwd / t["fwd"],
                       sched_promised_ms=1e3 * t_promised,
                       sched_promised_pct_fwd=100 * t_promised / t["fwd"],
                       fwd_built_ms=1e3 * t["fwd_built"],
                       sched_inside_pct_fwd=100 * (t["fwd_built"] - t["fwd"]) / t["fwd"])
            if "bwd" in t:    # not timed with --no-backward: the fields stay out of the JSON
                row.update(bwd_ms=1e3 * t["bwd"], bwd_tflops=2.5 * flops / t["bwd"] / 1e12,
                           bwd_ratio=t["bwd"] / (density * dense["bwd"]),
                           sched_pct_fwd_bwd=100 * t_sched / (t["fwd"] + t["bwd"]))
            rows.append(row)
            print(f"S={seq} {row['variant']} density {density:.3f}: fwd {row['fwd_ms']:.3f} ms "
                  f"bwd {row.get('bwd_ms', float('nan')):.3f} ms sched {row['sched_ms']:.3f} ms "
                  f"(the forward's lists alone {row['sched_fwd_ms']:.3f} ms, ids promised "
                  f"{row['sched_promised_ms']:.3f} ms, inside the forward's jit "
                  f"{row['fwd_built_ms'] - row['fwd_ms']:+.3f} ms, sorted-table path "
                  f"{row['sched_table_ms']:.3f} ms, XLA compaction {row['sched_xla_ms']:.3f} ms)",
                  flush=True)
        del prob
    result["rows"] = rows
    return finish(result, args.out, lambda: print_table(rows))


def _forward_lists(sched):
    """The parts of a schedule the forward kernels read."""
    return sched.kv_indices, sched.kv_num_blocks, sched.kv_num_masked, sched.density


def tuning_changes(items) -> dict:
    """{field: int} of command-line items FIELD=INT naming GpuTuning fields; a ValueError that
    names the item and the fields otherwise."""
    fields = {f.name for f in dataclasses.fields(GpuTuning)}
    changes = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in fields or not value.lstrip("-").isdigit():
            raise ValueError(f"--tuning {item!r}: expected FIELD=INT with FIELD one of "
                             f"GpuTuning's: {', '.join(sorted(fields))}")
        changes[name] = int(value)
    GpuTuning(**changes)  # the fields' own checks, with their messages
    return changes


def add_tuning_flag(parser, help: str) -> None:
    """--tuning FIELD=INT ...; the flag may be given more than once, and every item counts."""
    parser.add_argument("--tuning", nargs="+", action="extend", default=[],
                        metavar="FIELD=INT", help=help)


def parsed_tuning(parser, items) -> dict:
    """tuning_changes of --tuning's items; a bad item ends the run as argparse's errors do."""
    try:
        return tuning_changes(items)
    except (TypeError, ValueError) as err:
        parser.error(str(err))


def finish(result: dict, out, print_table) -> int:
    """Writes the JSON (when out is set), prints the table last, and fails (1) when the
    correctness check of the run failed: its timings would be of wrong results."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    print_table()
    if not all(r["ok"] for r in result["correctness"]):
        print("CORRECTNESS CHECK FAILED: the timings above are of wrong results")
        return 1
    return 0


def print_table(rows):
    print("\nratio = time / (density x cuDNN time); targets: fwd and bwd ratio <= 1.3 at density "
          ">= 10% and S >= 32k, <= 1.5 at 100%. TFLOP/s on visited blocks (cuDNN: causal half).\n"
          "sched: the whole schedule; fwd-only: the lists a forward alone reads (the dk/dv "
          "lists dropped by XLA), and its share of the forward; promised: the same with the ids' "
          "range promised (num_ids), no range check; inside: a forward that builds that schedule "
          "in its own jit, less the forward alone, as a share of the forward.")
    head = (f"{'S':>7} {'variant':>12} {'density':>7} {'fwd ms':>9} {'TF/s':>6} {'ratio':>6} "
            f"{'bwd ms':>9} {'TF/s':>6} {'ratio':>6} {'sched ms':>8} {'sched %':>7} "
            f"{'fwd-only':>8} {'%':>6} {'promised':>8} {'%':>6} {'inside':>6} {'table ms':>8} "
            f"{'xla ms':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        sparse = r["variant"] != "cudnn"
        bwd = (f"{r['bwd_ms']:>9.3f} {r['bwd_tflops']:>6.0f} {r.get('bwd_ratio', 1.0):>6.2f}"
               if "bwd_ms" in r else f"{'-':>9} {'-':>6} {'-':>6}")
        print(f"{r['seq']:>7} {r['variant']:>12} {r['density']:>7.3f} {r['fwd_ms']:>9.3f} "
              f"{r['fwd_tflops']:>6.0f} {r.get('fwd_ratio', 1.0):>6.2f} {bwd} "
              + (f"{r['sched_ms']:>8.3f} {r['sched_pct_fwd']:>6.1f}% {r['sched_fwd_ms']:>8.3f} "
                 f"{r['sched_fwd_pct_fwd']:>5.1f}% {r['sched_promised_ms']:>8.3f} "
                 f"{r['sched_promised_pct_fwd']:>5.1f}% {r['sched_inside_pct_fwd']:>5.1f}% "
                 f"{r['sched_table_ms']:>8.3f} "
                 f"{r['sched_xla_ms']:>8.3f}" if sparse else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768, 131072])
    parser.add_argument("--densities", type=float, nargs="+",
                        default=[1.0, 0.5, 0.25, 0.1, 0.05])
    parser.add_argument("--tune", type=int, default=0,
                        help="sequence length of a launch-parameter sweep (0: defaults)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--no-backward", action="store_true",
                        help="time the forward kernels only (the schedule's share is of the forward)")
    parser.add_argument("--out", default="results/bench_attention.json")
    parser.add_argument("--backend", choices=("gpu", "mosaic", "triton"), default="gpu",
                        help="the kernels timed (gpu: Pallas with the Triton lowering)")
    parser.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global SMOKE, BACKEND
    SMOKE, BACKEND = args.smoke, args.backend
    sys.exit(run(args))


if __name__ == "__main__":
    main()
