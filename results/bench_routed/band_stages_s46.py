"""The sorted forward end to end (num_clusters given) with the band kernel pipelined 2 and 3
stages deep, and cuDNN, in alternating rounds at each length; the band kernel alone too.
Prints one JSON line per length."""
import sys, json, dataclasses, statistics
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
import fused_stages as fs
from bench_attention import timed
from pallas_kernels.sorted_layout import sorted_attention, sort_clusters
from pallas_kernels.triton_backend import forward_band, forward_segment
label = sys.argv[1]
for seq, rounds in ((32768, 7), (131072, 3)):
    clusters = 32
    q, k, v, ids = fs.inputs(seq, clusters, fs.SHAPE, seed=1)
    base = dataclasses.replace(fs.config(q, k, fs.SHAPE), num_ids=clusters)
    cfgs = {f"stages {n}": dataclasses.replace(base, gpu=dataclasses.replace(base.gpu, band_stages=n)) for n in (2, 3)}
    e2e = {n: jax.jit(lambda q, k, v, ids, c=c: sorted_attention(q, k, v, ids, c, "triton")) for n, c in cfgs.items()}
    srt = sort_clusters(ids, backend="triton", length=seq, full=False, num_ids=clusters)
    part = jax.jit(lambda q, k, v, o, s: forward_segment(q, k, v, o, s, base))(q, k, v, srt.order, srt.starts)
    band = {n: jax.jit(lambda q, k, v, ids, o, l, c=c: forward_band(q, k, v, ids, c, init=(o, l))) for n, c in cfgs.items()}
    cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
    out = {n: f(q, k, v, ids) for n, f in e2e.items()}
    t = {f"{w} {n}": [] for w in ("e2e", "band") for n in cfgs}
    t["cudnn"] = []
    names = list(cfgs)
    for r in range(rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            t[f"e2e {n}"].append(timed(e2e[n], q, k, v, ids, reps=9) * 1e3)
        for n in (names if r % 2 == 0 else names[::-1]):
            t[f"band {n}"].append(timed(band[n], q, k, v, ids, *part, reps=9) * 1e3)
        t["cudnn"].append(timed(cudnn, q, k, v, reps=5) * 1e3)
    m = {key: statistics.median(x) for key, x in t.items()}
    wins = sum(a < b for a, b in zip(t["e2e stages 3"], t["e2e stages 2"]))
    print(json.dumps(dict(label=label, seq=seq, clusters=clusters, medians=m, rounds=t,
                          speedups={n: m["cudnn"] / m["e2e " + n] for n in cfgs},
                          e2e_3_beats_2=f"{wins}/{rounds}",
                          equal=all(bool(jnp.array_equal(out["stages 2"][i], out["stages 3"][i])) for i in range(2)))), flush=True)
