"""The sorted forward end to end at 32k (32 random clusters, num_clusters given) with the
band kernel 3 stages deep (the default) against 2 stages, and the tree grid's tail of 512
(the default) against 256 and 1024 programs, cuDNN in alternating rounds. One JSON line."""
import sys, json, dataclasses, statistics
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
import fused_stages as fs
from bench_attention import timed
from pallas_kernels.sorted_layout import sorted_attention
label, seq, clusters, rounds = sys.argv[1], 32768, 32, 7
q, k, v, ids = fs.inputs(seq, clusters, fs.SHAPE, seed=1)
base = dataclasses.replace(fs.config(q, k, fs.SHAPE), num_ids=clusters)
tune = lambda **kw: dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, **kw))  # noqa: E731
cfgs = {"default": base, "band 2 stages": tune(band_stages=2), "tail 256": tune(tree_tail=256),
        "tail 1024": tune(tree_tail=1024)}
assert base.gpu.band_stages == 3 and base.gpu.tree_tail == 512
e2e = {n: jax.jit(lambda q, k, v, ids, c=c: sorted_attention(q, k, v, ids, c, "triton")) for n, c in cfgs.items()}
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
out = {n: f(q, k, v, ids) for n, f in e2e.items()}
t = {n: [] for n in cfgs}
t["cudnn"] = []
names = list(cfgs)
for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
        t[n].append(timed(e2e[n], q, k, v, ids, reps=9) * 1e3)
    t["cudnn"].append(timed(cudnn, q, k, v, reps=5) * 1e3)
m = {key: statistics.median(x) for key, x in t.items()}
beats = {n: f"{sum(a < b for a, b in zip(t['default'], t[n]))}/{rounds}" for n in names[1:]}
print(json.dumps(dict(label=label, seq=seq, clusters=clusters, medians=m, rounds=t,
                      speedups={n: m["cudnn"] / m[n] for n in cfgs}, default_beats=beats,
                      equal=all(bool(jnp.array_equal(out["default"][i], out[n][i])) for i in range(2) for n in cfgs))), flush=True)
