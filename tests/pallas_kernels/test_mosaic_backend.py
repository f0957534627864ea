"""backend="mosaic" (mosaic_gpu.py) against the dense float32 reference.

One test class, two runners: "interpreter" runs the warp-specialised kernel in Pallas' GPU
interpreter on the CPU (its barriers, TMA copies and schedule walk, with the matmuls as jnp
dots), "compiled" lowers it through Mosaic GPU on a Hopper GPU. Each host runs the runner it
can and skips the other, saying why.
"""
from __future__ import annotations

import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import Case, assert_close, assert_matches_reference, make_inputs
from test_kernels import outputs_and_grads, poison_device_memory

from pallas_kernels import block_sparse_attention, build_schedule, reference_attention
from pallas_kernels.config import MosaicTuning
from pallas_kernels.mosaic_gpu import forward
from pallas_kernels.ops import make_config

ON_GPU = jax.default_backend() == "gpu"
RUNNERS = {"interpreter": True, "compiled": False}  # runner -> interpret flag
TOL = {"bfloat16": 2e-2, "float16": 4e-3}


@pytest.fixture(params=list(RUNNERS))
def interpret(request):
    if request.param == "interpreter" and ON_GPU:
        pytest.skip("interpreter runner: runs on hosts without a GPU (on a GPU host the "
                    "compiled runner checks the same cases)")
    if request.param == "compiled":
        if not ON_GPU:
            pytest.skip(f"compiled runner: no GPU here (jax's default backend is "
                        f"{jax.default_backend()!r}); it runs on a Hopper host")
        capability = str(getattr(jax.devices()[0], "compute_capability", ""))
        if not capability.startswith("9"):
            pytest.skip(f"compiled runner: wgmma needs a Hopper GPU, this one has {capability}")
    return RUNNERS[request.param]


# Random routes (i.i.d. ids per token) and contiguous clusters; GQA 1-3; lengths off the block;
# q_offset; head dims 64 and 24 (padded to 64); batch and kv heads > 1; rows without any key
# (window 0, no sink, many clusters); a single cluster at full density with a huge window.
CASES = [
    Case(5, 200, "interleaved", 5, 1, 3, 0, "bfloat16", "mosaic", head_dim=64,
         block_q=128, block_k=64),
    Case(3, 150, "contiguous", 5, 4, 1, 37, "float16", "mosaic", kv_heads=2, head_dim=24,
         block_q=128, block_k=128),
    Case(1, 200, "interleaved", 5000, 4, 1, 0, "bfloat16", "mosaic", batch=2, head_dim=64,
         block_q=128, block_k=64),
    Case(64, 130, "interleaved", 0, 0, 2, 11, "bfloat16", "mosaic", head_dim=64,
         block_q=128, block_k=64),
]


def _check(interpret, case, tuning=None):
    """Outputs, LSE and the gradients of <out, d_out> + <lse, d_lse> against the reference."""
    q, k, v, qc, kc, d_out, d_lse = make_inputs(case, zlib.crc32(str(case).encode()))
    mask = dict(window=case.window, sink_tokens=case.sink, q_offset=case.q_offset)
    poison_device_memory()

    def attention(q, k, v, qc, kc, **kwargs):
        return block_sparse_attention(q, k, v, qc, kc, backend="mosaic", interpret=interpret,
                                      block_q=case.block_q, block_k=case.block_k, **kwargs)

    got = outputs_and_grads(attention, q, k, v, qc, kc, d_out, d_lse, **mask)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = outputs_and_grads(reference_attention, *f32[:3], qc, kc, f32[3], d_lse, **mask)
    return assert_matches_reference(got, want, (q, k, v), TOL[case.dtype])


class TestMosaicBackend:
    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_matches_reference(self, interpret, case):
        empty = _check(interpret, case)
        if case.window == 0 and case.sink == 0:
            assert empty.any(), "the case must hold rows without any allowed key"

    @pytest.mark.parametrize("tuning", [
        MosaicTuning(stages=1, pingpong=False),
        MosaicTuning(stages=3, pingpong=True),
        MosaicTuning(stages=1, pingpong=True, persistent=True, ctas=1),
        MosaicTuning(stages=2, pingpong=False, persistent=True, ctas=3)], ids=str)
    def test_ring_depth_pingpong_and_persistent_grid(self, interpret, tuning):
        """The forward alone equals the reference with a one-slot ring (every fetch waits for
        both consumers), three slots and the ping-pong barrier, and on a persistent grid: one
        CTA running all four query blocks (the ring and the query buffers carried from tile to
        tile), or three CTAs with uneven shares."""
        case = Case(4, 200, "interleaved", 5, 1, 2, 0, "bfloat16", "mosaic", head_dim=64,
                    block_q=128, block_k=64)
        q, k, v, qc, kc, *_ = make_inputs(case, seed=7)
        mask = dict(window=case.window, sink_tokens=case.sink, q_offset=case.q_offset)
        cfg = make_config(q, k, **mask, scale=None, backend="mosaic", interpret=interpret,
                          block_q=case.block_q, block_k=case.block_k)
        sched = build_schedule(qc, kc, **mask, block_q=cfg.block_q, block_k=cfg.block_k)
        sq = cfg.num_q_blocks * cfg.block_q
        pad = ((0, 0), (0, sq - case.seq), (0, 0), (0, 0))
        out, lse = forward(jnp.pad(q, pad), jnp.pad(k, pad), jnp.pad(v, pad),
                           jnp.pad(qc, ((0, 0), (0, 0), (0, sq - case.seq))),
                           jnp.pad(kc, ((0, 0), (0, 0), (0, sq - case.seq))), sched, cfg,
                           tuning)
        f32 = [x.astype(jnp.float32) for x in (q, k, v)]
        ref_out, ref_lse = reference_attention(*f32, qc, kc, return_lse=True, **mask)
        assert_close("out", out[:, :case.seq], ref_out, TOL[case.dtype])
        assert_close("lse", lse[..., :case.seq], ref_lse, TOL[case.dtype])


def test_float32_is_refused_with_the_reason():
    case = dataclasses.replace(CASES[0], dtype="float32")
    q, k, v, qc, kc, *_ = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match="2-byte inputs.*float32"):
        block_sparse_attention(q, k, v, qc, kc, window=4, sink_tokens=1, backend="mosaic",
                               interpret=True, block_q=128, block_k=64)


@pytest.mark.parametrize("block_q, block_k", [(64, 64), (128, 32)])
def test_blocks_off_the_wgmma_tiles_are_refused(block_q, block_k):
    q, k, v, qc, kc, *_ = make_inputs(CASES[0], seed=0)
    with pytest.raises(ValueError, match="block_q a multiple of 128"):
        block_sparse_attention(q, k, v, qc, kc, window=4, sink_tokens=1, backend="mosaic",
                               interpret=True, block_q=block_q, block_k=block_k)


def test_head_dim_beyond_shared_memory_is_refused():
    """128 x 128 blocks of head dim 512 need 132 KiB of queries and 257 KiB per ring slot."""
    case = dataclasses.replace(CASES[0], head_dim=512, block_k=128)
    q, k, v, qc, kc, *_ = make_inputs(case, seed=0)
    with pytest.raises(ValueError, match="more than the 232448 a Hopper block has; use smaller"):
        block_sparse_attention(q, k, v, qc, kc, window=4, sink_tokens=1, backend="mosaic",
                               interpret=True, block_q=128, block_k=128)


def test_compiled_without_a_gpu_says_so():
    if ON_GPU:
        pytest.skip("this host has a GPU")
    q, k, v, qc, kc, *_ = make_inputs(CASES[0], seed=0)
    with pytest.raises(ValueError, match="compiles for a Hopper GPU.*interpret=True"):
        block_sparse_attention(q, k, v, qc, kc, window=4, sink_tokens=1, backend="mosaic",
                               block_q=128, block_k=64)


def test_tuning_rejects_a_ring_without_slots_or_a_grid_without_ctas():
    with pytest.raises(ValueError, match="stages must be an int >= 1"):
        MosaicTuning(stages=0)
    with pytest.raises(ValueError, match="ctas must be an int >= 1"):
        MosaicTuning(persistent=True, ctas=0)
    with pytest.raises(ValueError, match="backward must be 'triton', 'pallas' or 'mosaic'"):
        MosaicTuning(backward="cudnn")



def test_sorted_layout_through_mosaic(interpret):
    """routed_attention's sorted layout on scattered routes: its tree pass and its band pass
    (the local pairs of other clusters, exclude_same_cluster) on the Mosaic forward, against
    the reference, with gradients."""
    from pallas_kernels import routed_attention
    rng = np.random.default_rng(5)
    seq, heads, kv_heads, dim = 200, 2, 1, 64
    q, k, v, d_out = (jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)
                      for shape in ((1, seq, heads, dim), (1, seq, kv_heads, dim),
                                    (1, seq, kv_heads, dim), (1, seq, heads, dim)))
    d_lse = jnp.asarray(rng.standard_normal((1, heads, seq)), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 6, size=(1, heads, seq)), jnp.int32)
    mask = dict(window=9, sink_tokens=1)

    def routed(q, k, v, qc, kc, **kwargs):
        return routed_attention(q, k, v, qc, layout="sorted", backend="mosaic",
                                interpret=interpret, block_q=128, block_k=64, **kwargs)

    got = outputs_and_grads(routed, q, k, v, ids, ids, d_out, d_lse, **mask)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = outputs_and_grads(reference_attention, *f32[:3], ids, ids, f32[3], d_lse, **mask)
    assert_matches_reference(got, want, (q, k, v), TOL["bfloat16"])


def test_backward_takes_triton_where_it_runs(monkeypatch):
    """Compiled, the backward is Triton's where jax_triton can run, else Pallas'; interpreted
    it is always Pallas' (the Triton interpreter needs its own process setup)."""
    from pallas_kernels import gpu as pallas_gpu
    from pallas_kernels import mosaic_gpu, triton_backend
    monkeypatch.setattr(triton_backend, "backward", lambda *a: "triton")
    monkeypatch.setattr(pallas_gpu, "backward", lambda *a: "pallas")
    cfg = make_config(jnp.zeros((1, 128, 1, 64), jnp.bfloat16),
                      jnp.zeros((1, 128, 1, 64), jnp.bfloat16), window=4, sink_tokens=1,
                      q_offset=0, scale=None, backend="gpu", interpret=False, block_q=128,
                      block_k=64)
    args = (None,) * 9
    monkeypatch.setattr(triton_backend, "unavailable", lambda interpret: None)
    assert mosaic_gpu.backward(*args, cfg) == "triton"
    assert mosaic_gpu.backward(*args, dataclasses.replace(cfg, interpret=True)) == "pallas"
    monkeypatch.setattr(triton_backend, "unavailable", lambda interpret: "no jax_triton")
    assert mosaic_gpu.backward(*args, cfg) == "pallas"


# The Mosaic backward (mosaic_gpu_bwd.py): 128 x 128 blocks; GQA walks the group in the dk/dv
# kernel; lengths off the block and q_offset; rows without keys.
BACKWARD_CASES = [
    Case(4, 200, "interleaved", 9, 1, 2, 0, "bfloat16", "mosaic", head_dim=64, block_q=128,
         block_k=128),
    Case(64, 150, "interleaved", 0, 0, 1, 37, "float16", "mosaic", kv_heads=2, head_dim=24,
         block_q=128, block_k=128),
]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_mosaic_backward_matches_reference(interpret, case):
    """Outputs and gradients with MosaicTuning(backward="mosaic"): the dq and dk/dv kernels
    of mosaic_gpu_bwd.py on the schedule's lists."""
    from pallas_kernels import attention_with_schedule
    q, k, v, qc, kc, d_out, d_lse = make_inputs(case, zlib.crc32(str(case).encode()))
    mask = dict(window=case.window, sink_tokens=case.sink, q_offset=case.q_offset)
    cfg = make_config(q, k, **mask, scale=None, backend="mosaic", interpret=interpret,
                      block_q=case.block_q, block_k=case.block_k,
                      mosaic_tuning=MosaicTuning(backward="mosaic"))
    sched = build_schedule(qc, kc, **mask, block_q=cfg.block_q, block_k=cfg.block_k)
    poison_device_memory()

    def attention(q, k, v, qc, kc, return_lse, **kwargs):
        return attention_with_schedule(q, k, v, qc, kc, sched, backend="mosaic", config=cfg)

    got = outputs_and_grads(attention, q, k, v, qc, kc, d_out, d_lse)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    want = outputs_and_grads(reference_attention, *f32[:3], qc, kc, f32[3], d_lse, **mask)
    empty = assert_matches_reference(got, want, (q, k, v), TOL[case.dtype])
    assert empty.any() == (case.window == 0)


def test_mosaic_backward_refuses_other_blocks():
    q, k, v, qc, kc, *_ = make_inputs(CASES[0], seed=0)
    with pytest.raises(ValueError, match="Mosaic GPU backward runs 128 x 128 blocks"):
        make_config(q, k, window=4, sink_tokens=1, q_offset=0, scale=None, backend="mosaic",
                    interpret=True, block_q=128, block_k=64,
                    mosaic_tuning=MosaicTuning(backward="mosaic"))
