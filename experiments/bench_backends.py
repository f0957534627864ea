"""The block-sparse kernels' backends side by side on a GPU: "pallas" (Pallas lowered through
Triton, backend="gpu"), "triton" (the kernels written in Triton, through jax_triton) and
"mosaic" (Pallas' Mosaic GPU lowering for Hopper; its backward by MosaicTuning), against
cuDNN's dense causal flash attention in the same run.

One run: (1) checks each backend's output, LSE and gradients against the float32 reference on
random routes (i.i.d. cluster ids per token) and on contiguous clusters; (2) for each sequence
length times cuDNN and each backend at several block densities (contiguous clusters, window 128,
sink 1), forward and forward+backward. Llama-3-8B attention shape: B=1, Hq=32, Hkv=8, D=128,
bf16. Times are medians. Writes JSON and prints the table last; exits 1 when a check failed.

  python3 experiments/bench_backends.py --out results/bench_backends.json
  python3 experiments/bench_backends.py --toy       # a CPU dry run (interpreters, XLA for cuDNN)
  python3 experiments/bench_backends.py --backends triton triton+dq_atomic mosaic mosaic+dq_atomic
  python3 experiments/bench_backends.py --backends triton+dq_atomic --tuning dkv_tile_q=32
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import add_tuning_flag, finish, parsed_tuning, rel_err, timed  # noqa: E402

# name in the table -> backend="auto"'s candidate (autoselect.split_candidate): a backend and
# its tuning; the +dq_atomic rows run the Triton backward as one launch that adds dq with
# atomics (the Mosaic forward's backward is the Triton one)
BACKENDS = {"pallas": "gpu", "triton": "triton", "triton+dq_atomic": "triton+dq_atomic",
            "mosaic": "mosaic", "mosaic+dq_atomic": "mosaic+dq_atomic"}
SINK = 1


def backend_of(name) -> str:
    from pallas_kernels.autoselect import candidate_backend
    return candidate_backend(BACKENDS[name])


def row_tuning(name, dtype, changes=None):
    """(backend, GpuTuning or None for the dtype's defaults) of a table row; changes: GpuTuning
    fields set on top of the row's own (--tuning)."""
    from pallas_kernels.autoselect import split_candidate
    from pallas_kernels.config import GpuTuning
    backend, tuning = split_candidate(BACKENDS[name], dtype)
    if changes:
        tuning = dataclasses.replace(tuning or GpuTuning.for_dtype(dtype), **changes)
    return backend, tuning


def config(name, q, k, *, window, sink_tokens, block, interpret, changes=None):
    """The AttentionConfig of a table row's backend and tuning (row_tuning)."""
    from pallas_kernels.ops import make_config
    backend, tuning = row_tuning(name, q.dtype, changes)
    return make_config(q, k, window=window, sink_tokens=sink_tokens, q_offset=0, scale=None,
                       backend=backend, interpret=interpret, block_q=block, block_k=block,
                       gpu_tuning=tuning)


class Shape:
    """Llama-3-8B's attention shape, or a small one for --toy."""

    def __init__(self, toy):
        self.hq, self.hkv, self.d = (4, 2, 32) if toy else (32, 8, 128)
        self.block = 32 if toy else 128
        self.window = 8 if toy else 128  # toy sequences are shorter than 128
        self.toy = toy


def contiguous_ids(shape, seq, clusters, seed):
    """[1, Hq, seq]: `clusters` runs of equal length, cut at a different place per head."""
    rng = np.random.default_rng(seed)
    shift = rng.integers(0, max(seq // clusters, 1), size=(1, shape.hq, 1))
    return jnp.asarray(np.minimum((np.arange(seq) + shift) * clusters // seq, clusters - 1),
                       jnp.int32)


def random_route_ids(shape, seq, clusters, seed):
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, clusters, size=(1, shape.hq, seq)), jnp.int32)


def random_inputs(shape, seq, dtype, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (1, seq, shape.hq, shape.d), dtype)
    k = jax.random.normal(keys[1], (1, seq, shape.hkv, shape.d), dtype)
    v = jax.random.normal(keys[2], (1, seq, shape.hkv, shape.d), dtype)
    return q, k, v, jax.random.normal(keys[3], (1, seq, shape.hq, shape.d), dtype)


def check_correctness(shape, backends, changes=None):
    """Each backend's out, LSE, dq, dk, dv against the reference on float32 inputs."""
    from pallas_kernels import build_schedule, reference_attention
    from pallas_kernels.ops import attention_with_schedule
    rows = []
    seq_bf16, seq_f32 = (100, 77) if shape.toy else (1000, 777)
    for seq, dtype, ids_fn, clusters, window, sink, tol in [
            (seq_bf16, jnp.bfloat16, random_route_ids, 4, shape.window, SINK, 2e-2),
            (seq_bf16, jnp.bfloat16, contiguous_ids, 4, shape.window, SINK, 2e-2),
            (seq_f32, jnp.float32, random_route_ids, 3, 16, 4, 2e-5)]:
        q, k, v, ct = random_inputs(shape, seq, dtype, seed=seq)
        ids = ids_fn(shape, seq, clusters, seed=1)
        kw = dict(window=window, sink_tokens=sink)

        # ids are an argument of the compiled function: baked in as a constant, XLA
        # constant-folds the schedule's argsort and the reference's mask (minutes at S=1000)
        @functools.partial(jax.jit, static_argnums=0)
        def out_lse_grads(f, q, k, v, ct, ids):
            (out, lse), vjp = jax.vjp(lambda q, k, v: f(q, k, v, ids), q, k, v)
            return out, lse, vjp((ct, jnp.zeros_like(lse)))

        def reference(q, k, v, ids):
            return reference_attention(q, k, v, ids, ids, return_lse=True, **kw)

        f32 = [x.astype(jnp.float32) for x in (q, k, v, ct)]
        want = out_lse_grads(reference, *f32, ids)
        for name in backends:
            backend = backend_of(name)
            if dtype == jnp.float32 and backend == "triton" and not shape.toy:
                # Measured on the H200: compiling the float32 Triton kernels for this check
                # outlasted a 10-minute device call; tests/pallas_kernels/test_triton_backend.py
                # checks them compiled instead.
                continue
            if dtype == jnp.float32 and backend == "mosaic":
                continue  # wgmma on 2-byte inputs only: the backend refuses float32
            cfg = config(name, q, k, **kw, block=shape.block, interpret=shape.toy,
                         changes=changes)

            def kernel(q, k, v, ids, backend=backend, cfg=cfg):
                sched = build_schedule(ids, ids, **kw, block_q=cfg.block_q,
                                       block_k=cfg.block_k)
                return attention_with_schedule(q, k, v, ids, ids, sched, backend=backend,
                                               config=cfg)
            got = out_lse_grads(kernel, q, k, v, ct, ids)
            errs = {"out": rel_err(got[0], want[0]), "lse": rel_err(got[1], want[1])}
            errs.update({n: rel_err(g, w) for n, g, w in zip(("dq", "dk", "dv"), got[2], want[2])})
            ok = all(e <= tol for e in errs.values())
            route = "random" if ids_fn is random_route_ids else "contiguous"
            rows.append(dict(backend=name, seq=seq, dtype=jnp.dtype(dtype).name, routes=route,
                             tol=tol, ok=ok, **errs))
            print(f"correctness {name} S={seq} {jnp.dtype(dtype).name} {route} routes: "
                  + " ".join(f"{n}={e:.2e}" for n, e in errs.items())
                  + (" OK" if ok else " FAILED"), flush=True)
    return rows


class Problem:
    """Inputs of one sequence length and the jitted functions timed on them."""

    def __init__(self, shape, seq, reps, changes=None):
        from pallas_kernels import build_schedule
        self.shape, self.seq, self.reps, self.changes = shape, seq, reps, changes
        self.q, self.k, self.v, self.ct = random_inputs(shape, seq, jnp.bfloat16, seed=seq)
        self.schedule = jax.jit(functools.partial(
            lambda ids, b, w: build_schedule(ids, ids, window=w, sink_tokens=SINK,
                                             block_q=b, block_k=b), b=shape.block,
            w=shape.window))

    def _time_pair(self, forward):
        """(forward, forward + backward) seconds of forward(q, k, v, *rest)."""
        def fwd_bwd(q, k, v, ct, *rest):
            out, vjp = jax.vjp(lambda q, k, v: forward(q, k, v, *rest), q, k, v)
            return out, vjp(ct)

        args, fwd_jit, fwd_bwd_jit = (self.q, self.k, self.v), jax.jit(forward), jax.jit(fwd_bwd)
        return (lambda *rest: timed(fwd_jit, *args, *rest, reps=self.reps),
                lambda *rest: timed(fwd_bwd_jit, *args, self.ct, *rest, reps=self.reps))

    def time_cudnn(self):
        impl = "xla" if self.shape.toy else "cudnn"

        def forward(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, implementation=impl, is_causal=True)

        fwd, both = self._time_pair(forward)
        return fwd(), both()

    def kernel_timers(self, name):
        """Timers of one row's backend; the config is static, so each compiles once per
        length."""
        from pallas_kernels.ops import attention_with_schedule
        backend = backend_of(name)
        cfg = config(name, self.q, self.k, window=self.shape.window, sink_tokens=SINK,
                     block=self.shape.block, interpret=self.shape.toy, changes=self.changes)

        def forward(q, k, v, ids, sched):
            return attention_with_schedule(q, k, v, ids, ids, sched, backend=backend,
                                           config=cfg)[0]

        return self._time_pair(forward)

    def pick_clusters(self, target, cache):
        """Number of contiguous clusters whose schedule density is closest to target."""
        lo, hi = max(1, int(0.5 / target)), max(2, int(1.6 / target) + 2)
        best = None
        for n in range(lo, hi):
            if n not in cache:
                ids = contiguous_ids(self.shape, self.seq, n, seed=n)
                cache[n] = (float(self.schedule(ids).density), ids)
            if best is None or abs(cache[n][0] - target) < abs(cache[best][0] - target):
                best = n
        return cache[best][1], cache[best][0]


def run(args):
    shape = Shape(args.toy)
    backends = {b: BACKENDS[b] for b in args.backends}
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; backends {backends}",
          flush=True)
    result = {"jax": jax.__version__, "device": jax.devices()[0].device_kind,
              "shape": dict(B=1, Hq=shape.hq, Hkv=shape.hkv, D=shape.d, dtype="bfloat16",
                            window=shape.window, sink=SINK, block=shape.block),
              "tuning": args.tuning}
    result["correctness"] = check_correctness(shape, backends, args.tuning)
    rows = []
    for seq in args.seqs:
        start = time.perf_counter()
        prob = Problem(shape, seq, args.reps, args.tuning)
        dense_fwd, dense_both = prob.time_cudnn()
        rows.append(dict(seq=seq, variant="cudnn", density=1.0, fwd_ms=1e3 * dense_fwd,
                         fwd_bwd_ms=1e3 * dense_both))
        print(f"S={seq} cudnn fwd {1e3 * dense_fwd:.3f} ms fwd+bwd {1e3 * dense_both:.3f} ms",
              flush=True)
        timers = {name: prob.kernel_timers(name) for name in backends}
        densities = args.densities if seq <= 32768 else args.long_densities
        cache = {}
        for target in densities:
            ids, density = prob.pick_clusters(target, cache)
            sched = prob.schedule(ids)
            for name, (fwd, both) in timers.items():
                t_fwd, t_both = fwd(ids, sched), both(ids, sched)
                row = dict(seq=seq, variant=f"{name} {target:.0%}", backend=name, target=target,
                           density=density, fwd_ms=1e3 * t_fwd, fwd_bwd_ms=1e3 * t_both,
                           fwd_ratio=t_fwd / (density * dense_fwd),
                           fwd_bwd_ratio=t_both / (density * dense_both))
                rows.append(row)
                print(f"S={seq} {row['variant']} density {density:.3f}: fwd {row['fwd_ms']:.3f} "
                      f"ms fwd+bwd {row['fwd_bwd_ms']:.3f} ms", flush=True)
        print(f"S={seq} done in {time.perf_counter() - start:.0f} s", flush=True)
        del prob
    result["rows"] = rows
    return finish(result, args.out, lambda: print_table(result["correctness"], rows))


def print_table(checks, rows):
    print("\ncorrectness (max |err| / max(1, max |ref|)):")
    for r in checks:
        print(f"  {r['backend']:>6} S={r['seq']:<5} {r['dtype']:>8} {r['routes']:>10}: "
              + " ".join(f"{n} {r[n]:.1e}" for n in ("out", "lse", "dq", "dk", "dv"))
              + f"  (tol {r['tol']:g}) {'OK' if r['ok'] else 'FAILED'}")
    print("\nratio = time / (density x cuDNN time) of the same S; 1.0 is cuDNN's efficiency.")
    head = (f"{'S':>7} {'variant':>22} {'density':>7} {'fwd ms':>9} {'ratio':>6} "
            f"{'fwd+bwd ms':>10} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['seq']:>7} {r['variant']:>22} {r['density']:>7.3f} {r['fwd_ms']:>9.3f} "
              f"{r.get('fwd_ratio', 1.0):>6.2f} {r['fwd_bwd_ms']:>10.3f} "
              f"{r.get('fwd_bwd_ratio', 1.0):>6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=None,
                        help="sequence lengths (default 32768 131072; --toy: 128)")
    parser.add_argument("--densities", type=float, nargs="+", default=None,
                        help="block densities timed up to 32k (default 1 0.5 0.25 0.1 0.05; "
                             "--toy: 1 0.5)")
    parser.add_argument("--long-densities", type=float, nargs="+", default=None,
                        help="densities timed at lengths above 32k (each costs seconds there; "
                             "default 1 0.25 0.05)")
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS),
                        default=["pallas", "triton"])
    add_tuning_flag(parser, "GpuTuning fields set on every row's tuning, e.g. dkv_tile_q=32")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default="results/bench_backends.json")
    parser.add_argument("--toy", action="store_true",
                        help="CPU dry run: small shape, interpreted kernels, XLA for cuDNN")
    args = parser.parse_args()
    args.tuning = parsed_tuning(parser, args.tuning)
    if args.toy:
        if any(backend_of(b) == "mosaic" for b in args.backends):
            # its blocks start at 128 rows: more than a toy sequence
            print("--toy: mosaic left out (its 128-row blocks exceed the toy shape's)")
            args.backends = [b for b in args.backends if backend_of(b) != "mosaic"]
        # triton decides interpreted vs compiled when first imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
        args.seqs = args.seqs or [128]
        args.densities, args.long_densities = args.densities or [1.0, 0.5], [1.0]
        args.reps = 1
    args.seqs = args.seqs or [32768, 131072]
    args.densities = args.densities or [1.0, 0.5, 0.25, 0.1, 0.05]
    args.long_densities = args.long_densities or [1.0, 0.25, 0.05]
    sys.exit(run(args))


if __name__ == "__main__":
    main()
