"""backend="auto" on a GPU: the fastest of the Pallas kernels ("gpu"), the Triton kernels
("triton") and, on Hopper with 2-byte inputs, the Mosaic GPU forward ("mosaic"), each of the
last two also with the Triton backward as one launch that adds dq with atomics
("triton+dq_atomic", "mosaic+dq_atomic": GpuTuning.dq_atomic), measured once per (device
kind, shape class) and kept in a small JSON file.

A choice is never guessed: with one usable candidate that one runs (nothing to compare);
with several, each runs forward + backward on random inputs of the call's shape, with the
call's window and sink, at full density (one cluster) and at a sparse one (16 contiguous
clusters per head: what a surgical layer visits is nearer that). Its score (RULE) is the sum
over both of seconds / block density, so each density weighs as much as the other; the lowest
score is recorded with every score. A candidate that fails there loses. A record that lacks one
of the candidates usable now (one added since, or jax-triton installed since), or was scored
by another rule, is measured again. The file is
$PALLAS_KERNELS_CACHE_DIR/backend_choice.json, else
~/.cache/pallas_kernels/backend_choice.json; delete it to measure again.
"""
from __future__ import annotations

import concurrent.futures
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

CANDIDATES = ("gpu", "triton", "triton+dq_atomic", "mosaic", "mosaic+dq_atomic")
SPARSE_CLUSTERS = 16
RULE = (f"forward + backward seconds / block density, summed over 1 and {SPARSE_CLUSTERS} "
        "contiguous clusters")
# a candidate is a backend, then "+" and the names of GpuTuning changes from the dtype's defaults
TUNINGS = {"dq_atomic": {"dq_atomic": 1}}


def candidate_backend(candidate: str) -> str:
    """The backend of a candidate's name."""
    if candidate not in CANDIDATES:
        raise ValueError(f"backend='auto': unknown candidate {candidate!r} (known: "
                         f"{', '.join(CANDIDATES)})")
    return candidate.split("+")[0]


def split_candidate(candidate: str, dtype):
    """(backend, GpuTuning or None for the dtype's defaults) of a candidate's name."""
    from pallas_kernels.config import GpuTuning
    backend, names = candidate_backend(candidate), candidate.split("+")[1:]
    if not names:
        return backend, None
    changes = {field: value for n in names for field, value in TUNINGS[n].items()}
    return backend, GpuTuning.for_dtype(dtype, **changes)


def cache_path() -> Path:
    root = os.environ.get("PALLAS_KERNELS_CACHE_DIR")
    base = Path(root) if root else Path.home() / ".cache" / "pallas_kernels"
    return base / "backend_choice.json"


def shape_class(q, k, *, window, sink_tokens, block_q, block_k) -> str:
    """Calls that share this key share a choice: sequence lengths round up to a power of two;
    window and sink only as present or not (they move the work little at full density)."""
    batch, q_len, hq, d = q.shape
    kv_len, hkv = k.shape[1], k.shape[2]
    bucket = 1 << (max(q_len, kv_len) - 1).bit_length()
    return (f"{jnp.dtype(q.dtype).name} B{batch} Hq{hq} Hkv{hkv} D{d} S<={bucket} "
            f"blocks{block_q}x{block_k} window{int(window > 0)} sink{int(sink_tokens > 0)}")


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _store(path: Path, table: dict):
    """Written whole to a temporary file, then renamed: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(table, f, indent=1, sort_keys=True)
    os.replace(f.name, path)


def measure(candidate, q, k, *, window, sink_tokens, block_q, block_k, interpret=False,
            reps=3):
    """A candidate's score (RULE): median seconds of forward + backward on random inputs
    shaped like q, k, divided by the block density, at one cluster (every causal block
    visited) plus at SPARSE_CLUSTERS contiguous clusters per head."""
    from pallas_kernels.ops import attention_with_schedule, make_config
    from pallas_kernels.schedule import build_schedule
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    qr = jax.random.normal(keys[0], q.shape, q.dtype)
    kr = jax.random.normal(keys[1], k.shape, k.dtype)
    vr = jax.random.normal(keys[2], k.shape, k.dtype)
    ct = jax.random.normal(keys[3], q.shape, q.dtype)
    mask = dict(window=window, sink_tokens=sink_tokens, q_offset=max(0, k.shape[1] - q.shape[1]))
    backend, tuning = split_candidate(candidate, q.dtype)
    cfg = make_config(qr, kr, **mask, scale=None, backend=backend, interpret=interpret,
                      block_q=block_q, block_k=block_k, gpu_tuning=tuning)

    @jax.jit
    def fwd_bwd(q, k, v, ct, qc, kc, sched):
        out, vjp = jax.vjp(lambda q, k, v: attention_with_schedule(
            q, k, v, qc, kc, sched, backend=backend, config=cfg)[0], q, k, v)
        return out, vjp(ct)

    score = 0.0
    for clusters in (1, SPARSE_CLUSTERS):
        qc, kc = (contiguous_clusters(q.shape[0], q.shape[2], n, clusters, offset)
                  for n, offset in ((q.shape[1], mask["q_offset"]), (k.shape[1], 0)))
        sched = build_schedule(qc, kc, **mask, block_q=cfg.block_q, block_k=cfg.block_k)
        args = (qr, kr, vr, ct, qc, kc, sched)
        score += _seconds(fwd_bwd, args, reps) / float(sched.density)
    return score


def contiguous_clusters(batch, heads, length, clusters, offset=0):
    """[batch, heads, length] int32: `clusters` runs of equal length over positions offset ..
    offset + length of a sequence that ends at the last query."""
    total = offset + length
    pos = jnp.arange(offset, total, dtype=jnp.int32)
    return jnp.broadcast_to(pos * clusters // max(total, 1), (batch, heads, length))


def _seconds(f, args, reps):
    """Median wall seconds of f(*args) over reps calls, after one untimed call."""
    jax.block_until_ready(f(*args))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def usable_candidates(q, *, block_q, block_k) -> list:
    """The candidates that can run a call like this one on this host, "gpu" first. The
    Mosaic forward's backward is Triton's where jax-triton runs (else dq_atomic is moot)."""
    from pallas_kernels.config import AttentionConfig
    from pallas_kernels.mosaic_gpu import unavailable as mosaic_unavailable
    from pallas_kernels.triton_backend import unavailable as triton_unavailable
    cfg = AttentionConfig(q_len=q.shape[1], kv_len=q.shape[1], q_offset=0, window=0,
                          sink_tokens=0, scale=1.0, block_q=block_q, block_k=block_k)
    triton = triton_unavailable(False) is None
    mosaic = mosaic_unavailable(cfg, q.dtype) is None
    return (["gpu"] + (["triton", "triton+dq_atomic"] if triton else [])
            + (["mosaic"] if mosaic else []) + (["mosaic+dq_atomic"] if mosaic and triton else []))


def choose(q, k, *, window, sink_tokens, block_q, block_k, candidates=None, timer=measure,
           device_kind=None) -> str:
    """The recorded choice (a candidate's name: split_candidate) for this device kind and
    shape class, measured on first use."""
    if candidates is None:
        candidates = usable_candidates(q, block_q=block_q, block_k=block_k)
    if len(candidates) == 1:
        return candidates[0]
    device_kind = device_kind or jax.devices()[0].device_kind
    key = f"{device_kind} | " + shape_class(q, k, window=window, sink_tokens=sink_tokens,
                                             block_q=block_q, block_k=block_k)
    path = cache_path()
    table = _load(path)
    entry = table.get(key, {})
    measured = set(entry.get("scores", {})) | set(entry.get("errors", {}))
    if (entry.get("choice") in candidates and measured >= set(candidates)
            and entry.get("rule") == RULE):
        return entry["choice"]
    scores, errors = {}, {}

    def measure_all():
        for candidate in candidates:
            try:
                scores[candidate] = timer(candidate, jax.ShapeDtypeStruct(q.shape, q.dtype),
                                         jax.ShapeDtypeStruct(k.shape, k.dtype), window=window,
                                         sink_tokens=sink_tokens, block_q=block_q,
                                         block_k=block_k)
            except Exception as e:  # a candidate that cannot run this shape loses
                errors[candidate] = f"{type(e).__name__}: {str(e)[:300]}"

    # Called while an outer jax.jit traces the attention (q a tracer), the measurement must
    # still run, not be staged into that trace: jax's trace state is per thread, so a fresh
    # thread compiles and runs the kernels as at top level. (ensure_compile_time_eval would
    # also evaluate the kernels' own input-free primitives, such as program_id, eagerly.)
    if isinstance(q, jax.core.Tracer):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(measure_all).result()
    else:
        measure_all()
    if not scores:
        raise RuntimeError(f"backend='auto': no GPU backend ran on {key}: {errors}")
    choice = min(scores, key=scores.get)
    table = _load(path)  # another process may have written meanwhile
    table[key] = dict(choice=choice, scores=scores, errors=errors, rule=RULE)
    _store(path, table)
    return choice
