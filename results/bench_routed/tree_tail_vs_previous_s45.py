"""One code tree (run from its checkout): the sorted forward end to end (num_clusters given),
the tree kernel alone, and cuDNN, in alternating rounds; with the new tree, the tail's variants.
Prints one JSON line per case."""
import sys, json, dataclasses, statistics
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
import fused_stages as fs
from bench_attention import timed
from pallas_kernels.sorted_layout import sorted_attention, sort_clusters
from pallas_kernels.triton_backend import forward_segment
label, seq, clusters, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
q, k, v, ids = fs.inputs(seq, clusters, fs.SHAPE, seed=1)
base = dataclasses.replace(fs.config(q, k, fs.SHAPE), num_ids=clusters)
cfgs = {"default": base}
if hasattr(base.gpu, "tree_tail"):
    cfgs["tail 0"] = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, tree_tail=0))
e2e = {n: jax.jit(lambda q, k, v, ids, c=c: sorted_attention(q, k, v, ids, c, "triton")) for n, c in cfgs.items()}
srt = sort_clusters(ids, backend="triton", length=seq, full=False, num_ids=clusters)
tree = {n: jax.jit(lambda q, k, v, o, s, c=c: forward_segment(q, k, v, o, s, c)) for n, c in cfgs.items()}
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
out = {n: f(q, k, v, ids) for n, f in e2e.items()}
ref = cudnn(q, k, v)
t = {f"{w} {n}": [] for w in ("e2e", "tree") for n in cfgs}
t["cudnn"] = []
names = list(cfgs)
for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
        t[f"e2e {n}"].append(timed(e2e[n], q, k, v, ids, reps=9) * 1e3)
        t[f"tree {n}"].append(timed(tree[n], q, k, v, srt.order, srt.starts, reps=9) * 1e3)
    t["cudnn"].append(timed(cudnn, q, k, v, reps=5) * 1e3)
m = {key: statistics.median(x) for key, x in t.items()}
digest = float(jnp.sum(out["default"][0].astype(jnp.float32) ** 2))
print(json.dumps(dict(label=label, seq=seq, clusters=clusters, medians=m, rounds=t,
                      speedups={n: m["cudnn"] / m["e2e " + n] for n in cfgs},
                      out_sq_sum=digest,
                      same_as_tail0=all(bool(jnp.array_equal(out["default"][i], out[n][i])) for i in range(2) for n in cfgs))), flush=True)
