"""The Mosaic GPU forward's launch parameters on a Hopper GPU: ring depth, ping-pong, key block
size and a persistent grid, each checked against the Pallas forward and timed against cuDNN in
the same run.

Llama-3-8B attention shape (B=1, Hq=32, Hkv=8, D=128, bf16), window 128, sink 1, contiguous
clusters at the requested densities. Prints one row per variant, the table last.

  python3 experiments/tune_mosaic.py --seq 32768 --out results/tune_mosaic.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_attention import timed  # noqa: E402
from bench_backends import SINK, Shape, contiguous_ids, random_inputs  # noqa: E402


CHOICES = {"both": (True, False), "yes": (True,), "no": (False,)}


def run(args):
    from pallas_kernels import build_schedule
    from pallas_kernels.config import MosaicTuning
    from pallas_kernels.mosaic_gpu import forward as mosaic_forward
    from pallas_kernels.ops import kernel_forward, make_config
    shape = Shape(False)
    q, k, v, _ = random_inputs(shape, args.seq, jnp.bfloat16, seed=args.seq)
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True))
    dense_ms = 1e3 * timed(cudnn, q, k, v, reps=args.reps)
    print(f"S={args.seq} cudnn fwd {dense_ms:.3f} ms", flush=True)
    rows = []
    for clusters, block_k in itertools.product(args.clusters, args.block_k):
        ids = contiguous_ids(shape, args.seq, clusters, seed=clusters)
        mask = dict(window=shape.window, sink_tokens=SINK, q_offset=0)
        cfg = make_config(q, k, **mask, scale=None, backend="mosaic", interpret=False,
                          block_q=128, block_k=block_k)
        sched = jax.jit(lambda ids: build_schedule(ids, ids, **mask, block_q=128,
                                                   block_k=block_k))(ids)
        density = float(sched.density)
        want = jax.jit(lambda q, k, v: kernel_forward(q, k, v, ids, ids, sched, "gpu",
                                                      cfg))(q, k, v)
        for stages, pingpong, persistent in itertools.product(
                args.stages, CHOICES[args.pingpong], CHOICES[args.persistent][::-1]):
            tuning = MosaicTuning(stages=stages, pingpong=pingpong, persistent=persistent)
            f = jax.jit(lambda q, k, v, t=tuning: mosaic_forward(q, k, v, ids, ids, sched, cfg,
                                                                 t))
            try:
                out, lse = f(q, k, v)
                err = float(jnp.max(jnp.abs(out.astype(jnp.float32)
                                            - want[0].astype(jnp.float32))))
                lse_err = float(jnp.max(jnp.where(jnp.isfinite(want[1]),
                                                  jnp.abs(lse - want[1]), 0.0)))
                ms = 1e3 * timed(f, q, k, v, reps=args.reps)
            except Exception as e:  # a variant that does not compile or fit is reported
                print(f"clusters {clusters} block_k {block_k} {tuning}: "
                      f"{type(e).__name__}: {str(e)[:400]}", flush=True)
                continue
            row = dict(clusters=clusters, density=density, block_k=block_k, stages=stages,
                       pingpong=pingpong, persistent=persistent, ms=ms, cudnn_ms=dense_ms,
                       ratio=ms / (density * dense_ms), max_err_vs_pallas=err, lse_err=lse_err)
            rows.append(row)
            print(row, flush=True)
    backward_rows = time_backwards(args, shape, q, k, v) if args.backwards else []
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(seq=args.seq, device=jax.devices()[0]
                                                  .device_kind, jax=jax.__version__,
                                                  rows=rows, backward_rows=backward_rows),
                                             indent=1))
    print("\nratio = time / (density x cuDNN forward time); 1.0 is cuDNN's efficiency")
    print(f"{'clusters':>8} {'density':>7} {'block_k':>7} {'stages':>6} {'pingpong':>8} "
          f"{'persist':>7} {'ms':>8} {'ratio':>6} {'err':>8}")
    for r in rows:
        print(f"{r['clusters']:>8} {r['density']:>7.3f} {r['block_k']:>7} {r['stages']:>6} "
              f"{str(r['pingpong']):>8} {str(r.get('persistent', False)):>7} {r['ms']:>8.3f} "
              f"{r['ratio']:>6.2f} {r['max_err_vs_pallas']:>8.1e}")
    for r in backward_rows:
        print(f"backward {r['backward']:>6} density {r['density']:.3f}: fwd+bwd {r['ms']:.3f} ms, "
              f"bwd {r['bwd_ms']:.3f} ms, ratio {r['bwd_ratio']:.2f}, max grad diff vs pallas "
              f"{r['max_err_vs_pallas']:.1e}")
    return 0 if rows and all(np.isfinite(r["max_err_vs_pallas"]) and r["max_err_vs_pallas"]
                             < 0.05 for r in rows) else 1


def time_backwards(args, shape, q, k, v):
    """Forward + backward of backend="mosaic" with each backward (MosaicTuning.backward),
    against cuDNN's in the same run; gradients compared with the Pallas backward's."""
    from pallas_kernels import build_schedule
    from pallas_kernels.config import MosaicTuning
    from pallas_kernels.ops import attention_with_schedule, make_config
    ct = jax.random.normal(jax.random.PRNGKey(1), q.shape, q.dtype)

    def fwd_bwd(attention):
        def run(q, k, v):
            out, vjp = jax.vjp(attention, q, k, v)
            return out, vjp(ct)
        return jax.jit(run)

    cudnn = fwd_bwd(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True))
    cudnn_fwd = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="cudnn", is_causal=True))
    dense_bwd = timed(cudnn, q, k, v, reps=args.reps) - timed(cudnn_fwd, q, k, v, reps=args.reps)
    rows = []
    for clusters in args.clusters:
        ids = contiguous_ids(shape, args.seq, clusters, seed=clusters)
        mask = dict(window=shape.window, sink_tokens=SINK, q_offset=0)
        sched = jax.jit(lambda ids: build_schedule(ids, ids, **mask, block_q=128,
                                                   block_k=128))(ids)
        density, reference, fwd_s = float(sched.density), None, None
        for choice in ("pallas", "triton", "mosaic"):
            cfg = make_config(q, k, **mask, scale=None, backend="mosaic", interpret=False,
                              block_q=128, block_k=128,
                              mosaic_tuning=MosaicTuning(backward=choice))

            def attention(q, k, v, cfg=cfg):
                return attention_with_schedule(q, k, v, ids, ids, sched, backend="mosaic",
                                               config=cfg)[0]
            try:
                f = fwd_bwd(attention)
                grads = f(q, k, v)[1]
                reference = reference or grads
                err = max(float(jnp.max(jnp.abs(g.astype(jnp.float32) - r.astype(jnp.float32))))
                          for g, r in zip(grads, reference))
                # the forward is the same whatever the backward: timed once
                fwd_s = fwd_s or timed(jax.jit(attention), q, k, v, reps=args.reps)
                both = timed(f, q, k, v, reps=args.reps)
            except Exception as e:  # a backward that does not compile here is reported
                print(f"backward {choice} clusters {clusters}: {type(e).__name__}: "
                      f"{str(e)[:400]}", flush=True)
                continue
            bwd = both - fwd_s
            rows.append(dict(backward=choice, clusters=clusters, density=density, ms=1e3 * both,
                             bwd_ms=1e3 * bwd, cudnn_bwd_ms=1e3 * dense_bwd,
                             bwd_ratio=bwd / (density * dense_bwd), max_err_vs_pallas=err))
            print(rows[-1], flush=True)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--clusters", type=int, nargs="+", default=[1, 10, 20],
                        help="contiguous clusters (1: every causal block)")
    parser.add_argument("--block-k", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--stages", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--pingpong", choices=tuple(CHOICES), default="both",
                        help="MosaicTuning.pingpong variants timed")
    parser.add_argument("--persistent", choices=tuple(CHOICES), default="both",
                        help="MosaicTuning.persistent variants timed")
    parser.add_argument("--backwards", action="store_true",
                        help="also time forward + backward with each MosaicTuning.backward")
    parser.add_argument("--out", default="")
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
