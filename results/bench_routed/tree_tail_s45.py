"""The tree grid's tail: 512 programs of the first blocks last (A, the default), none (B), 256 (C),
1024 (D); same process, alternating rounds; cuDNN each round. Prints JSON lines and table rows."""
import sys, json, dataclasses, statistics
import jax, jax.numpy as jnp
import numpy as np
sys.path.insert(0, "experiments")
import fused_stages as fs
from bench_attention import timed
from pallas_kernels.sorted_layout import sorted_attention, sort_clusters
from pallas_kernels.triton_backend import forward_segment
med = statistics.median
cases = [(32768, 32, 5), (32768, 8, 3), (32768, 128, 3), (8192, 32, 5), (131072, 32, 2)]
if len(sys.argv) > 1:
    cases = [c for c in cases if f"{c[0]}/{c[1]}" in sys.argv[1:]]
for seq, clusters, rounds in cases:
    q, k, v, ids = fs.inputs(seq, clusters, fs.SHAPE, seed=1)
    base = dataclasses.replace(fs.config(q, k, fs.SHAPE), num_ids=clusters)
    assert base.gpu.tree_tail == 512
    cfgs = {"A": base}
    for n, tail in (("B", 0), ("C", 256), ("D", 1024)):
        cfgs[n] = dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, tree_tail=tail))
    e2e = {n: jax.jit(lambda q, k, v, ids, c=c: sorted_attention(q, k, v, ids, c, "triton")) for n, c in cfgs.items()}
    srt = sort_clusters(ids, backend="triton", length=seq, full=False, num_ids=clusters)
    tree = {n: jax.jit(lambda q, k, v, o, s, c=c: forward_segment(q, k, v, o, s, c)) for n, c in cfgs.items()}
    outs = {n: f(q, k, v, ids) for n, f in e2e.items()}
    same = all(bool(jnp.array_equal(outs["A"][i], outs[n][i])) for i in range(2) for n in "BCD")
    finite = bool(jnp.all(jnp.isfinite(outs["A"][0].astype(jnp.float32))))
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    ref = cudnn(q, k, v)
    t = {f"{w} {n}": [] for w in ("e2e", "tree") for n in "ABCD"}
    t["cudnn"] = []
    for r in range(rounds):
        for n in "ABCD" if r % 2 == 0 else "DCBA":
            t[f"e2e {n}"].append(timed(e2e[n], q, k, v, ids, reps=9) * 1e3)
            t[f"tree {n}"].append(timed(tree[n], q, k, v, srt.order, srt.starts, reps=9) * 1e3)
        t["cudnn"].append(timed(cudnn, q, k, v, reps=5) * 1e3)
    m = {key: med(x) for key, x in t.items()}
    print(json.dumps(dict(seq=seq, clusters=clusters, bitwise_equal=same, finite=finite,
                          medians=m, rounds=t,
                          speedups={n: m["cudnn"] / m["e2e " + n] for n in "ABCD"})))
    print(f"| {seq} | {clusters} | " + " | ".join(f"{m['tree ' + n]:.3f}" for n in "BCAD") + " | "
          + " | ".join(f"{m['e2e ' + n]:.3f}" for n in "BCAD") + f" | {m['cudnn']:.2f} | "
          + " | ".join(f"{m['cudnn'] / m['e2e ' + n]:.2f}x" for n in "BCAD") + f" | {same} |", flush=True)
