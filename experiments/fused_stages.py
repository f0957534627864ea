"""The sorted layout's fused Triton forward (backend="triton") stage by stage, with its launch
parameters swept, against cuDNN in the same run.

  python3 experiments/fused_stages.py --out results/bench_routed/fused_stages.json
  python3 experiments/fused_stages.py --seqs 32768 --clusters 32 --no-sweep
  python3 experiments/fused_stages.py --seqs 32768 --band-by-position 1   # the other split
  python3 experiments/fused_stages.py --toy       # CPU: triton's interpreter at toy size

Per (S, clusters), each token's cluster drawn at random, the Llama-3-8B attention shape (B=1,
Hq=32, Hkv=8, D=128, bf16, window 128, sink 1, 128 x 128 blocks), each stage jitted alone on
inputs computed beforehand (medians):

  - sort: cluster_order (the stable argsort, sorted ids) and the segment starts of the
    sorted ids; the counting sort (order and starts) per (bins, tile); the forward's padded
    sort_clusters both ways (the counting one with its range check and lax.cond);
  - tree kernel: segment_fwd_kernel in closed form (no schedule) reading q, k, v through the
    order, per GpuTuning tree_* variant (query and key blocks, warps, stages, order loaded a
    block ahead);
  - band kernel: the window and sink pairs merged into the tree's result, the closed-form
    band_fwd_kernel per band_* variant (query and key tiles, warps, stages, query heads per
    program; heads first in the grid, tiles first for the default too);
  - end to end: sorted_attention with the default tuning and with the fastest variant of each
    kernel, with the number of clusters given (no range check), with the order given (the
    two kernels alone, no sort), and with the argsort in place of the counting sort; cuDNN's
    causal attention on the same q, k, v.

Correctness first: the fused forward against the float32 reference at S = 1000 (bf16); then,
in every case, each variant's output and LSE against the default's on the case's own inputs
(the band kernels, after the default tree kernel, against the natural layout's
block-sparse kernels: every allowed pair). Writes JSON to --out and prints the
tables last; exits 1 when a check failed.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
from pathlib import Path

TOY = "--toy" in sys.argv
TUNING: dict = {}  # GpuTuning fields given on the command line (--rescale-slack, ...)
if TOY:  # before triton's first import: its kernels then run in the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import finish, rel_err, timed  # noqa: E402
from pallas_kernels import reference_attention  # noqa: E402
from pallas_kernels.common import pad_axis  # noqa: E402
from pallas_kernels.config import GpuTuning  # noqa: E402
from pallas_kernels.ops import make_config  # noqa: E402
from pallas_kernels.segment_schedule import segment_starts  # noqa: E402
from pallas_kernels import sorted_layout  # noqa: E402
from pallas_kernels.routed import routed_attention  # noqa: E402
from pallas_kernels.sorted_layout import (cluster_order, sort_clusters,  # noqa: E402
                                          sorted_attention, sorted_plan)
from pallas_kernels.triton_backend import counting_sort  # noqa: E402

SHAPE = dict(hq=32, hkv=8, d=128, window=128, sink=1, block=128)
TOY_SHAPE = dict(hq=2, hkv=1, d=16, window=8, sink=1, block=16)
# (tree_tile_q, tree_tile_k, tree_warps, tree_stages, tree_prefetch): the tree pass's query
# and key blocks, warps, stages, order loaded a block ahead; the default first
TREE_VARIANTS = [(64, 32, 4, 3, 1), (64, 64, 4, 3, 1), (128, 128, 8, 2, 1), (64, 32, 4, 4, 1),
                 (128, 32, 8, 3, 1), (64, 16, 4, 3, 1)]
# (band_tile_q, band_tile_k, band_warps, band_stages, band_heads), the default first
BAND_VARIANTS = [(16, 16, 4, 3, 4), (16, 32, 4, 2, 4), (16, 32, 4, 3, 4), (32, 32, 8, 2, 4),
                 (16, 16, 4, 2, 4), (32, 16, 8, 2, 4)]
# (bins, tile) of the counting sort, the default first
SORT_VARIANTS = [(256, 512), (256, 1024), (256, 256), (64, 512)]
TOY_TREE = [(16, 16, 4, 1, 0), (32, 16, 4, 1, 1)]
TOY_BAND = [(16, 16, 4, 1, 1), (16, 16, 4, 1, 2)]


def tree_tuning(variant) -> dict:
    return dict(zip(("tree_tile_q", "tree_tile_k", "tree_warps", "tree_stages",
                     "tree_prefetch"), variant))


def band_tuning(variant) -> dict:
    return dict(zip(("band_tile_q", "band_tile_k", "band_warps", "band_stages", "band_heads"),
                    variant))


def inputs(seq, clusters, shape, seed):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (1, seq, shape["hq"], shape["d"]), jnp.bfloat16)
    k, v = (jax.random.normal(key, (1, seq, shape["hkv"], shape["d"]), jnp.bfloat16)
            for key in keys[1:3])
    ids = jax.random.randint(keys[3], (1, shape["hq"], seq), 0, clusters, jnp.int32)
    return q, k, v, ids


def config(q, k, shape, **tuning):
    return make_config(q, k, window=shape["window"], sink_tokens=shape["sink"], q_offset=0,
                       scale=None, backend="triton", interpret=TOY, block_q=shape["block"],
                       block_k=shape["block"], gpu_tuning=GpuTuning(**TUNING, **tuning))


def check_reference(shape) -> dict:
    """The fused forward (default tuning) against the float32 reference, bf16 inputs."""
    seq = 100 if TOY else 1000
    q, k, v, ids = inputs(seq, 16, shape, seed=seq)
    cfg = config(q, k, shape)
    got = jax.jit(lambda *a: sorted_attention(*a, cfg, "triton"))(q, k, v, ids)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = reference_attention(*f32, ids, ids, window=shape["window"],
                               sink_tokens=shape["sink"], return_lse=True)
    errs = dict(out=rel_err(got[0], want[0]), lse=rel_err(got[1], want[1]))
    row = dict(seq=seq, what="fused forward vs reference", tol=2e-2, **errs,
               ok=all(e <= 2e-2 for e in errs.values()))
    print(f"correctness S={seq}: out={errs['out']:.2e} lse={errs['lse']:.2e} "
          + ("OK" if row["ok"] else "FAILED"), flush=True)
    return row


def run_case(seq, clusters, shape, *, sweep, reps) -> tuple[list, list]:
    """(timing rows, correctness rows) of one (S, clusters)."""
    from pallas_kernels.triton_backend import forward_band, forward_segment
    q, k, v, ids = inputs(seq, clusters, shape, seed=seq + clusters)
    base = config(q, k, shape)
    plan = jax.jit(lambda ids: sorted_plan(ids, base))(ids)
    tree_variants = TOY_TREE if TOY else TREE_VARIANTS
    sp = -(-seq // shape["block"]) * shape["block"]  # the call's padded length
    qp, kp, vp = (pad_axis(x, sp, 1) for x in (q, k, v))
    qcp = pad_axis(ids, sp, 2)
    rows, checks = [], []

    def add(stage, variant, fn, *args):
        ms = 1e3 * timed(jax.jit(fn), *args, reps=reps)
        rows.append(dict(seq=seq, clusters=clusters, stage=stage, variant=str(variant), ms=ms))
        print(f"S={seq} clusters={clusters} {stage} {variant}: {ms:.3f} ms", flush=True)
        return ms

    def check(what, got, want):
        errs = [rel_err(g, w) for g, w in zip(got, want)]
        checks.append(dict(seq=seq, clusters=clusters, what=what, tol=2e-2, out=errs[0],
                           lse=errs[1], ok=max(errs) <= 2e-2))

    cudnn_ms = add("cuDNN causal", "-", lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, implementation="xla" if TOY else "cudnn", is_causal=True), q, k, v)
    add("sort", "argsort", cluster_order, ids)
    add("segment starts", "argsort", segment_starts, plan.sorted_ids)
    starts = jax.jit(segment_starts)(plan.sorted_ids)
    padded = jax.jit(lambda ids: sort_clusters(ids, length=sp, full=False))(ids)
    for bins, tile in SORT_VARIANTS if sweep else SORT_VARIANTS[:1]:
        add("sort and starts, counting", (bins, tile), lambda ids, bins=bins, tile=tile:
            counting_sort(ids, bins, length=sp, tile=tile, invert=False, interpret=TOY)[:2],
            ids)
    fwd_sort = {backend: lambda ids, backend=backend: sort_clusters(
        ids, backend=backend, interpret=TOY, length=sp, full=False)[:2]
        for backend in ("xla", "triton")}
    add("sort and starts, padded (the forward's)", "argsort", fwd_sort["xla"], ids)
    add("sort and starts, padded (the forward's)", "counting, range checked",
        fwd_sort["triton"], ids)
    add("sort and starts, padded (the forward's)", "counting, num_clusters given",
        lambda ids: sort_clusters(ids, backend="triton", interpret=TOY, length=sp, full=False,
                                  num_ids=clusters)[:2], ids)
    got = jax.jit(fwd_sort["triton"])(ids)
    checks.append(dict(seq=seq, clusters=clusters, what="counting sort vs argsort", tol=0,
                       out=float(jnp.sum(got[0] != padded.order)),
                       lse=float(jnp.sum(got[1] != padded.starts)),
                       ok=bool(jnp.all(got[0] == padded.order)
                               & jnp.all(got[1] == padded.starts))))

    def tree(variant):
        cfg = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu,
                                                                **tree_tuning(variant)))
        return lambda q, k, v, order, starts: forward_segment(q, k, v, order, starts, cfg)

    partial = jax.jit(tree(tree_variants[0]))(qp, kp, vp, plan.order, starts)
    tree_ms = {}
    for variant in tree_variants if sweep else tree_variants[:1]:
        tree_ms[variant] = add("tree kernel, closed form", variant, tree(variant), qp, kp, vp,
                               plan.order, starts)
        check(f"tree kernel {variant} vs default",
              jax.jit(tree(variant))(qp, kp, vp, plan.order, starts), partial)
    # every allowed pair's (out, lse) by another path: the natural layout's block-sparse
    # kernels with their schedule
    want = jax.jit(lambda q, k, v, ids: routed_attention(
        q, k, v, ids, window=shape["window"], sink_tokens=shape["sink"], layout="natural",
        backend="triton", interpret=TOY, block_q=shape["block"], block_k=shape["block"],
        return_lse=True))(q, k, v, ids)

    def band(variant, heads_first=True):
        cfg = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu,
                                                                **band_tuning(variant)))
        return lambda q, k, v, o, l: forward_band(q, k, v, qcp, cfg, init=(o, l),
                                                  heads_first=heads_first)

    def check_real(what, got):  # the real rows (the padded kernels' first seq)
        check(what, (got[0][:, :seq], got[1][..., :seq]), want)

    band_variants = TOY_BAND if TOY else BAND_VARIANTS
    band_ms = {}
    for variant in band_variants if sweep else band_variants[:1]:
        band_ms[variant] = add("band kernel, closed form", variant, band(variant), qp, kp, vp,
                               *partial)
        check_real(f"band kernel {variant} after the tree vs the natural layout",
                   jax.jit(band(variant))(qp, kp, vp, *partial))
    add("band kernel, closed form, tiles first", band_variants[0], band(band_variants[0], False),
        qp, kp, vp, *partial)
    check_real("band kernel, tiles first, after the tree vs the natural layout",
               jax.jit(band(band_variants[0], False))(qp, kp, vp, *partial))

    best = (min(tree_ms, key=tree_ms.get), min(band_ms, key=band_ms.get))
    for name, (tv, bv) in {"default": (tree_variants[0], band_variants[0]),
                           "fastest kernels": best}.items():
        if name == "fastest kernels" and best == (tree_variants[0], band_variants[0]):
            continue
        cfg = config(q, k, shape, **tree_tuning(tv), **band_tuning(bv))
        ms = add("end to end", f"{name} {tv} {bv}",
                 lambda q, k, v, ids, cfg=cfg: sorted_attention(q, k, v, ids, cfg, "triton"),
                 q, k, v, ids)
        rows[-1]["speedup_vs_cudnn"] = cudnn_ms / ms
    promised = dataclasses.replace(base, num_ids=clusters)
    ms = add("end to end", f"default, num_clusters given {tree_variants[0]} {band_variants[0]}",
             lambda q, k, v, ids: sorted_attention(q, k, v, ids, promised, "triton"),
             q, k, v, ids)
    rows[-1]["speedup_vs_cudnn"] = cudnn_ms / ms
    # the two kernels alone: what the forward would take with a free sort
    ms = add("end to end", "default, the order given (tree and band kernels, no sort)",
             lambda q, k, v, ids, order, starts: sorted_layout._fused_forward(
                 q, k, v, ids, order, starts, promised), q, k, v, ids, padded.order,
             padded.starts)
    rows[-1]["speedup_vs_cudnn"] = cudnn_ms / ms
    counting, sorted_layout.COUNTING_BINS = sorted_layout.COUNTING_BINS, 0  # argsort only
    try:
        ms = add("end to end", f"default, argsort {tree_variants[0]} {band_variants[0]}",
                 lambda q, k, v, ids: sorted_attention(q, k, v, ids, base, "triton"),
                 q, k, v, ids)
    finally:
        sorted_layout.COUNTING_BINS = counting
    rows[-1]["speedup_vs_cudnn"] = cudnn_ms / ms
    return rows, checks


def print_tables(result):
    print("\n| S | clusters | stage | variant | ms | vs cuDNN |")
    print("|---|---|---|---|---|---|")
    for r in result["rows"]:
        ratio = f"{r['speedup_vs_cudnn']:.2f}x" if "speedup_vs_cudnn" in r else ""
        print(f"| {r['seq']} | {r['clusters']} | {r['stage']} | {r['variant']} | "
              f"{r['ms']:.3f} | {ratio} |")
    bad = [c for c in result["correctness"] if not c["ok"]]
    print(f"\n{len(result['correctness']) - len(bad)} of {len(result['correctness'])} checks "
          "within 2e-2" + "".join(f"\nFAILED: {c}" for c in bad))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="+", default=None)
    parser.add_argument("--clusters", type=int, nargs="+", default=[32])
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="the default tuning only")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", default=None,
                        help="JSON path (default results/bench_routed/fused_stages.json; "
                             "with --toy, fused_stages_toy.json in the temp folder)")
    parser.add_argument("--toy", action="store_true",
                        help="CPU dry run: triton's interpreter, toy shape and lengths")
    parser.add_argument("--rescale-slack", type=int, default=None,
                        help="GpuTuning.rescale_slack of every kernel (default: its own)")
    parser.add_argument("--band-by-position", type=int, choices=(0, 1), default=None,
                        help="GpuTuning.band_by_position: how the tree and band passes split "
                             "the pairs (default: its own)")
    args = parser.parse_args(argv)
    global TOY, TUNING
    TOY = args.toy
    TUNING = {name: value for name, value in (("rescale_slack", args.rescale_slack),
                                              ("band_by_position", args.band_by_position))
              if value is not None}
    if TOY:  # triton reads it at its first import (the kernels' modules import it lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
    shape = dict(TOY_SHAPE if TOY else SHAPE)
    seqs = args.seqs or ([64, 96] if TOY else [8192, 32768, 131072])
    if min(seqs) < shape["block"] or min(args.clusters) < 1:
        parser.error(f"--seqs must be >= one block ({shape['block']}) and --clusters >= 1")
    if not TOY and jax.default_backend() != "gpu":
        parser.error("the fused forward compiles for a GPU; on this host run --toy")
    result = dict(shape=shape, device=str(jax.devices()[0]), tuning=TUNING,
                  correctness=[check_reference(shape)], rows=[])
    for seq in seqs:
        for clusters in args.clusters:
            rows, checks = run_case(seq, clusters, shape, sweep=args.sweep, reps=args.reps)
            result["rows"] += rows
            result["correctness"] += checks
    out = args.out or (Path(tempfile.gettempdir()) / "fused_stages_toy.json" if TOY
                       else "results/bench_routed/fused_stages.json")
    code = finish(result, out, lambda: print_tables(result))
    result["exit_code"] = code
    return result


if __name__ == "__main__":
    sys.exit(main()["exit_code"])
