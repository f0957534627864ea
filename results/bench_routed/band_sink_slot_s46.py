"""One code tree (run from its checkout): the sorted forward end to end (num_clusters given),
the band kernel alone (on the tree pass's result), and cuDNN, in alternating rounds, with the
checkout's band tuning ("default": 2 stages when this ran) and 3 stages. Prints one JSON line
and saves the band's output for the first 4096 tokens under $OUT, to compare two checkouts."""
import sys, json, dataclasses, statistics
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
import fused_stages as fs
from bench_attention import timed
from pallas_kernels.sorted_layout import sorted_attention, sort_clusters
from pallas_kernels.triton_backend import forward_band, forward_segment
label, seq, clusters, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
q, k, v, ids = fs.inputs(seq, clusters, fs.SHAPE, seed=1)
base = dataclasses.replace(fs.config(q, k, fs.SHAPE), num_ids=clusters)
cfgs = {"default": base,
        "band 3 stages": dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, band_stages=3))}
e2e = {n: jax.jit(lambda q, k, v, ids, c=c: sorted_attention(q, k, v, ids, c, "triton")) for n, c in cfgs.items()}
srt = sort_clusters(ids, backend="triton", length=seq, full=False, num_ids=clusters)
part = jax.jit(lambda q, k, v, o, s: forward_segment(q, k, v, o, s, base))(q, k, v, srt.order, srt.starts)
band = {n: jax.jit(lambda q, k, v, ids, o, l, c=c: forward_band(q, k, v, ids, c, init=(o, l))) for n, c in cfgs.items()}
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
out = {n: f(q, k, v, ids) for n, f in e2e.items()}
bout = {n: f(q, k, v, ids, *part) for n, f in band.items()}
t = {f"{w} {n}": [] for w in ("e2e", "band") for n in cfgs}
t["cudnn"] = []
names = list(cfgs)
for r in range(rounds):
    for n in (names if r % 2 == 0 else names[::-1]):
        t[f"e2e {n}"].append(timed(e2e[n], q, k, v, ids, reps=9) * 1e3)
        t[f"band {n}"].append(timed(band[n], q, k, v, ids, *part, reps=9) * 1e3)
    t["cudnn"].append(timed(cudnn, q, k, v, reps=5) * 1e3)
m = {key: statistics.median(x) for key, x in t.items()}
print(json.dumps(dict(label=label, seq=seq, clusters=clusters, medians=m, rounds=t,
                      speedups={n: m["cudnn"] / m["e2e " + n] for n in cfgs},
                      stages_equal=all(bool(jnp.array_equal(bout["default"][i], bout[n][i])) for i in range(2) for n in cfgs))), flush=True)
# this process's band result on the tree's partial, for the old/new comparison
import numpy as np, os
np.save(os.path.join(os.environ.get("OUT", "/tmp"), f"band_{label}.npy"), np.asarray(bout["default"][0][0, :4096].astype(jnp.float32)))
