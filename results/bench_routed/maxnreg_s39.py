"""Register caps (ptxas maxnreg) for the tree and band kernels: more programs per SM?"""
import dataclasses, sys
sys.path.insert(0, '.'); sys.path.insert(0, 'experiments')
import jax, jax.numpy as jnp
from bench_attention import timed, rel_err
from fused_stages import inputs, config, SHAPE, tree_tuning, band_tuning
from pallas_kernels.common import pad_axis
from pallas_kernels.sorted_layout import sorted_plan, sorted_attention
from pallas_kernels.segment_schedule import segment_starts
from pallas_kernels.triton_backend import forward_band, forward_segment
import jax_triton.triton_lib as jtl
import triton.backends.nvidia.compiler as nv

CAPS, current = {}, [None]
orig_parse, orig_get = nv.CUDABackend.parse_options, jtl.get_or_create_triton_kernel
def parse(self, opts):
    o = orig_parse(self, opts)
    return dataclasses.replace(o, maxnreg=current[0]) if current[0] else o
def get(init, platform, fn, *a, **kw):
    name = getattr(fn, "__name__", None) or fn.fn.__name__
    current[0] = CAPS.get(name)
    try:
        return orig_get(init, platform, fn, *a, **kw)
    finally:
        current[0] = None
nv.CUDABackend.parse_options = parse
jtl.get_or_create_triton_kernel = get

seq = int(sys.argv[1]) if len(sys.argv) > 1 else 32768
q, k, v, ids = inputs(seq, 32, SHAPE, seed=seq + 32)
base = config(q, k, SHAPE)
plan = jax.jit(lambda ids: sorted_plan(ids, base))(ids)
sp = -(-seq // 128) * 128
qp, kp, vp = (pad_axis(x, sp, 1) for x in (q, k, v)); qcp = pad_axis(ids, sp, 2)
starts = jax.jit(segment_starts)(plan.sorted_ids)
cud = 1e3 * timed(jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="cudnn", is_causal=True)), q, k, v, reps=5)
print(f"cuDNN {cud:.3f} ms", flush=True)
rows = []
def run(label, fn, args, ref=None):
    jtl._COMPILED_KERNEL_CACHE.clear()
    f = jax.jit(fn)
    got = f(*args)
    ms = 1e3 * timed(f, *args, reps=7)
    err = max(rel_err(g, w) for g, w in zip(got, ref)) if ref is not None else 0.0
    rows.append((label, ms, err)); print(f"{label}: {ms:.3f} ms err {err:.1e}", flush=True)
    return got
def tree(variant):
    cfg = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, **tree_tuning(variant)))
    return lambda q, k, v, o, s: forward_segment(q, k, v, o, s, cfg)
ref_tree = None
import os
TREE = [((64, 32, 4, 3, 1), None), ((128, 32, 8, 3, 1), 128), ((128, 32, 8, 2, 1), 128),
        ((128, 64, 8, 3, 1), 128), ((128, 64, 8, 2, 1), 128), ((128, 128, 8, 2, 1), 128),
        ((64, 32, 4, 1, 1), 128), ((128, 64, 8, 2, 1), 120), ((128, 32, 8, 2, 1), 120)]
for variant, cap in TREE:
    CAPS.clear(); CAPS["segment_fwd_kernel"] = cap
    out = run(f"tree {variant} maxnreg {cap}", tree(variant), (qp, kp, vp, plan.order, starts), ref_tree)
    ref_tree = ref_tree or out
if os.environ.get("TREE_ONLY"):
    print("\n| variant | ms | rel err vs first |")
    for label, ms, err in rows:
        print(f"| {label} | {ms:.3f} | {err:.1e} |")
    sys.exit(0)
def band(variant):
    cfg = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, **band_tuning(variant)))
    return lambda q, k, v, o, l: forward_band(q, k, v, qcp, cfg, init=(o, l))
ref_band = None
for variant, cap in [((16, 16, 4, 2, 4), None), ((16, 16, 4, 2, 4), 96), ((16, 16, 4, 1, 4), 96),
                     ((16, 16, 4, 2, 4), 80), ((16, 32, 4, 2, 4), 96)]:
    CAPS.clear(); CAPS["band_fwd_kernel"] = cap
    out = run(f"band {variant} maxnreg {cap}", band(variant), (qp, kp, vp, *ref_tree), ref_band)
    ref_band = ref_band or out
best_t = min((r for r in rows if r[0].startswith("tree")), key=lambda r: r[1])
best_b = min((r for r in rows if r[0].startswith("band")), key=lambda r: r[1])
print("best", best_t, best_b)
e2e_ref = None
for tc, bc, tv, bv in [(None, None, (64, 32, 4, 3, 1), (16, 16, 4, 2, 4)),
                       (128, 96, (64, 32, 4, 2, 1), (16, 16, 4, 2, 4)),
                       (128, None, (64, 32, 4, 2, 1), (16, 16, 4, 2, 4)),
                       (None, 96, (64, 32, 4, 3, 1), (16, 16, 4, 2, 4))]:
    CAPS.clear(); CAPS.update(segment_fwd_kernel=tc, band_fwd_kernel=bc)
    cfg = config(q, k, SHAPE, **tree_tuning(tv), **band_tuning(bv))
    out = run(f"e2e tree {tv} cap {tc} band {bv} cap {bc}", lambda q, k, v, i, cfg=cfg: sorted_attention(q, k, v, i, cfg, "triton"), (q, k, v, ids), e2e_ref)
    e2e_ref = e2e_ref or out
print("\n| variant | ms | vs cuDNN | rel err vs first |")
for label, ms, err in rows:
    print(f"| {label} | {ms:.3f} | {cud / ms:.2f}x | {err:.1e} |")
