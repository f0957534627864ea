"""backend="triton" (triton_kernels.py) against the dense float32 reference.

One test class, two runners: "interpreter" launches the Triton kernels in triton's interpreter
on CPU torch tensors (no jax_triton; hosts without a GPU), "jax_triton" compiles them through
jax_triton.triton_call (a GPU host). Triton fixes interpreted vs compiled when it is first
imported, so each host runs one runner and skips the other, saying why.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
import sys
import zlib

import jax

# Before triton's first import: without a GPU its kernels can only run interpreted.
ON_GPU = jax.default_backend() == "gpu"
if not ON_GPU and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from test_kernels import (TOL, Case, assert_close, assert_matches_reference,  # noqa: E402
                          make_inputs, outputs_and_grads)
from test_routed_attention import float64_attention_over  # noqa: E402

from pallas_kernels import (block_sparse_attention, build_schedule,  # noqa: E402
                            reference_attention, routed_attention)
from pallas_kernels.config import GpuTuning  # noqa: E402
from pallas_kernels.masking import LOG2E  # noqa: E402
from pallas_kernels.ops import attention_with_schedule, make_config  # noqa: E402
from pallas_kernels.triton_backend import unavailable  # noqa: E402

RUNNERS = {"interpreter": True, "jax_triton": False}  # runner -> interpret flag


@pytest.fixture(params=list(RUNNERS))
def interpret(request):
    if request.param == "jax_triton" and not ON_GPU:
        pytest.skip(f"jax_triton runner: no GPU here (jax's default backend is "
                    f"{jax.default_backend()!r}); it runs on a GPU host")
    if request.param == "interpreter" and ON_GPU:
        pytest.skip("interpreter runner: a GPU host imports triton compiled, and triton "
                    "cannot interpret in the same process; it runs on hosts without a GPU")
    reason = unavailable(RUNNERS[request.param])
    if reason:
        pytest.skip(f"{request.param} runner: {reason}")
    return RUNNERS[request.param]


# Random routes (i.i.d. ids per token: "interleaved") and contiguous clusters; GQA 1-4; odd
# lengths; q_offset; float32 and bf16; head dim 24 (padded to 32 by masked loads); 64-blocks
# with float32 tiles of 32 (the kernels loop over sub-tiles); batch and kv heads > 1.
CASES = [
    Case(5, 77, "interleaved", 5, 1, 4, 0, "float32", "triton", head_dim=24),
    Case(2, 57, "interleaved", 5, 4, 2, 37, "bfloat16", "triton", kv_heads=2),
    Case(7, 100, "contiguous", 5, 1, 1, 0, "float32", "triton", block_q=32),
    Case(64, 45, "interleaved", 0, 4, 3, 37, "float32", "triton", batch=2),
    Case(3, 130, "contiguous", 5000, 0, 2, 11, "bfloat16", "triton", block_q=32, block_k=32),
    Case(7, 150, "interleaved", 5, 1, 2, 0, "float32", "triton", kv_heads=2, block_q=64,
         block_k=64),
]


def _attention(interpret, case, tuning=None):
    """block_sparse_attention on the triton backend; with tuning (GpuTuning fields over the
    dtype's defaults), the same through make_config and attention_with_schedule."""
    def attention(q, k, v, qc, kc, *, return_lse, **mask):
        if tuning is None:
            return block_sparse_attention(q, k, v, qc, kc, backend="triton", interpret=interpret,
                                          block_q=case.block_q, block_k=case.block_k,
                                          return_lse=return_lse, **mask)
        gpu = dataclasses.replace(GpuTuning.for_dtype(q.dtype), **tuning)
        cfg = make_config(q, k, **mask, scale=None, backend="triton", interpret=interpret,
                          block_q=case.block_q, block_k=case.block_k, gpu_tuning=gpu)
        sched = build_schedule(qc, kc, **mask, block_q=case.block_q, block_k=case.block_k)
        out, lse = attention_with_schedule(q, k, v, qc, kc, sched, backend="triton", config=cfg)
        return (out, lse) if return_lse else out
    return attention


def _check(interpret, case, seed, kv_len=None, tuning=None):
    """Outputs, LSE and the gradients of <out, d_out> + <lse, d_lse> against the reference."""
    q, k, v, qc, kc, d_out, d_lse = make_inputs(case, seed, kv_len)
    mask = dict(window=case.window, sink_tokens=case.sink, q_offset=case.q_offset)
    out, lse, grads = outputs_and_grads(_attention(interpret, case, tuning), q, k, v, qc, kc,
                                        d_out, d_lse, **mask)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    ref_out, ref_lse, ref_grads = outputs_and_grads(reference_attention, *f32[:3], qc, kc,
                                                    f32[3], d_lse, **mask)
    assert np.abs(np.asarray(ref_out, np.float32)).max() > 0.1  # a real comparison, not zeros
    return assert_matches_reference((out, lse, grads), (ref_out, ref_lse, ref_grads), (q, k, v),
                                    TOL[case.dtype])


def _assert_fused_matches_reference(fused, q, k, v, ids, d_out, dtype, grads=True, **mask):
    """fused(q, k, v) -> (out, lse) against reference_attention on float32 copies: outputs,
    LSE and, with grads, the gradients of <out, d_out> + sum(tanh(lse))."""
    def loss(attend, q, k, v):
        out, lse = attend(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(jnp.tanh(lse)), (out, lse)

    ref = lambda q, k, v: reference_attention(  # noqa: E731
        q, k, v, ids, ids, **mask, return_lse=True)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    if grads:
        (_, got), got_grads = jax.value_and_grad(
            lambda *a: loss(fused, *a), argnums=(0, 1, 2), has_aux=True)(q, k, v)
        (_, want), want_grads = jax.value_and_grad(
            lambda *a: loss(ref, *a), argnums=(0, 1, 2), has_aux=True)(*f32)
    else:
        got, want, got_grads, want_grads = fused(q, k, v), ref(*f32), (), ()
    assert np.abs(np.asarray(want[0])).max() > 0.1  # a real comparison, not zeros
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), (*got, *got_grads),
                          (*want, *want_grads)):
        assert_close(name, g, w, TOL[dtype])


class TestTritonKernels:

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, interpret, case):
        _check(interpret, case, seed=zlib.crc32(str(case).encode()))

    def test_rows_without_keys_give_zero_output(self, interpret):
        """Sink 0 and window 0 with many ids: many rows see no key at all."""
        empty = _check(interpret, Case(64, 48, "interleaved", 0, 0, 2, 5, "float32", "triton"),
                       seed=3)
        assert empty.any() and not empty.all()

    @pytest.mark.parametrize("kv_len", [20, 70])
    def test_key_length_other_than_query_end(self, interpret, kv_len):
        """Keys may stop before the last query (20 < 5 + 40) or run past it (70)."""
        case = Case(3, 40, "interleaved", 4, 1, 2, 5, "float32", "triton", block_k=32)
        _check(interpret, case, seed=11 + kv_len, kv_len=kv_len)

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_backward_with_dq_atomic(self, interpret, case):
        """GpuTuning.dq_atomic: dk, dv and dq from one launch, each tile's dq added into a
        zeroed float32 array (sinks in their parts in the same grid, or none: S130)."""
        _check(interpret, case, seed=zlib.crc32(str(case).encode()) + 1,
               tuning=dict(dq_atomic=1))

    @pytest.mark.parametrize("sink", [40, 2**40])
    @pytest.mark.parametrize("dq_atomic", [0, 1])
    def test_sinks_over_several_blocks(self, interpret, sink, dq_atomic, monkeypatch):
        """Sink keys fill 3 key blocks (40 over 16-blocks) or all of them (every key a sink):
        the sink pass takes those blocks, the main dk/dv pass the others or none. Parts of 2
        query blocks: the 4 query blocks' lists are summed from 2 parts. With dq_atomic the
        parts run in the main pass's grid, after its programs (none when every key is a
        sink)."""
        from pallas_kernels import triton_backend
        monkeypatch.setattr(triton_backend, "SINK_CHUNK", 2)
        case = Case(3, 60, "interleaved", 2, sink, 2, 5, "float32", "triton")
        _check(interpret, case, seed=17, tuning=dict(dq_atomic=1) if dq_atomic else None)

    def test_kernels_launched_directly(self, interpret, monkeypatch):
        """forward, then backward from the reference's own LSE and delta, without the custom
        VJP around them: each kernel's output on its own against the reference (the sink
        pass in parts of 2 of the 4 query blocks); then dq_atomic's one backward launch."""
        from pallas_kernels import triton_backend
        monkeypatch.setattr(triton_backend, "SINK_CHUNK", 2)
        case = Case(5, 64, "interleaved", 3, 1, 2, 0, "float32", "triton")
        q, k, v, qc, kc, d_out, _ = make_inputs(case, seed=41)
        mask = dict(window=case.window, sink_tokens=case.sink, q_offset=0)
        cfg = make_config(q, k, **mask, scale=None, backend="triton", interpret=interpret,
                          block_q=16, block_k=16)
        sched = build_schedule(qc, kc, **mask, block_q=16, block_k=16)
        ref_out, ref_lse = reference_attention(q, k, v, qc, kc, **mask, return_lse=True)
        _, vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, qc, kc, **mask), q, k, v)
        ref_grads = vjp(d_out)
        if interpret:  # straight into the interpreter on torch tensors: no jax in between
            import torch
            t = [torch.from_numpy(np.array(x)) for x in (q, k, v, qc, kc, d_out)]
            s = [torch.from_numpy(np.array(x)) for x in sched]
            out, lse = triton_backend.launch_interpreted(
                triton_backend.forward_launch(cfg, q.shape, k.shape, q.dtype), *t[:5], *s[:3])
            delta = torch.einsum("bqhd,bqhd->bhq", out, t[5])
            lse2 = torch.from_numpy(np.array(ref_lse)) * LOG2E
            common = (*t[:3], t[5], lse2, delta, *t[3:5])
            (dq,) = triton_backend.launch_interpreted(
                triton_backend.dq_launch(cfg, q.shape, k.shape, q.dtype), *common, *s[:3])
            dk, dv = triton_backend.launch_interpreted(
                triton_backend.dkv_launch(cfg, q.shape, k.shape, q.dtype), *common, *s[3:6])
            sink = triton_backend.dkv_sink_launch(cfg, q.shape, k.shape, q.dtype)
            pdk, pdv = triton_backend.launch_interpreted(sink, *common, *s[3:6])
            rows = sink.meta["SINK_ROWS"]  # the sink key block, summed over its parts
            dk[:, :rows], dv[:, :rows] = pdk.sum(0), pdv.sum(0)
            got = [x.numpy() for x in (out, lse, dq, dk, dv)]
            # dq_atomic's one launch: dq unscaled in float32, the sink parts as above
            dk, dv, pdk, pdv, dq = triton_backend.launch_interpreted(
                triton_backend.dkv_dq_launch(cfg, q.shape, k.shape, q.dtype), *common, *s[3:6])
            dk[:, :rows], dv[:, :rows] = pdk.sum(0), pdv.sum(0)
            got_atomic = [x.numpy() for x in (dq * cfg.scale, dk, dv)]
        else:
            out, lse = jax.jit(lambda *a: triton_backend.forward(*a, sched, cfg))(q, k, v, qc, kc)
            delta = jnp.einsum("bqhd,bqhd->bhq", out, d_out)
            def backward(c):
                return jax.jit(lambda *a: triton_backend.backward(*a, sched, c))(
                    q, k, v, d_out, ref_lse, delta, qc, kc)
            got = [out, lse, *backward(cfg)]
            atomic = dataclasses.replace(cfg, gpu=dataclasses.replace(cfg.gpu, dq_atomic=1))
            got_atomic = list(backward(atomic))
        for name, g, w in zip(("out", "lse", "dq", "dk", "dv"), got,
                              (ref_out, ref_lse, *ref_grads)):
            assert_close(name, g, w, TOL["float32"])
        for name, g, w in zip(("dq", "dk", "dv"), got_atomic, ref_grads):
            assert_close(name + " (dq_atomic)", g, w, TOL["float32"])

    def test_routed_attention_on_random_routes(self, interpret):
        """routed_attention's sorted layout (segment and band schedules, the "other cluster"
        mask, the LSE merge) on the Triton kernels."""
        rng = np.random.default_rng(5)
        seq, hq, hkv, d = 70, 4, 2, 16
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, d)), jnp.float32)
                   for h in (hq, hkv, hkv))
        ids = jnp.asarray(rng.integers(0, 4, (1, hq, seq)), jnp.int32)
        kw = dict(window=4, sink_tokens=1)
        got = routed_attention(q, k, v, ids, **kw, layout="sorted", backend="triton",
                               interpret=interpret, block_q=16, block_k=16)
        want = reference_attention(q, k, v, ids, ids, **kw)
        assert_close("out", got, want, TOL["float32"])

    @pytest.mark.parametrize("entry", ["block_sparse_attention", "routed_attention"])
    def test_public_entry_points_take_a_gpu_tuning(self, interpret, entry, monkeypatch):
        """gpu_tuning reaches the kernels from the public functions: with dq_atomic=1 the
        backward is the one-launch kernel (counted), and out, LSE and gradients still match
        the reference (the natural layout, and routed_attention's sorted one)."""
        from pallas_kernels import GpuTuning, block_sparse_attention, triton_backend
        launched = []
        real = triton_backend.dkv_dq_launch
        monkeypatch.setattr(triton_backend, "dkv_dq_launch",
                            lambda *a: launched.append(a[1]) or real(*a))
        rng = np.random.default_rng(23)
        seq, hq, hkv, d = 52, 4, 2, 16
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, d)), jnp.float32)
                   for h in (hq, hkv, hkv))
        ids = jnp.asarray(rng.integers(0, 3, (1, hq, seq)), jnp.int32)
        d_out = jnp.asarray(rng.standard_normal((1, seq, hq, d)), jnp.float32)
        kw = dict(window=4, sink_tokens=1)
        common = dict(**kw, backend="triton", interpret=interpret, block_q=16, block_k=16,
                      return_lse=True,
                      gpu_tuning=GpuTuning.for_dtype(jnp.float32, dq_atomic=1))
        if entry == "block_sparse_attention":
            attend = lambda q, k, v: block_sparse_attention(q, k, v, ids, ids, **common)  # noqa: E731,E501
        else:
            attend = lambda q, k, v: routed_attention(  # noqa: E731
                q, k, v, ids, layout="sorted", **common)
        _assert_fused_matches_reference(attend, q, k, v, ids, d_out, "float32", True, **kw)
        assert launched, "dq_atomic=1 did not reach the backward"

    @pytest.mark.parametrize("seq, hq, hkv, window, sink, dtype, grads", [
        (70, 4, 2, 4, 1, "float32", True), (50, 2, 1, 0, 0, "float32", False),
        (45, 3, 1, 0, 3, "float32", True), (61, 4, 1, 8, 2, "bfloat16", False)])
    def test_fused_sorted_forward(self, interpret, seq, hq, hkv, window, sink, dtype, grads):
        """The sorted layout's forward on the Triton kernels reads q, k and v through the
        order and merges inside the band kernel: outputs and LSE against the reference (GQA,
        lengths off the block, tree alone, sinks beyond the window) and, in two cases, the
        gradients (the backward runs on the fused forward's out and lse)."""
        rng = np.random.default_rng(seq * 7 + hq)
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, 16)), dtype)
                   for h in (hq, hkv, hkv))
        ids = jnp.asarray(rng.integers(0, 4, (1, hq, seq)), jnp.int32)
        d_out = jnp.asarray(rng.standard_normal((1, seq, hq, 16)), jnp.float32)
        kw = dict(window=window, sink_tokens=sink)
        fused = lambda q, k, v: routed_attention(  # noqa: E731
            q, k, v, ids, **kw, layout="sorted", backend="triton", interpret=interpret,
            block_q=16, block_k=16, return_lse=True)
        _assert_fused_matches_reference(fused, q, k, v, ids, d_out, dtype, grads, **kw)

    @pytest.mark.parametrize("tiles, dtype, split, atomic", [
        ((16, 16), "float32", 0, 0), ((64, 16), "bfloat16", 0, 1), ((16, 32), "float32", 0, 0),
        ((16, 16), "float32", 1, 1), ((64, 16), "bfloat16", 1, 0), ((32, 16), "float32", 1, 0)])
    def test_fused_forward_tree_tiles(self, interpret, tiles, dtype, split, atomic):
        """The fused forward's tree pass in blocks of its own (tree_tile_q x tree_tile_k, each
        cut to the largest power of two dividing the padded length 96: 64 -> 32), smaller or
        larger than the call's 32-blocks, while the backward keeps the call's schedule; the
        pairs split between the passes by cluster or by position (band_by_position); the
        backward's dq from its own kernel or added by the dk/dv kernel (dq_atomic). Outputs,
        LSE and gradients against the reference."""
        from pallas_kernels.config import GpuTuning
        from pallas_kernels.sorted_layout import sorted_attention
        from pallas_kernels.triton_backend import segment_forward_launch
        rng = np.random.default_rng(sum(tiles))
        seq, hq, hkv = 75, 4, 2
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, 16)), dtype)
                   for h in (hq, hkv, hkv))
        ids = jnp.asarray(rng.integers(0, 3, (1, hq, seq)), jnp.int32)
        d_out = jnp.asarray(rng.standard_normal((1, seq, hq, 16)), jnp.float32)
        cfg = make_config(q, k, window=6, sink_tokens=2, q_offset=0, scale=None,
                          backend="triton", interpret=interpret, block_q=32, block_k=32,
                          gpu_tuning=GpuTuning(tree_tile_q=tiles[0], tree_tile_k=tiles[1],
                                               tree_warps=4, tree_stages=1,
                                               band_by_position=split, dq_atomic=atomic))
        launch = segment_forward_launch(cfg, (1, 96, hq, 16), (1, 96, hkv, 16), dtype)
        bq, bk = (min(t, 32) for t in tiles)
        assert (launch.meta["BQ"], launch.meta["BK"]) == (bq, bk)
        assert launch.grid == (96 // bq * hq,)
        assert launch.meta["TAIL"] == min(-(-512 // hq), 96 // bq - 1)  # 512 programs last
        assert (launch.meta["WINDOW"], launch.meta["SINK"]) == ((6, 2) if split else (0, 0))
        fused = lambda q, k, v: sorted_attention(q, k, v, ids, cfg, "triton")  # noqa: E731
        _assert_fused_matches_reference(fused, q, k, v, ids, d_out, dtype, window=6,
                                        sink_tokens=2)

    @pytest.mark.parametrize("seq, sp, hq, hkv, clusters, tiles, dtype, window, sink, split", [
        (70, 80, 4, 2, 3, (16, 16), "float32", 0, 0, 0),   # long segments: unmasked blocks, padding
        (64, 64, 2, 1, 40, (16, 16), "float32", 0, 0, 0),  # many one-token segments, no padding
        (90, 96, 3, 3, 2, (32, 32), "float32", 0, 0, 0),   # two segments over several blocks each
        (93, 128, 2, 1, 3, (32, 16), "float32", 0, 0, 0),  # key blocks smaller than query blocks
        (93, 128, 2, 2, 4, (16, 32), "float32", 0, 0, 0),  # ... and larger
        (61, 64, 4, 1, 5, (16, 16), "bfloat16", 0, 0, 0),
        (100, 128, 4, 2, 2, (16, 16), "float32", 7, 1, 0),  # a window, the band's by cluster
        # band_by_position: less the band's pairs: a window, sinks, both, a window of whole
        # blocks, one segment, a window read 256 slots at a time
        (100, 128, 4, 2, 2, (16, 16), "float32", 7, 0, 1),
        (100, 128, 2, 1, 3, (32, 16), "float32", 0, 3, 1),
        (150, 160, 4, 2, 2, (32, 16), "float32", 9, 1, 1),
        (150, 160, 2, 2, 2, (16, 32), "float32", 32, 2, 1),
        (150, 160, 2, 1, 6, (16, 32), "float32", 8, 1, 1),  # segments end inside key blocks
        (120, 128, 4, 1, 4, (16, 16), "bfloat16", 20, 1, 1),
        (200, 208, 2, 1, 1, (16, 16), "float32", 40, 1, 1),
        (400, 400, 2, 1, 2, (32, 16), "float32", 300, 0, 1)])
    def test_tree_kernel_in_closed_form(self, interpret, seq, sp, hq, hkv, clusters, tiles,
                                        dtype, window, sink, split):
        """segment_fwd_kernel against float64 numpy: per head, a random permutation grouped
        into random segments; slot t attends to the slots from its segment's start to t, read
        through the order, written in token order (padding slots too, as their own segment);
        with band_by_position (split), less the band pass's pairs: keys within the window of
        the query, or sinks. Rows with no such key come out 0 with LSE -inf."""
        from pallas_kernels.config import GpuTuning
        from pallas_kernels.segment_schedule import segment_starts
        from pallas_kernels.sorted_layout import cluster_order
        from pallas_kernels.triton_backend import forward_segment
        rng = np.random.default_rng(seq * clusters + window)
        d = 16
        q, k, v = (rng.standard_normal((1, sp, h, d)) for h in (hq, hkv, hkv))
        ids = rng.integers(0, clusters, (1, hq, seq)) - (clusters - 1)
        order = np.argsort(ids, axis=-1, kind="stable")
        sorted_ids = np.take_along_axis(ids, order, axis=-1)
        got_order, got_sorted = cluster_order(jnp.asarray(ids, jnp.int32))
        np.testing.assert_array_equal(got_order, order)
        np.testing.assert_array_equal(got_sorted, sorted_ids)
        # float64: token x attends to the tokens of its cluster up to itself; the padding
        # positions (their rows too) are one more cluster
        every = np.concatenate([ids[0], np.full((hq, sp - seq), clusters)], axis=-1)[None]
        want_out, want_lse = float64_attention_over(
            q, k, v, every, lambda i, j, same: same and not (split and (i - j < window
                                                                       or j < sink)))
        want_out, want_lse = want_out[0], want_lse[0]
        none = np.isneginf(want_lse)
        assert none.any() == bool(split)  # the first tokens keep no tree key
        assert (~none).sum() >= sp // 4  # many rows do
        cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        assert np.abs(want_out).max() > 0.1
        # the order read in step with the keys or a block ahead; no block run last, three per
        # head, every block but one per head (the most the launch defers)
        for prefetch, tail in ((0, 0), (1, 2 * hq + 1), (1, 10 ** 6)):
            cfg = make_config(cast(q[:, :seq]), cast(k[:, :seq]), window=window,
                              sink_tokens=sink, q_offset=0, scale=None, backend="triton",
                              interpret=interpret, block_q=16, block_k=16,
                              gpu_tuning=GpuTuning(tree_tile_q=tiles[0], tree_tile_k=tiles[1],
                                                   tree_prefetch=prefetch, tree_tail=tail,
                                                   band_by_position=split))
            out, lse = forward_segment(cast(q), cast(k), cast(v), jnp.asarray(order, jnp.int32),
                                       segment_starts(jnp.asarray(sorted_ids)), cfg)
            out, lse = np.asarray(out, np.float32), np.asarray(lse)
            np.testing.assert_array_equal(np.isneginf(lse[0]), none)
            assert_close("out", out[0], want_out, TOL[dtype])  # padding rows too
            assert_close("lse", lse[0][~none], want_lse[~none], TOL[dtype])

    @pytest.mark.parametrize("seq, hq, hkv, window, sink, tiles, heads, dtype, partial", [
        (70, 4, 2, 5, 1, (16, 32), (1, 1), "float32", True),   # key tile over two query tiles
        (96, 2, 1, 0, 40, (32, 16), (2, 2), "float32", False),  # sinks alone, 3 sink tiles
        (64, 3, 3, 20, 3, (16, 16), (2, 1), "float32", True),  # no group to share: one head
        (50, 2, 1, 64, 2, (16, 16), (1, 1), "float32", False),  # a window past the sequence
        (70, 8, 2, 7, 1, (16, 16), (2, 2), "float32", True),   # two programs per kv group
        (70, 4, 2, 5, 0, (16, 16), (2, 2), "float32", False),  # padding rows past any key
        (61, 4, 1, 9, 2, (32, 32), (4, 4), "bfloat16", True),
        (61, 6, 2, 9, 2, (16, 32), (4, 1), "bfloat16", True),  # group 3: one head
        # the default's alignment: a window of whole key tiles (128 / 16 there), three tiles
        # per query tile, and a sink tile from query tile 2 on
        (100, 4, 2, 32, 1, (16, 16), (2, 2), "float32", True),
        (100, 4, 2, 32, 2, (16, 16), (2, 2), "float32", False)])
    @pytest.mark.parametrize("split", [0, 1])
    def test_band_kernel_in_closed_form(self, interpret, seq, hq, hkv, window, sink, tiles,
                                        heads, dtype, partial, split):
        """band_fwd_kernel against float64 numpy: the causal pairs with the key within the
        window or among the sinks, of other clusters or, with band_by_position (split), of
        every cluster; padded positions and GQA, started from a partial over the other
        same-cluster pairs (the result is then every allowed pair's) or from none (lse -inf:
        the band set alone; rows without a band key give 0 and -inf). heads: (band_heads
        asked, query heads per program: the largest power of two up to it dividing the
        group)."""
        from pallas_kernels.config import GpuTuning
        from pallas_kernels.triton_backend import band_forward_launch, forward_band
        rng = np.random.default_rng(seq + window)
        sp, d = -(-seq // 32) * 32, 16
        q, k, v = (rng.standard_normal((1, sp, h, d)) for h in (hq, hkv, hkv))
        ids = rng.integers(0, 3, (1, hq, sp))

        def in_band(i, j, same):  # causal already; the padding keys are in no set
            return j < seq and (i - j < window or j < sink) and (split or not same)

        init = float64_attention_over(q, k, v, ids, lambda i, j, same: (
            j < seq and same and not in_band(i, j, same))) if partial else (
            np.zeros((1, sp, hq, d)), np.full((1, hq, sp), -np.inf))
        want_out, want_lse = float64_attention_over(q, k, v, ids, lambda i, j, same: (
            in_band(i, j, same) or partial and j < seq and same))
        want_out, want_lse = want_out[0], want_lse[0]
        cast = lambda x: jnp.asarray(x, dtype)  # noqa: E731
        cfg = make_config(cast(q[:, :seq]), cast(k[:, :seq]), window=window, sink_tokens=sink,
                          q_offset=0, scale=None, backend="triton", interpret=interpret,
                          block_q=16, block_k=16,
                          gpu_tuning=GpuTuning(band_tile_q=tiles[0], band_tile_k=tiles[1],
                                               band_heads=heads[0], band_by_position=split))
        launch = band_forward_launch(cfg, q.shape, k.shape, dtype)
        bq = tiles[0] * heads[0] // heads[1]  # fewer heads per program: a longer query tile
        assert (launch.meta["BQ"], launch.meta["TK"], launch.meta["HB"]) == (bq, tiles[1],
                                                                             heads[1])
        assert launch.grid == (hq // heads[1], sp // bq)  # heads first
        assert np.abs(want_out).max() > 0.1  # a real comparison, not zeros
        none = np.isneginf(want_lse)  # padding rows too: they attend no padding key
        # without a partial and by cluster, some rows have no band key; by position a real
        # row has itself or a sink, and padding rows past every real key's window none
        assert none[:, :seq].any() == (not partial and not split)
        if split:
            assert none.any() == (not partial and sink == 0 and sp - seq >= window)
        for heads_first in (True, False):  # the grid's two orders
            out, lse = forward_band(cast(q), cast(k), cast(v), jnp.asarray(ids, jnp.int32), cfg,
                                    init=(cast(init[0]), jnp.asarray(init[1], jnp.float32)),
                                    heads_first=heads_first)
            out, lse = np.asarray(out[0], np.float32), np.asarray(lse[0])
            np.testing.assert_array_equal(np.isneginf(lse), none)
            assert_close("lse", lse[~none], want_lse[~none], TOL[dtype])
            assert_close("out", out, want_out, TOL[dtype])

    @pytest.mark.parametrize("slack, split", [(8, 0), (0, 0), (8, 1)])
    def test_forward_rescale_with_peaked_scores(self, interpret, slack, split):
        """The tree and band kernels' running max with a slack (GpuTuning.rescale_slack): scores
        of std ~9 make a row's max jump past the slack in the middle of its keys as well as
        stay within it. The sorted layout at head dim 64, where compiled bf16 kernels skip the
        rescale per thread (PACK > 0), and the block-sparse forward (which rescales every
        tile) on the same inputs; outputs and LSE against the float32 reference (the backward
        reads the LSE, not the running max; at these scores bf16 gradients are off the
        reference by the inputs' rounding alone)."""
        from pallas_kernels.config import GpuTuning
        from pallas_kernels.triton_backend import (band_forward_launch, forward_launch,
                                                   segment_forward_launch)
        rng = np.random.default_rng(41 + slack)
        seq, hq, hkv, d, dtype = 200, 4, 2, 64, "bfloat16"
        q, k, v = (jnp.asarray(rng.standard_normal((1, seq, h, d)) * (3.0 if h == hq or x
                                                                       else 1.0), dtype)
                   for x, h in ((0, hq), (1, hkv), (0, hkv)))
        ids = jnp.asarray(rng.integers(0, 3, (1, hq, seq)), jnp.int32)
        d_out = jnp.asarray(rng.standard_normal((1, seq, hq, d)), jnp.float32)
        kw = dict(window=8, sink_tokens=1)
        tuning = GpuTuning(rescale_slack=slack, band_by_position=split)
        cfg = make_config(q, k, **kw, q_offset=0, scale=None, backend="triton",
                          interpret=interpret, block_q=128, block_k=128, gpu_tuning=tuning)
        padded = ((1, 256, hq, d), (1, 256, hkv, d), dtype)
        lazy = slack > 0 and not interpret
        for make in (segment_forward_launch, band_forward_launch):
            meta = make(cfg, *padded).meta
            assert meta["SLACK"] == slack
            assert meta["PACK"] == (32 if lazy else 0), make.__name__  # 64 rows x 64 / 128
        assert forward_launch(cfg, *padded).meta | {"SLACK": 0, "PACK": 0} == \
            forward_launch(cfg, *padded).meta  # the block-sparse forward: every tile
        scores = np.einsum("qhd,khd->hqk", np.asarray(q[0], np.float32),
                           np.repeat(np.asarray(k[0], np.float32), 2, axis=1)) / np.sqrt(d)
        assert scores.std() > 6  # max jumps of more than 8 (base 2) along a row
        from pallas_kernels.ops import attention_with_schedule
        from pallas_kernels.sorted_layout import sorted_attention
        fused = lambda q, k, v: sorted_attention(q, k, v, ids, cfg, "triton")  # noqa: E731
        _assert_fused_matches_reference(fused, q, k, v, ids, d_out, dtype, False, **kw)
        sched = build_schedule(ids, ids, **kw, q_offset=0, block_q=128, block_k=128)
        block = lambda q, k, v: attention_with_schedule(  # noqa: E731
            q, k, v, ids, ids, sched, backend="triton", config=cfg)
        _assert_fused_matches_reference(block, q, k, v, ids, d_out, dtype, False, **kw)

    def test_fused_sorted_forward_builds_no_permuted_copy(self, interpret):
        """Without a backward, the sorted layout on the Triton kernels gathers no [B, S, H, D]
        array: the kernels read q, k and v through the order and write in token order."""
        q = jnp.ones((1, 40, 4, 16), jnp.float32)
        k = jnp.ones((1, 40, 2, 16), jnp.float32)
        ids = jnp.zeros((1, 4, 40), jnp.int32)

        def attend(q, k, v, backend):
            return routed_attention(q, k, v, ids, window=4, sink_tokens=1, layout="sorted",
                                    backend=backend, interpret=interpret, block_q=16,
                                    block_k=16)

        def rank4_gathers(backend):
            jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, backend))(q, k, k)
            return [e for e in _equations(jaxpr.jaxpr) if e.primitive.name == "gather"
                    and e.outvars[0].aval.ndim == 4]

        assert rank4_gathers("triton") == []
        assert len(rank4_gathers("gpu")) >= 4  # the staged layout: q, k, v and the output

    def test_auto_measures_both_kernels(self, interpret, tmp_path, monkeypatch):
        """backend="auto"'s measurement on the real kernels: each candidate (the Triton ones
        as they are and with dq_atomic) runs forward + backward, and the fastest is recorded
        with every time."""
        import functools

        from pallas_kernels import autoselect
        monkeypatch.setenv("PALLAS_KERNELS_CACHE_DIR", str(tmp_path))
        q = jax.ShapeDtypeStruct((1, 40, 2, 16), jnp.float32)
        k = jax.ShapeDtypeStruct((1, 40, 1, 16), jnp.float32)
        timer = functools.partial(autoselect.measure, interpret=interpret, reps=1)
        got = autoselect.choose(q, k, window=4, sink_tokens=1, block_q=16, block_k=16,
                                candidates=["gpu", "triton", "triton+dq_atomic"], timer=timer,
                                device_kind="test")
        (entry,) = json.loads((tmp_path / "backend_choice.json").read_text()).values()
        assert entry["errors"] == {}, entry
        assert sorted(entry["scores"]) == ["gpu", "triton", "triton+dq_atomic"]
        assert all(t > 0 for t in entry["scores"].values())
        assert got == entry["choice"] == min(entry["scores"], key=entry["scores"].get)

    def test_auto_inside_jit_matches_reference(self, interpret, tmp_path, monkeypatch):
        """backend="auto" on a GPU, called while jax.jit traces: the measurement runs (and is
        recorded), and the chosen kernels give the reference's output."""
        if interpret:
            pytest.skip("backend='auto' chooses between compiled kernels: GPU only")
        monkeypatch.setenv("PALLAS_KERNELS_CACHE_DIR", str(tmp_path))
        case = Case(3, 300, "interleaved", 16, 1, 4, 0, "bfloat16", "triton", kv_heads=2)
        q, k, v, qc, kc, _, _ = make_inputs(case, seed=8)
        kw = dict(window=16, sink_tokens=1)
        got = jax.jit(lambda q, k, v: block_sparse_attention(q, k, v, qc, kc, **kw))(q, k, v)
        (entry,) = json.loads((tmp_path / "backend_choice.json").read_text()).values()
        from pallas_kernels.autoselect import usable_candidates
        assert entry["errors"] == {}, entry  # every candidate measured, none failed
        assert sorted(entry["scores"]) == sorted(usable_candidates(q, block_q=128,
                                                                    block_k=128)), entry
        want = reference_attention(*(x.astype(jnp.float32) for x in (q, k, v)), qc, kc, **kw)
        assert_close("out", got, want, TOL["bfloat16"])


def _equations(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _equations(inner)


@pytest.mark.skipif(ON_GPU, reason="the error is for hosts without a GPU")
def test_compiled_kernels_without_gpu_say_why():
    q = jnp.ones((1, 16, 2, 16))
    ids = jnp.zeros((1, 2, 16), jnp.int32)
    with pytest.raises(RuntimeError, match="triton"):
        block_sparse_attention(q, q[:, :, :1], q[:, :, :1], ids, ids, window=2, sink_tokens=1,
                               backend="triton")


@pytest.mark.parametrize("what", ["band", "tree"])
def test_sorted_passes_refuse_unequal_lengths(what):
    from pallas_kernels.triton_backend import band_forward_launch, segment_forward_launch
    launch = band_forward_launch if what == "band" else segment_forward_launch
    q = jax.ShapeDtypeStruct((1, 64, 2, 16), jnp.float32)
    cfg = make_config(q, q, window=4, sink_tokens=1, q_offset=0, scale=None, backend="triton",
                      interpret=not ON_GPU, block_q=16, block_k=16)
    with pytest.raises(ValueError, match=rf"the {what} pass is self-attention over one padded "
                                         r"length: q \(1, 64, 2, 16\), k \(1, 48, 2, 16\)"):
        launch(cfg, q.shape, (1, 48, 2, 16), jnp.float32)


def test_band_tiles_divide_the_padded_length():
    """The band kernel's tiles: the largest power of two up to the tuning's that divides the
    padded length (a tile past it would read past the arrays), never below 16."""
    from pallas_kernels.triton_backend import _dividing_tile
    assert [_dividing_tile(64, sp) for sp in (128, 96, 80, 48)] == [64, 32, 16, 16]
    assert _dividing_tile(32, 1 << 17) == 32
    with pytest.raises(ValueError, match="no tile of 16 or more positions divides the padded "
                                         "length 40"):
        _dividing_tile(64, 40)


def test_blocks_below_sixteen_are_refused():
    q = jnp.ones((1, 16, 2, 16))
    ids = jnp.zeros((1, 2, 16), jnp.int32)
    with pytest.raises(ValueError, match="GPU block sizes must be >= 16"):
        block_sparse_attention(q, q[:, :, :1], q[:, :, :1], ids, ids, window=2, sink_tokens=1,
                               backend="triton", block_q=8, interpret=True)


# Compiles every kernel for a GPU target without a GPU (triton ships ptxas), in a process that
# imports triton compiled, and prints each kernel's shared memory.
_COMPILE = r"""
import json, os, sys
sys.path.insert(0, "experiments")
import kernel_sass
from pallas_kernels import triton_compact
from pallas_kernels.config import GpuTuning

cc, out = int(sys.argv[1]), sys.argv[2]
shared = {}
for name in kernel_sass.KERNELS:
    launch, kernel = kernel_sass.compile_kernel(name, cc, GpuTuning())
    assert kernel.asm["cubin"], launch.name
    shared[launch.name] = kernel.metadata.shared
    if launch.meta.get("PACK"):  # the lazy rescale: its machine code, for the test to read
        with open(os.path.join(out, launch.name + ".sass"), "w") as f:
            f.write(f"PACK {launch.meta['PACK']}\n"
                    + kernel_sass.disassemble(kernel.asm["cubin"]))
launch = triton_compact._launch(32 * 1024, 1024)
kernel = kernel_sass.compile_launch(launch, ["*i8"] * 3 + ["*i32"] * 3, cc)
shared[launch.name] = kernel.metadata.shared
launch = triton_compact._launch(32 * 1024, 1024, FROM_SIGNATURES=True, ROWS=1024, NQ=1024,
                                NK=1024, TRANSPOSED=False, Q_LEN=131072, KV_LEN=131072, BQ=128,
                                BK=128, Q_OFFSET=0, WINDOW=128, SINK=1, WORDS=4)
kernel = kernel_sass.compile_launch(launch, ["*i8"] + ["*i32"] * 5, cc)
shared[launch.name] = kernel.metadata.shared
print(json.dumps(shared))
"""


@pytest.mark.parametrize("cc, shared_limit", [(90, 227 * 1024), (80, 163 * 1024)])
def test_kernels_compile_for_nvidia_gpus(cc, shared_limit, tmp_path):
    """The Llama-shaped bf16 kernels at the default tuning build to cubin for Hopper (H100,
    H200) and Ampere (A100) and fit their shared memory (opt-in maximum per block): the
    interpreter runs the Python, not the compiler."""
    import subprocess
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["JAX_PLATFORMS"] = "cpu"  # compiles for a target: no device, none of this GPU's memory
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton_cache")  # a writable one on any host
    root = str(pathlib.Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(cc), str(tmp_path)], env=env,
                          cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shared = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(shared) == ["block_schedule_compact", "block_schedule_signature_lists",
                              "block_sparse_attention_dkv", "block_sparse_attention_dkv_dq",
                              "block_sparse_attention_dkv_sink", "block_sparse_attention_dq",
                              "block_sparse_attention_fwd", "routed_attention_band_fwd",
                              "routed_attention_fwd", "routed_attention_tree_fwd"]
    for name, used in shared.items():
        assert 0 < used <= shared_limit, (name, used, shared_limit)
    # The forward kernels' lazy rescale (triton_kernels._lazy_rescale_asm) tests two
    # accumulator elements per thread against 1.0 and skips the multiplies of all of them:
    # right only if those two carry every row the thread holds. In the machine code, every
    # skipped multiply must scale by one of the two tested registers.
    # Hopper only: Ampere's fragment spreads a program's rows otherwise.
    from experiment_script import load_experiment
    skipped_multiplies = load_experiment("kernel_sass").skipped_multiplies
    lazy = {p.stem: p.read_text() for p in tmp_path.glob("*.sass")}
    assert sorted(lazy) == (["routed_attention_band_fwd", "routed_attention_tree_fwd"]
                            if cc == 90 else [])
    for name, sass in lazy.items():
        pack = int(sass.split()[1])
        blocks = skipped_multiplies(sass)
        assert blocks, f"{name}: no branch over the rescale"
        for tested, factors, count in blocks:
            assert count == pack and len(tested) == 2 and factors <= tested, (
                name, tested, factors, count, pack)

