"""routed_attention (natural, sorted and auto layouts) against the dense float32 reference:
outputs, LSE and gradients; the sink partial; the "other cluster" mask mode; the merge; the mesh
wrapper.

Like test_kernels.py: on a CPU host the GPU- and TPU-style kernels run in Pallas interpret
mode, on an accelerator its compiled kernel runs.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding

from pallas_kernels import (allowed_pairs, attention_with_schedule, build_schedule,
                            reference_attention, routed_attention, sharded_routed_attention)
from pallas_kernels.ops import make_config
from pallas_kernels.routed import prefer_sorted
from pallas_kernels.schedule import natural_density_bound
from pallas_kernels.sorted_layout import (SINK_PARTIAL_MAX, _permute_heads, _permute_rows,
                                          merge_partials, sink_pass, sort_by_cluster,
                                          sorted_attention, sorted_attention_autodiff,
                                          sorted_plan)
from pallas_kernels.sharding import attention_specs
from test_kernels import (INTERPRET, TOL, assert_close, kernel_backend, outputs_and_grads,
                          poison_device_memory)


@dataclasses.dataclass(frozen=True)
class Case:
    kernel: str
    layout: str
    seq: int
    clusters: int
    window: int
    sink: int
    q_heads: int
    kv_heads: int
    dtype: str
    block_q: int = 16
    block_k: int = 16
    batch: int = 1
    contiguous: bool = False

    def __str__(self):
        return (f"{self.kernel}-{self.layout}-S{self.seq}-c{self.clusters}"
                f"{'r' if self.contiguous else ''}-w{self.window}-s{self.sink}-h{self.q_heads}/"
                f"{self.kv_heads}-{self.dtype}-b{self.block_q}x{self.block_k}-B{self.batch}")


CASES = [
    Case("gpu", "sorted", 257, 7, 5, 1, 4, 2, "float32"),
    Case("tpu", "sorted", 257, 30, 0, 0, 2, 2, "float32", block_q=32),
    Case("gpu", "sorted", 100, 3, 0, 4, 4, 2, "bfloat16", block_k=32),
    Case("tpu", "sorted", 100, 100, 20, 0, 4, 2, "bfloat16"),
    Case("gpu", "sorted", 1, 1, 5, 1, 2, 2, "float32"),
    Case("tpu", "sorted", 300, 16, 5, 1, 4, 2, "bfloat16", block_q=32, block_k=32, batch=2),
    # sink partial: sink 3, window smaller / larger than the block, GQA, S off the block
    Case("gpu", "sorted", 130, 6, 3, 3, 4, 2, "float32"),
    Case("gpu", "sorted", 130, 6, 40, 3, 4, 1, "float32"),
    Case("tpu", "sorted", 90, 4, 20, 3, 4, 2, "bfloat16", block_q=32),
    # a sink wider than SINK_PARTIAL_MAX stays in the band kernel
    Case("gpu", "sorted", 80, 5, 3, SINK_PARTIAL_MAX + 4, 2, 1, "float32"),
    Case("gpu", "natural", 70, 5, 5, 1, 4, 2, "float32"),
    Case("tpu", "auto", 70, 5, 2**31, 2**40, 2, 2, "float32"),
    Case("gpu", "auto", 64, 4, 3, 1, 4, 2, "float32", contiguous=True),
]


def make_inputs(case: Case, seed: int):
    rng = np.random.default_rng(seed)
    dtype = jnp.dtype(case.dtype)

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), dtype)

    shape = (case.batch, case.q_heads, case.seq)
    if case.contiguous:  # equal runs, cut at a different place per head
        shift = rng.integers(0, case.seq // case.clusters, (case.batch, case.q_heads, 1))
        ids = np.minimum((np.arange(case.seq) + shift) * case.clusters // case.seq,
                         case.clusters - 1)
    else:  # each token's cluster drawn at random: scattered routes
        ids = rng.integers(0, case.clusters, shape)
    clusters = jnp.asarray(ids * 7919 - 1000, jnp.int32)  # ids spread over int32
    q = normal(case.batch, case.seq, case.q_heads, 16)
    k = normal(case.batch, case.seq, case.kv_heads, 16)
    v = normal(case.batch, case.seq, case.kv_heads, 16)
    d_out = normal(case.batch, case.seq, case.q_heads, 16)
    d_lse = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    return q, k, v, clusters, d_out, d_lse


def routed_as_pair(q, k, v, qc, kc, **kwargs):
    """routed_attention under the (q_clusters, k_clusters) signature of outputs_and_grads."""
    assert qc is kc
    return routed_attention(q, k, v, qc, **kwargs)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_reference(case):
    q, k, v, ids, d_out, d_lse = make_inputs(case, seed=zlib.crc32(str(case).encode()))
    mask = dict(window=case.window, sink_tokens=case.sink)
    poison_device_memory()
    out, lse, grads = outputs_and_grads(
        routed_as_pair, q, k, v, ids, ids, d_out, d_lse, **mask, layout=case.layout,
        backend=kernel_backend(case.kernel), interpret=INTERPRET, block_q=case.block_q,
        block_k=case.block_k)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    ref_out, ref_lse, ref_grads = outputs_and_grads(reference_attention, *f32[:3], ids, ids,
                                                    f32[3], d_lse, **mask)
    tol = TOL[case.dtype]
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close("out", out, ref_out, tol)
    assert_close("lse", lse, ref_lse, tol)  # every row keeps (i, i): all finite
    for name, g, rg, x in zip(("dq", "dk", "dv"), grads, ref_grads, (q, k, v)):
        assert g.dtype == x.dtype
        assert_close(name, g, rg, tol)


@pytest.mark.parametrize("window,sink", [(5, 3), (0, 0), (40, 1)])
def test_global_statistics_vjp_equals_autodiff_through_the_merge(window, sink):
    """sorted_attention's backward (each pass's kernel with the merged lse and delta) against
    autodiff through the same stages (merge, gathers, each pass's own VJP), float32."""
    case = Case("gpu", "sorted", 130, 6, window, sink, 4, 2, "float32")
    q, k, v, ids, d_out, d_lse = make_inputs(case, seed=11 + window)
    cfg = make_config(q, k, window=window, sink_tokens=sink, q_offset=0, scale=None,
                      backend=kernel_backend("gpu"), interpret=INTERPRET, block_q=16,
                      block_k=16)

    def outputs_and_vjp(fn, q, k, v):
        (out, lse), vjp = jax.vjp(lambda q, k, v: fn(q, k, v, ids, cfg, kernel_backend("gpu")),
                                  q, k, v)
        return (out, lse, *vjp((d_out, d_lse)))

    results = []
    for fn in (sorted_attention, sorted_attention_autodiff):
        poison_device_memory()
        # jitted: eager, the stages dispatched a few hundred small programs
        results.append(jax.jit(outputs_and_vjp, static_argnums=0)(fn, q, k, v))
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), *results):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5,
                                   err_msg=name)
    assert float(jnp.abs(results[0][2]).max()) > 1e-2   # gradients that can differ


def test_query_with_only_itself_and_a_sink_key():
    """Distinct ids, window 1, sink 1: query i > 0 sees only keys 0 and i (the band set is
    empty, the sink set holds (i, 0)); against the float64 softmax over those two scores and
    against the reference, gradients included."""
    rng = np.random.default_rng(3)
    seq, dim = 37, 16
    q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, dim)), jnp.float32) for h in (4, 2, 2))
    ids = jnp.asarray(rng.permutation(4 * seq).reshape(1, 4, seq), jnp.int32)
    d_out = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    d_lse = jnp.asarray(rng.standard_normal((1, 4, seq)), jnp.float32)
    mask = dict(window=1, sink_tokens=1)
    out, lse, grads = outputs_and_grads(
        routed_as_pair, q, k, v, ids, ids, d_out, d_lse, **mask, layout="sorted",
        backend=kernel_backend("gpu"), interpret=INTERPRET, block_q=16, block_k=16)
    qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
    want_out, want_lse = np.zeros(q.shape), np.zeros((1, 4, seq))
    for h, i in np.ndindex(4, seq):
        keys = [0, i] if i else [0]
        s = qn[0, i, h] @ kn[0, keys, h // 2].T / np.sqrt(dim)
        p = np.exp(s - s.max())
        want_out[0, i, h] = p @ vn[0, keys, h // 2] / p.sum()
        want_lse[0, h, i] = s.max() + np.log(p.sum())
    assert_close("out", out, want_out, TOL["float32"])
    assert_close("lse", lse, want_lse, TOL["float32"])
    _, _, ref_grads = outputs_and_grads(reference_attention, q, k, v, ids, ids, d_out, d_lse,
                                        **mask)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close(name, g, rg, TOL["float32"])


def float64_attention_over(q, k, v, ids, keep):
    """Loops over the pairs (b, h, i, j) with j <= i that keep(i, j, same_cluster) selects:
    (out, lse) in float64, 0 and -inf for rows without a key."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    ids = np.asarray(ids)
    batch, seq, heads, dim = q.shape
    group = heads // k.shape[2]
    out, lse = np.zeros(q.shape), np.full((batch, heads, seq), -np.inf)
    for b, h, i in np.ndindex(batch, heads, seq):
        keys = [j for j in range(i + 1) if keep(i, j, ids[b, h, i] == ids[b, h, j])]
        if keys:
            s = q[b, i, h] @ k[b, keys, h // group].T / np.sqrt(dim)
            p = np.exp(s - s.max())
            out[b, i, h] = p @ v[b, keys, h // group] / p.sum()
            lse[b, h, i] = s.max() + np.log(p.sum())
    return out, lse


def float64_sink_attention(q, k, v, ids, window, sink):
    """The sink pairs outside the window and the tree set."""
    return float64_attention_over(q, k, v, ids,
                                  lambda i, j, same: j < sink and i - j >= window and not same)


@pytest.mark.parametrize("window, sink", [(0, 1), (4, 3), (30, 2)])
def test_sink_partial_matches_explicit_loops(window, sink):
    """sink_pass against float64 loops over its set, rows without a key included, GQA; its
    gradients are finite where a row is empty."""
    rng = np.random.default_rng(window + sink)
    seq = 33
    q, k, v = (jnp.asarray(rng.standard_normal((2, seq, h, 8)), jnp.float32) for h in (6, 2, 2))
    ids = jnp.asarray(rng.integers(0, 3, (2, 6, seq)), jnp.int32)
    cfg = make_config(q, k, window=window, sink_tokens=sink, q_offset=0, scale=None,
                      backend="gpu", interpret=True, block_q=16, block_k=16)
    out, lse = sink_pass(q, k, v, ids, cfg)
    want_out, want_lse = float64_sink_attention(q, k, v, ids, window, sink)
    empty = np.isneginf(want_lse)
    assert empty.any() and not empty.all()
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert out.dtype == jnp.float32
    assert_close("out", out, want_out, 1e-6)
    assert_close("lse", np.where(empty, 0, lse), np.where(empty, 0, want_lse), 1e-6)
    grads = jax.grad(lambda q, k, v: jnp.sum(sink_pass(q, k, v, ids, cfg)[0]),
                     argnums=(0, 1, 2))(q, k, v)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert not np.any(np.asarray(grads[1])[:, sink:])  # only the sink keys get a gradient


@pytest.mark.parametrize("window, sink, reaches_block_0", [(3, 1, 2), (40, 2, 4),
                                                           (3, SINK_PARTIAL_MAX + 1, 7)])
def test_band_schedule_leaves_key_block_0_to_the_sink_partial(window, sink, reaches_block_0):
    """In the sorted plan key block 0 is visited by the query blocks its window reaches, not
    by every one, unless the sink is wider than SINK_PARTIAL_MAX."""
    seq, block = 100, 16
    ids = jnp.asarray(np.random.default_rng(4).integers(0, 5, (1, 2, seq)), jnp.int32)
    x = jnp.zeros((1, seq, 2, 16), jnp.float32)
    cfg = make_config(x, x, window=window, sink_tokens=sink, q_offset=0, scale=None,
                      backend="gpu", interpret=True, block_q=block, block_k=block)
    band = sorted_plan(ids, cfg).band
    np.testing.assert_array_equal(np.asarray(band.q_num_blocks[..., 0]), reaches_block_0)


def test_auto_rule_follows_the_natural_density():
    """Scattered ids make the natural schedule visit every causal block (sorted layout); 16 runs
    of 4 blocks keep it low (natural layout). Rows of run c visit its blocks up to the diagonal
    (16 * 10), the previous block for the window when it starts a run (15) and the sink block
    when c > 0 (60): 235 of 64 * 65 / 2 causal blocks."""
    seq = 4096
    scattered = jnp.asarray(np.random.default_rng(0).integers(0, 16, (1, 2, seq)), jnp.int32)
    runs = jnp.repeat(jnp.arange(16, dtype=jnp.int32), 256)[None, None].repeat(2, 1)
    kw = dict(window=16, sink_tokens=1, block_q=64, block_k=64)
    dense = build_schedule(scattered, scattered, **kw).density
    sparse = build_schedule(runs, runs, **kw).density
    assert float(dense) == 1.0 and bool(prefer_sorted(dense))
    assert float(sparse) == pytest.approx(235 / 2080)
    assert not bool(prefer_sorted(sparse)) and bool(prefer_sorted(sparse, sorted_above=0.1))


@pytest.mark.parametrize("seq,bq,bk,window,sink", [(300, 32, 32, 16, 1), (277, 16, 32, 40, 3),
                                                    (150, 32, 16, 1, 0)])
def test_density_bound_is_exact_below_64_ids_and_an_upper_bound_above(seq, bq, bk, window, sink):
    """natural_density_bound against build_schedule's density: equal when every id lies in
    [0, 64) (scattered, runs, one cluster, few clusters), never below it for ids up to
    10,000."""
    rng = np.random.default_rng(seq)
    kw = dict(window=window, sink_tokens=sink, block_q=bq, block_k=bk)
    # compiled once per kw (a fresh jit per call compiled every call)
    bound_of = jax.jit(natural_density_bound, static_argnames=tuple(kw))
    exact_of = jax.jit(lambda ids, **kw: build_schedule(ids, ids, **kw).density,
                       static_argnames=tuple(kw))

    def bound(ids):
        return bound_of(ids, **kw)

    def exact(ids):
        return exact_of(ids, **kw)

    runs = np.repeat(np.arange(seq // 20 + 1), 20)[:seq]
    shape = (2, 3, seq)
    for ids in (rng.integers(0, 64, shape), np.broadcast_to(runs % 64, shape),
                np.full(shape, 63), rng.integers(0, 6, shape)):
        ids = jnp.asarray(ids, jnp.int32)
        assert float(bound(ids)) == pytest.approx(float(exact(ids)), abs=1e-6)
    for ids in (rng.integers(0, 10_000, shape), np.broadcast_to(runs * 97, shape)):
        ids = jnp.asarray(ids, jnp.int32)
        assert float(exact(ids)) - 1e-6 <= float(bound(ids)) <= 1.0
    # 64 apart, two runs share a signature bit: the bound counts their blocks, the schedule not.
    ids = jnp.asarray(np.broadcast_to(np.where(np.arange(seq) < seq // 2, 0, 64), shape),
                      jnp.int32)
    kw.update(window=1, sink_tokens=0)
    assert float(bound(ids)) > float(exact(ids))


def float64_local_attention(q, k, v, ids, window, sink):
    """The local pairs (sink or window) of other clusters."""
    return float64_attention_over(q, k, v, ids,
                                  lambda i, j, same: (j < sink or i - j < window) and not same)


@pytest.mark.parametrize("kernel", ["gpu", "tpu"])
def test_other_cluster_mode_masks_every_block(kernel):
    """A schedule from build_schedule marks window blocks full; with exclude_same_cluster the
    kernels must still drop the same-cluster pairs there (and give empty rows 0, -inf)."""
    rng = np.random.default_rng(5)
    seq, window, sink = 48, 40, 1
    q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, 16)), jnp.float32) for h in (2, 1, 1))
    ids = jnp.asarray(rng.integers(0, 3, (1, 2, seq)), jnp.int32)
    sched = build_schedule(ids, ids, window=window, sink_tokens=sink, block_q=16, block_k=16)
    assert int(jnp.sum(sched.kv_num_blocks - sched.kv_num_masked)) > 0
    cfg = make_config(q, k, window=window, sink_tokens=sink, q_offset=0, scale=None,
                      backend=kernel_backend(kernel), interpret=INTERPRET, block_q=16,
                      block_k=16)
    cfg = dataclasses.replace(cfg, exclude_same_cluster=True)
    poison_device_memory()
    out, lse = attention_with_schedule(q, k, v, ids, ids, sched, backend=kernel_backend(kernel),
                                       config=cfg)
    want_out, want_lse = float64_local_attention(q, k, v, ids, window, sink)
    empty = np.isneginf(want_lse)
    assert empty.any() and not empty.all()
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), empty)
    assert_close("out", out, want_out, TOL["float32"])
    assert_close("lse", np.where(empty, 0, lse), np.where(empty, 0, want_lse), TOL["float32"])


def test_other_cluster_mask_matches_explicit_loops():
    rng = np.random.default_rng(1)
    qc, kc = rng.integers(0, 3, 9), rng.integers(0, 3, 14)
    got = np.asarray(allowed_pairs(5 + np.arange(9)[:, None], np.arange(14)[None, :],
                                   qc[:, None], kc[None, :], window=3, sink_tokens=2, kv_len=12,
                                   exclude_same_cluster=True))
    for i, j in np.ndindex(9, 14):
        pos = 5 + i
        assert got[i, j] == (j < 12 and j <= pos and (j < 2 or pos - j < 3) and qc[i] != kc[j])


@pytest.mark.parametrize("sets", [2, 3])
def test_merge_of_disjoint_sets_equals_softmax_over_the_union(sets):
    """Against float64 softmax over concatenated scores; a set with no key (lse -inf) weighs 0
    and passes finite gradients."""
    rng = np.random.default_rng(2 + sets)
    scores = [rng.standard_normal((1, 3, 5, n)) for n in (4, 6, 2)[:sets]]
    values = [rng.standard_normal((1, 3, n, 8)) for n in (4, 6, 2)[:sets]]
    scores[1][0, 1, 2] = -np.inf                              # row (head 1, query 2): b empty
    scores[-1][0, 2, 4] = -np.inf                             # row (head 2, query 4): last empty

    def partial(s, v):
        m = np.max(s, axis=-1, keepdims=True)
        p = np.exp(s - np.where(np.isfinite(m), m, 0))
        total = p.sum(-1)
        o = np.einsum("bhqk,bhkd->bqhd", p / np.where(total > 0, total, 1)[..., None], v)
        return o, np.where(total > 0, np.log(np.where(total > 0, total, 1)) + m[..., 0], -np.inf)

    parts = [partial(s, v) for s, v in zip(scores, values)]
    o, l = partial(np.concatenate(scores, -1), np.concatenate(values, -2))
    args = [jnp.asarray(x, jnp.float32) for part in parts for x in part]
    got_o, got_l = merge_partials(*args)
    assert_close("out", got_o, o, 1e-6)
    assert_close("lse", got_l, l, 1e-6)
    grads = jax.grad(lambda *a: jnp.sum(merge_partials(*a)[0]) + jnp.sum(merge_partials(*a)[1]),
                     argnums=tuple(range(len(args))))(*args)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)
    assert float(grads[3][0, 1, 2]) == 0.0 and not np.any(np.asarray(grads[2][0, 2, 1]))
    assert float(grads[-1][0, 2, 4]) == 0.0 and not np.any(np.asarray(grads[-2][0, 4, 2]))


def test_merge_needs_pairs():
    x = jnp.zeros((1, 2, 1, 4))
    with pytest.raises(ValueError, match="merge_partials takes \\(out, lse\\) pairs, at least "
                                         "two, got 3 arrays"):
        merge_partials(x, x[..., 0], x)


@pytest.mark.parametrize("group", [1, 3])
def test_permutation_backward_is_the_scatter_of_its_cotangent(group):
    """_permute_heads' backward (a gather by the inverse order, summed over each kv group)
    against float64 loops that add every sorted slot's cotangent back to its token and kv head;
    the LSE permutation likewise."""
    rng = np.random.default_rng(11 + group)
    batch, seq, kv_heads, dim = 2, 29, 2, 4
    heads = kv_heads * group
    ids = jnp.asarray(rng.integers(0, 4, (batch, heads, seq)), jnp.int32)
    order, _, inverse = sort_by_cluster(ids)
    x = jnp.asarray(rng.standard_normal((batch, seq, kv_heads, dim)), jnp.float32)
    ct = rng.standard_normal((batch, seq, heads, dim))
    out, vjp = jax.vjp(lambda x: _permute_heads(x, order, inverse, group), x)
    o = np.asarray(order)
    want_out, want_dx = np.zeros((batch, seq, heads, dim)), np.zeros(x.shape)
    for b, h, s in np.ndindex(batch, heads, seq):
        want_out[b, s, h] = np.asarray(x, np.float64)[b, o[b, h, s], h // group]
        want_dx[b, o[b, h, s], h // group] += ct[b, s, h]
    assert_close("out", out, want_out, 1e-6)
    assert_close("dx", vjp(jnp.asarray(ct, jnp.float32))[0], want_dx, 1e-6)
    lse = jnp.asarray(rng.standard_normal((batch, heads, seq)), jnp.float32)
    ct_lse = rng.standard_normal((batch, heads, seq))
    got, vjp = jax.vjp(lambda l: _permute_rows(l, order, inverse), lse)
    want_dl = np.zeros(lse.shape)
    for b, h, s in np.ndindex(batch, heads, seq):
        want_dl[b, h, o[b, h, s]] += ct_lse[b, h, s]
    assert_close("lse", got, np.take_along_axis(np.asarray(lse), o, -1), 0)
    assert_close("dlse", vjp(jnp.asarray(ct_lse, jnp.float32))[0], want_dl, 1e-6)


def test_under_shard_map_equals_the_unsharded_call():
    """Batch and heads split over as many devices as the host has (up to 2 x 2)."""
    devices = jax.devices()
    data, tensor = (2, 2) if len(devices) >= 4 else (1, min(len(devices), 2))
    mesh = Mesh(np.array(devices[:data * tensor]).reshape(data, 1, tensor),
                ("data", "fsdp", "tensor"))
    case = Case("gpu", "sorted", 40, 4, 3, 1, 4, 2, "float32", batch=2)
    q, k, v, ids, _, _ = make_inputs(case, seed=7)
    kw = dict(window=3, sink_tokens=1, layout="sorted", backend=kernel_backend("gpu"),
              interpret=INTERPRET, block_q=16, block_k=16, return_lse=True)
    want_out, want_lse = reference_attention(q, k, v, ids, ids, window=3, sink_tokens=1,
                                             return_lse=True)
    act, id_spec = attention_specs(mesh)
    place = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    out, lse = jax.jit(lambda *a: sharded_routed_attention(mesh, *a, **kw))(
        place(q, act), place(k, act), place(v, act), place(ids, id_spec))
    assert out.sharding.spec == act
    assert_close("out", out, want_out, TOL["float32"])
    assert_close("lse", lse, want_lse, TOL["float32"])


def _args():
    rng = np.random.default_rng(0)
    return (jnp.asarray(rng.standard_normal((1, 8, 4, 16)), jnp.float32),
            jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32),
            jnp.asarray(rng.standard_normal((1, 8, 2, 16)), jnp.float32),
            jnp.asarray(rng.integers(0, 3, (1, 4, 8)), jnp.int32))


@pytest.mark.parametrize("change, error, match", [
    (dict(layout="tree"), ValueError,
     r"layout must be one of \('auto', 'natural', 'sorted'\), got 'tree'"),
    (dict(sorted_above=1.5), ValueError, r"sorted_above must be a number in \[0, 1\], got 1.5"),
    (dict(sorted_above="0.3"), ValueError, "sorted_above must be a number"),
    (dict(k=jnp.ones((1, 6, 2, 16)), v=jnp.ones((1, 6, 2, 16))), ValueError,
     "routed_attention is self-attention: q and k must hold the same positions, got Sq=8 and "
     "Sk=6"),
    (dict(clusters=jnp.zeros((1, 2, 8), jnp.int32)), ValueError,
     r"clusters must have shape \[B, Hq, S\] = \(1, 4, 8\), got \(1, 2, 8\)"),
    (dict(clusters=jnp.zeros((1, 4, 8))), TypeError, "clusters must hold integer cluster ids"),
    (dict(window=-1), ValueError, "window must be >= 0"),
    (dict(backend="gpu", block_k=8), ValueError, "GPU block sizes must be >= 16"),
])
def test_bad_arguments_raise(change, error, match):
    q, k, v, ids = _args()
    arrays = dict(q=q, k=k, v=v, clusters=ids)
    kwargs = dict(window=2, sink_tokens=1, interpret=True)
    for key, value in change.items():
        (arrays if key in arrays else kwargs)[key] = value
    with pytest.raises(error, match=match):
        routed_attention(**arrays, **kwargs)
