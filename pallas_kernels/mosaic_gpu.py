"""backend="mosaic": block-sparse flash attention for Hopper through Pallas' Mosaic GPU lowering.

The forward kernel is warp-specialised: one CTA owns one schedule query block, split between
two consumer warpgroups (block_q // 2 rows each, wgmma's 64-row granularity), and a producer
warpgroup that walks the block's schedule list and streams the listed key blocks (K, V and,
for the blocks that need the token mask, their cluster ids) into a ring of shared-memory slots
with the bulk tensor-copy engine (TMA). Both consumers read every slot, so one slot is freed
when both have arrived on its "consumed" barrier. An optional ping-pong barrier makes the two
consumers take turns on the tensor cores, so one's softmax overlaps the other's matmuls. With
MosaicTuning(persistent=True) a fixed number of CTAs (one per SM) loop over the query blocks:
the key ring runs on from one block to the next and the next block's queries load while the
current one computes. Meant to hide the per-block start-up that short schedule lists expose,
it measured 2-16% slower than one CTA per block on the H200 (BENCHMARKS.md), so it is off by
default.

Scores live in base 2 (exp2); the LSE leaves in natural log, as in the other backends. Inputs
arrive padded to whole blocks (ops.py) in the [B, S, heads, D] layout; the head dim is padded
here to a multiple of 64 (the swizzled tile of a 2-byte wgmma operand). 2-byte dtypes only.

The backward (dq, dk, dv) runs on the same schedule: by default the Triton kernels
(triton_backend.py) where jax_triton is installed, else the Pallas kernels of gpu.py;
MosaicTuning(backward="mosaic") takes the warp-specialised kernels of mosaic_gpu_bwd.py.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gpu as pallas_gpu
from pallas_kernels.common import NT, dot, pad_axis
from pallas_kernels.config import AttentionConfig, MosaicTuning
from pallas_kernels.masking import LOG2E, allowed_pairs

ROWS = 64  # one warpgroup's wgmma tile height
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per block, opt-in maximum


def unavailable(cfg: AttentionConfig, dtype) -> str | None:
    """Why backend="mosaic" cannot run this call; None when it can."""
    if jnp.dtype(dtype).itemsize != 2:
        return (f"backend='mosaic' runs 2-byte inputs (bfloat16, float16) on wgmma; got "
                f"{jnp.dtype(dtype).name} (backend='gpu' or 'triton' run float32)")
    if cfg.block_q % (2 * ROWS) or cfg.block_k % ROWS:
        return (f"backend='mosaic' needs block_q a multiple of {2 * ROWS} (two warpgroups of "
                f"{ROWS} rows) and block_k a multiple of {ROWS}; got block_q={cfg.block_q}, "
                f"block_k={cfg.block_k}")
    if not cfg.interpret:
        if jax.default_backend() != "gpu":
            return (f"backend='mosaic' compiles for a Hopper GPU, but jax's default backend is "
                    f"{jax.default_backend()!r} (interpret=True runs the kernel in Pallas' GPU "
                    "interpreter on the CPU)")
        kind = jax.devices()[0].device_kind
        capability = getattr(jax.devices()[0], "compute_capability", "")
        if capability and not str(capability).startswith("9"):
            return (f"backend='mosaic' needs a Hopper GPU (compute capability 9.x, wgmma); "
                    f"{kind} has {capability}")
    return None


def interpret_params():
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


class WarpgroupOps:
    """The kernel's register-level operations. Compiled, they carry wgmma and its register
    layouts. Pallas' GPU interpreter (jax's CPU stand-in for this lowering) has no rules for
    layout hints, transposed operands, register operands of wgmma or run_state, so under
    interpret=True the same program runs them as plain jnp: the barriers, the TMA copies, the
    schedule walk, the masks and the softmax are what the interpreter then checks."""

    def __init__(self, interpret: bool):
        self.interpret = interpret

    def load(self, ref, layout):
        return ref[...] if self.interpret else plgpu.load(ref, (), layout=layout)

    def iota(self, shape, dim):
        if self.interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def cast(self, x, layout):
        return x if self.interpret else plgpu.layout_cast(x, layout)

    def scores(self, q_smem, k_smem, on_issue=None):
        """q @ k.T in float32; on_issue runs once the matmul is issued, before its wait."""
        on_issue = on_issue or (lambda: None)
        if self.interpret:
            on_issue()
            return dot(q_smem[...], k_smem[...], NT)

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem, (1, 0)))
            on_issue()
            return acc_ref[...]
        return pl.run_scoped(qk, plgpu.ACC((q_smem.shape[0], k_smem.shape[0]), jnp.float32))

    def accumulate(self, acc, p, v_smem):
        """acc + p @ v, in place on the tensor cores."""
        if self.interpret:
            return acc + dot(p, v_smem[...])

        def into(acc_ref):
            plgpu.wgmma(acc_ref, p, v_smem)
        return pl.run_state(into)(plgpu.ACC.init(acc))


def ring_depth(cfg: AttentionConfig, fixed: int, per_stage: int, wanted: int) -> int:
    """The largest ring depth <= wanted whose slots (per_stage bytes each) fit shared memory
    beside fixed bytes; a clear error when not even one does."""
    fits = (SMEM_BYTES - fixed - 4096) // per_stage
    if fits < 1:
        raise ValueError(f"backend='mosaic': blocks {cfg.block_q} x {cfg.block_k} with this head "
                         f"dim need {fixed + per_stage} bytes of shared memory, more than the "
                         f"{SMEM_BYTES} a Hopper block has; use smaller blocks")
    return int(min(wanted, fits))


def free_slot(g, stages, *free):
    """Before the ring's step g refills its slot, wait until both consumers released the slot's
    previous contents."""
    @pl.when(g >= stages)
    def _():
        for barrier in free:
            plgpu.barrier_wait(barrier.at[lax.rem(g, stages)])


def drain(total, stages, *free):
    """Observe the releases of the ring's last slots too: every barrier phase is waited on."""
    def body(g, carry):
        for barrier in free:
            plgpu.barrier_wait(barrier.at[lax.rem(g, stages)])
        return carry
    lax.fori_loop(jnp.maximum(total - stages, 0), total, body, None)


def stream_keys(refs, ring, *, b, h, i, kvh, n_masked, n_total, base, stages, block_k):
    """The producer's walk over one query block's key list: K, V and (masked blocks only) the
    key cluster ids into the ring's slots, from the ring's step base on.
    refs = (k_ref, v_ref, kc_ref, idx_ref); ring = (k_smem, v_smem, kc_smem, k_bar, v_bar,
    kc_bar, k_free, v_free)."""
    k_ref, v_ref, kc_ref, idx_ref = refs
    k_smem, v_smem, kc_smem, k_bar, v_bar, kc_bar, k_free, v_free = ring

    def fetch(t, carry):
        g = base + t
        slot = lax.rem(g, stages)
        j = idx_ref[b, h, i, t]
        keys = (b, pl.ds(j * block_k, block_k), kvh)
        free_slot(g, stages, k_free)
        plgpu.copy_gmem_to_smem(k_ref.at[keys], k_smem.at[slot], k_bar.at[slot])

        @pl.when(t < n_masked)
        def _():
            plgpu.copy_gmem_to_smem(kc_ref.at[b, h, pl.ds(j * block_k, block_k)],
                                    kc_smem.at[slot], kc_bar.at[slot])

        free_slot(g, stages, v_free)
        plgpu.copy_gmem_to_smem(v_ref.at[keys], v_smem.at[slot], v_bar.at[slot])
        return carry

    lax.fori_loop(0, n_total, fetch, None)
    return base + n_total


def mask_rows(ops, cfg: AttentionConfig, s, kc_slot, kc_bar_slot, q_pos, q_ids, k_start):
    """Scores [64, block_k] of query rows against the key block starting at k_start, with -inf
    where the token mask forbids the pair (the key ids wait on their own barrier)."""
    plgpu.barrier_wait(kc_bar_slot)
    k_ids = lax.broadcast_in_dim(ops.load(kc_slot, plgpu.Layout.WGMMA.reduce(0)), s.shape, [1])
    ok = allowed_pairs(q_pos, k_start + ops.iota(s.shape, 1), q_ids, k_ids, window=cfg.window,
                       sink_tokens=cfg.sink_tokens, kv_len=cfg.kv_len,
                       exclude_same_cluster=cfg.exclude_same_cluster)
    return jnp.where(ok, s, -jnp.inf)


def _fwd_kernel(q_ref, k_ref, v_ref, qc_ref, kc_ref, idx_ref, cnt_ref, o_ref, lse_ref,
                q_smem, qc_smem, lse_smem, k_smem, v_smem, kc_smem,
                q_bar, qc_bar, k_bar, v_bar, kc_bar, k_free, v_free, turn, *,
                cfg: AttentionConfig, group: int, stages: int, pingpong: bool, heads: int,
                batch: int, ctas: int):
    """Each CTA runs the query blocks ("tiles") cta, cta + ctas, ...: one tile each when ctas is
    the number of tiles; with fewer CTAs (a persistent grid) the key ring runs on across a
    CTA's tiles and the next tile's queries load into a second buffer while the current one
    computes. Tiles are ordered longest rows (last query blocks) first."""
    bq, bk, nq = cfg.block_q, cfg.block_k, cfg.num_q_blocks
    cta, wg = lax.axis_index("ctas"), lax.axis_index("wg")
    my_tiles = (nq * heads * batch - cta + ctas - 1) // ctas
    bufs = q_smem.shape[0]  # query buffers: 2 when a CTA runs several tiles
    dtype = q_ref.dtype
    lay = WarpgroupOps(cfg.interpret)
    row_vec = plgpu.Layout.WGMMA.reduce(1)

    def coords(n):
        """(batch, head, query block, masked count, listed count) of this CTA's n-th tile."""
        u = cta + n * ctas
        i = nq - 1 - u // (heads * batch)
        b, h = (u // heads) % batch, u % heads
        return b, h, i, cnt_ref[b, h, i, 0], cnt_ref[b, h, i, 1]

    def take_turn():  # the ping-pong: the two consumers alternate on the tensor cores
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    @pl.when(wg < 2)
    def _consumer():
        plgpu.set_max_registers(232, action="increase")
        shape = (ROWS, bk)
        c = cfg.scale * LOG2E

        def load_queries(n, buf):
            b, h, i, _, _ = coords(n)
            row0 = i * bq + wg * ROWS
            at = buf * 2 + wg
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(row0, ROWS), h], q_smem.at[buf, wg],
                                    q_bar.at[at])
            plgpu.copy_gmem_to_smem(qc_ref.at[b, h, pl.ds(row0, ROWS)], qc_smem.at[buf, wg],
                                    qc_bar.at[at])

        def tile(n, base):
            b, h, i, n_masked, n_total = coords(n)
            buf = lax.rem(n, bufs)
            # the buffer the next queries go to was last read by an earlier tile's output copy
            nxt = n + 1 if bufs == 2 else n

            @pl.when((nxt < my_tiles) & (nxt > 0))
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                load_queries(nxt, lax.rem(nxt, bufs))

            plgpu.barrier_wait(q_bar.at[buf * 2 + wg])
            plgpu.barrier_wait(qc_bar.at[buf * 2 + wg])
            q_tile = q_smem.at[buf, wg]
            row0 = i * bq + wg * ROWS
            q_ids = lax.broadcast_in_dim(lay.load(qc_smem.at[buf, wg], row_vec), shape, [0])
            q_pos = cfg.q_offset + row0 + lay.iota(shape, 0)

            def step(t, carry, masked):
                acc, m, l = carry
                slot = lax.rem(base + t, stages)
                plgpu.barrier_wait(k_bar.at[slot])
                s = lay.scores(q_tile, k_smem.at[slot], take_turn) * c
                if masked:
                    s = mask_rows(lay, cfg, s, kc_smem.at[slot], kc_bar.at[slot], q_pos, q_ids,
                                  idx_ref[b, h, i, t] * bk)
                plgpu.barrier_arrive(k_free.at[slot])
                m_new = jnp.maximum(m, s.max(axis=1))
                # a row that has seen only masked keys keeps m = -inf: shift by 0 (no NaN)
                m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new) if masked else m_new
                alpha = jnp.exp2(m - m_use)
                p = jnp.exp2(s - lax.broadcast_in_dim(m_use, shape, [0]))
                l = l * alpha + p.sum(axis=1)
                acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
                p16 = p.astype(dtype)
                if pingpong:
                    plgpu.barrier_arrive(turn)
                plgpu.barrier_wait(v_bar.at[slot])
                if pingpong:
                    plgpu.barrier_wait(turn)
                acc = lay.accumulate(acc, p16, v_smem.at[slot])
                plgpu.barrier_arrive(v_free.at[slot])
                return acc, m_new, l

            carry = (lay.cast(jnp.zeros((ROWS, q_smem.shape[-1]), jnp.float32),
                              plgpu.Layout.WGMMA),
                     lay.cast(jnp.full((ROWS,), -jnp.inf, jnp.float32), row_vec),
                     lay.cast(jnp.zeros((ROWS,), jnp.float32), row_vec))
            carry = lax.fori_loop(0, n_masked, functools.partial(step, masked=True), carry)
            acc, m, l = lax.fori_loop(n_masked, n_total, functools.partial(step, masked=False),
                                      carry)
            empty = l == 0.0  # no allowed key: output 0, LSE -inf
            l_safe = jnp.where(empty, 1.0, l)
            acc = acc / lax.broadcast_in_dim(l_safe, acc.shape, [0])
            plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's lse copy
            q_tile[...] = acc.astype(dtype)  # the output leaves through its queries' buffer
            lse_smem.at[wg][...] = jnp.where(empty, -jnp.inf, (m + jnp.log2(l_safe)) / LOG2E)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(q_tile, o_ref.at[b, pl.ds(row0, ROWS), h])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_ref.at[b, h, pl.ds(row0, ROWS)])
            return base + n_total

        load_queries(0, 0)
        if pingpong:
            pl.when(wg == 1)(take_turn)
        lax.fori_loop(0, my_tiles, tile, jnp.int32(0))
        if pingpong:
            pl.when(wg == 0)(take_turn)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == 2)
    def _producer():
        plgpu.set_max_registers(40, action="decrease")

        def tile(n, base):
            b, h, i, n_masked, n_total = coords(n)
            return stream_keys((k_ref, v_ref, kc_ref, idx_ref),
                               (k_smem, v_smem, kc_smem, k_bar, v_bar, kc_bar, k_free, v_free),
                               b=b, h=h, i=i, kvh=lax.div(h, group), n_masked=n_masked,
                               n_total=n_total, base=base, stages=stages, block_k=bk)

        drain(lax.fori_loop(0, my_tiles, tile, jnp.int32(0)), stages, k_free, v_free)


def _ctas(tuning: MosaicTuning, tiles: int, interpret: bool) -> int:
    """CTAs of the launch: one per tile, or the persistent grid's count."""
    if not tuning.persistent:
        return tiles
    if tuning.ctas:
        return min(tuning.ctas, tiles)
    sms = 2 if interpret else getattr(jax.devices()[0], "core_count", 0) or 132
    return min(sms, tiles)


def forward(q, k, v, qc, kc, sched, cfg: AttentionConfig, tuning: MosaicTuning | None = None):
    """out [B, Sqp, Hq, D] (q.dtype), lse [B, Hq, Sqp] float32 (natural log); tuning defaults
    to cfg.mosaic."""
    tuning = tuning or cfg.mosaic
    reason = unavailable(cfg, q.dtype)
    if reason:
        raise ValueError(reason)
    d = q.shape[-1]
    dp = -(-d // ROWS) * ROWS
    q, k, v = (pad_axis(x, dp, axis=-1) for x in (q, k, v))
    batch, sqp, hq, _ = q.shape
    hkv = k.shape[2]
    bk = cfg.block_k
    tiles = batch * hq * cfg.num_q_blocks
    ctas = _ctas(tuning, tiles, cfg.interpret)
    bufs = 1 if ctas == tiles else 2
    item = q.dtype.itemsize
    stages = ring_depth(cfg, bufs * cfg.block_q * (dp * item + 4) + cfg.block_q * 4,
                        2 * bk * dp * item + bk * 4, tuning.stages)  # queries | K, V, key ids
    counts = jnp.stack([sched.kv_num_masked, sched.kv_num_blocks], axis=-1)
    swizzled = (plgpu.TilingTransform((8, ROWS)), plgpu.SwizzleTransform(128))
    tile = functools.partial(plgpu.SMEM, dtype=q.dtype, transforms=swizzled)
    scratch = [
        tile((bufs, 2, ROWS, dp)),                        # queries, then the output
        plgpu.SMEM((bufs, 2, ROWS), jnp.int32),           # query cluster ids
        plgpu.SMEM((2, ROWS), jnp.float32),               # lse
        tile((stages, bk, dp)),                            # key ring
        tile((stages, bk, dp)),                            # value ring
        plgpu.SMEM((stages, bk), jnp.int32),               # key cluster ids
        plgpu.Barrier(num_barriers=2 * bufs), plgpu.Barrier(num_barriers=2 * bufs),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),
        plgpu.Barrier(num_arrivals=2),
    ]
    kernel = functools.partial(_fwd_kernel, cfg=cfg, group=hq // hkv, stages=stages,
                               pingpong=tuning.pingpong, heads=hq, batch=batch, ctas=ctas)
    out, lse = plgpu.kernel(
        kernel,
        out_type=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                  jax.ShapeDtypeStruct((batch, hq, sqp), jnp.float32)],
        scratch_types=scratch,
        grid=(ctas,),
        grid_names=("ctas",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret_params() if cfg.interpret else None,
    )(q, k, v, qc, kc, sched.kv_indices, counts)
    return out[..., :d], lse


def backward(q, k, v, do, lse, delta, qc, kc, sched, cfg: AttentionConfig):
    """dq, dk, dv on the same schedule, by cfg.mosaic.backward: "mosaic" (mosaic_gpu_bwd.py),
    "pallas" (gpu.py) or "triton" (triton_backend.py through jax_triton where it runs compiled,
    else the Pallas kernels; under interpret=True the Pallas kernels run in Pallas' interpreter,
    since triton's interpreter needs its own process setup)."""
    choice = cfg.mosaic.backward
    if choice == "mosaic":
        from pallas_kernels import mosaic_gpu_bwd
        return mosaic_gpu_bwd.backward(q, k, v, do, lse, delta, qc, kc, sched, cfg)
    if choice == "triton" and not cfg.interpret:
        from pallas_kernels import triton_backend
        if triton_backend.unavailable(False) is None:
            return triton_backend.backward(q, k, v, do, lse, delta, qc, kc, sched, cfg)
    return pallas_gpu.backward(q, k, v, do, lse, delta, qc, kc, sched, cfg)
