"""One code tree (run from its checkout): the sorted forward end to end at 32k (32 random
clusters, num_clusters given), the band kernel alone on the tree pass's result, and cuDNN, in
rounds. One JSON line; the band's output for the first 4096 tokens saved under $OUT."""
import sys, os, json, dataclasses, statistics
import numpy as np
import jax, jax.numpy as jnp
sys.path.insert(0, "experiments")
import fused_stages as fs
from bench_attention import timed
from pallas_kernels.sorted_layout import sorted_attention, sort_clusters
from pallas_kernels.triton_backend import forward_band, forward_segment
label, seq, clusters, rounds = sys.argv[1], 32768, 32, 7
q, k, v, ids = fs.inputs(seq, clusters, fs.SHAPE, seed=1)
base = dataclasses.replace(fs.config(q, k, fs.SHAPE), num_ids=clusters)
e2e = jax.jit(lambda q, k, v, ids: sorted_attention(q, k, v, ids, base, "triton"))
srt = sort_clusters(ids, backend="triton", length=seq, full=False, num_ids=clusters)
part = jax.jit(lambda q, k, v, o, s: forward_segment(q, k, v, o, s, base))(q, k, v, srt.order, srt.starts)
band = jax.jit(lambda q, k, v, ids, o, l: forward_band(q, k, v, ids, base, init=(o, l)))
cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn"))
bout = band(q, k, v, ids, *part)
t = {"e2e": [], "band": [], "cudnn": []}
for r in range(rounds):
    t["e2e"].append(timed(e2e, q, k, v, ids, reps=9) * 1e3)
    t["band"].append(timed(band, q, k, v, ids, *part, reps=9) * 1e3)
    t["cudnn"].append(timed(cudnn, q, k, v, reps=5) * 1e3)
m = {key: statistics.median(x) for key, x in t.items()}
print(json.dumps(dict(label=label, medians=m, rounds=t, speedup=m["cudnn"] / m["e2e"])), flush=True)
np.save(os.path.join(os.environ.get("OUT", "/tmp"), f"band_{label}.npy"),
        np.asarray(bout[0][0, :4096].astype(jnp.float32)))
