"""Per-kernel device time of the sorted forward at 32k, 32 random clusters (num_clusters given)."""
import sys, json, time
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
from trace_summary import profile, format_summary, load_trace, device_kernel_events
import tempfile
from pallas_kernels.routed import routed_attention
ks = jax.random.split(jax.random.PRNGKey(0), 4)
S = 32768
q = jax.random.normal(ks[0], (1, S, 32, 128), jnp.bfloat16)
k, v = (jax.random.normal(key, (1, S, 8, 128), jnp.bfloat16) for key in ks[1:3])
ids = jax.random.randint(ks[3], (1, 32, S), 0, 32)
f = jax.jit(lambda q, k, v, ids: routed_attention(q, k, v, ids, window=128, sink_tokens=1,
            layout="sorted", backend="triton", num_clusters=32))
print(format_summary("sorted fwd 32k", profile(f, q, k, v, ids, reps=5)))
# the time line of one call: each kernel's start, duration, gap after the previous
jax.block_until_ready(f(q, k, v, ids))
with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d, create_perfetto_trace=True):
        for _ in range(3):
            jax.block_until_ready(f(q, k, v, ids))
    ev = sorted(device_kernel_events(load_trace(d)), key=lambda e: e["ts"])
prev = None
for e in ev:
    gap = "" if prev is None else f"gap {e['ts'] - prev:8.1f} us"
    print(f"{e['dur']:9.1f} us  {gap}  {e['name'][:90]}")
    prev = e["ts"] + e["dur"]
print(f.lower(q, k, v, ids).as_text()[:200])
