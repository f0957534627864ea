"""The sorted forward at 32k / 32 random clusters, one code tree (PYTHONPATH): end to end
(timed back to back), kernels only (order given), the sort alone, a back-to-back trace
(period, busy, idle gaps) and cuDNN. Prints one JSON line last."""
import sys, json, tempfile, statistics
import jax, jax.numpy as jnp
import numpy as np
sys.path.insert(0, "experiments")
from bench_attention import timed
from trace_summary import load_trace, device_kernel_events, busy_us
from pallas_kernels.routed import routed_attention
from pallas_kernels.sorted_layout import sort_clusters, _fused_forward
from pallas_kernels.ops import make_config
label = sys.argv[1]
S = int(sys.argv[2]) if len(sys.argv) > 2 else 32768
ks = jax.random.split(jax.random.PRNGKey(0), 4)
q = jax.random.normal(ks[0], (1, S, 32, 128), jnp.bfloat16)
k, v = (jax.random.normal(key, (1, S, 8, 128), jnp.bfloat16) for key in ks[1:3])
ids = jax.random.randint(ks[3], (1, 32, S), 0, 32)
kw = dict(window=128, sink_tokens=1, layout="sorted", backend="triton")
f = jax.jit(lambda q, k, v, ids: routed_attention(q, k, v, ids, num_clusters=32, **kw))
fc = jax.jit(lambda q, k, v, ids: routed_attention(q, k, v, ids, **kw))
srt = jax.jit(lambda ids: sort_clusters(ids, backend="triton", length=S, full=False,
                                        num_ids=32)[:2])
order, starts = srt(ids)
ref_order = np.argsort(np.asarray(ids), axis=-1, kind="stable")
assert np.array_equal(np.asarray(order), ref_order), "order differs from numpy's stable argsort"
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                            implementation="cudnn"))
import inspect
from pallas_kernels import routed as R
res = {"label": label, "S": S}
res["sort_ms"] = timed(srt, ids, reps=9) * 1e3
# kernels only: the forward from a given order (the sort outside the timed function)
import fused_stages as fs
cfg = fs.config(q, k, fs.SHAPE)
kf = jax.jit(lambda q, k, v, ids, order, starts: _fused_forward(q, k, v, ids, order, starts, cfg))
jax.block_until_ready(kf(q, k, v, ids, order, starts))
res["kernels_ms"] = timed(kf, q, k, v, ids, order, starts, reps=9) * 1e3
for rnd in range(3):
    res.setdefault("e2e_ms", []).append(timed(f, q, k, v, ids, reps=9) * 1e3)
    res.setdefault("e2e_checked_ms", []).append(timed(fc, q, k, v, ids, reps=9) * 1e3)
    res.setdefault("cudnn_ms", []).append(timed(cudnn, q, k, v, reps=5) * 1e3)
# back-to-back trace: 10 calls queued, one block at the end
jax.block_until_ready(f(q, k, v, ids))
with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
        outs = [f(q, k, v, ids) for _ in range(10)]
        jax.block_until_ready(outs)
    ev = sorted(device_kernel_events(load_trace(d)), key=lambda e: e["ts"])
starts_ = [e["ts"] for e in ev if "count" in e["name"]]
res["trace_period_ms"] = statistics.median(np.diff(starts_)) / 1e3 if len(starts_) > 2 else None
res["trace_busy_ms"] = busy_us(ev) / 1e3 / 10
gaps = {}
for a, b in zip(ev, ev[1:]):
    g = b["ts"] - (a["ts"] + a["dur"])
    gaps.setdefault(b["name"][:40], []).append(g)
res["gap_before_us"] = {n: round(statistics.median(g), 1) for n, g in gaps.items()}
res["kernel_us"] = {}
for e in ev:
    res["kernel_us"].setdefault(e["name"][:40], []).append(e["dur"])
res["kernel_us"] = {n: round(statistics.median(d), 1) for n, d in res["kernel_us"].items()}
med = statistics.median
res["speedup"] = med(res["cudnn_ms"]) / med(res["e2e_ms"])
print(json.dumps(res))
