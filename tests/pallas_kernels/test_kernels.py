"""block_sparse_attention against the dense float32 reference: outputs, LSE and gradients.

On a CPU host every kernel runs in Pallas interpret mode (the GPU/Triton-style kernel and the
TPU/Mosaic kernel); on a GPU or TPU host the same cases run that platform's compiled kernel.
The cases form a pairwise covering set of the parameters (every pair of values of any two
parameters appears in some case), which keeps the file to a few minutes in interpret mode.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import (allowed_pairs, attention_with_schedule, block_sparse_attention,
                            build_schedule, reference_attention)
from pallas_kernels.config import AttentionConfig, GpuTuning
from pallas_kernels.ops import make_config

PLATFORM = jax.default_backend()
INTERPRET = PLATFORM == "cpu"
TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def kernel_backend(kernel):
    """On CPU: the named kernel in interpret mode. On an accelerator: its own compiled kernel."""
    return kernel if INTERPRET else ("tpu" if PLATFORM == "tpu" else "gpu")


@dataclasses.dataclass(frozen=True)
class Case:
    clusters: int
    seq: int
    layout: str
    window: int
    sink: int
    group: int
    q_offset: int
    dtype: str
    kernel: str
    batch: int = 1
    kv_heads: int = 1
    head_dim: int = 16
    block_q: int = 16
    block_k: int = 16

    def __str__(self):
        return (f"{self.kernel}-S{self.seq}-c{self.clusters}{self.layout[0]}-w{self.window}"
                f"-s{self.sink}-g{self.group}-o{self.q_offset}-{self.dtype}")


# Pairwise covering set over clusters, S, layout, window, sink, GQA ratio, q_offset, dtype and
# kernel; batch, kv heads, head dim (24 exercises head-dim padding) and blocks vary alongside.
CASES = [
    Case(1, 1, "contiguous", 0, 0, 1, 0, "bfloat16", "tpu"),
    Case(1, 1, "interleaved", 5000, 1, 4, 37, "bfloat16", "gpu", block_q=32),
    Case(2, 1, "contiguous", 5, 4, 4, 0, "float32", "tpu", batch=2),
    Case(7, 1, "contiguous", 5000, 4, 3, 37, "float32", "tpu", kv_heads=2),
    Case(64, 1, "interleaved", 0, 4, 3, 37, "float32", "gpu", head_dim=24),
    Case(1, 100, "interleaved", 5000, 1, 3, 0, "bfloat16", "tpu", block_k=32),
    Case(2, 100, "interleaved", 5, 0, 3, 0, "bfloat16", "tpu", batch=2),
    Case(7, 100, "contiguous", 5, 1, 1, 0, "float32", "gpu", block_q=32),
    Case(64, 100, "interleaved", 5, 4, 4, 37, "bfloat16", "tpu", block_q=32),
    Case(64, 100, "contiguous", 0, 1, 1, 0, "float32", "gpu", kv_heads=2, block_k=32),
    Case(1, 257, "interleaved", 0, 1, 4, 0, "bfloat16", "tpu"),
    Case(2, 257, "contiguous", 5000, 1, 3, 0, "float32", "gpu", head_dim=24),
    Case(2, 257, "interleaved", 5, 4, 1, 0, "bfloat16", "gpu", batch=2, block_k=32),
    Case(7, 257, "interleaved", 0, 0, 4, 0, "bfloat16", "tpu", block_q=32),
    Case(64, 257, "contiguous", 5000, 0, 3, 37, "float32", "gpu", block_q=32, block_k=32),
    Case(1, 1024, "contiguous", 5, 4, 4, 0, "float32", "gpu", block_q=32, block_k=32),
    Case(2, 1024, "interleaved", 0, 1, 3, 37, "bfloat16", "tpu", block_q=32, block_k=32),
    Case(7, 1024, "interleaved", 5000, 0, 1, 37, "float32", "gpu", block_q=32, block_k=32),
    Case(64, 1024, "contiguous", 5000, 1, 3, 0, "bfloat16", "tpu", block_q=32, block_k=32),
    # float32 GPU tiles are 32 wide: 64-blocks make every GPU kernel loop over sub-tiles
    Case(7, 257, "interleaved", 5, 1, 2, 0, "float32", "gpu", kv_heads=2, block_q=64,
         block_k=64),
]


def cluster_ids(rng, layout, clusters, batch, heads, length, total):
    """Contiguous: runs of consecutive positions (per head, a different cut); interleaved:
    i.i.d. ids. Ids are scattered over int32 (negative ones too): kernels must not assume 0..n."""
    if layout == "contiguous":
        shift = rng.integers(0, max(total // max(clusters, 1), 1), size=(batch, heads, 1))
        pos = np.arange(total - length, total)
        ids = np.minimum((pos + shift) * clusters // max(total, 1), clusters - 1)
    else:
        ids = rng.integers(0, clusters, size=(batch, heads, length))
    return jnp.asarray(ids * 7919 - 1000, jnp.int32)


def make_inputs(case: Case, seed: int, kv_len: int | None = None):
    rng = np.random.default_rng(seed)
    heads = case.kv_heads * case.group
    kv_len = case.q_offset + case.seq if kv_len is None else kv_len
    dtype = jnp.dtype(case.dtype)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    q = normal(case.batch, case.seq, heads, case.head_dim)
    k = normal(case.batch, kv_len, case.kv_heads, case.head_dim)
    v = normal(case.batch, kv_len, case.kv_heads, case.head_dim)
    total = max(kv_len, case.q_offset + case.seq)
    kc_all = cluster_ids(rng, case.layout, case.clusters, case.batch, heads, total, total)
    kc = kc_all[..., :kv_len]
    qc = kc_all[..., case.q_offset:case.q_offset + case.seq]
    if case.layout == "interleaved":  # queries draw their own ids
        qc = cluster_ids(rng, case.layout, case.clusters, case.batch, heads, case.seq, total)
    d_out = normal(case.batch, case.seq, heads, case.head_dim)
    d_lse = jnp.asarray(rng.standard_normal((case.batch, heads, case.seq)), jnp.float32)
    return q, k, v, qc, kc, d_out, d_lse


def poison_device_memory():
    """Fill freed device memory with NaN, so an output the kernel forgets to write shows up.
    (Interpret mode already starts every output buffer as NaN.)"""
    if not INTERPRET:
        jnp.full((1 << 26,), jnp.nan, jnp.float32).block_until_ready()


def outputs_and_grads(attention, q, k, v, qc, kc, d_out, d_lse, **kwargs):
    """out, lse and the gradients of <out, d_out> + <lse, d_lse> (finite LSE entries only)."""
    def loss(q, k, v):
        out, lse = attention(q, k, v, qc, kc, return_lse=True, **kwargs)
        finite = jnp.isfinite(lse)
        value = (jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32))
                 + jnp.sum(jnp.where(finite, lse, 0.0) * d_lse))
        return value, (out, lse)

    (_, (out, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
        q, k, v)
    return out, lse, grads


def assert_close(name, got, want, tol):
    """max |got - want| <= tol * max(1, max |want|), with no NaN or inf anywhere."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    assert np.all(np.isfinite(got)), f"{name}: non-finite values"
    err = float(np.max(np.abs(got - want))) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(want))) if want.size else 0.0)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def check_against_reference(case: Case, seed: int, kv_len: int | None = None):
    q, k, v, qc, kc, d_out, d_lse = make_inputs(case, seed, kv_len)
    kwargs = dict(window=case.window, sink_tokens=case.sink, q_offset=case.q_offset)
    poison_device_memory()
    out, lse, grads = outputs_and_grads(
        block_sparse_attention, q, k, v, qc, kc, d_out, d_lse, **kwargs,
        backend=kernel_backend(case.kernel), interpret=INTERPRET,
        block_q=case.block_q, block_k=case.block_k)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    ref_out, ref_lse, ref_grads = outputs_and_grads(
        reference_attention, *f32[:3], qc, kc, f32[3], d_lse, **kwargs)
    return assert_matches_reference((out, lse, grads), (ref_out, ref_lse, ref_grads), (q, k, v),
                                    TOL[case.dtype])


def assert_matches_reference(got, want, inputs, tol):
    """Kernel (out, lse, (dq, dk, dv)) against the reference's, in the inputs' dtypes; rows
    without a key must have lse -inf in both. Returns the mask of those rows."""
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = want
    assert out.dtype == inputs[0].dtype and lse.dtype == jnp.float32
    assert_close("out", out, ref_out, tol)
    empty = np.isneginf(np.asarray(ref_lse))
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert_close("lse", np.where(empty, 0, lse), np.where(empty, 0, ref_lse), tol)
    for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype
        assert_close(name, g, rg, tol)
    return empty


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    check_against_reference(case, seed=zlib.crc32(str(case).encode()))


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_rows_without_keys_give_zero_output(kernel):
    """Sink 0 and window 0 with disjoint id sets: many rows see no key at all."""
    case = Case(64, 48, "interleaved", 0, 0, 2, 5, "float32", kernel)
    empty = check_against_reference(case, seed=3)
    assert empty.any() and not empty.all()


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
@pytest.mark.parametrize("kv_len", [20, 70])
def test_key_length_other_than_query_end(kernel, kv_len):
    """Keys may stop before the last query (20 < 5 + 40) or run past it (70)."""
    case = Case(3, 40, "interleaved", 4, 1, 2, 5, "float32", kernel, block_k=32)
    check_against_reference(case, seed=11 + kv_len, kv_len=kv_len)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_window_and_sinks_beyond_the_sequence(kernel):
    """A window of 2**31 ("no window") and more sinks than keys allow every causal pair."""
    case = Case(3, 40, "interleaved", 2**31, 2**40, 2, 5, "float32", kernel)
    check_against_reference(case, seed=21)


def test_mask_matches_explicit_loops():
    rng = np.random.default_rng(0)
    qc, kc = rng.integers(0, 3, 9), rng.integers(0, 3, 14)
    got = np.asarray(allowed_pairs(5 + np.arange(9)[:, None], np.arange(14)[None, :],
                                   qc[:, None], kc[None, :], window=3, sink_tokens=2, kv_len=12))
    for i in range(9):
        for j in range(14):
            pos = 5 + i
            want = j < 12 and j <= pos and (qc[i] == kc[j] or j < 2 or pos - j < 3)
            assert got[i, j] == want, (i, j)


@pytest.mark.parametrize("attention", [
    reference_attention, functools.partial(block_sparse_attention, backend="xla")],
    ids=["reference", "xla_backend"])
@pytest.mark.parametrize("window, sink", [(2, 1), (2**31, 2**40)])
def test_reference_matches_float64_loops(attention, window, sink):
    """The reference, and the xla backend that dispatches to it, against float64 loops."""
    case = Case(3, 12, "interleaved", window, sink, 2, 3, "float32", "gpu", head_dim=8)
    q, k, v, qc, kc, _, _ = make_inputs(case, seed=9)
    out, lse = attention(q, k, v, qc, kc, window=window, sink_tokens=sink, q_offset=3,
                         scale=0.3, return_lse=True)
    q, k, v, qc, kc = (np.asarray(x, np.float64) for x in (q, k, v, qc, kc))
    for h in range(q.shape[2]):
        for i in range(q.shape[1]):
            pos = 3 + i
            keys = [j for j in range(k.shape[1]) if j <= pos and (
                qc[0, h, i] == kc[0, h, j] or j < sink or pos - j < window)]
            s = np.array([0.3 * q[0, i, h] @ k[0, j, h // 2] for j in keys])
            if not keys:
                assert np.isneginf(lse[0, h, i]) and np.all(np.asarray(out[0, i, h]) == 0)
                continue
            p = np.exp(s - s.max())
            want = (p / p.sum()) @ v[0, keys, h // 2]
            np.testing.assert_allclose(out[0, i, h], want, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(lse[0, h, i], s.max() + np.log(p.sum()), rtol=1e-6)


_RNG = np.random.default_rng(1)


def _randn(*shape, dtype=jnp.float32):
    return jnp.asarray(_RNG.standard_normal(shape), dtype)


def _args(**overrides):
    rng = np.random.default_rng(0)
    args = dict(q=jnp.asarray(rng.standard_normal((1, 8, 4, 16)), jnp.float32),
                k=jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32),
                v=jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32),
                q_clusters=jnp.zeros((1, 4, 8), jnp.int32) + 3,
                k_clusters=jnp.zeros((1, 4, 8), jnp.int32) + 3)
    kwargs = dict(window=2, sink_tokens=1)
    for key, value in overrides.items():
        (args if key in args else kwargs)[key] = value
    return args, kwargs


@pytest.mark.parametrize("overrides, error, match", [
    (dict(k=jnp.ones((1, 8, 3, 16)), v=jnp.ones((1, 8, 3, 16))), ValueError,
     "multiple of kv heads"),
    (dict(v=jnp.ones((1, 7, 2, 16))), ValueError, "k and v must have the same shape"),
    (dict(q=jnp.ones((8, 4, 16))), ValueError, "rank 4"),
    (dict(q_clusters=jnp.ones((1, 4, 8))), TypeError, "q_clusters must hold integer"),
    (dict(k_clusters=jnp.ones((1, 2, 8), jnp.int32)), ValueError, "k_clusters must have shape"),
    (dict(window=-1), ValueError, "window must be >= 0"),
    (dict(sink_tokens=1.5), TypeError, "sink_tokens must be a Python int"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(block_q=24, backend="gpu"), ValueError, "block_q must be a positive power of two"),
    (dict(q=jnp.ones((1, 8, 4, 16), jnp.int32)), TypeError, "q must be float32"),
    (dict(block_k=8, backend="gpu"), ValueError, "GPU block sizes must be >= 16"),
    (dict(k=_randn(1, 8, 2, 16, dtype=jnp.bfloat16), v=_randn(1, 8, 2, 16, dtype=jnp.bfloat16)),
     TypeError, "q, k and v must share one dtype"),
    (dict(q=_randn(1, 0, 4, 16)), ValueError, "sequence lengths must be positive"),
    (dict(k=_randn(1, 8, 2, 8), v=_randn(1, 8, 2, 8)), ValueError,
     r"k must be \[B=1, Sk, Hkv, D=16\]"),
    (dict(q_offset=2**31 - 10), ValueError, r"q_offset \+ Sq \+ Sk must be < 2\*\*31"),
])
def test_bad_arguments_raise(overrides, error, match):
    args, kwargs = _args(**overrides)
    with pytest.raises(error, match=match):
        block_sparse_attention(**args, **kwargs)


def test_auto_backend_follows_platform():
    from pallas_kernels.ops import resolve_backend
    assert resolve_backend("auto") == {"cpu": "xla", "tpu": "tpu"}.get(PLATFORM, "gpu")


def _scheduled_attention(kernel, q, k, qc, kc, *, schedule_block=16, **mask):
    """attention_with_schedule on a 16 x 16-block config and a schedule built beforehand with
    schedule_block-sized blocks, as the benchmarks call it."""
    backend = kernel_backend(kernel)
    cfg = make_config(q, k, **mask, scale=None, backend=backend, interpret=INTERPRET,
                      block_q=16, block_k=16)
    sched = build_schedule(qc, kc, **mask, block_q=schedule_block, block_k=schedule_block)
    return functools.partial(attention_with_schedule, schedule=sched, backend=backend,
                             config=cfg)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_attention_with_schedule_matches_reference(kernel):
    case = Case(3, 40, "interleaved", 4, 1, 2, 5, "float32", kernel)  # sink 1: no empty rows
    q, k, v, qc, kc, d_out, d_lse = make_inputs(case, seed=31)
    mask = dict(window=case.window, sink_tokens=case.sink, q_offset=case.q_offset)
    attend = _scheduled_attention(kernel, q, k, qc, kc, **mask)
    out, lse, grads = outputs_and_grads(lambda *args, return_lse: attend(*args),
                                        q, k, v, qc, kc, d_out, d_lse)
    ref_out, ref_lse, ref_grads = outputs_and_grads(reference_attention, q, k, v, qc, kc,
                                                    d_out, d_lse, **mask)
    for name, got, want in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, *grads),
                               (ref_out, ref_lse, *ref_grads)):
        assert_close(name, got, want, TOL["float32"])


def test_attention_with_schedule_rejects_mismatches():
    case = Case(3, 40, "interleaved", 4, 1, 2, 5, "float32", "gpu")
    q, k, v, qc, kc, _, _ = make_inputs(case, seed=32)
    mask = dict(window=4, sink_tokens=1, q_offset=5)
    wrong_blocks = _scheduled_attention("gpu", q, k, qc, kc, **mask, schedule_block=32)
    with pytest.raises(ValueError, match=r"schedule.kv_indices has shape \(1, 2, 2, 2\), but "
                       r"the config's blocks \(16 x 16\) need \(1, 2, 3, 3\)"):
        wrong_blocks(q, k, v, qc, kc)
    attend = _scheduled_attention("gpu", q, k, qc, kc, **mask)
    with pytest.raises(ValueError, match="config is for q_len=40, kv_len=45, but q and k hold 39"):
        attend(q[:, 1:], k, v, qc[..., 1:], kc)
    with pytest.raises(TypeError, match="q_clusters must hold integer"):
        attend(q, k, v, qc.astype(jnp.float32), kc)
    with pytest.raises(ValueError, match=r"the kernels' backend must be one of "
                       r"\('gpu', 'mosaic', 'tpu', 'triton'\)"):
        attend(q, k, v, qc, kc, backend="xla")


@pytest.mark.parametrize("make, error, match", [
    (lambda: GpuTuning(fwd_tile_k=48), ValueError,
     r"GpuTuning.fwd_tile_k must be a power of two >= 16, got 48"),
    (lambda: GpuTuning(dq_tile_q=8), ValueError, "GpuTuning.dq_tile_q must be a power of two"),
    (lambda: GpuTuning(dkv_tile_k=32.0), TypeError, "GpuTuning.dkv_tile_k must be an int"),
    (lambda: GpuTuning(dkv_warps=3), ValueError,
     "GpuTuning.dkv_warps must be a positive power of two"),
    (lambda: GpuTuning(fwd_stages=0), ValueError, "GpuTuning.fwd_stages must be >= 1"),
    (lambda: GpuTuning(band_tile_q=24), ValueError,
     r"GpuTuning.band_tile_q must be a power of two >= 16, got 24"),
    (lambda: GpuTuning(band_heads=3), ValueError,
     "GpuTuning.band_heads must be a positive power of two, got 3"),
    (lambda: GpuTuning(tree_prefetch=2), ValueError,
     "GpuTuning.tree_prefetch must be 0 or 1, got 2"),
    (lambda: GpuTuning(tree_tail=-1), ValueError, "GpuTuning.tree_tail must be >= 0, got -1"),
    (lambda: GpuTuning(band_by_position=2), ValueError,
     "GpuTuning.band_by_position must be 0 or 1, got 2"),
    (lambda: GpuTuning(dq_atomic=-1), ValueError, "GpuTuning.dq_atomic must be 0 or 1, got -1"),
    (lambda: GpuTuning(tree_tile_k=8), ValueError,
     r"GpuTuning.tree_tile_k must be a power of two >= 16, got 8"),
    (lambda: GpuTuning(rescale_slack=17), ValueError,
     r"GpuTuning.rescale_slack must be in \[0, 16\] \(the weights stay below 2\^slack\), got 17"),
    (lambda: GpuTuning(rescale_slack=-1), ValueError, r"GpuTuning.rescale_slack must be in"),
    (lambda: AttentionConfig(q_len=8, kv_len=8, q_offset=0, window=1, sink_tokens=0, scale=1.0,
                             block_q=16, block_k=48), ValueError,
     "block_k must be a positive power of two, got 48"),
])
def test_bad_kernel_config_raises(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_tuning_for_a_dtype_takes_changes():
    """for_dtype's changes sit on that dtype's tiles: float32 keeps its 32-wide tiles."""
    f32 = GpuTuning.for_dtype(jnp.float32, dq_atomic=1)
    assert (f32.dq_atomic, f32.dkv_tile_q, f32.fwd_stages) == (1, 32, 1)
    assert GpuTuning.for_dtype(jnp.float32) == GpuTuning.for_dtype(jnp.float32, dq_atomic=0)
    assert GpuTuning.for_dtype(jnp.bfloat16, band_tile_k=32) == GpuTuning(band_tile_k=32)
    assert GpuTuning().dkv_tile_q != 32  # the bf16 tiles differ, so the check above can fail
    with pytest.raises(ValueError, match="GpuTuning.dq_atomic must be 0 or 1, got 3"):
        GpuTuning.for_dtype(jnp.float32, dq_atomic=3)


def _bench_attention():
    path = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_forward_schedule_is_the_schedules_key_block_lists():
    """bench_attention times "what a forward alone builds": the key-block lists and the
    density of the whole schedule, equal to its fields."""
    bench = _bench_attention()
    prob = bench.Problem(512)
    ids = jnp.broadcast_to(jnp.arange(512) // 32 % 7, (1, bench.HQ, 512))  # 7 clusters, cycled
    whole = prob.schedule_fn(ids, 32, 32, "xla")
    forward = jax.jit(lambda ids: bench._forward_lists(prob.schedule(ids, 32, 32, "xla")))(ids)
    promised = prob.forward_schedule_fn(ids, 32, 32, 7)  # the ids' range promised
    assert float(whole.density) < 0.9  # blocks skipped: the lists are not all full
    for lists in (forward, promised):
        for got, want in zip(lists, (whole.kv_indices, whole.kv_num_blocks,
                                     whole.kv_num_masked, whole.density)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_bench_tuning_reports_when_no_backward_variant_runs(monkeypatch):
    bench = _bench_attention()

    def time_kernels(self, *args, fwd=True, bwd=True, reps=7):
        if bwd:
            raise RuntimeError("shared memory exhausted")
        return {"fwd": 1e-3}

    monkeypatch.setattr(bench.Problem, "time_kernels", time_kernels)
    with pytest.raises(RuntimeError, match=r"tune S=16: no backward variant ran at any of the "
                       r"blocks \[\(16, 16\)\]"):
        bench.tune(16, [(16, 16)])
